"""The web's caches (per worker and shared by every worker in Redis) never change an answer.

Real Redis with three hours of data for the whole detector (``sample.write_day``); for
random windows anywhere in it (hypothesis), the Stream and Detector views read through
the caches equal the views read straight from Redis, value for value, NaN for NaN.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minard.store import schema
from minard.store import timeseries as ts
from minard.testing import sample, wait_for
from minard.web import data

HOURS = 3


@pytest.fixture
def day(redis_client):
    """Three hours of 1 s data ending now (a run every 10 minutes), every level written."""
    end = time.time()
    sample.write_day(redis_client, end, days=HOURS / 24, run_seconds=600)
    return end


def same(a, b, path="view") -> None:
    """Assert two views are equal: arrays value for value (NaN equal to NaN), the rest exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), path
    elif isinstance(a, float) and isinstance(b, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, path


windows = st.tuples(
    st.integers(-HOURS * 3600 + 60, 30),  # stop relative to now (s): anywhere in the data, or just ahead of now
    st.sampled_from([1, 7, 60, 600, 3599, 3600, 4 * 3600]),  # window length (s)
    st.sampled_from([0.0, 0.25, 0.5]),  # sub-second offset: bucket edges
)


@pytest.fixture
def worker(redis_client):
    """One web worker's Source, kept across the examples of a test (its caches fill up as a worker's would)."""
    return data.Source(redis_client)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(window=windows, quantity=st.sampled_from(data.QUANTITIES), live=st.integers(0, 50))
def test_views_through_the_caches_equal_the_views_read_straight_from_redis(redis_client, day, worker, window,
                                                                            quantity, live):
    """A worker (filling the shared cache), a new worker (reading it) and no cache at all agree.

    Before each example a second that is complete but not yet settled gets
    *live* more events: a bucket that can still change is never answered from a cache.
    """
    if live:
        pipe = redis_client.pipeline()
        t = time.time() - 2.9
        ts.add(pipe, "trig", t, {"TOTAL": live})
        ts.add(pipe, schema.GROUP_OCCUPANCY, t, {"events": live}, levels=schema.CHANNEL_LEVELS)
        pipe.execute()
    now = time.time()
    stop_offset, length, frac = window
    stop = now + stop_offset + frac
    start = stop - length
    fresh = data.Source(redis_client)  # a new worker: empty caches of its own, the shared one in Redis
    direct = data.stream_view(redis_client, start, stop, now)
    for src in (worker, worker, fresh):  # the worker twice: the second time from its own cache
        same(data.stream_view(src, start, stop, now), direct, "stream")
    direct = data.detector_view(redis_client, quantity, start, stop, now)
    for src in (worker, worker, fresh):
        same(data.detector_view(src, quantity, start, stop, now), direct, "detector")


def test_the_shared_cache_holds_only_settled_data(redis_client, day):
    """After views of every kind of window, each shared block, baseline and block sum ends before
    the newest settled bucket of its level, and expires."""
    src = data.Source(redis_client)
    now = time.time()
    for length in (60, 600, 3600, 4 * 3600):
        data.stream_view(src, now - length, now, now)
        for quantity in data.QUANTITIES:
            data.detector_view(src, quantity, now - length, now, now)
            data.detector_view(src, quantity, now - 2 * length, now - length, now)
    blocks = [k.decode() for k in redis_client.scan_iter(schema.WEB_BLOCK.pattern)]
    bases = [k.decode() for k in redis_client.scan_iter(schema.WEB_BASELINE.pattern)]
    assert blocks and bases
    for key in blocks:
        _, _, step, block, *_ = key.split(":")
        assert (int(block) + 1) * data.BLOCK - 1 <= data.last_settled(int(step), now), key
        assert 0 < redis_client.ttl(key) <= data.WEB_BLOCK_TTL
    for key in bases:
        _, _, _, step, anchor, _ = key.split(":")
        assert ts.bucket(float(anchor), int(step)) <= data.last_settled(int(step), now), key
        assert 0 < redis_client.ttl(key) <= data.WEB_BLOCK_TTL
    sums = [k.decode() for k in redis_client.scan_iter(schema.WEB_SUM.pattern)]
    assert sums
    for key in sums:
        _, _, _, step, block = key.split(":")
        assert (int(block) + 1) * data.SUM_BLOCK - 1 <= data.last_settled(int(step), now), key
        assert 0 < redis_client.ttl(key) <= data.WEB_BLOCK_TTL


def test_a_shared_baseline_is_what_a_new_worker_reads(redis_client, day):
    """A second worker answers from the shared baseline even after the stored arrays change under it."""
    now = time.time()
    start, stop = now - 5000, now - 4400
    first = data.detector_view(data.Source(redis_client), "occupancy", start, stop, now)
    (key,) = [k for k in redis_client.scan_iter(schema.WEB_BASELINE.pattern)]
    redis_client.set(key, np.full(len(first["baseline"]), 0.5, "<f8").tobytes())  # only the shared copy says 0.5
    second = data.detector_view(data.Source(redis_client), "occupancy", start, stop, now)
    assert (second["baseline"] == 0.5).all()
    assert not np.array_equal(first["baseline"], second["baseline"])


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 8), nan_share=st.floats(0, 1), kind=st.sampled_from(["unit", "small", "integers", "wide"]),
       seed=st.integers(0, 2**32 - 1))
