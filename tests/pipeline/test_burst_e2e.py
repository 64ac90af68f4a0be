"""Supernova burst through the real pipeline: replay (paced by the events' clock) ->
dispatcher -> minard_dispatch push -> pull pool (2 workers) -> Redis.

The detection latency is measured as the time from when the burst's last event
was due to be sent (replay start + its clock offset; the replay starts a little
later, so this over-estimates the latency) to the alarm's raise time.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_dispatch_stream import make_stack  # noqa: F401 - fixture

from minard.analysis import burst as ana
from minard.simulate.events import Faults, generate_batches, generate_events, write_zdab
from minard.store import alarms, bursts
from minard.testing import wait_for

pytestmark = pytest.mark.slow

N, RATE, FIRST, DURATION, BURST_RATE = 20_000, 1000.0, 12_000, 0.01, 1e6
OPTS = {"rate_hz": RATE, "mean_nhit": 40.0, "run": 3210, "faults": Faults(burst=(FIRST, DURATION, BURST_RATE))}


def truth():
    """(GTIDs of the selected events of the burst, clock offset (s) of its last event from the first event)."""
    gtids, clocks, first_clock = [], [], None
    from minard.formats.pmt import decode_buffer

    idx = 0
    for buf, offsets, lengths in generate_batches(5, N, **OPTS):
        ev = decode_buffer(buf, offsets, lengths)
        index = np.arange(idx, idx + len(ev.gtid))
        idx += len(ev.gtid)
        if first_clock is None:
            first_clock = int(ev.clock10[0])
        sel = ((index >= FIRST - 1) & (index < FIRST + int(DURATION * BURST_RATE)) & (ev.nhit >= 60)
               & ~ev.orphan.astype(bool))
        gtids += ev.gtid[sel].tolist()
        clocks += ev.clock10[sel].tolist()
    return gtids, (int(clocks[-1]) - first_clock) / ana.TICKS


def test_burst_in_a_replayed_run_is_alarmed_within_two_seconds_with_its_gtid_range(make_stack, tmp_path, redis_client):
    path = tmp_path / "burst.zdab"
    write_zdab(path, generate_events(5, N, **OPTS), progress=False)
    gtids, offset = truth()
    stack = make_stack(burst_min_background=5, dispatch_workers=2)
    t0 = time.time()
    replay = stack.replay(path, "--speed", "1x", wait=False)
    found = wait_for(lambda: bursts.list_bursts(redis_client), timeout=offset + 20, what="the burst record")
    assert replay.wait(60) == 0
    (alarm,) = [a for a in alarms.list_alarms(redis_client) if a["name"] == "supernova_burst"]
    latency = alarm["raised"] - (t0 + offset)
    print(f"burst detection latency: {latency:.2f} s after the burst's last event was due "
          f"(first record: {found[0]['count']} events)")
    assert latency < 2.0, latency
    # Both workers' parts of the burst end up merged in one record with the whole GTID range.
    wait_for(lambda: stack.pull_stats().get("processed", 0) >= N, 30, "every event processed")
    wait_for(lambda: bursts.list_bursts(redis_client)[0]["count"] == len(gtids), 10, "the merged record")
    (b,) = bursts.list_bursts(redis_client)
    assert (b["run"], b["gtid_first"], b["gtid_last"]) == (3210, gtids[0], gtids[-1])
