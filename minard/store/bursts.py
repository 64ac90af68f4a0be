"""Supernova burst monitor: shared state of the pull workers and the burst records.

Each pull worker selects the events above ``burst_nhit_threshold``
(:func:`minard.analysis.burst.select`) and, in the same transaction as its
aggregates, appends them to Redis; then it re-evaluates every window that
contains one of its new events against all workers' events
(:func:`minard.analysis.burst.find_excesses`).  So a burst is found whatever
worker got which batch, at most one flush (about a second) after its events
arrive.

Redis keys (docs/storage.md):

- ``minard:burst:ev:{run:RUN}:B``  string of EVENT_DTYPE records (clock10, GTID,
  nhit) of the selected events of clock bucket B (10 s of the 10 MHz clock),
  appended by the workers; expires after an hour
- ``minard:burst:bg:{run:RUN}`` hash clock second -> selected events (the measured
  background); expires after a day
- ``minard:bursts:index``    sorted set of burst ids by start time (Unix s)
- ``minard:burst:ID``        JSON of one burst record; ``minard:burst:ID:events``
  its events (EVENT_DTYPE bytes)
- ``minard:bursts:next``     last burst id; ``minard:bursts:lock`` serialises merges
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

import click
import numpy as np

from minard import config as config_mod
from minard.analysis import burst as ana
from minard.store import alarms, schema

log = logging.getLogger("minard.store.bursts")

INDEX, NEXT, LOCK = schema.BURSTS_INDEX, schema.BURSTS_NEXT, schema.BURSTS_LOCK
BUCKET_TICKS = 10 * ana.TICKS
EVENTS_TTL = 3600
BG_TTL = 86400
KEEP = 400 * 86400
MAX_EVENTS = 200_000  # events kept per burst record
ALARM = "supernova_burst"
#: The SNO time zero of clock10 (ZDAB_FORMAT.md §5).
SNO_EPOCH = datetime(1996, 1, 1, tzinfo=UTC).timestamp()


def events_key(run: int, bucket: int) -> str:
    """Key of the selected events of *run* in clock bucket *bucket*."""
    return schema.BURST_EVENTS.key(run=int(run), bucket=int(bucket))


def bg_key(run: int) -> str:
    """Key of the per-clock-second counts of selected events of *run*."""
    return schema.BURST_BACKGROUND.key(run=int(run))


def record_key(burst_id: int) -> str:
    """Key of one burst record's JSON."""
    return schema.BURST.key(id=int(burst_id))


def record_events_key(burst_id: int) -> str:
    """Key of one burst record's events."""
    return schema.BURST_RECORD_EVENTS.key(id=int(burst_id))


def clock_to_unix(clock10: float) -> float:
    """Unix time of a 10 MHz clock value."""
    return SNO_EPOCH + float(clock10) / ana.TICKS


