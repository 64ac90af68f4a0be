"""The registry of programs and their heartbeat state.

Programs are declared in ``conf/programs.cfg`` (``programs_file``), one INI
section per program::

    [data_producer]
    host = localhost
    description = ORCA stream -> ZMQ
    timeout = 30          ; seconds without a heartbeat before it is "down"
    link = /logs/data_producer
    log_file = /var/log/minard/data_producer.log   ; optional, for the Logs page

Heartbeat state lives in Redis (``minard:ops:hb:NAME``) and is evaluated
lazily: a program is *up* while its last heartbeat is younger than its timeout,
*down* after that, *unknown* if it never sent one.  :func:`check_heartbeats`
turns each up -> down transition into one alarm; the log server, the pages and
the pinger call it, and Redis makes sure only one of them raises the alarm.
"""

from __future__ import annotations

import configparser
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from minard.config import ROOT
from minard.ops.keys import valid_name
from minard.store import alarms, schema

HB_PREFIX = schema.OPS_HEARTBEAT.key(program="")
METRICS_PREFIX = schema.OPS_METRICS.key(program="")
#: At most this many metrics per program, each name at most 32 characters.
MAX_METRICS = 16

UP, DOWN, UNKNOWN = "up", "down", "unknown"


def ops_path(cfg, key: str, default_name: str) -> Path:
    """The path of configuration *key*, or ``var_dir/default_name`` if it is empty.

    Relative paths are relative to the project root, like every other path key.
    """
    raw = str(cfg.get(key) or "").strip()
    if raw:
        p = Path(raw)
        return p if p.is_absolute() else ROOT / p
    var = Path(str(cfg["var_dir"]))
    return (var if var.is_absolute() else ROOT / var) / default_name


@dataclass(frozen=True)
class Program:
    """One registered program, as declared in programs.cfg."""

    name: str
    host: str = ""
    description: str = ""
    timeout: float = 30.0
    link: str = ""
    log_file: str = ""


def _check_link(name: str, link: str) -> str:
    """Accept only site-relative or http(s) links (never ``javascript:`` in an href)."""
    if link and not (link.startswith("/") and not link.startswith("//")) and not link.startswith(("http://", "https://")):
        raise ValueError(f"programs.cfg [{name}]: link must start with '/', http:// or https://")
    return link


def parse_registry(text: str, default_timeout: float = 30.0, source: str = "programs.cfg") -> dict[str, Program]:
    """Parse programs.cfg text into programs by name; a bad entry raises ValueError."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    parser.read_string(text, source=source)
    programs = {}
    for name in parser.sections():
        if not valid_name(name):
            raise ValueError(f"{source}: [{name}] is not a valid program name")
        sec = parser[name]
        try:
            timeout = float(sec.get("timeout", default_timeout))
        except ValueError:
            raise ValueError(f"{source} [{name}]: timeout must be a number of seconds") from None
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"{source} [{name}]: timeout must be positive")
        programs[name] = Program(
            name=name, host=sec.get("host", ""), description=sec.get("description", ""),
            timeout=timeout, link=_check_link(name, sec.get("link", "")),
            log_file=sec.get("log_file", ""),
        )
    return programs


class Registry:
    """The programs of programs.cfg, re-read when the file changes."""

    def __init__(self, path: str | os.PathLike, default_timeout: float = 30.0):
        self.path = Path(path)
        self.default_timeout = default_timeout
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._programs: dict[str, Program] = {}

    @classmethod
    def from_config(cls, cfg) -> Registry:
        """The registry named by ``programs_file`` with ``heartbeat_timeout`` as default."""
        return cls(ops_path(cfg, "programs_file", "programs.cfg"), float(cfg["heartbeat_timeout"]))

    def programs(self) -> dict[str, Program]:
        """Programs by name (an absent file means none)."""
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                text = self.path.read_text(encoding="utf-8") if stamp else ""
                self._programs = parse_registry(text, self.default_timeout, str(self.path))
                self._stamp = stamp
            return self._programs

    def get(self, name: object) -> Program | None:
        """The program called *name*, or None (also for names that are not strings)."""
        return self.programs().get(name) if isinstance(name, str) else None

    def __iter__(self):
        return iter(self.programs().values())


def log_path(cfg, program: Program) -> Path:
    """The file the log server writes *program*'s records to (its registered name only)."""
    assert valid_name(program.name)
    return ops_path(cfg, "log_dir", "logs") / f"{program.name}.log"


def view_path(cfg, program: Program) -> Path:
    """The file the Logs page shows: ``log_file`` from the registry, else the log server's."""
    if program.log_file:
        p = Path(program.log_file)
        return p if p.is_absolute() else ROOT / p
    return log_path(cfg, program)


# -- heartbeats -----------------------------------------------------------------

_BEAT = """
local now = tonumber(ARGV[1])
local last = tonumber(redis.call('HGET', KEYS[1], 'last'))
local was = 'up'
if not last then was = 'unknown' elseif now - last > tonumber(ARGV[2]) then was = 'down' end
if was ~= 'up' then redis.call('HSET', KEYS[1], 'since', ARGV[1]) end
redis.call('HSET', KEYS[1], 'last', ARGV[1], 'status', ARGV[3], 'host', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'count', 1)
local alarmed = redis.call('HGET', KEYS[1], 'down_alarm') or ''
redis.call('HDEL', KEYS[1], 'down_alarm')
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {was, alarmed}
"""


