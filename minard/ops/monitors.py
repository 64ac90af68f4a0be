"""``minard monitors``: the checks of conf/monitors.cfg, each on its own period.

``conf/monitors.cfg`` (``monitors_file``) has one line per monitor, ``NAME
PERIOD`` (seconds), as the seed's ``monitors.cfg`` / ``poll start NAME
PERIOD``.  One process runs them all, so they start and stop together (one
supervisord program).  Each check returns named values; the runner writes
them to the scalar time series group ``mon`` (:func:`minard.store.timeseries.put`,
field ``<monitor>.<value>``, e.g. ``redis.used_memory``) and evaluates the alarm
definitions of conf/alarms.cfg on them (:mod:`minard.ops.alarmdefs`, source
``monitor``): limits, delays, latching and suppression live there, not here.

=========== ==================================================================
redis       used memory, its fraction of maxmemory, keys, clients, OOM errors
disk        free fraction and bytes of the log, record and var directories
lag         consumer lag (s) of every pool, from their heartbeats
queues      ZMQ-side queue depth: batches held and records in flight per pool
dispatcher  the dispatcher answers ``STATS?``; its clients and dropped events
losses      dropped + errors of every pipeline stage (``stats:<stage>``)
heartbeats  components whose heartbeat stopped (and the registry's alarms)
staleness   seconds since each component beat and each stream stage moved
crates      hits per event of each crate (newest 10 s of the dispatch stream)
rates       events per second of the dispatch stream (last complete 10 s)
=========== ==================================================================

A failing check is logged and retried on its next period; it never stops the
others.  The runner beats ``status:monitors`` like any pipeline process.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from minard import config as config_mod
from minard import metrics
from minard.ops import alarmdefs, programs
from minard.store import connection, schema, status
from minard.store import timeseries as ts

log = logging.getLogger("minard.ops.monitors")

GROUP = "mon"
COMPONENT = "monitors"


@dataclass(frozen=True)
class MonitorSpec:
    """One line of monitors.cfg."""

    name: str
    period: float


@dataclass
class Context:
    """What every check may use: the configuration and a Redis client."""

    cfg: dict
    redis: object
    evaluator: alarmdefs.Evaluator | None = None


Check = Callable[[Context], dict[str, float]]


# ----------------------------------------------------------------- the checks


def _redis_error_count(info: dict, code: str) -> float:
    """Replies with error *code* (e.g. OOM) since Redis started, from INFO errorstats."""
    raw = info.get(f"errorstat_{code}")
    if isinstance(raw, dict):
        return float(raw.get("count", 0))
    return 0.0


def check_redis(ctx: Context):
    """Redis memory (and its share of maxmemory), keys, clients and OOM write failures."""
    r = ctx.redis
    info = r.info("all")
    used, limit = float(info.get("used_memory", 0)), float(info.get("maxmemory", 0))
    values = {"used_memory": used, "maxmemory": limit, "keys": float(r.dbsize()),
              "clients": float(info.get("connected_clients", 0)),
              "oom_errors": _redis_error_count(info, "OOM"),
              "memory_fraction": used / limit if limit else 0.0}
    return values


def watched_dirs(cfg) -> dict[str, Path]:
    """The directories whose disk space is watched: logs, records, var."""
    c = config_mod.Config(cfg)
    dirs = {"logs": programs.ops_path(cfg, "log_dir", "logs"), "records": c.path("record_dir"),
            "var": c.path("var_dir")}
    stack = c.path("stack_dir") / "logs"
    if stack.exists():
        dirs["stack_logs"] = stack
    return dirs


def _existing(path: Path) -> Path:
    """*path* or its nearest existing parent (a directory not created yet is on that disk)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(ctx: Context):
    """Free space (fraction and bytes) of the disks holding the watched directories."""
    values = {}
    for name, path in watched_dirs(ctx.cfg).items():
        st = os.statvfs(_existing(path))
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        values[f"{name}_free"] = free / total if total else 0.0
        values[f"{name}_free_bytes"] = float(free)
    return values


