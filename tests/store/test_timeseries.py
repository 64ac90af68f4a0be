"""Multi-resolution series in a real redis-server: exact combining, resolution choice, expiry."""

import math
import threading

import numpy as np
import pytest
import redis as redis_py

from minard.store import channels
from minard.store import timeseries as ts

T0 = 1_700_000_000.0


def test_choose_level_keeps_every_window_under_max_points():
    for window in (60, 600, 3600, 86400, 7 * 86400, 365 * 86400):
        level = ts.choose_level(T0 - window, T0, now=T0)
        assert window / level.step <= ts.MAX_POINTS
        assert level.keep >= window
    assert ts.choose_level(T0 - 600, T0).step == 1


def test_choose_level_skips_levels_whose_retention_has_passed():
    level = ts.choose_level(T0 - 3 * 86400, T0 - 3 * 86400 + 60, now=T0)
    assert level.keep >= 3 * 86400


def test_added_fields_appear_at_every_resolution(redis_client):
    pipe = redis_client.pipeline()
    ts.add(pipe, "trig", T0 + 0.5, {"TOTAL:n": 3, "TOTAL:nhit": 120.0})
    ts.add(pipe, "trig", T0 + 5.2, {"TOTAL:n": 2})
    pipe.execute()
    times, vals, level = ts.fetch(redis_client, "trig", ["TOTAL:n", "TOTAL:nhit"], T0, T0 + 9)
    assert level.step == 1
    assert vals["TOTAL:n"][0] == 3 and vals["TOTAL:n"][5] == 2
    assert math.isnan(vals["TOTAL:n"][1])
    _, coarse, level = ts.fetch(redis_client, "trig", ["TOTAL:n"], T0, T0 + 9, step=10)
    assert level.step == 10 and np.nansum(coarse["TOTAL:n"]) == 5


def test_every_key_expires_after_its_retention(redis_client):
    pipe = redis_client.pipeline()
    ts.add(pipe, "trig", T0, {"x": 1})
    channels.add_counts(pipe, "occ", T0, np.array([5]), np.array([1]))
    pipe.execute()
    for key in redis_client.keys("*"):
        assert 0 < redis_client.ttl(key) <= 800 * 86400 + 6 * 3600


def test_concurrent_writers_combine_exactly(redis_url):
    """Several workers adding counts at once lose nothing and double nothing."""
    rng = np.random.default_rng(1)
    per_worker = [rng.integers(0, 10240, size=(20, 300)) for _ in range(4)]

    def work(chunks):
        client = redis_py.Redis.from_url(redis_url)
        for lcn in chunks:
            pipe = client.pipeline(transaction=False)
            ch, counts = np.unique(lcn, return_counts=True)
            channels.add_counts(pipe, "occ", T0, ch, counts)
            ts.add(pipe, "trig", T0, {"TOTAL:n": len(lcn)})
            pipe.execute()
        client.close()

    threads = [threading.Thread(target=work, args=(c,)) for c in per_worker]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client = redis_py.Redis.from_url(redis_url)
    expected = np.bincount(np.concatenate([c.ravel() for c in per_worker]), minlength=10240)
    got, level = ts.read_counts(client, "occ", T0, T0 + 5)
    assert level.step == 10
    assert np.array_equal(got, expected)
    _, vals, _ = ts.fetch(client, "trig", ["TOTAL:n"], T0, T0)
    assert vals["TOTAL:n"][0] == 4 * 20 * 300


def test_values_average_per_channel_and_absent_channels_are_nan(redis_client):
    pipe = redis_client.pipeline()
    channels.add_values(pipe, "cmos", T0, np.array([0, 7]), np.array([100.5, 0.0]))
    channels.add_values(pipe, "cmos", T0 + 1, np.array([0, 7]), np.array([200.5, -3.25]))
    pipe.execute()
    mean, _ = ts.read_values(redis_client, "cmos", T0, T0 + 2)
    assert mean[0] == pytest.approx(150.5)
    assert mean[7] == pytest.approx(-1.625)
    assert np.isnan(mean[1]) and np.isnan(mean[9727])


def test_channel_history_reads_one_channel(redis_client):
    pipe = redis_client.pipeline()
    for i in range(3):
        channels.add_counts(pipe, "occ", T0 + 10 * i, np.array([42, 43]), np.array([i + 1, 100]))
        channels.add_values(pipe, "base", T0 + 10 * i, np.array([42]), np.array([float(i)]))
    pipe.execute()
    times, counts, level = ts.channel_history(redis_client, "occ", 42, T0, T0 + 25)
    assert level.step == 10 and counts[-3:].tolist() == [1, 2, 3]
    _, vals, _ = ts.channel_history(redis_client, "base", 42, T0, T0 + 25, kind="values")
    assert vals[-3:].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError):
        ts.channel_history(redis_client, "occ", 10240, T0, T0 + 1)


def test_crate_card_stats_ignore_missing_channels():
    values = np.full(10240, np.nan)
    values[512:544] = np.arange(32)
    stats = ts.crate_card_stats(values)
    assert stats["card_max"][1, 0] == 31 and stats["card_mean"][1, 0] == 15.5
    assert stats["crate_max"][1] == 31 and np.isnan(stats["crate_mean"][0])
