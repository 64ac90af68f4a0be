"""The warmer fills the shared cache with exactly what a request would store, and only settled blocks."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_for

from minard import config, stack
from minard.store import schema
from minard.testing import free_port, sample, stop_pid, wait_port
from minard.web import data, warm

REPO = Path(__file__).resolve().parents[2]


def test_a_warm_pass_stores_what_a_request_reads_and_only_settled_blocks(redis_client):
    now = time.time()
    sample.write_day(redis_client, now, days=3 / 24, run_seconds=600)
    done: set = set()
    stored, _ = warm.warm_once(redis_client, redis_client, now, 3, done, limit=10_000)
    keys = {k.decode() for k in redis_client.scan_iter(schema.WEB_BLOCK.pattern)}
    assert stored == len(keys) > 100
    for group, fields, step, block in warm.blocks(now, 3):
        key = data.block_key(group, fields, step, block)
        if key not in keys:
            continue
        assert (block + 1) * data.BLOCK - 1 <= data.last_settled(step, now)
        rows = data.read_rows(redis_client, group, fields, step, block * data.BLOCK, (block + 1) * data.BLOCK - 1)
        shared = np.frombuffer(redis_client.get(key), "<f8").reshape(rows.shape)
        assert np.array_equal(shared, rows, equal_nan=True), key
    assert warm.warm_once(redis_client, redis_client, now, 3, done) == (0, 0)  # nothing new has settled
    fresh = data.Source(redis_client)  # a worker reading the warmed blocks
    for start, stop in ((now - 3 * 3600, now), (now - 7000, now - 3000), (now - 900, now - 5)):
        _same_stream(data.stream_view(fresh, start, stop, now), data.stream_view(redis_client, start, stop, now))


def _same_stream(a: dict, b: dict) -> None:
    for key in ("t", "run", "subrun", "gtid"):
        assert np.array_equal(a[key], b[key], equal_nan=True), key
    for key in ("rate", "nhit", "qhs"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert np.array_equal(a[key][name], b[key][name], equal_nan=True), (key, name)
    assert a["boundaries"] == b["boundaries"]


def test_a_warm_pass_stores_the_detector_baselines_a_request_would_use(redis_client, monkeypatch):
    now = time.time()
    sample.write_day(redis_client, now, days=2 / 24, run_seconds=600)
    done: set = set()
    computed = warm.warm_baselines(redis_client, redis_client, now, 2, done, limit=10_000)
    keys = {k.decode() for k in redis_client.scan_iter(schema.WEB_BASELINE.pattern)}
    assert computed == len(keys) >= 12  # every settled 10-minute slot of the 2 hours (less the one filling)
    assert warm.warm_baselines(redis_client, redis_client, now, 2, done) == 0  # nothing new has settled
    # A worker's map of any window in those hours reads the warmed baseline and computes none itself.
    computing = []
    monkeypatch.setattr(data, "median_of_windows", lambda *a: computing.append(a) or pytest.fail("computed"))
    fresh = data.Source(redis_client)
    for stop in (now - 6000, now - 3333.5, now - 700):
        view = data.detector_view(fresh, "occupancy", stop - 600, stop, now)
        monkeypatch.undo()
        direct = data.detector_view(redis_client, "occupancy", stop - 600, stop, now)
        assert np.array_equal(view["baseline"], direct["baseline"], equal_nan=True)
        assert np.array_equal(view["hot"], direct["hot"]) and np.array_equal(view["dead"], direct["dead"])
        monkeypatch.setattr(data, "median_of_windows", lambda *a: pytest.fail("computed"))
    assert not computing


def test_a_warm_pass_stores_the_block_sums_a_request_would_add_up(redis_client, monkeypatch):
    now = time.time()
    sample.write_day(redis_client, now, days=2 / 24, run_seconds=600)
    done: set = set()
    assert warm.warm_sums(redis_client, redis_client, now, 2, done, limit=10_000) >= 80  # the 2 h of 10 s buckets
    keys = {k.decode() for k in redis_client.scan_iter(schema.WEB_SUM.pattern)}
    assert len(keys) == len(done) - sum(1 for b in done if data.sum_key(b[0], b[2], b[3]) not in keys)
    for name, kind, step, block in warm.sum_blocks(now, 2):
        key = data.sum_key(name, step, block)
        if key not in keys:
            continue
        assert (block + 1) * data.SUM_BLOCK - 1 <= data.last_settled(step, now), key
        arrays = data.bucket_arrays(redis_client, name, kind, step,
                                     range(block * data.SUM_BLOCK, (block + 1) * data.SUM_BLOCK), now)
        total, _ = data.sum_arrays(arrays, kind)
        assert np.array_equal(np.frombuffer(redis_client.get(key), "<i8"), total), key
    assert warm.warm_sums(redis_client, redis_client, now, 2, done) == 0  # nothing new has settled
    # A new worker's maps of the last hour add the warmed sums and read only the buckets at their edges.
    fresh = data.Source(redis_client)
    real = data.bucket_arrays
    for stop in (now - 2400.5, now - 1200, now - 30):
        level = data.map_level(stop - 600, stop, now)
        direct = data.window_values(redis_client, "occupancy", stop - 600, stop, now, level)
        read = []
        monkeypatch.setattr(data, "bucket_arrays", lambda r, n, k, st, buckets, t, read=read: read.extend(buckets)
                            or real(r, n, k, st, buckets, t))
        view = data.window_values(fresh, "occupancy", stop - 600, stop, now, level)
        monkeypatch.undo()
        assert level.step == 10 and np.array_equal(view[0], direct[0], equal_nan=True) and view[2] == direct[2]
        assert len(read) <= 2 * (data.SUM_BLOCK - 1) + (1 if stop > now - 60 else 0), read  # edges (and the tail)


def test_a_worker_preloads_the_stored_blocks_into_its_memory_and_then_asks_redis_for_none(redis_client, monkeypatch):
    now = time.time()
    sample.write_day(redis_client, now, days=2 / 24, run_seconds=600)
    stored, _ = warm.warm_once(redis_client, redis_client, now, 2, set(), limit=10_000)
    worker = data.Source(redis_client, data.Cache(2048))  # as the web app's
    assert warm.preload(worker, now, 2) == stored > 100  # only what the shared cache holds
    small = data.Source(redis_client, data.Cache(300))
    assert warm.preload(small, now, 2) == 200  # two thirds of a worker's cache at most
    assert warm.preload(worker, now, 2) == 0  # nothing new
    asked = []
    monkeypatch.setattr(data, "read_rows", lambda *a: asked.append(a) or pytest.fail("read from Redis"))
    monkeypatch.setattr(worker.redis, "mget", lambda keys: asked.append(keys) or pytest.fail("shared cache asked"))
    stop = (data.last_settled(1, now) + 1) // data.BLOCK * data.BLOCK - 1  # the newest wholly settled block's end
    view = data.stream_view(worker, stop - 1800, stop, now)
    monkeypatch.undo()
    _same_stream(view, data.stream_view(redis_client, stop - 1800, stop, now))
    assert not asked


def test_a_worker_preloads_the_stored_baselines_and_its_maps_ask_redis_for_none(redis_client, monkeypatch):
    now = time.time()
    sample.write_day(redis_client, now, days=2 / 24, run_seconds=600)
    computed = warm.warm_baselines(redis_client, redis_client, now, 2, set(), limit=10_000)
    worker = data.Source(redis_client, data.Cache(2048))
    assert warm.preload(worker, now, 2) == computed >= 12  # no blocks stored: the baselines only
    monkeypatch.setattr(data, "_shared_median", lambda *a: pytest.fail("baseline asked of Redis"))
    for stop in (now - 6000, now - 700):
        view = data.detector_view(worker, "occupancy", stop - 600, stop, now)
        monkeypatch.undo()
        direct = data.detector_view(redis_client, "occupancy", stop - 600, stop, now)
        assert np.array_equal(view["baseline"], direct["baseline"], equal_nan=True)
        monkeypatch.setattr(data, "_shared_median", lambda *a: pytest.fail("baseline asked of Redis"))


def test_blocks_without_data_are_not_stored(redis_client):
    assert warm.warm_once(redis_client, redis_client, time.time(), 1, set())[0] == 0
    assert not list(redis_client.scan_iter("webcache:*"))


def test_only_one_worker_warms_at_a_time(redis_client):
    """A warmer that finds the lock held does nothing; once it is free, it warms."""
    sample.write_day(redis_client, time.time(), days=1 / 24)
    first, second = warm.Warmer(redis_client, redis_client, 1), warm.Warmer(redis_client, redis_client, 1)
    redis_client.set(schema.WEB_WARM_LOCK, "another worker", ex=60)
    assert second.step() == 0 and not list(redis_client.scan_iter(schema.WEB_BLOCK.pattern))
    redis_client.delete(schema.WEB_WARM_LOCK)
    assert first.step() > 0 and redis_client.get(schema.WEB_WARM_LOCK) is None


@pytest.mark.slow
def test_gunicorn_workers_warm_the_shared_cache_after_their_first_request(redis_url, redis_client, tmp_path):
    now = time.time()
    sample.write_day(redis_client, now, days=2 / 24)
    port = free_port()
    settings = {"redis_url": redis_url, "var_dir": str(tmp_path), "web_warm_hours": "2"}
    env = {**os.environ, **{f"MINARD_{k.upper()}": v for k, v in settings.items()}}
    # as minard up runs it (gevent workers: the warmer thread is a greenlet)
    argv = stack.gunicorn_command(config.load(settings, env={}), "web", port=port, workers=2)
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=20)
        assert not list(redis_client.scan_iter(schema.WEB_BLOCK.pattern))  # nothing before a request
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/banner", timeout=10).read()
        expected = {data.block_key(*b) for b in warm.blocks(now, 1.5) if _has_data(redis_client, *b)}
        assert len(expected) > 100
        wait_for(lambda: expected <= {k.decode() for k in redis_client.scan_iter(schema.WEB_BLOCK.pattern)}, 30,
                 "every settled block of the last 2 h in the shared cache")
    finally:
        stop_pid(proc)


def _has_data(redis_client, group, fields, step, block) -> bool:
    rows = data.read_rows(redis_client, group, fields, step, block * data.BLOCK, (block + 1) * data.BLOCK - 1)
    return bool(np.isfinite(rows).any())