def _alive_components(ctx: Context) -> dict[str, dict]:
    """Heartbeat hashes of the components that are alive now."""
    return {n: f for n, f in status.components(ctx.redis).items() if f.get("alive")}


def _float(value) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def check_lag(ctx: Context):
    """Consumer lag (seconds) of every pool, as each reports it in its heartbeat."""
    values = {}
    for name, fields in _alive_components(ctx).items():
        lag = _float(fields.get("lag_seconds"))
        if lag is not None:
            values[name] = lag
    return values


def check_queues(ctx: Context):
    """Queue depth between ZMQ and the workers: batches held and records in flight per pool."""
    values = {}
    for name, fields in _alive_components(ctx).items():
        for key, short in (("queued_batches", "queued"), ("inflight_records", "inflight")):
            v = _float(fields.get(key))
            if v is not None:
                values[f"{name}.{short}"] = v
    return values


def check_dispatcher(ctx: Context):
    """The dispatcher answers STATS? (1/0); its clients, and events dropped for slow analyzers."""
    import json

    from minard.dispatcher.client import query

    try:
        reply = query(f"127.0.0.1:{ctx.cfg['dispatcher_port']}", "STATS?", timeout=3.0, cfg=ctx.cfg)
        stats = json.loads(reply.split(":", 1)[1])
    except Exception as exc:  # noqa: BLE001 - refused, timeout, bad reply: not answering
        log.debug("dispatcher: %s", exc)
        values = {"up": 0.0}
    else:
        clients = stats.get("clients") or []
        values = {"up": 1.0, "clients": float(len(clients)),
                  "analyzers": float(sum(c.get("role") == "analyzer" for c in clients)),
                  "dropped": float(sum(int(c.get("events_dropped") or 0) for c in clients)),
                  "uptime": float(stats.get("uptime") or 0)}
    return values


def check_losses(ctx: Context):
    """Records lost per pipeline stage (dropped + errors of ``stats:<stage>``)."""
    values = {}
    for stage, counters in status.stats(ctx.redis).items():
        values[stage] = float(counters.get("dropped", 0) + counters.get("errors", 0))
    return values


def check_heartbeats(ctx: Context):
    """Components whose own heartbeat stopped, and the registry's silence alarms."""
    comps = status.components(ctx.redis)
    down = [n for n, f in comps.items() if not f.get("alive") and n != COMPONENT]
    registry = programs.Registry.from_config(ctx.cfg)
    silent = programs.check_heartbeats(ctx.redis, registry, history_days=float(ctx.cfg["alarm_history_days"]))
    if silent:
        log.warning("stopped sending heartbeats: %s", ", ".join(silent))
    return {"components": float(len(comps)), "components_down": float(len(down))}


#: Last value of each stage's ``processed`` counter and when it last moved.
STREAM_SEEN = schema.STREAM_SEEN


def check_staleness(ctx: Context, now: float | None = None):
    """Seconds since each pipeline component beat (``component.NAME``) and since each
    stream stage last processed a record (``stream.STAGE``): a silent pipeline is not healthy."""
    now = time.time() if now is None else now
    values = {}
    for name, fields in status.components(ctx.redis, now).items():
        last = _float(fields.get("time"))
        # An expired heartbeat key: at least its 30 s lifetime ago.
        values[f"component.{name}"] = now - last if last is not None else 30.0
    seen = {k.decode(): v.decode() for k, v in ctx.redis.hgetall(STREAM_SEEN).items()}
    pipe = ctx.redis.pipeline(transaction=False)
    for stage, counters in status.stats(ctx.redis).items():
        processed = int(counters.get("processed", 0))
        old_count, _, old_t = seen.get(stage, "-1:0").partition(":")
        if processed != int(old_count):
            pipe.hset(STREAM_SEEN, stage, f"{processed}:{now!r}")
            values[f"stream.{stage}"] = 0.0
        else:
            values[f"stream.{stage}"] = now - float(old_t)
    pipe.execute()
    return values


