"""Alarm definitions (conf/alarms.cfg) and their evaluation against monitor values.

One INI section per alarm (docs/operations.md, "Alarm definitions")::

    [consumer_lag]
    condition = lag.* > 5          ; METRIC OP NUMBER, or increase(METRIC) > N
    priority  = medium             ; critical | high | medium | low
    on_delay  = 3                  ; N consecutive evaluations, or "10s"
    off_delay = 2                  ; the same, before it returns to normal
    deadband  = 1                  ; it clears only below 5 - 1
    latch     = no                 ; yes: after clearing it needs a reset
    class     = banner             ; audible | banner | silent
    suppress  = run_type:calibration, crate:{1}
    guidance  = what the shifter should do
    link      = /status

``*`` in the metric matches one dotted part or more; each match is its own
alarm *instance* (``lag.minard_dispatch_pull``).  ``{1}`` in ``suppress`` is
the matched part, so ``crate:{1}`` suppresses the alarm of crate 3 while the
flag ``crate:3`` (crate 3 out of service) is set.  Definitions with no
``condition`` describe event alarms raised elsewhere (``supernova_burst``,
``heartbeat``, ``log``): their priority, class, guidance and link.

The :class:`Evaluator` keeps, per instance, how many consecutive evaluations
(and since when) the condition held or not, so a value crossing its limit
every second produces one alarm that stays open, not one per crossing.
"""

from __future__ import annotations

import configparser
import fnmatch
import logging
import math
import operator
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from minard import config as config_mod
from minard.store import alarms

log = logging.getLogger("minard.ops.alarmdefs")

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
       "==": operator.eq, "!=": operator.ne}
_COND = re.compile(r"^\s*(?:(increase)\(\s*([\w.*-]+)\s*\)|([\w.*-]+))\s*(>=|<=|==|!=|>|<)\s*"
                   r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_DELAY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s?)\s*$")


@dataclass(frozen=True)
class Delay:
    """An on- or off-delay: *count* consecutive evaluations or *seconds* of holding."""

    count: int = 1
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str, where: str) -> Delay:
        m = _DELAY.match(text or "1")
        if not m:
            raise ValueError(f"{where}: delay {text!r} must be N (evaluations) or Ns (seconds)")
        value = float(m.group(1))
        return cls(seconds=value) if m.group(2) else cls(count=max(1, int(value)))

    def met(self, n: int, since: float, now: float) -> bool:
        """True once held for *n* evaluations since *since*."""
        return now - since >= self.seconds if self.seconds else n >= self.count


@dataclass(frozen=True)
class Definition:
    """One section of alarms.cfg."""

    name: str
    priority: str = "medium"
    metric: str = ""
    func: str = ""
    op: str = ""
    limit: float = 0.0
    on_delay: Delay = field(default_factory=Delay)
    off_delay: Delay = field(default_factory=Delay)
    deadband: float = 0.0
    latch: bool = False
    annunciation: str = "banner"
    suppress: tuple[str, ...] = ()
    guidance: str = ""
    link: str = ""
    message: str = ""

    @property
    def condition(self) -> str:
        """The condition as written."""
        if not self.metric:
            return ""
        m = f"{self.func}({self.metric})" if self.func else self.metric
        return f"{m} {self.op} {self.limit:g}"

    def instances(self, values: dict[str, float]) -> dict[str, str]:
        """Metric names of *values* this definition watches -> instance (the ``*`` part)."""
        if "*" not in self.metric:
            return {self.metric: ""} if self.metric in values else {}
        rx = re.compile("^" + re.escape(self.metric).replace(r"\*", "(.+)") + "$")
        out = {}
        for k in values:
            m = rx.match(k)
            if m:
                out[k] = ".".join(m.groups())
        return out

    def holds(self, value: float, active: bool) -> bool:
        """Whether the condition holds; an active alarm clears only past the deadband."""
        limit = self.limit
        if active and self.deadband:
            limit = limit - self.deadband if self.op in (">", ">=") else (
                limit + self.deadband if self.op in ("<", "<=") else limit)
        return OPS[self.op](value, limit)

    def suppressed_by(self, instance: str, flags: dict[str, dict]) -> str:
        """The reason this instance is suppressed by design now, or ''."""
        for pattern in self.suppress:
            flag = pattern.replace("{1}", instance)
            if flag in flags:
                f = flags[flag]
                return f"{flag} (set by {f.get('by', '?')}{': ' + f['comment'] if f.get('comment') else ''})"
        return ""