def record_heartbeat(r, program: Program, status: str, host: str = "",
                     metrics: dict | None = None, now: float | None = None,
                     history_days: float = 30) -> str:
    """Store one heartbeat; return the state before it (up, down or unknown).

    A heartbeat after a silence longer than the timeout starts a new uptime
    period; if the silence had raised an alarm, a success alarm says it is back.
    """
    now = time.time() if now is None else now
    ttl = int(history_days * 86400)
    was, alarmed = r.eval(_BEAT, 1, HB_PREFIX + program.name, repr(now), repr(program.timeout),
                          status, host, ttl)
    was = was.decode() if isinstance(was, bytes) else was
    if metrics:
        record_metrics(r, program.name, metrics, now)
    if alarmed:
        down_since = float(alarmed)
        alarms.raise_alarm(
            r, alarms.SUCCESS, f"{program.name} is sending heartbeats again "
            f"(silent for {_duration(now - down_since)})", source="heartbeat",
            program=program.name, key=f"heartbeat-up:{program.name}", now=now,
            history_days=history_days, name="heartbeat", priority="low", annunciation="silent")
    return was


def record_metrics(r, name: str, metrics: dict, now: float | None = None) -> None:
    """Store numeric pipeline metrics (lag, queue depth, loss counters) of *name*."""
    now = time.time() if now is None else now
    clean = {str(k): float(v) for k, v in metrics.items()}
    clean["updated"] = now
    r.hset(METRICS_PREFIX + name, mapping={k: repr(v) for k, v in clean.items()})


def validate_metrics(metrics: object) -> dict[str, float]:
    """Check a metrics mapping from a request; raise ValueError with a clear message."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise ValueError("metrics must be an object of name -> number")  # noqa: TRY004 - a 400
    if len(metrics) > MAX_METRICS:
        raise ValueError(f"at most {MAX_METRICS} metrics per heartbeat")
    out = {}
    for k, v in metrics.items():
        if not (isinstance(k, str) and valid_name(k) and len(k) <= 32):
            raise ValueError("metric names must be short words of letters, digits, '_', '.', '-'")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"metric {k} must be a finite number")
        out[k] = float(v)
    return out


def _duration(seconds: float) -> str:
    """A short human duration: 42 s, 5 min, 3.2 h, 2.1 d."""
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _decode(h: dict) -> dict[str, str]:
    """A Redis hash with bytes keys/values as str -> str."""
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in h.items()}


def state_of(program: Program, hb: dict[str, str], now: float) -> dict:
    """The display state of *program* from its heartbeat hash (pure function)."""
    last = float(hb["last"]) if hb.get("last") else None
    if last is None:
        state = UNKNOWN
    elif now - last > program.timeout:
        state = DOWN
    else:
        state = UP
    since = float(hb.get("since") or last or 0) or None
    return {
        "name": program.name, "host": program.host, "description": program.description,
        "timeout": program.timeout, "link": program.link, "state": state,
        "status": hb.get("status", ""), "reported_host": hb.get("host", ""),
        "last": last, "age": (now - last) if last is not None else None,
        "uptime": (now - since) if state == UP and since else None,
        "heartbeats": int(hb.get("count") or 0),
    }


def statuses(r, registry: Registry, now: float | None = None) -> list[dict]:
    """State, uptime and metrics of every registered program, in file order."""
    now = time.time() if now is None else now
    progs = list(registry)
    pipe = r.pipeline(transaction=False)
    for p in progs:
        pipe.hgetall(HB_PREFIX + p.name)
        pipe.hgetall(METRICS_PREFIX + p.name)
    replies = pipe.execute()
    out = []
    for i, p in enumerate(progs):
        row = state_of(p, _decode(replies[2 * i]), now)
        metrics = _decode(replies[2 * i + 1])
        updated = metrics.pop("updated", None)
        row["metrics"] = {k: _number(v) for k, v in sorted(metrics.items())}
        row["metrics_age"] = (now - float(updated)) if updated else None
        out.append(row)
    return out


def _number(v: str) -> float | str:
    """A stored metric as a number when it is one."""
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() else f


#: Atomically: if the heartbeat is older than the timeout and no alarm was raised
#: for this silence yet, mark it and return the last heartbeat time.
_CHECK = """
local raw = redis.call('HGET', KEYS[1], 'last')
if not raw or tonumber(ARGV[1]) - tonumber(raw) <= tonumber(ARGV[2]) then return false end
if redis.call('HSETNX', KEYS[1], 'down_alarm', raw) == 1 then return raw end
return false
"""


def check_heartbeats(r, registry: Registry, now: float | None = None, history_days: float = 30) -> list[str]:
    """Raise one alarm per program whose heartbeat went silent; return their names.

    Safe to call from many processes at once: a Lua script checks the age and
    marks the silence in one step, so exactly one caller raises the alarm.
    """
    now = time.time() if now is None else now
    newly_down = []
    for p in registry:
        last = r.eval(_CHECK, 1, HB_PREFIX + p.name, repr(now), repr(p.timeout))
        if last is None:
            continue
        last = float(last)
        newly_down.append(p.name)
        alarms.raise_alarm(
            r, alarms.DANGER,
            f"{p.name} stopped sending heartbeats: last one {_duration(now - last)} ago "
            f"(timeout {p.timeout:g} s)", source="heartbeat", program=p.name,
            key=f"heartbeat-down:{p.name}", now=now, history_days=history_days, name="heartbeat")
    return newly_down