def check_crates(ctx: Context, now: float | None = None):
    """Hits per event of each crate in the newest 10 s of the dispatch stream (``occupancy.N``)."""
    from minard.formats.detector import NCHANNELS_TOTAL
    from minard.store.query import latest_occupancy

    occ, t = latest_occupancy(ctx.redis, now, lookback=120.0)
    if t is None:
        return {}
    per_crate = occ[:NCHANNELS_TOTAL].reshape(-1, 512).sum(axis=1)
    return {f"occupancy.{c}": float(v) for c, v in enumerate(per_crate)}


def check_rates(ctx: Context, now: float | None = None):
    """Events per second of the dispatch stream over the last complete 10 s (``events``)."""
    now = time.time() if now is None else now
    _, vals, _ = ts.fetch(ctx.redis, schema.GROUP_STREAM, ["events"], now - 12, now - 2.5, step=1)
    events = vals["events"]
    return {"events": float(np.nansum(events)) / max(1, len(events))}


CHECKS: dict[str, Check] = {
    "redis": check_redis, "disk": check_disk, "lag": check_lag, "queues": check_queues,
    "dispatcher": check_dispatcher, "losses": check_losses, "heartbeats": check_heartbeats,
    "staleness": check_staleness, "crates": check_crates, "rates": check_rates,
}


# ----------------------------------------------------------------- monitors.cfg


def parse_monitors(text: str, source: str = "monitors.cfg") -> list[MonitorSpec]:
    """``NAME PERIOD`` lines (``#`` comments) -> specs; an unknown name or bad period raises ValueError."""
    specs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}:{lineno}: expected 'NAME PERIOD', got {line!r}")
        name, raw = parts
        if name not in CHECKS:
            raise ValueError(f"{source}:{lineno}: unknown monitor {name!r} (known: {', '.join(CHECKS)})")
        try:
            period = float(raw)
        except ValueError:
            raise ValueError(f"{source}:{lineno}: period {raw!r} is not a number of seconds") from None
        if not (math.isfinite(period) and period > 0):
            raise ValueError(f"{source}:{lineno}: period must be positive")
        specs.append(MonitorSpec(name, period))
    return specs


def load_monitors(cfg) -> list[MonitorSpec]:
    """The monitors of ``monitors_file``."""
    path = config_mod.Config(cfg).path("monitors_file")
    return parse_monitors(path.read_text(encoding="utf-8"), str(path))


# ----------------------------------------------------------------- running


def run_check(ctx: Context, name: str, now: float | None = None,
              evaluator: alarmdefs.Evaluator | None = None) -> dict[str, float]:
    """Run monitor *name* once: write its values to the series, evaluate the alarm
    definitions of conf/alarms.cfg on them (metrics ``NAME.VALUE``)."""
    now = time.time() if now is None else now
    values = CHECKS[name](ctx)
    values = {k: float(v) for k, v in values.items() if _float(v) is not None}
    named = {f"{name}.{k}": v for k, v in values.items()}
    if values:
        pipe = ctx.redis.pipeline(transaction=False)
        ts.put(pipe, GROUP, now, named)
        pipe.execute()
    if evaluator is None:
        evaluator = ctx.evaluator
    if evaluator is not None:
        evaluator.evaluate(named, now, only=alarmdefs.matching(evaluator.defs, f"{name}.*"))
    return values