def test_the_fast_median_equals_numpys_nanmedian(rows, nan_share, kind, seed):
    """The baseline's median (sort-based) is np.nanmedian's value for value, NaN where a channel has none."""
    rng = np.random.default_rng(seed)
    values = {"unit": rng.random((rows, 512)), "small": rng.random((rows, 512)) * 1e-4,
              "integers": np.round(rng.random((rows, 512)) * 5), "wide": rng.standard_normal((rows, 512)) * 1e3}[kind]
    values[rng.random(values.shape) < nan_share] = np.nan
    with np.errstate(all="ignore"), data._quiet():
        expected = np.nanmedian(values, axis=0)
    assert np.array_equal(data.nanmedian_rows(values), expected, equal_nan=True)


def test_map_answers_encode_a_shared_baseline_as_they_encode_a_fresh_one(cfg, redis_client, day):
    """Windows of one slot share one cached baseline array, whose rounded and packed forms the
    worker keeps (minard.web.api._encoded): every answer equals the encoding of a fresh view."""
    from minard.web import api, create_app

    client = create_app(cfg).test_client()
    now = time.time()
    slot = (now - 5000) // 600 * 600
    for offset in (0, 100, 250, 0):
        start, stop = slot + offset, slot + offset + 600
        direct = data.detector_view(redis_client, "occupancy", start, stop, time.time())
        packed = client.get(f"/api/detector?quantity=occupancy&start={start}&stop={stop}&encoding=f32").get_json()
        plain = client.get(f"/api/detector?quantity=occupancy&start={start}&stop={stop}").get_json()
        for key in ("values", "baseline"):
            assert packed[f"{key}_f32"] == api.packed_sigfigs(direct[key]), key
            same(np.array(plain[key], dtype=float), api.sigfigs(direct[key]), key)


def test_run_starts_kept_by_a_worker_are_those_in_redis_and_a_new_run_shows_within_a_second(redis_client):
    now = time.time()
    day_s = data.RUN_STARTS_BLOCK
    edge = (now // day_s) * day_s  # the start of the present (UTC) day
    starts = {10: edge - 3 * day_s + 5, 11: edge - day_s, 12: edge - 0.5, 13: edge, 14: now - 100}
    redis_client.zadd(schema.RUNS_START, {str(r): t for r, t in starts.items()})
    src = data.Source(redis_client)
    for start, stop in ((edge - 4 * day_s, now), (edge - day_s, edge), (edge - 0.5, edge - 0.5), (edge + 1, now),
                        (now - 50, now)):
        direct = [(int(m), t) for m, t in redis_client.zrangebyscore(schema.RUNS_START, start, stop, withscores=True)]
        assert data.run_starts(src, start, stop, now) == direct, (start, stop)
    redis_client.zadd(schema.RUNS_START, {"15": now - 1})  # a run starts now: the present day is re-read
    wait_for(lambda: (15, now - 1) in data.run_starts(src, now - 60, now, time.time()), 2 * data.OPEN_RUN_STARTS_TTL + 1,
             "the new run")


def test_requests_that_miss_one_key_together_compute_it_once_and_share_it(redis_client):
    src = data.Source(redis_client)
    release, computed = threading.Event(), []

    def compute():
        computed.append(1)
        release.wait(10)
        return np.arange(3.0)

    results = []
    threads = [threading.Thread(target=lambda: results.append(data.cached(src, ("view", 1), 60, compute)))
               for _ in range(10)]
    for t in threads:
        t.start()
    wait_for(lambda: src.cache.flights.get(("view", 1), [None, 0])[1] == 10, 10, "ten requests on the key")
    release.set()
    for t in threads:
        t.join(10)
    assert len(computed) == 1 and len(results) == 10
    assert all(r is results[0] for r in results)
    assert not src.cache.flights  # nothing left behind
