"""Multi-resolution time series in Redis, written by consumers, read by the site.

Two shapes of data, both bucketed at several resolutions at write time so that
any window from a minute to a year is read in at most ``MAX_POINTS`` buckets:

* **Scalar series** (trigger rates, nhit sums, loss counters, ...): one Redis
  hash per (resolution, bucket, group), key ``ts:{<step>:<bucket>}:<group>``,
  fields are metric names.  Workers add with HINCRBY/HINCRBYFLOAT, which are
  atomic, so any number of workers combine exactly; "last value" fields use
  HSET.

* **Per-channel series** (occupancy, CMOS rate, base current): one binary
  string per (resolution, bucket, name) holding an array over the 10240
  channels, key ``ch:{<step>:<bucket>}:<name>``.  Counts are big-endian uint32,
  saturating; averaged values keep a fixed-point int64 sum (``<name>:sum``)
  and a uint32 count (``<name>:n``).  They are written by the one
  per-channel writer, :class:`minard.store.channels.ChannelWriter`, in ways
  that let any number of workers combine exactly.

Every key carries an expiry of its level's retention, so memory is bounded.
``docs/storage.md`` lists the keys and the memory they take.  Functions that
write take a redis pipeline, so a worker's whole flush is one round trip.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import numpy as np

from minard.formats.detector import NCARDS, NCHANNELS, NCHANNELS_TOTAL, NCRATES
from minard.store.schema import (
    CHANNEL,
    CHANNEL_LEVELS,
    SCALAR,
    SCALAR_LEVELS,
    Level,
)

#: Most buckets one query reads; picks the resolution.
MAX_POINTS = 3000
#: Fixed-point scale for averaged per-channel values (1e-3 resolution).
VALUE_SCALE = 1000


def bucket(t: float, step: int) -> int:
    """Index of the bucket of *step* seconds that holds time *t*."""
    return int(t // step)


def scalar_key(step: int, b: int, group: str) -> str:
    return SCALAR.key(step=step, bucket=b, group=group)


def channel_key(step: int, b: int, name: str) -> str:
    return CHANNEL.key(step=step, bucket=b, name=name)


def choose_level(start: float, stop: float, levels=SCALAR_LEVELS, now: float | None = None,
                 max_points: int = MAX_POINTS, step: float | None = None) -> Level:
    """The finest level that covers [start, stop] in at most *max_points* buckets.

    With *step*, the finest level whose step is at least *step*.  A level only
    qualifies if its retention reaches back to *start* (from *now*).
    """
    if stop < start:
        raise ValueError("stop is before start")
    for level in levels:
        if step is not None and level.step < step:
            continue
        if (stop - start) / level.step > max_points:
            continue
        if now is not None and now - start > level.keep:
            continue
        return level
    return levels[-1]


def bucket_range(start: float, stop: float, step: int) -> range:
    """Bucket indices from the one holding *start* to the one holding *stop*."""
    return range(bucket(start, step), bucket(stop, step) + 1)


# ---------------------------------------------------------------- scalar series

def add(pipe, group: str, t: float, fields: Mapping[str, float], levels=SCALAR_LEVELS) -> None:
    """Add *fields* (name -> increment) to the buckets holding *t* at every level."""
    for level in levels:
        key = scalar_key(level.step, bucket(t, level.step), group)
        for name, value in fields.items():
            if isinstance(value, (int, np.integer)):
                pipe.hincrby(key, name, int(value))
            else:
                pipe.hincrbyfloat(key, name, float(value))
        pipe.expire(key, level.keep + level.step)


def put(pipe, group: str, t: float, fields: Mapping[str, object], levels=SCALAR_LEVELS) -> None:
    """Set *fields* (last value wins) in the buckets holding *t* at every level."""
    if not fields:
        return
    mapping = {k: (float(v) if isinstance(v, np.floating) else int(v) if isinstance(v, np.integer) else v)
               for k, v in fields.items()}
    for level in levels:
        key = scalar_key(level.step, bucket(t, level.step), group)
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, level.keep + level.step)


def fetch(redis, group: str, names: Iterable[str], start: float, stop: float,
          step: float | None = None, now: float | None = None,
          levels=SCALAR_LEVELS) -> tuple[np.ndarray, dict[str, np.ndarray], Level]:
    """Read *names* of *group* over [start, stop].

    Returns (bucket start times, {name: float array with NaN where absent}, level).
    """
    names = list(names)
    level = choose_level(start, stop, levels, now=now, step=step)
    buckets = bucket_range(start, stop, level.step)
    pipe = redis.pipeline(transaction=False)
    for b in buckets:
        pipe.hmget(scalar_key(level.step, b, group), names)
    rows = pipe.execute()
    out = {}
    for i, name in enumerate(names):
        out[name] = np.array([_num(row[i]) for row in rows], dtype=float)
    times = np.array([b * level.step for b in buckets], dtype=float)
    return times, out, level


def _num(raw) -> float:
    """Redis reply (bytes or None) to float, NaN when absent or not a number."""
    if raw is None:
        return math.nan
    try:
        return float(raw)
    except ValueError:
        return math.nan


def latest(redis, group: str, t: float, level: Level = SCALAR_LEVELS[0]) -> dict[str, str]:
    """All fields of the bucket holding *t* (decoded to str)."""
    raw = redis.hgetall(scalar_key(level.step, bucket(t, level.step), group))
    return {k.decode(): v.decode() for k, v in raw.items()}


# ---------------------------------------------------------- per-channel series

def _array(raw: bytes | None, dtype: str) -> np.ndarray:
    """A stored binary array padded with zeros to the whole detector."""
    out = np.zeros(NCHANNELS_TOTAL, dtype=np.dtype(dtype).newbyteorder("="))
    if raw:
        arr = np.frombuffer(raw[: NCHANNELS_TOTAL * np.dtype(dtype).itemsize], dtype=dtype)
        out[: len(arr)] = arr
    return out


def read_counts(redis, name: str, start: float, stop: float, levels=CHANNEL_LEVELS,
                now: float | None = None) -> tuple[np.ndarray, Level]:
    """Per-channel counts summed over [start, stop] (10240-entry int64 array)."""
    level = choose_level(start, stop, levels, now=now)
    pipe = redis.pipeline(transaction=False)
    for b in bucket_range(start, stop, level.step):
        pipe.get(channel_key(level.step, b, name))
    total = np.zeros(NCHANNELS_TOTAL, dtype=np.int64)
    for raw in pipe.execute():
        total += _array(raw, ">u4")
    return total, level


def read_values(redis, name: str, start: float, stop: float, levels=CHANNEL_LEVELS,
                now: float | None = None) -> tuple[np.ndarray, Level]:
    """Per-channel mean of the readings over [start, stop]; NaN where none."""
    level = choose_level(start, stop, levels, now=now)
    pipe = redis.pipeline(transaction=False)
    buckets = bucket_range(start, stop, level.step)
    for b in buckets:
        pipe.get(channel_key(level.step, b, f"{name}:sum"))
        pipe.get(channel_key(level.step, b, f"{name}:n"))
    raw = pipe.execute()
    sums = np.zeros(NCHANNELS_TOTAL, dtype=np.int64)
    counts = np.zeros(NCHANNELS_TOTAL, dtype=np.int64)
    for s, n in zip(raw[0::2], raw[1::2]):
        sums += _array(s, ">i8")
        counts += _array(n, ">u4")
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / VALUE_SCALE / np.maximum(counts, 1), np.nan)
    return mean, level


def channel_history(redis, name: str, lcn: int, start: float, stop: float, kind: str = "counts",
                    levels=CHANNEL_LEVELS, now: float | None = None) -> tuple[np.ndarray, np.ndarray, Level]:
    """One channel's series over [start, stop]: counts per bucket or mean value per bucket.

    Reads only that channel's bytes of each bucket (GETRANGE), so drill-down is cheap.
    """
    if not 0 <= lcn < NCHANNELS_TOTAL:
        raise ValueError(f"channel index {lcn} outside 0..{NCHANNELS_TOTAL - 1}")
    level = choose_level(start, stop, levels, now=now)
    buckets = bucket_range(start, stop, level.step)
    pipe = redis.pipeline(transaction=False)
    for b in buckets:
        if kind == "counts":
            pipe.getrange(channel_key(level.step, b, name), lcn * 4, lcn * 4 + 3)
        else:
            pipe.getrange(channel_key(level.step, b, f"{name}:sum"), lcn * 8, lcn * 8 + 7)
            pipe.getrange(channel_key(level.step, b, f"{name}:n"), lcn * 4, lcn * 4 + 3)
    raw = pipe.execute()
    times = np.array([b * level.step for b in buckets], dtype=float)
    if kind == "counts":
        vals = np.array([int.from_bytes(r, "big") if len(r) == 4 else 0 for r in raw], dtype=float)
    else:
        # A sum never incremented (all readings 0) is absent: it counts as 0.
        sums = [int.from_bytes(s, "big", signed=True) if len(s) == 8 else 0 for s in raw[0::2]]
        counts = [int.from_bytes(n, "big") if len(n) == 4 else 0 for n in raw[1::2]]
        vals = np.array([s / VALUE_SCALE / n if n else math.nan for s, n in zip(sums, counts)])
    return times, vals, level


def crate_card_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Crate and card mean/max of a 10240-entry per-channel array, ignoring NaN."""
    v = np.asarray(values, dtype=float).reshape(NCRATES, NCARDS, NCHANNELS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN crates/cards give NaN
        return {
            "crate_mean": np.nanmean(v.reshape(NCRATES, -1), axis=1),
            "crate_max": np.nanmax(v.reshape(NCRATES, -1), axis=1),
            "card_mean": np.nanmean(v, axis=2),
            "card_max": np.nanmax(v, axis=2),
        }

