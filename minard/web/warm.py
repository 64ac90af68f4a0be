"""Fill the web workers' shared cache of settled Stream-page blocks ahead of any request.

The first view of a window that no worker had shown paid for decoding every
settled block of scalar rows it covers (:func:`minard.web.data.scalar_rows`:
32 HGETALLs of the 84 trigger fields, about a millisecond a block, some 140
blocks for a 6-hour rate plot); that was the slow tail of ``bench/web.py``'s
distinct windows.  Under gunicorn every worker of the site starts a
:class:`Warmer` with its first request (:func:`minard.web._warm_under_gunicorn`); a
short-lived Redis lock (:data:`minard.store.schema.WEB_WARM_LOCK`) lets one
of them at a time store the blocks of the last ``web_warm_hours`` hours that
no worker has stored yet (``webcache:rows:…``, the same keys and values a
request would store), then each new block as it settles.  Blocks are stored
only once settled, so a warmed block is exactly what a request would read
(``tests/web/test_web_warm.py``).

It also stores the Detector page's rolling baselines of its default view
(WARM_BASELINES: the occupancy map of 10 minutes) for every settled window
slot of those hours (``webcache:base:…``, what :func:`minard.web.data.baseline`
would store): computing one reads 6 windows of buckets, about 4 ms of CPU and
15 MB from Redis, and was the slow tail of the map's distinct windows.  And
the block sums of those maps at the finest channel level (WARM_SUMS,
``webcache:sum:…``, what :func:`minard.web.data.channel_sum` would store), so a
worker's first map of the last two hours adds about 7 stored sums instead of
61 buckets read from Redis.

Every worker then copies the stored blocks of those hours into its own memory
(:func:`preload`): fetching a day plot's 140 blocks from the shared cache was
half of a worker's first answer of a window (``bench/web.py``).
"""

from __future__ import annotations

import gc
import logging
import math
import random
import threading
import time

import numpy as np

from minard.store import timeseries as ts
from minard.store.schema import SCALAR_LEVELS, WEB_WARM_LOCK
from minard.web import data

log = logging.getLogger("minard.web.warm")

#: The (group, fields) block sets of the Stream page, the ones worth decoding ahead.
WARM_SETS = (("trig", data.TRIG_FIELDS), ("stream", data.STREAM_FIELDS))
#: Seconds between two passes of a worker's warmer.
INTERVAL = 20.0
#: At most this many blocks are decoded per pass (a pass stays under a second of CPU);
#: while blocks remain, the next pass follows after PAUSE s (a day's first warm-up
#: takes a few passes), then every INTERVAL s.
PASS_BLOCKS = 400
PAUSE = 0.2
#: Detector-page baselines computed ahead: (quantity, window length in s) of the page's default view.
WARM_BASELINES = (("occupancy", 600.0),)
#: At most this many baselines are computed per pass (about 4 ms of CPU each).
PASS_BASELINES = 100
#: Detector-page quantities whose block sums (SUM_BLOCK buckets of the finest
#: channel level) are stored ahead: the default view's.
WARM_SUMS = ("occupancy",)
#: At most this many block sums are stored per pass (8 buckets read, about 1 ms each).
PASS_SUMS = 30
#: Seconds to the next pass while another worker is warming or the last preload found new blocks.
PRELOAD_PAUSE = 2.0


def blocks(now: float, hours: float) -> list[tuple[str, tuple, int, int]]:
    """Every settled block of the Stream page's sets within the last *hours*: (group, fields, step, block)."""
    out = []
    for level in SCALAR_LEVELS:
        first = ts.bucket(now - min(hours * 3600, level.keep), level.step) // data.BLOCK
        last = (data.last_settled(level.step, now) + 1) // data.BLOCK - 1  # the newest block wholly settled
        for block in range(last, first - 1, -1):  # newest first: the views most looked at
            out.extend((group, fields, level.step, block) for group, fields in WARM_SETS)
    return out


def warm_once(reads, writes, now: float, hours: float, done: set, limit: int = PASS_BLOCKS) -> tuple[int, int]:
    """Store the shared rows of up to *limit* settled blocks not yet in Redis; returns (stored, decoded).

    Rows are read from *reads* (the dashboard's Redis, maybe a replica) and
    stored through *writes* (the primary).  Blocks without any data are not
    stored (a request stores them if anyone looks).  *done* holds the blocks
    already handled (kept by the caller across passes, so each pass only looks
    at blocks that settled since).
    """
    todo = [b for b in blocks(now, hours) if b not in done]
    if not todo:
        return 0, 0
    pipe = reads.pipeline(transaction=False)
    for group, fields, step, block in todo:
        pipe.exists(data.block_key(group, fields, step, block))
    stored = decoded = 0
    for item, exists in zip(todo, pipe.execute()):
        if not exists:
            if decoded >= limit:
                continue
            group, fields, step, block = item
            rows = data.read_rows(reads, group, fields, step, block * data.BLOCK, block * data.BLOCK + data.BLOCK - 1)
            decoded += 1
            if np.isfinite(rows).any():
                data.store_shared(writes, data.block_key(group, fields, step, block), rows)
                stored += 1
        done.add(item)
    oldest = min(now - hours * 3600, now - SCALAR_LEVELS[0].keep)
    done.difference_update({b for b in done if (b[3] + 1) * data.BLOCK * b[2] < oldest})  # out of the horizon
    return stored, decoded


