"""Keys fit Redis Cluster: each per-crate WATCH/MULTI transaction stays in one hash slot (issue 18).

Every transaction the CMOS workers send while processing a simulated ORCA stream of
several crates is recorded client-side (the real commands redis-py sends, WATCHed keys
included); Redis itself names the keys of each command (``COMMAND GETKEYS``) and the
slot is the Cluster's CRC16 of the hash tag.  docs/storage.md ("Redis Cluster") lists
which transactions are single-slot and which are not yet.
"""

from __future__ import annotations

import fnmatch

import redis as redis_py
from redis.crc import key_slot

from minard.pipeline.orca_cmos import CmosHandler
from minard.simulate.orca import OrcaSimulator
from minard.store import schema
from tests.pipeline.test_orca_stream import BASE_ID, CMOS_ID, _frames, _sim_records


def record_transactions(monkeypatch) -> list[list[tuple]]:
    """Patch redis-py's Pipeline so every MULTI/EXEC (with its WATCHed keys) is kept."""
    done: list[list[tuple]] = []
    watched: dict[int, list[tuple]] = {}
    real_watch, real_exec = redis_py.client.Pipeline.watch, redis_py.client.Pipeline._execute_transaction

    def watch(self, *names):
        watched.setdefault(id(self), []).append(("WATCH", *names))
        return real_watch(self, *names)

    def execute_transaction(self, connection, commands, raise_on_error):
        done.append(watched.pop(id(self), []) + [tuple(args) for args, _ in commands])
        return real_exec(self, connection, commands, raise_on_error)

    monkeypatch.setattr(redis_py.client.Pipeline, "watch", watch)
    monkeypatch.setattr(redis_py.client.Pipeline, "_execute_transaction", execute_transaction)
    return done


def keys_of(client, transaction) -> set[bytes]:
    """Every key the commands of *transaction* touch, as Redis itself names them."""
    keys = set()
    for args in transaction:
        try:
            keys.update(k if isinstance(k, bytes) else str(k).encode() for k in client.command_getkeys(*args))
        except redis_py.ResponseError:  # a command without keys
            continue
    return keys


def test_hash_tags_put_each_crate_transaction_in_one_slot():
    assert key_slot(schema.ORCA_CMOS_STATE.key(crate=3).encode()) == \
        key_slot(schema.ORCA_CMOS_STATE.key(crate=18).encode()) == \
        key_slot(schema.ORCA_LATEST.key(stream="cmos").encode()) == key_slot(b"{cmos}")
    assert schema.ORCA_CMOS_STATE.pattern == "orca:{cmos}:state:*"


def test_every_per_crate_cmos_transaction_of_a_real_run_stays_in_one_hash_slot(cfg, redis_client, monkeypatch):
    transactions = record_transactions(monkeypatch)
    sim = OrcaSimulator(31, cmos_id=CMOS_ID, base_id=BASE_ID, poll_period=0.5, crates=[0, 3, 7, 11, 18],
                        flag_probability=0, counter_reset=False, masked_fraction=0)
    recs = [r for r in _sim_records(sim, 3.0) if r.kind == "cmos"]
    a, b = CmosHandler(cfg), CmosHandler(cfg)  # two workers sharing the per-crate state
    for i in range(0, len(recs), 4):
        (a if i % 8 else b).process(_frames("cmos", recs[i:i + 4]))
    state = fnmatch.translate(schema.ORCA_CMOS_STATE.pattern)
    crate_tx = [t for t in transactions if any(fnmatch.fnmatchcase(k.decode(), schema.ORCA_CMOS_STATE.pattern)
                                               for k in keys_of(redis_client, t))]
    assert state and len(crate_tx) >= 5, f"expected per-crate transactions, got {len(crate_tx)}"
    for t in crate_tx:
        keys = keys_of(redis_client, t)
        slots = {key_slot(k) for k in keys}
        assert len(slots) == 1, f"keys {sorted(keys)} span slots {slots}"
    assert any(len(keys_of(redis_client, t)) > 2 for t in crate_tx)  # several crates in one transaction