def _bool(text: str, where: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "yes", "true", "on"):
        return True
    if v in ("0", "no", "false", "off", ""):
        return False
    raise ValueError(f"{where}: {text!r} is not yes/no")


KNOWN = {"condition", "priority", "on_delay", "off_delay", "deadband", "latch", "class", "suppress",
         "guidance", "link", "message"}


def parse(text: str, source: str = "alarms.cfg") -> dict[str, Definition]:
    """alarms.cfg text -> definitions by name; a mistake raises ValueError naming the line's section."""
    cp = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    try:
        cp.read_string(text, source)
    except configparser.Error as exc:
        raise ValueError(f"{source}: {exc}") from None
    defs = {}
    for name in cp.sections():
        where = f"{source} [{name}]"
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ValueError(f"{where}: alarm names are letters, digits, _ . - (at most 64)")
        sec = cp[name]
        unknown = set(sec) - KNOWN
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        kw = {}
        cond = sec.get("condition", "").strip()
        if cond:
            m = _COND.match(cond)
            if not m:
                raise ValueError(f"{where}: condition {cond!r} must be 'METRIC OP NUMBER' or "
                                 "'increase(METRIC) OP NUMBER'")
            kw.update(func=m.group(1) or "", metric=m.group(2) or m.group(3), op=m.group(4),
                      limit=float(m.group(5)))
        klass = sec.get("class", "").strip().lower()
        try:
            priority = alarms.parse_priority(sec.get("priority", "medium"))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if not klass:
            klass = "audible" if priority in ("critical", "high") else "banner"
        if klass not in alarms.CLASSES:
            raise ValueError(f"{where}: class must be one of {', '.join(alarms.CLASSES)}")
        link = sec.get("link", "").strip()
        if link and not (link.startswith("/") and not link.startswith("//") or link.startswith(("http://", "https://"))):
            raise ValueError(f"{where}: link must be a site path (/...) or an http(s) URL")
        deadband = float(sec.get("deadband", "0") or 0)
        if not math.isfinite(deadband) or deadband < 0:
            raise ValueError(f"{where}: deadband must be >= 0")
        defs[name] = Definition(
            name=name, priority=priority, on_delay=Delay.parse(sec.get("on_delay", "1"), where),
            off_delay=Delay.parse(sec.get("off_delay", "1"), where), deadband=deadband,
            latch=_bool(sec.get("latch", "no"), where), annunciation=klass,
            suppress=tuple(s.strip() for s in sec.get("suppress", "").split(",") if s.strip()),
            guidance=sec.get("guidance", "").strip(), link=link, message=sec.get("message", "").strip(), **kw)
    return defs


def definitions_path(cfg) -> Path:
    """The alarms file (``alarms_file``)."""
    return config_mod.Config(cfg).path("alarms_file")


_CACHE: dict[str, tuple[float, dict[str, Definition]]] = {}


def load(cfg) -> dict[str, Definition]:
    """The definitions of ``alarms_file``, re-read when the file changes; {} if it is missing."""
    path = definitions_path(cfg)
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return {}
    hit = _CACHE.get(str(path))
    if hit and hit[0] == mtime:
        return hit[1]
    defs = parse(path.read_text(encoding="utf-8"), str(path))
    _CACHE[str(path)] = (mtime, defs)
    return defs