class BurstMonitor:
    """One pull worker's part of the burst search (see the module docstring)."""

    def __init__(self, redis, cfg):
        self.redis = redis
        self.nhit_threshold = int(cfg["burst_nhit_threshold"])
        self.windows = ana.parse_windows(cfg["burst_windows"])
        self.far = float(cfg["burst_false_alarms_per_day"])
        self.min_background = float(cfg["burst_min_background"])
        self.background_seconds = int(cfg["burst_background_seconds"])
        self.history_days = float(cfg["alarm_history_days"])
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []  # (runs, events)
        self.written: dict[int, tuple[int, int]] = {}  # run -> clock range of events just written
        self.errors = 0

    def add(self, batch) -> None:
        """Select the burst candidates of a decoded batch (vectorised)."""
        if not len(batch.gtid):
            return
        keep = (batch.nhit >= self.nhit_threshold) & ~batch.orphan.astype(bool)
        if not keep.any():
            return
        ev = ana.select(batch.nhit[keep], batch.clock10[keep], batch.gtid[keep],
                        np.zeros(int(keep.sum()), bool), self.nhit_threshold)
        self.pending.append((np.asarray(batch.run)[keep], ev))

    def write(self, pipe) -> None:
        """Append the pending candidates to Redis in the caller's transaction."""
        self.written = {}
        if not self.pending:
            return
        runs = np.concatenate([r for r, _ in self.pending])
        ev = np.concatenate([e for _, e in self.pending])
        self.pending = []
        for run in np.unique(runs):
            mine = ev[runs == run]
            bucket = (mine["clock10"] // BUCKET_TICKS).astype(np.int64)
            for b in np.unique(bucket):
                key = events_key(run, b)
                pipe.append(key, mine[bucket == b].tobytes())
                pipe.expire(key, EVENTS_TTL)
            secs, counts = np.unique((mine["clock10"] // ana.TICKS).astype(np.int64), return_counts=True)
            for s, c in zip(secs.tolist(), counts.tolist()):
                pipe.hincrby(bg_key(run), s, c)
            pipe.expire(bg_key(run), BG_TTL)
            self.written[int(run)] = (int(mine["clock10"].min()), int(mine["clock10"].max()))

    def evaluate(self, now: float | None = None) -> list[dict]:
        """Search the windows containing the events just written; store bursts, raise the alarm."""
        found = []
        for run, (t0, t1) in self.written.items():
            try:
                found += self._evaluate_run(run, t0, t1, now)
            except Exception:
                self.errors += 1
                log.exception("burst search of run %d failed", run)
        self.written = {}
        return found

    def background(self, run: int, until_clock: int) -> tuple[float, float]:
        """(rate Hz, seconds measured) of *run* from complete clock seconds before *until_clock*."""
        raw = self.redis.hgetall(bg_key(run))
        if not raw:
            return 0.0, 0.0
        secs = np.array([int(k) for k in raw], np.int64)
        counts = np.array([int(v) for v in raw.values()], np.int64)
        last = until_clock // ana.TICKS
        old = secs < last - self.background_seconds - 10
        if old.sum() > self.background_seconds:  # keep the hash short on long runs
            self.redis.hdel(bg_key(run), *secs[old].tolist())
        # Skip the first second (partial) and the last two (other workers may still add to them).
        ok = (secs > secs.min()) & (secs < last - 1) & (secs >= last - self.background_seconds)
        if not ok.any():
            return 0.0, 0.0
        span = int(secs[ok].max() - secs[ok].min() + 1)
        dense = np.zeros(span, np.int64)  # seconds without a candidate count as 0
        dense[secs[ok] - secs[ok].min()] = counts[ok]
        return ana.background_rate(dense), float(span)

    def _evaluate_run(self, run: int, t0: int, t1: int, now: float | None) -> list[dict]:
        rate, measured = self.background(run, t1)
        if measured < self.min_background:
            return []
        wmax = int(max(self.windows) * ana.TICKS)
        lo, hi = max(0, t0 - wmax), t1 + wmax
        keys = [events_key(run, b) for b in range(lo // BUCKET_TICKS, hi // BUCKET_TICKS + 1)]
        blobs = [b for b in self.redis.mget(keys) if b]
        if not blobs:
            return []
        ev = ana.ordered(np.frombuffer(b"".join(blobs), ana.EVENT_DTYPE))
        ev = ev[(ev["clock10"] >= lo) & (ev["clock10"] <= hi)]
        t = ev["clock10"].astype(np.int64)
        found = []
        for w in self.windows:
            k = ana.threshold(rate, w, self.far)
            for ex in ana.find_excesses(t, w, k, rate, end_from=t0, end_to=t1 + int(w * ana.TICKS)):
                rec = store_burst(self.redis, run, ev[ex.first:ex.last + 1], w, ex.peak, k, rate,
                                  now=now, history_days=self.history_days)
                found.append(rec)
        return found


def _lock(r, timeout: float = 5.0) -> str:
    """Take the merge lock (bounded wait); returns the token to release it."""
    token = f"{time.time()}:{id(r)}"
    end = time.monotonic() + timeout
    while not r.set(LOCK, token, nx=True, px=5000):
        if time.monotonic() > end:
            raise TimeoutError("burst record lock held for too long")
        time.sleep(0.01)
    return token


def _unlock(r, token: str) -> None:
    r.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
           1, LOCK, token)


def _load_events(r, burst_id: int) -> np.ndarray:
    raw = r.get(record_events_key(burst_id))
    return np.frombuffer(raw, ana.EVENT_DTYPE) if raw else np.zeros(0, ana.EVENT_DTYPE)


def store_burst(r, run: int, events: np.ndarray, window: float, peak: int, threshold: int,
                background: float, now: float | None = None, history_days: float = 30) -> dict:
    """Store one excess as a burst record, merged with any overlapping record of the run.

    A new record raises the ``supernova_burst`` alarm (critical); a merge only
    widens the record.  Returns the stored record.
    """
    now = time.time() if now is None else now
    c0, c1 = int(events["clock10"][0]), int(events["clock10"][-1])
    token = _lock(r)
    try:
        s0, s1 = clock_to_unix(c0), clock_to_unix(c1)
        ids = [int(i) for i in r.zrangebyscore(INDEX, s0 - 7200, s1)]
        overlapping = []
        for i in ids:
            raw = r.get(record_key(i))
            if raw:
                rec = json.loads(raw)
                if rec["run"] == run and rec["clock_first"] <= c1 and c0 <= rec["clock_last"]:
                    overlapping.append(rec)
        if overlapping:
            rec = overlapping[0]
            allev = [events, _load_events(r, rec["id"])]
            for other in overlapping[1:]:  # a new excess may bridge two records
                allev.append(_load_events(r, other["id"]))
                rec["windows"] = sorted(set(rec["windows"]) | set(other["windows"]))
                rec["peak"] = max(rec["peak"], other["peak"])
                r.delete(record_key(other["id"]), record_events_key(other["id"]))
                r.zrem(INDEX, other["id"])
            events = ana.ordered(np.concatenate(allev))
            rec["windows"] = sorted(set(rec["windows"]) | {window})
            rec["peak"] = max(rec["peak"], int(peak))
            new = False
        else:
            rec = {"id": int(r.incr(NEXT)), "run": int(run), "windows": [window], "window": window,
                   "peak": int(peak), "threshold": int(threshold), "background_hz": round(background, 3),
                   "detected": now}
            new = True
        events = events[:MAX_EVENTS]
        rec["window"] = min(rec["windows"])
        rec.update(_summary(events))
        pipe = r.pipeline(transaction=True)
        pipe.set(record_key(rec["id"]), json.dumps(rec), ex=KEEP)
        pipe.set(record_events_key(rec["id"]), events.tobytes(), ex=KEEP)
        pipe.zadd(INDEX, {rec["id"]: rec["start"]})
        pipe.execute()
    finally:
        _unlock(r, token)
    if new:
        rec["alarm"] = alarms.raise_alarm(
            r, alarms.DANGER, f"supernova burst candidate in run {run}: {rec['count']} events above "
            f"threshold in {window:g} s (expected {background * window:.1f}, threshold {threshold}); "
            f"GTID {rec['gtid_first']:#x}-{rec['gtid_last']:#x}",
            source="burst", program="minard_dispatch_pull", key=f"{ALARM}:{rec['id']}", now=now,
            history_days=history_days, name=ALARM, priority="critical")
        r.set(record_key(rec["id"]), json.dumps(rec), ex=KEEP)
        log.warning("supernova burst candidate %d in run %d: %d events, GTID %#x-%#x", rec["id"], run,
                    rec["count"], rec["gtid_first"], rec["gtid_last"])
    return rec


def _summary(events: np.ndarray) -> dict:
    """The record fields computed from its events."""
    c0, c1 = int(events["clock10"][0]), int(events["clock10"][-1])
    return {"gtid_first": int(events["gtid"][0]), "gtid_last": int(events["gtid"][-1]),
            "clock_first": c0, "clock_last": c1, "start": clock_to_unix(c0), "end": clock_to_unix(c1),
            "count": len(events), "nhit": ana.nhit_histogram(events["nhit"])}


def list_bursts(r, limit: int = 200, with_events: bool = False) -> list[dict]:
    """Burst records, newest first; *with_events* adds each one's GTIDs and nhits."""
    ids = [int(i) for i in r.zrevrange(INDEX, 0, max(0, limit - 1))]
    out = []
    for i in ids:
        raw = r.get(record_key(i))
        if not raw:
            continue
        rec = json.loads(raw)
        if with_events:
            ev = _load_events(r, i)
            rec["gtids"] = ev["gtid"].tolist()
            rec["nhits"] = ev["nhit"].tolist()
        out.append(rec)
    return out


def get_burst(r, burst_id: int) -> dict | None:
    """One burst record with its events' GTIDs and nhits, or None."""
    raw = r.get(record_key(burst_id))
    if not raw:
        return None
    rec = json.loads(raw)
    ev = _load_events(r, burst_id)
    rec["gtids"] = ev["gtid"].tolist()
    rec["nhits"] = ev["nhit"].tolist()
    return rec


@click.command("bursts")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per burst.")
@click.option("--events", is_flag=True, help="With --json: include each burst's event GTIDs and nhits.")
@click.option("--limit", type=int, default=100, show_default=True, help="Most recent bursts to list.")
@config_mod.pass_config
def bursts_cmd(cfg, as_json, events, limit):
    """List the supernova burst candidates found by the dispatch consumers.

    Each burst: run, GTID range (gtid_first..gtid_last), start and end (Unix
    time from the events' 10 MHz clock), count of events above
    burst_nhit_threshold and the window length (s) that triggered.
    """
    import redis as redis_py

    from minard.store import connection

    r = connection.redis(cfg, "admin")
    try:
        rows = list_bursts(r, limit, with_events=events)
    except redis_py.RedisError as exc:
        raise click.ClickException(f"Redis {config_mod.redact(cfg['redis_url'])}: {exc}") from None
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"{'ID':>4} {'RUN':>7} {'GTIDS':<19} {'START (UTC)':<23} {'DUR s':>8} {'COUNT':>7} {'WINDOW':>6}")
    for b in rows:
        start = datetime.fromtimestamp(b["start"], UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:23]
        click.echo(f"{b['id']:>4} {b['run']:>7} {b['gtid_first']:#08x}-{b['gtid_last']:#08x} {start:<23} "
                   f"{b['end'] - b['start']:>8.3f} {b['count']:>7} {b['window']:>6g}")
