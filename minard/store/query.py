"""``minard query cmos|base|occupancy [--json]``: the latest per-channel values.

* ``cmos`` / ``base``: each channel's value at its most recent reading, from
  the latest maps the ORCA consumers keep (``orca:{cmos}:latest``,
  ``orca:{base}:latest``; see docs/storage.md).  CMOS: each channel's last
  valid rate and its time (a reading that gives no rate — flagged, masked,
  counter reset, a new baseline after a flagged reading — keeps it); base:
  the value at the crate's latest reading (NaN, left out, when that reading
  gave none: masked, busy, slot not polled).  ``--max-age`` leaves out values
  that arrived longer ago than that; ``--with-age`` shows each value's age.
* ``occupancy``: hits / events of the dispatch stream over the latest
  interval: the newest bucket of the finest per-channel level (10 s) that has
  events (``ts:{10:<b>}:occ`` field ``events`` and ``ch:{10:<b>}:hits``), looking
  back at most ``--max-age`` seconds (default one hour).  Every channel has a
  value when there were events (0.0 for a silent channel).

With ``--json`` the output is ONE JSON object ``{"<lcn>": value, ...}`` keyed
by channel index ``crate*512 + card*32 + channel`` (with ``--with-age``:
``{"<lcn>": {"value": v, "age_seconds": s}}``); without it, one line per
channel (lcn, crate, card, channel, value[, age in seconds]).
"""

from __future__ import annotations

import json
import time

import click
import numpy as np
import redis as redis_py

from minard import config as config_mod
from minard.formats.detector import NCHANNELS_TOTAL
from minard.store import connection
from minard.store import timeseries as ts
from minard.store.schema import ORCA_LATEST_KEY as LATEST_KEY
from minard.store.schema import ORCA_LATEST_TIME_KEY as LATEST_TIME_KEY

NAMES = ("cmos", "base", "occupancy")
#: How far back occupancy looks for an interval with events by default (s).
OCCUPANCY_LOOKBACK = 3600.0


def _f8(raw: bytes | None) -> np.ndarray:
    """A stored big-endian float64 array padded with NaN to the whole detector."""
    out = np.full(NCHANNELS_TOTAL, np.nan)
    if raw:
        n = min(len(raw) // 8, NCHANNELS_TOTAL)
        out[:n] = np.frombuffer(raw[:n * 8], dtype=">f8")
    return out


def latest_values(redis, stream: str, now: float | None = None, max_age: float = 0.0) -> np.ndarray:
    """Per-channel latest value of *stream* ("cmos" or "base"); NaN = none (see the module)."""
    return latest_with_age(redis, stream, now, max_age)[0]


def latest_with_age(redis, stream: str, now: float | None = None,
                    max_age: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(values, ages in seconds)`` of *stream*'s latest map; NaN where there is no value.

    Bytes of a map never written (absent cards) read as zeros, so the
    arrival-time map decides: a channel with time 0 has never been written.
    """
    pipe = redis.pipeline(transaction=False)
    pipe.get(LATEST_KEY.format(stream=stream))
    pipe.get(LATEST_TIME_KEY.format(stream=stream))
    raw, raw_t = pipe.execute()
    values, times = _f8(raw), _f8(raw_t)
    now = time.time() if now is None else now
    ok = np.nan_to_num(times, nan=0.0) > 0
    if max_age > 0:
        ok &= times >= now - max_age
    values = np.where(ok, values, np.nan)
    return values, np.where(ok & np.isfinite(values), np.maximum(now - times, 0.0), np.nan)


def latest_occupancy(redis, now: float | None = None, lookback: float = OCCUPANCY_LOOKBACK):
    """``(hits/event per channel, bucket start time)`` of the newest 10 s bucket with
    events within *lookback* seconds; all NaN and None if there is none."""
    now = time.time() if now is None else now
    level = ts.CHANNEL_LEVELS[0]
    newest = ts.bucket(now, level.step)
    buckets = list(range(newest, ts.bucket(now - lookback, level.step) - 1, -1))
    pipe = redis.pipeline(transaction=False)
    for b in buckets:
        pipe.hget(ts.scalar_key(level.step, b, "occ"), "events")
    for b, events in zip(buckets, pipe.execute()):
        if events is not None and float(events) > 0:
            hits = ts._array(redis.get(ts.channel_key(level.step, b, "hits")), ">u4")
            return hits / float(events), b * level.step
    return np.full(NCHANNELS_TOTAL, np.nan), None


def as_mapping(values: np.ndarray) -> dict[str, float]:
    """``{"<lcn>": value}`` for every channel with a finite value."""
    ok = np.flatnonzero(np.isfinite(values))
    return {str(i): float(v) for i, v in zip(ok.tolist(), values[ok].tolist())}


@click.command("query", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("name", type=click.Choice(NAMES))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object keyed by channel index.")
@click.option("--max-age", type=float, default=None,
              help="cmos/base: leave out readings older than this many seconds [any age]; "
                   f"occupancy: look back at most this far for an interval with events [{OCCUPANCY_LOOKBACK:g}].")
@click.option("--with-age", is_flag=True, help="cmos/base: also each value's age in seconds (staleness).")
@config_mod.pass_config
def query_cmd(cfg, name, as_json, max_age, with_age):
    """Print the latest per-channel values of NAME (cmos, base or occupancy) from Redis."""
    try:
        client = connection.redis(cfg, "admin")
    except connection.RedisConfigError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        if name == "occupancy":
            values, _ = latest_occupancy(client, lookback=max_age or OCCUPANCY_LOOKBACK)
        else:
            values, ages = latest_with_age(client, name, max_age=max_age or 0.0)
    except redis_py.RedisError as exc:
        raise click.ClickException(f"Redis {config_mod.redact(cfg['redis_url'])}: {exc}") from None
    finally:
        client.close()
    mapping = as_mapping(values)
    age = as_mapping(ages) if with_age and name != "occupancy" else None
    if as_json:
        if age is not None:
            mapping = {k: {"value": v, "age_seconds": round(age.get(k, 0.0), 3)} for k, v in mapping.items()}
        click.echo(json.dumps(mapping))
        return
    for key, value in mapping.items():
        lcn = int(key)
        tail = f" {age.get(key, 0.0):.1f}" if age is not None else ""
        click.echo(f"{lcn:5d} {lcn // 512:2d} {lcn // 32 % 16:2d} {lcn % 32:2d} {value:.6g}{tail}")