def matching(defs: dict[str, Definition], pattern: str) -> list[Definition]:
    """Definitions whose metric matches the glob *pattern* (e.g. ``lag.*``)."""
    return [d for d in defs.values() if d.metric and fnmatch.fnmatch(d.metric, pattern)]


@dataclass
class _Instance:
    """Evaluation state of one alarm instance."""

    active: bool = False
    n_true: int = 0
    n_false: int = 0
    since_true: float = 0.0
    since_false: float = 0.0
    previous: float | None = None  # last raw value (for increase())
    fresh: bool = True  # not evaluated yet by this process


class Evaluator:
    """Evaluates definitions against named values; raises and clears their alarms."""

    def __init__(self, redis, defs: dict[str, Definition], history_days: float = 30):
        self.redis = redis
        self.defs = defs
        self.history_days = history_days
        self.state: dict[tuple[str, str], _Instance] = {}
    @staticmethod
    def key(d: Definition, instance: str) -> str:
        """The grouping key of an instance's alarm."""
        return f"def:{d.name}:{instance}"

    def evaluate(self, values: dict[str, float], now: float | None = None,
                 only: list[Definition] | None = None) -> list[int]:
        """Evaluate (some) definitions on *values*; return ids of alarms raised now."""
        now = time.time() if now is None else now
        flags = alarms.flags(self.redis)
        raised = []
        for d in (only if only is not None else self.defs.values()):
            if not d.metric:
                continue
            for metric, instance in d.instances(values).items():
                value = values[metric]
                if value is None or not math.isfinite(float(value)):
                    continue
                alarm_id = self._step(d, instance, float(value), now, flags)
                if alarm_id is not None:
                    raised.append(alarm_id)
        return raised

    def _step(self, d: Definition, instance: str, value: float, now: float, flags) -> int | None:
        st = self.state.setdefault((d.name, instance), _Instance())
        if d.func == "increase":
            prev, st.previous = st.previous, value
            if prev is None:
                return None
            value = value - prev
        holds = d.holds(value, st.active)
        if st.fresh:
            # After a restart: an alarm left open in Redis is this instance's; pick it up.
            st.fresh = False
            open_id = alarms.open_alarm(self.redis, self.key(d, instance))
            if open_id is not None:
                a = alarms.get(self.redis, open_id, now)
                st.active = bool(a and a["condition"] and a["cleared"] is None)
        if holds:
            st.n_false = 0
            if st.n_true == 0:
                st.since_true = now
            st.n_true += 1
        else:
            st.n_true = 0
            if st.n_false == 0:
                st.since_false = now
            st.n_false += 1
        if not st.active and holds and d.on_delay.met(st.n_true, st.since_true, now):
            st.active = True
            what = f"{d.name}{'[' + instance + ']' if instance else ''}"
            shown = f"{d.func}({d.metric})" if d.func else d.metric
            message = d.message.replace("{1}", instance).replace("{value}", f"{value:g}") if d.message else (
                f"{what}: {shown.replace('*', instance or '*')} = {value:g} ({d.op} {d.limit:g})")
            return alarms.raise_alarm(
                self.redis, alarms.priority_level(d.priority), message, source="monitor",
                program=instance, key=self.key(d, instance), now=now, history_days=self.history_days,
                name=d.name, priority=d.priority, suppressed=d.suppressed_by(instance, flags), clears=True,
                latched=d.latch, annunciation=d.annunciation)
        if st.active and not holds and d.off_delay.met(st.n_false, st.since_false, now):
            st.active = False
            alarms.clear(self.redis, self.key(d, instance), now, self.history_days)
        elif st.active:
            self._resuppress(d, instance, flags)
        return None

    def _resuppress(self, d: Definition, instance: str, flags) -> None:
        """Keep an open alarm's suppression in step with the flags (a crate back in service)."""
        if not d.suppress:
            return
        alarm_id = alarms.open_alarm(self.redis, self.key(d, instance))
        if alarm_id is not None:
            self.redis.hset(alarms.alarm_key(alarm_id), "suppressed", d.suppressed_by(instance, flags))