def baseline_slots(now: float, hours: float) -> list[tuple[str, float, float]]:
    """(quantity, span, anchor) of the WARM_BASELINES window slots within the last *hours*, newest first.

    A view of [start, start + span] uses the baseline of the slot anchored at
    ``floor(start / span) * span`` (:func:`minard.web.data.baseline`).
    """
    out = []
    for quantity, span in WARM_BASELINES:
        newest = math.floor(now / span)
        out.extend((quantity, span, k * span) for k in range(newest, newest - int(hours * 3600 / span) - 1, -1))
    return out


def settled_baselines(now: float, hours: float) -> list[tuple[tuple[str, float, float], ts.Level, str]]:
    """(slot, map level, shared-cache key) of the :func:`baseline_slots` whose windows have settled."""
    out = []
    for slot in baseline_slots(now, hours):
        quantity, span, anchor = slot
        level = data.map_level(anchor, anchor + span, now)
        if ts.bucket(anchor, level.step) <= data.last_settled(level.step, now):
            out.append((slot, level, data.baseline_key(quantity, level.step, anchor, span)))
    return out


def warm_baselines(reads, writes, now: float, hours: float, done: set, limit: int = PASS_BASELINES) -> int:
    """Store the shared baselines of up to *limit* settled slots not yet in Redis; returns how many.

    Each is computed from *reads* exactly as a request computes it
    (:func:`minard.web.data.median_of_windows`) and stored through *writes*
    under the key a request looks up; slots whose windows are still filling
    are left for a later pass.
    """
    todo = [item for item in settled_baselines(now, hours) if item[0] not in done]
    if not todo:
        return 0
    pipe = reads.pipeline(transaction=False)
    for _, _, key in todo:
        pipe.exists(key)
    computed = 0
    for (slot, level, key), exists in zip(todo, pipe.execute()):
        if not exists:
            if computed >= limit:
                continue
            quantity, span, anchor = slot
            data.store_shared(writes, key, data.median_of_windows(reads, quantity, anchor, span, now, level))
            computed += 1
        done.add(slot)
    oldest = now - hours * 3600 - max(span for _, span in WARM_BASELINES)
    done.difference_update({s for s in done if s[2] < oldest})  # out of the horizon
    return computed


