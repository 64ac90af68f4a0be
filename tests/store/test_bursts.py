"""Supernova burst monitor through the real pull workers and a real Redis.

Simulated runs (minard.simulate.events) are cut into the wire messages the
push sends, dealt round robin to two PullHandlers (as the pool does) that
flush after every message; the burst fault must give one burst record with
the burst's GTID range and one critical ``supernova_burst`` alarm.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from minard import config
from minard.analysis import burst as ana
from minard.cli import main
from minard.formats import wire
from minard.formats.pmt import decode_buffer, pack_dispatch
from minard.simulate.events import Faults, generate_batches
from minard.store import alarms, bursts

RATE = 1000.0
CFG = {"burst_nhit_threshold": 60, "burst_windows": "1,10", "burst_false_alarms_per_day": 0.01,
       "burst_min_background": 20.0}


def messages(n_events, faults=None, seed=11, per_message=1000):
    """(wire frames, decoded events) of a simulated run, cut as the push would."""
    for buf, offsets, lengths in generate_batches(seed, n_events, rate_hz=RATE, mean_nhit=40.0,
                                                  faults=faults, batch_size=per_message, run=77):
        recs = [pack_dispatch(buf[o:o + n]) for o, n in zip(offsets.tolist(), lengths.tolist())]
        yield wire.encode("pmt", recs, {"sent": time.time()}), decode_buffer(buf, offsets, lengths)


def run_workers(redis_url, n_events, faults=None, flush_every=1):
    """Feed two workers round robin; returns (workers, seconds each evaluate took, first detection index)."""
    from minard.pipeline.dispatch_pull import PullHandler

    workers = [PullHandler(config.load({"redis_url": redis_url, **CFG}, env={})) for _ in range(2)]
    spent, detected_at = [], None
    for k, (frames, _events) in enumerate(messages(n_events, faults)):
        w = workers[k % 2]
        w.first_batch = False
        w.process(frames)
        if k % flush_every == 0:
            t0 = time.perf_counter()
            w.flush(time.time())
            spent.append(time.perf_counter() - t0)
            if detected_at is None and w.redis.zcard(bursts.INDEX):
                detected_at = k
    for w in workers:
        w.flush(time.time())
    return workers, spent, detected_at


def burst_truth(n_events, faults):
    """GTIDs of the selected (nhit >= threshold, not orphan) events inside the injected burst.

    The simulator draws the gap *before* event i at the burst rate for i in the
    burst, so the burst's time span starts at event first - 1.
    """
    first, duration, rate = faults.burst
    idx0, idx1 = first - 1, first + int(duration * rate)
    gtids = []
    for k, (_frames, ev) in enumerate(messages(n_events, faults)):
        index = np.arange(k * 1000, k * 1000 + len(ev.gtid))
        sel = (index >= idx0) & (index < idx1) & (ev.nhit >= CFG["burst_nhit_threshold"]) & ~ev.orphan.astype(bool)
        gtids += ev.gtid[sel].tolist()
    return gtids


def test_burst_fault_gives_one_record_with_its_gtid_range_and_one_critical_alarm(redis_client, redis_url):
    faults = Faults(burst=(40_000, 0.01, 1e6))  # 10 000 events in 10 ms, 40 s into the run
    n = 60_000
    _workers, spent, detected_at = run_workers(redis_url, n, faults)
    truth = burst_truth(n, faults)
    found = bursts.list_bursts(redis_client, with_events=True)
    assert len(found) == 1, found
    b = found[0]
    assert (b["run"], b["gtid_first"], b["gtid_last"]) == (77, truth[0], truth[-1])
    assert b["count"] == len(truth) and sorted(b["gtids"]) == sorted(truth)
    assert b["window"] == 1.0 and set(b["windows"]) == {1.0, 10.0}
    assert b["end"] - b["start"] < 0.011
    # Detected at the first flush after the message holding the burst's events (message 40 or 49).
    assert detected_at is not None and 40 <= detected_at <= 50
    assert max(spent) < 1.0
    alarm = [a for a in alarms.list_alarms(redis_client) if a["name"] == "supernova_burst"]
    assert len(alarm) == 1
    assert (alarm[0]["priority"], alarm[0]["state"], alarm[0]["ringing"]) == ("critical", "unacknowledged", True)
    assert f"{truth[0]:#x}" in alarm[0]["message"]


def test_bursts_cli_prints_the_interface_fields_as_json(redis_client, redis_url, cfg):
    faults = Faults(burst=(25_000, 0.02, 5e5))
    run_workers(redis_url, 30_000, faults, flush_every=3)
    result = CliRunner().invoke(main, ["bursts", "--json"], env={"MINARD_REDIS_URL": redis_url},
                                catch_exceptions=False)
    rows = json.loads(result.output)
    assert len(rows) == 1
    assert {"run", "gtid_first", "gtid_last", "start", "end", "count", "window"} <= set(rows[0])
    text = CliRunner().invoke(main, ["bursts", ], env={"MINARD_REDIS_URL": redis_url}).output
    assert f"{rows[0]['gtid_first']:#08x}" in text


def test_overlapping_excesses_are_merged_into_one_record(redis_client):
    ev = np.zeros(10, ana.EVENT_DTYPE)
    ev["clock10"] = np.arange(10) * 1000 + 10**15
    ev["gtid"] = np.arange(100, 110)
    ev["nhit"] = 80
    a = bursts.store_burst(redis_client, 5, ev[:6], 1.0, 6, 5, 1.0)
    b = bursts.store_burst(redis_client, 5, ev[4:], 10.0, 6, 5, 1.0)
    c = bursts.store_burst(redis_client, 6, ev[4:], 1.0, 6, 5, 1.0)  # another run: its own record
    assert a["id"] == b["id"] != c["id"]
    merged = bursts.get_burst(redis_client, a["id"])
    assert (merged["gtid_first"], merged["gtid_last"], merged["count"]) == (100, 109, 10)
    assert merged["windows"] == [1.0, 10.0] and merged["window"] == 1.0
    assert len([x for x in alarms.list_alarms(redis_client) if x["name"] == "supernova_burst"]) == 2


@pytest.mark.slow
def test_a_clean_run_of_a_million_events_raises_no_burst(redis_client, redis_url):
    _workers, spent, _ = run_workers(redis_url, 1_000_000, None, flush_every=5)
    assert bursts.list_bursts(redis_client) == []
    assert not [a for a in alarms.list_alarms(redis_client) if a["name"] == "supernova_burst"]
    print(f"1e6 clean events: no burst; evaluate+flush mean {np.mean(spent) * 1e3:.1f} ms, "
          f"max {max(spent) * 1e3:.1f} ms")
