"""Keys fit Redis Cluster: every transaction of the data plane stays in one hash slot (issue 18).

A real dispatcher, push and pull pool (real ZMQ, real redis-server) store a recorded run and a
synthetic one, the dispatcher writes the runs' accounting at their end, and CMOS and base-current
workers process a simulated ORCA stream; meanwhile ``MONITOR`` records every transaction the
server runs, from every process (:mod:`minard.testing.monitor`).  Redis names the keys of each
command (``COMMAND GETKEYS``) and the slot is the Cluster's CRC16 of the hash tag.
docs/storage.md ("Redis Cluster") describes the tags.
"""

from __future__ import annotations

import fnmatch
import time

from redis.crc import key_slot

from minard.pipeline.orca_base import BaseHandler
from minard.pipeline.orca_cmos import CmosHandler
from minard.simulate.orca import OrcaSimulator
from minard.store import schema
from minard.store.runs import get_run
from minard.testing import wait_for
from minard.testing.monitor import TransactionRecorder
from tests.pipeline.test_dispatch_stream import file_totals, make_stack, synthetic  # noqa: F401 - a fixture
from tests.pipeline.test_orca_stream import BASE_ID, CMOS_ID, _frames, _sim_records


def test_hash_tags_put_what_is_written_together_in_one_slot():
    crate = {key_slot(schema.ORCA_CMOS_STATE.key(crate=c).encode()) for c in (0, 3, 18)}
    assert crate == {key_slot(schema.ORCA_LATEST.key(stream="cmos").encode())} == {key_slot(b"{cmos}")}
    bucket = {key_slot(schema.SCALAR.key(step=10, bucket=179, group=g).encode()) for g in ("trig", "occ", "nhit")}
    bucket |= {key_slot(schema.CHANNEL.key(step=10, bucket=179, name=n).encode()) for n in ("hits", "cmos:sum")}
    assert bucket == {key_slot(b"{10:179}")}
    run = {key_slot(schema.RUN.key(run=3510).encode())}
    run |= {key_slot(schema.RUN_PART.key(run=3510, part=p).encode()) for p in ("nhit", "channels", "acct")}
    run |= {key_slot(schema.BURST_EVENTS.key(run=3510, bucket=7).encode()),
            key_slot(schema.BURST_BACKGROUND.key(run=3510).encode())}
    assert run == {key_slot(b"{run:3510}")}
    assert schema.ORCA_CMOS_STATE.pattern == "orca:{cmos}:state:*"


def _orca_workers(cfg) -> None:
    """Two CMOS workers sharing the per-crate state and one base worker, on a simulated stream."""
    sim = OrcaSimulator(31, cmos_id=CMOS_ID, base_id=BASE_ID, poll_period=0.5, crates=[0, 3, 7, 11, 18],
                        flag_probability=0, counter_reset=False, masked_fraction=0)
    recs = _sim_records(sim, 3.0)
    cmos = [r for r in recs if r.kind == "cmos"]
    base = [r for r in recs if r.kind == "base"]
    a, b, c = CmosHandler(cfg), CmosHandler(cfg), BaseHandler(cfg)
    for i in range(0, len(cmos), 4):
        (a if i % 8 else b).process(_frames("cmos", cmos[i:i + 4]))
    for i in range(0, len(base), 4):
        c.process(_frames("base", base[i:i + 4]))
    for handler in (a, b, c):
        assert handler.flush(time.time())


def _touches(keys: set[bytes], pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(k.decode(errors="replace"), pattern) for k in keys)


def test_every_transaction_of_a_pool_the_dispatcher_and_the_orca_workers_stays_in_one_hash_slot(
        make_stack, demo_zdab, tmp_path, cfg, redis_url, redis_client):  # noqa: F811 - the fixture imported above
    path = synthetic(tmp_path / "run2000.zdab", n=3000, seed=5, run=2000)
    want = {**file_totals(demo_zdab)[0], **file_totals(path)[0]}
    with TransactionRecorder(redis_url) as rec:
        stack = make_stack(dispatch_workers=2)
        stack.replay(demo_zdab)
        stack.replay(path)
        stack.wait_settled(sum(w["events"] + w["orphans"] for w in want.values()))
        wait_for(lambda: all((get_run(redis_client, r) or {}).get("source_events") for r in want), 20,
                 "the dispatcher's accounting of both runs")
        _orca_workers(cfg)
    assert rec.commands > 100
    seen = []
    for t in rec.transactions:
        keys = rec.keys_of(t)
        if not keys:
            continue
        slots = {key_slot(k) for k in keys}
        assert len(slots) == 1, f"a transaction over {len(slots)} slots: {sorted(keys)[:12]}"
        seen.append(keys)
    kinds = {
        "time bucket (scalar and per-channel together)": lambda k: _touches(k, "ts:{*}:occ") and _touches(k, "ch:{*}:hits"),
        "run summary": lambda k: _touches(k, schema.RUN.pattern) and _touches(k, "{run:*}:nhit"),
        "run accounting (dispatcher)": lambda k: _touches(k, "{run:*}:acct"),
        "CMOS per-crate state": lambda k: _touches(k, schema.ORCA_CMOS_STATE.pattern),
        "CMOS series": lambda k: _touches(k, "ch:{*}:cmos:sum"),
        "base series": lambda k: _touches(k, "ch:{*}:base:sum"),
        "base latest map": lambda k: _touches(k, schema.ORCA_BASE_CRATE_TIME),
        "flush marks": lambda k: _touches(k, schema.FLUSH_MARK.pattern),
    }
    missing = [name for name, test in kinds.items() if not any(test(k) for k in seen)]
    assert not missing, f"no transaction of these kinds was recorded: {missing}"
    for run, w in want.items():  # and the data is all there, once
        got = get_run(redis_client, run)
        assert (got["events"], got["orphans"]) == (w["events"], w["orphans"])
