"""``minard query cmos|base|occupancy --json``: the latest per-channel values from Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minard.formats import orca, wire
from minard.formats.detector import NCHANNELS_TOTAL
from minard.pipeline.orca_base import BaseHandler
from minard.pipeline.orca_cmos import CmosHandler
from minard.simulate.orca import OrcaSimulator
from minard.store import channels
from minard.store import timeseries as ts

pytestmark = pytest.mark.timeout(60)
BIN = Path(sys.executable).parent


def query(redis_url, *args):
    env = dict(os.environ, MINARD_REDIS_URL=redis_url)
    out = subprocess.run([str(BIN / "minard"), "query", *args], env=env, capture_output=True, text=True,
                         timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def feed(handler, sim, seconds, kind, sent=None):
    parser = orca.OrcaStreamParser()
    records = [r for chunk in sim.stream(seconds) for r in parser.feed(chunk)] + parser.close()
    raws = [r.raw for r in records if r.kind == kind]
    handler.process(wire.encode(kind, raws, {"byteorder": sim.byteorder, "sent": sent or time.time()}))
    assert handler.flush(time.time())
    return raws


@pytest.fixture
def sim():
    return OrcaSimulator(21, cmos_id=17 << 18, base_id=3 << 18, poll_period=0.5, crates=[0, 4, 18],
                         masked_fraction=0.05, flag_probability=0, busy_probability=0.01, counter_reset=False)


def test_query_cmos_prints_one_json_object_of_the_latest_rates(cfg, redis_url, sim):
    feed(CmosHandler(cfg), sim, 1.5, "cmos")
    out = query(redis_url, "cmos", "--json")
    assert out.count("\n") == 1
    values = json.loads(out)
    want = ~np.isnan(sim.true_rates) & ~sim.masked_channels()
    assert sorted(map(int, values)) == np.flatnonzero(want).tolist()  # masked and absent channels left out
    for key, rate in values.items():
        assert rate == pytest.approx(sim.true_rates[int(key)], rel=1e-12)


def test_query_base_leaves_out_masked_and_busy_channels_and_values_are_exact(cfg, redis_url, sim):
    raws = feed(BaseHandler(cfg), sim, 1.0, "base")
    values = json.loads(query(redis_url, "base", "--json"))
    batch = orca.decode_base(raws[-3:], sim.byteorder)  # the last poll of the three crates
    ok = ~batch.masked & ~batch.busy
    assert batch.busy.any() and batch.masked.any()
    assert values == {str(i): float(v) for i, v in zip(batch.lcn[ok].tolist(), batch.current[ok].tolist())}


def test_query_max_age_leaves_out_old_readings(cfg, redis_url, sim):
    feed(CmosHandler(cfg), sim, 1.0, "cmos", sent=time.time() - 120)
    assert json.loads(query(redis_url, "cmos", "--json", "--max-age", "60")) == {}
    assert len(json.loads(query(redis_url, "cmos", "--json", "--max-age", "600"))) > 1000


def test_query_with_nothing_stored_prints_an_empty_object(redis_url):
    for name in ("cmos", "base", "occupancy"):
        assert json.loads(query(redis_url, name, "--json")) == {}


def test_query_occupancy_is_hits_per_event_of_the_latest_interval(redis_client, redis_url):
    now = time.time()
    pipe = redis_client.pipeline()
    old, new = now - 60, now - 1  # two 10 s buckets; the newer one is reported
    ts.add(pipe, "occ", old, {"events": 10}, levels=ts.CHANNEL_LEVELS)
    channels.add_counts(pipe, "hits", old, np.array([5]), np.array([10]))
    ts.add(pipe, "occ", new, {"events": 40}, levels=ts.CHANNEL_LEVELS)
    channels.add_counts(pipe, "hits", new, np.array([7, 9000]), np.array([10, 40]))
    pipe.execute()
    values = json.loads(query(redis_url, "occupancy", "--json"))
    assert len(values) == NCHANNELS_TOTAL  # with events, a silent channel has occupancy 0
    assert values["7"] == 0.25 and values["9000"] == 1.0 and values["5"] == 0.0


def test_query_without_json_prints_one_line_per_channel(cfg, redis_url, sim):
    feed(CmosHandler(cfg), sim, 1.0, "cmos")
    lines = query(redis_url, "cmos").splitlines()
    lcn, crate, card, channel, value = lines[0].split()
    assert int(crate) == int(lcn) // 512 and int(card) == int(lcn) // 32 % 16 and int(channel) == int(lcn) % 32
    assert float(value) == pytest.approx(sim.true_rates[int(lcn)], rel=1e-5)


def test_a_baseline_only_reading_after_a_flagged_one_keeps_the_last_valid_rate_and_its_age(cfg, redis_url):
    """The measured failure: a channel vanished from ``minard query cmos`` when its last
    reading only set a new baseline after a bit-31-flagged reading."""
    cmos_id, t0 = 9 << 18, 1_700_000_000_000_000
    handler = CmosHandler(cfg)
    now = time.time()

    def reading(k, counts, sent):
        rec = orca.encode_cmos(cmos_id, 2, 1, 0xFFFFFFFF, counts.reshape(1, 32),
                               orca.format_timestamp_us(t0 + k * 1_000_000))
        handler.process(wire.encode("cmos", [rec], {"byteorder": "little", "sent": sent}))
        assert handler.flush(time.time())

    counts = np.arange(32, dtype=np.int64) * 1000 + 5000
    reading(0, counts, now - 30)  # baseline
    reading(1, counts + 250, now - 20)  # a rate of 250 Hz on every channel
    flagged = counts + 500
    flagged[7] |= 1 << 31
    reading(2, flagged, now - 10)  # channel 7 flagged: no rate, no baseline
    reading(3, counts + 750, now)  # channel 7: a new baseline only, still no rate
    lcn = 2 * 512 + 7
    values = json.loads(query(redis_url, "cmos", "--json", "--with-age"))
    assert values[str(lcn)]["value"] == pytest.approx(250.0)
    assert values[str(lcn)]["age_seconds"] == pytest.approx(20.0, abs=5.0)  # from the reading that gave it
    assert values[str(lcn + 1)]["value"] == pytest.approx(250.0)
    assert values[str(lcn + 1)]["age_seconds"] < 5.0
    assert str(lcn) in json.loads(query(redis_url, "cmos", "--json"))  # the plain form keeps it too