def sum_blocks(now: float, hours: float) -> list[tuple[str, str, int, int]]:
    """(name, kind, step, block) of every settled block sum of WARM_SUMS within the last *hours*, newest first.

    Only the finest channel level: coarser windows add a handful of buckets.
    """
    level = ts.CHANNEL_LEVELS[0]
    first = -(-ts.bucket(now - min(hours * 3600, level.keep), level.step) // data.SUM_BLOCK)
    last = (data.last_settled(level.step, now) + 1) // data.SUM_BLOCK - 1  # the newest block wholly settled
    out = []
    for quantity in WARM_SUMS:
        name, kind, _ = data.CHANNEL_SOURCES[quantity]
        out.extend((name, kind, level.step, k) for k in range(last, first - 1, -1))
    return out


def warm_sums(reads, writes, now: float, hours: float, done: set, limit: int = PASS_SUMS) -> int:
    """Store the shared sums of up to *limit* settled blocks not yet in Redis; returns how many.

    Each is added up from *reads* exactly as a request adds it
    (:func:`minard.web.data.sum_arrays` of its SUM_BLOCK buckets) and stored
    through *writes* under the key a request looks up; blocks without any data
    are left to requests.
    """
    todo = [b for b in sum_blocks(now, hours) if b not in done]
    if not todo:
        return 0
    pipe = reads.pipeline(transaction=False)
    for name, _, step, k in todo:
        pipe.exists(data.sum_key(name, step, k))
    stored = 0
    for item, exists in zip(todo, pipe.execute()):
        if not exists:
            if stored >= limit:
                continue
            name, kind, step, k = item
            arrays = data.bucket_arrays(reads, name, kind, step, range(k * data.SUM_BLOCK, (k + 1) * data.SUM_BLOCK),
                                         now)
            if all(a[0] is None for a in arrays):
                done.add(item)
                continue
            data.store_sums(writes, name, kind, step, {k: data.sum_arrays(arrays, kind)})
            stored += 1
        done.add(item)
    level = ts.CHANNEL_LEVELS[0]
    oldest = ts.bucket(now - level.keep, level.step) // data.SUM_BLOCK
    done.difference_update({b for b in done if b[3] < oldest})  # out of the level's horizon
    return stored


def preload(source: data.Source, now: float, hours: float) -> int:
    """Copy the stored blocks and baselines of the last *hours* this worker lacks into its memory.

    Returns how many were copied.  Only what the shared cache holds is copied
    (computed by the warm passes or by requests, not here): the blocks, newest
    first, into at most two thirds of the worker's cache, then the baselines of
    the Detector page's default view (at most a sixth), so requests keep room
    for the rest.  The keys and values are the ones a request would keep.
    """
    todo = blocks(now, hours)[: source.cache.size * 2 // 3]
    loaded = 0
    for group, fields in WARM_SETS:
        wanted = [(("rows", g, f, step, block), data.block_key(g, f, step, block))
                  for g, f, step, block in todo if (g, f) == (group, fields)]
        loaded += _copy(source, wanted, (data.BLOCK, len(fields)))
    wanted = [(("baseline", quantity, level.step, anchor, span), key)
              for (quantity, span, anchor), level, key in settled_baselines(now, hours)[: source.cache.size // 6]]
    return loaded + _copy(source, wanted, (data.NCHANNELS_TOTAL,))


def _copy(source: data.Source, wanted: list[tuple[tuple, str]], shape: tuple[int, ...]) -> int:
    """:func:`minard.web.data.fetch_shared` of the pairs of *wanted* the worker lacks; returns how many came."""
    have = source.cache.get_many([key for key, _ in wanted], count=False)
    return len(data.fetch_shared(source, [pair for pair, value in zip(wanted, have) if value is None], shape))


class Warmer(threading.Thread):
    """A daemon thread of one web worker: a warm pass every INTERVAL s while it holds the lock."""

    def __init__(self, reads, writes, hours: float, interval: float = INTERVAL, source: data.Source | None = None):
        super().__init__(name="minard-web-warmer", daemon=True)
        self.reads, self.writes, self.hours, self.interval = reads, writes, hours, interval
        self.source = source  # this worker's cache, filled by preload()
        self.preloaded = 0
        self.busy = False  # another worker held the lock at the last pass
        self.done: set = set()
        self.done_baselines: set = set()
        self.stopped = threading.Event()
        self.done_sums: set = set()
        self.passes = self.stored = self.baselines = self.sums = 0
        self.more_left = False

    def run(self) -> None:
        """Warm until stopped; Redis errors are logged and retried at the next pass (never fatal)."""
        while not self.stopped.is_set():
            more = soon = False
            try:
                more = self.step() >= PASS_BLOCKS or self.more_left
                soon = self.preload() > 0 or self.busy
            except Exception as exc:  # noqa: BLE001 - an optimisation: a failed pass is retried later
                log.warning("warming the shared cache failed: %s: %s", type(exc).__name__, exc)
            wait = PAUSE if more else PRELOAD_PAUSE if soon else self.interval * random.uniform(0.8, 1.2)
            self.stopped.wait(wait)  # (random: the workers' passes spread out)

    def preload(self) -> int:
        """:func:`preload` into this worker's cache (when it has one); returns the blocks copied."""
        if self.source is None:
            return 0
        loaded = preload(self.source, time.time(), self.hours)
        self.preloaded += loaded
        if loaded:
            gc.freeze()  # the cache's long-lived entries out of full collections (minard.gunicorn_conf)
        return loaded

    def step(self) -> int:
        """One pass if no other worker is warming; returns the blocks decoded."""
        self.busy = not self.writes.set(WEB_WARM_LOCK, str(threading.get_native_id()), nx=True,
                                        ex=int(self.interval * 3))
        if self.busy:
            return 0
        try:
            now = time.time()
            stored, decoded = warm_once(self.reads, self.writes, now, self.hours, self.done)
            baselines = warm_baselines(self.reads, self.writes, now, self.hours, self.done_baselines)
            sums = warm_sums(self.reads, self.writes, now, self.hours, self.done_sums)
        finally:
            self.writes.delete(WEB_WARM_LOCK)
        self.passes += 1
        self.stored += stored
        self.baselines += baselines
        self.sums += sums
        self.more_left = baselines >= PASS_BASELINES or sums >= PASS_SUMS
        if stored or baselines or sums:
            log.info("stored %d settled blocks, %d baselines and %d block sums in the shared cache",
                     stored, baselines, sums)
        return decoded

    def stop(self) -> None:
        self.stopped.set()


_STARTING = threading.Lock()


def start(app) -> Warmer | None:
    """Start the warmer of the web *app* once (``web_warm_hours`` > 0); returns it."""
    hours = float(app.config["MINARD"]["web_warm_hours"])
    if hours <= 0:
        return None
    with _STARTING:  # concurrent first requests (greenlets or threads) start one warmer
        warmer = app.extensions.get("minard_warmer")
        if warmer is None:
            source = app.extensions["minard_source"]
            warmer = app.extensions["minard_warmer"] = Warmer(source.redis, app.extensions["minard_redis"], hours,
                                                              source=source)
            warmer.start()
    return warmer


__all__ = ["Warmer", "baseline_slots", "blocks", "preload", "settled_baselines", "start", "sum_blocks", "warm_baselines", "warm_once", "warm_sums"]