class Runner:
    """Runs every monitor on its period in one thread; SIGTERM stops it between checks."""

    def __init__(self, cfg, specs: list[MonitorSpec], redis=None):
        self.cfg = cfg
        self.specs = specs
        self.ctx = Context(cfg, redis or connection.redis(cfg, "logserver"))
        self.ctx.evaluator = alarmdefs.Evaluator(self.ctx.redis, alarmdefs.load(cfg),
                                                 float(cfg["alarm_history_days"]))
        self.started = time.time()
        self.runs = {s.name: 0 for s in specs}
        self.errors = {s.name: 0 for s in specs}
        self.failing: set[str] = set()
        self._stop = threading.Event()

    def stop(self, *_args) -> None:
        self._stop.set()

    def once(self, spec: MonitorSpec) -> dict[str, float] | None:
        """Run one monitor; log a failure once until it recovers."""
        try:
            values = run_check(self.ctx, spec.name)
        except Exception as exc:  # noqa: BLE001 - one failing check must not stop the others
            self.errors[spec.name] += 1
            if spec.name not in self.failing:
                log.warning("monitor %s failed: %s: %s", spec.name, type(exc).__name__, exc)
                self.failing.add(spec.name)
            return None
        if spec.name in self.failing:
            log.info("monitor %s works again", spec.name)
            self.failing.discard(spec.name)
        self.runs[spec.name] += 1
        return values

    def beat(self) -> None:
        """The runner's own heartbeat (status:monitors) with its counters."""
        fields = {"monitors": len(self.specs), "checks": sum(self.runs.values()),
                  "errors": sum(self.errors.values()), "failing": ",".join(sorted(self.failing))}
        try:
            pipe = self.ctx.redis.pipeline(transaction=True)
            status.beat(pipe, COMPONENT, fields, started=self.started)
            pipe.execute()
        except Exception:  # noqa: BLE001, S110 - Redis down: the redis monitor says so
            pass

    def run(self) -> None:
        """Start every monitor (as the seed's 'poll start NAME PERIOD') and run them until stopped."""
        for s in self.specs:
            log.info("poll start %s %g", s.name, s.period)
        due = {s.name: time.monotonic() for s in self.specs}
        next_beat = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            for s in self.specs:
                if now >= due[s.name] and not self._stop.is_set():
                    self.once(s)
                    due[s.name] = time.monotonic() + s.period
            if time.monotonic() >= next_beat:
                self.beat()
                next_beat = time.monotonic() + 1.0
            wait = min([*due.values(), next_beat]) - time.monotonic()
            self._stop.wait(max(0.05, wait))
        for s in self.specs:
            log.info("poll stop %s (%d checks, %d failed)", s.name, self.runs[s.name], self.errors[s.name])


@click.command("monitors")
@click.argument("names", nargs=-1)
@click.option("--once", is_flag=True, help="Run each monitor once, print its values, exit.")
@config_mod.pass_config
def monitors_cmd(cfg, names, once):
    """Run the monitors of monitors_file (or only NAMES), each on its period."""
    try:
        specs = load_monitors(cfg)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise click.ClickException(f"unknown monitor(s): {', '.join(unknown)} (known: {', '.join(CHECKS)})")
    if names:
        specs = [s for s in specs if s.name in names] or [MonitorSpec(n, 5.0) for n in names]
    runner = Runner(cfg, specs)
    if once:
        for s in specs:
            values = runner.once(s)
            shown = " ".join(f"{k}={v:g}" for k, v in (values or {}).items()) or "FAILED"
            click.echo(f"{s.name:<12} {shown}")
        return
    metrics.serve(cfg, "monitors", metrics.Snapshot("minard_monitor", lambda: {
        "checks": dict(runner.runs), "check_errors": dict(runner.errors),
        "failing": {n: n in runner.failing for n in list(runner.runs)}},
        counters=("checks", "check_errors"), labels=dict.fromkeys(("checks", "check_errors", "failing"), "monitor"),
        help={"failing": "1 while the monitor's check fails."}))
    signal.signal(signal.SIGTERM, runner.stop)
    signal.signal(signal.SIGINT, runner.stop)
    runner.run()
