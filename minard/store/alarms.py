"""Alarms in Redis: raise, group, acknowledge, shelve, and thresholds on pipeline data.

An alarm has a level (10 debug, 20 info, 21 success, 30 warning, 40 danger),
a message, where it came from (``source``: log, heartbeat, monitor, ...) and
the program it concerns.  Identical alarms are *grouped*: while an alarm is
not acknowledged, raising the same one again (same grouping key) only bumps
its count and last-seen time.  After an acknowledgement the next occurrence
opens a new alarm, so a condition that comes back is announced again; to
silence a recurring condition an operator *shelves* it, always until a given
time, after which it is active again unless acknowledged.

States follow ISA-18.2 (:func:`state_of`): ``unacknowledged``,
``acknowledged``, ``rtn_unacknowledged`` (the condition cleared before anyone
acknowledged it), ``normal`` (cleared and acknowledged, or reset when
latched), ``latched`` (acknowledged and cleared, waiting for a reset),
``shelved`` (always with an expiry), ``suppressed`` (by design, e.g. a crate
out of service) and ``out_of_service``.  Alarms raised from a definition of
conf/alarms.cfg (``clears``) can return to normal; a repeat while the alarm is
still open counts into it, so a chattering condition is one alarm.  Event
alarms (log, heartbeat) never clear: acknowledging closes them.  Every
transition is appended to the alarm's log (who, when, comment).

Priorities are ``critical | high | medium | low``.  An alarm is *ringing* when
it is unacknowledged and its class is ``audible`` (default for critical and
high); the website beeps while any alarm rings.

Redis keys (``docs/operations.md``):

- ``minard:alarms:next``          counter for alarm ids
- ``minard:alarm:ID``             hash with the alarm's fields; expires
  ``alarm_history_days`` after its last change
- ``minard:alarms:index``         sorted set of ids by last-seen time (trimmed
  to the same history)
- ``minard:alarms:group:SHA1``    id of the open alarm of a grouping key
- ``minard:alarms:counters``      last values of counters watched for movement
- ``minard:alarm:ID:log``         list of the alarm's transitions (JSON), same expiry
- ``minard:alarms:oos``           hash alarm name -> JSON (who, when, comment) of
  definitions taken out of service
- ``minard:alarms:flags``         hash suppression flag (``crate:3``,
  ``run_type:calibration``) -> JSON (who, when, comment)
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from minard.store import schema

DEBUG, INFO, SUCCESS, WARNING, DANGER = 10, 20, 21, 30, 40
#: level -> (name, colour).  Colours are the ones of static/css/minard.css.
LEVELS = {
    DEBUG: ("debug", "#6c757d"),
    INFO: ("info", "#0b7fab"),
    SUCCESS: ("success", "#1e8a3c"),
    WARNING: ("warning", "#d98c00"),
    DANGER: ("danger", "#c62828"),
}
NAMES = {name: level for level, (name, _) in LEVELS.items()}
NAMES.update({"error": DANGER, "critical": DANGER, "warn": WARNING})
RING_LEVEL = DANGER
MAX_MESSAGE = 2000
MAX_COMMENT = 500

NEXT, INDEX, COUNTERS = schema.ALARMS_NEXT, schema.ALARMS_INDEX, schema.ALARMS_COUNTERS
OOS, FLAGS = schema.ALARMS_OOS, schema.ALARMS_FLAGS

PRIORITIES = ("critical", "high", "medium", "low")
CLASSES = ("audible", "banner", "silent")
STATES = ("unacknowledged", "acknowledged", "rtn_unacknowledged", "latched", "normal", "shelved",
          "suppressed", "out_of_service")
#: States in which an alarm still needs the crew (shown by default, counted as active).
OPEN_STATES = ("unacknowledged", "acknowledged", "rtn_unacknowledged", "latched")


def default_priority(level: int) -> str:
    """The priority of an alarm raised with only a level (40 high, 30 medium, else low)."""
    return "high" if level >= DANGER else "medium" if level >= WARNING else "low"


def priority_level(priority: str) -> int:
    """The display level (colour) of a priority."""
    return {"critical": 50, "high": DANGER, "medium": WARNING, "low": INFO}[priority]


def parse_priority(value: object) -> str:
    """A priority name, or ValueError."""
    v = str(value).strip().lower()
    if v not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {str(value)[:20]!r}")
    return v


def alarm_key(alarm_id: int | str) -> str:
    """Redis key of one alarm's hash."""
    return schema.ALARM.key(id=int(alarm_id))


def group_key(key: str) -> str:
    """Redis key holding the open alarm id of grouping *key* (hashed: keys may be long)."""
    return schema.ALARM_GROUP.key(digest=hashlib.sha1(key.encode("utf-8")).hexdigest())


def parse_level(value: object) -> int:
    """A level from an int (0..50) or a name (debug, info, success, warning, danger, error)."""
    if isinstance(value, bool):
        raise ValueError("level must be a number or a level name")  # noqa: TRY004 - a 400, not a bug
    if isinstance(value, str):
        v = value.strip().lower()
        if v in NAMES:
            return NAMES[v]
        try:
            value = int(v)
        except ValueError:
            raise ValueError(f"unknown level {value[:20]!r}: use 10, 20, 21, 30, 40 or a level name") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value <= 50:
        raise ValueError("level must be an integer from 0 to 50")
    return value


def level_name(level: int) -> str:
    """Name of the highest defined level not above *level* (50 critical -> danger)."""
    best = DEBUG
    for lv in LEVELS:
        if lv <= level:
            best = max(best, lv)
    return LEVELS[best][0]


def level_colour(level: int) -> str:
    """Display colour of *level*."""
    return LEVELS[NAMES[level_name(level)]][1]


def _ttl(history_days: float) -> int:
    """Seconds an alarm is kept after its last change."""
    return max(1, int(history_days * 86400))


def _clip(text: object, limit: int) -> str:
    """*text* as str, cut to *limit* characters with an ellipsis."""
    s = str(text)
    return s if len(s) <= limit else s[: limit - 1] + "\u2026"


_RAISE = """
local id = redis.call('GET', KEYS[1])
if id then
  local a = ARGV[1] .. id
  if redis.call('EXISTS', a) == 1 then
    local f = redis.call('HMGET', a, 'ack_at', 'clears', 'clear_at', 'latched', 'reset_at')
    local closed
    if f[2] == '1' then
      if f[4] == '1' then closed = f[5] ~= false else closed = (f[1] ~= false and f[3] ~= false) end
    else
      closed = f[1] ~= false
    end
    if not closed then
      local back = 0
      if f[3] and f[4] ~= '1' then back = 2 end
      redis.call('HINCRBY', a, 'count', 1)
      redis.call('HSET', a, 'last', ARGV[2], 'message', ARGV[6], 'suppressed', ARGV[11])
      if f[3] and f[4] ~= '1' then redis.call('HDEL', a, 'clear_at', 'ack_at', 'ack_by', 'ack_comment') end
      redis.call('EXPIRE', a, ARGV[3])
      redis.call('EXPIRE', KEYS[1], ARGV[3])
      redis.call('ZADD', KEYS[3], ARGV[2], id)
      return {tonumber(id), back}
    end
  end
end
id = redis.call('INCR', KEYS[2])
local a = ARGV[1] .. id
redis.call('HSET', a, 'id', id, 'level', ARGV[4], 'source', ARGV[5], 'message', ARGV[6],
           'program', ARGV[7], 'key', ARGV[8], 'first', ARGV[2], 'last', ARGV[2], 'count', 1,
           'name', ARGV[9], 'priority', ARGV[10], 'suppressed', ARGV[11], 'clears', ARGV[12],
           'latched', ARGV[13], 'class', ARGV[14])
redis.call('EXPIRE', a, ARGV[3])
redis.call('SET', KEYS[1], id, 'EX', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], id)
return {tonumber(id), 1}
"""


def log_key(alarm_id: int | str) -> str:
    """Redis key of one alarm's transition log."""
    return schema.ALARM_LOG.key(id=int(alarm_id))


def record(r, alarm_id: int, action: str, who: str = "", comment: str = "", now: float | None = None,
           history_days: float = 30) -> None:
    """Append one transition (who, when, comment) to the alarm's log."""
    now = time.time() if now is None else now
    entry = json.dumps({"t": now, "action": action, "who": who, "comment": _clip(comment, MAX_COMMENT)})
    pipe = r.pipeline(transaction=False)
    pipe.rpush(log_key(alarm_id), entry)
    pipe.ltrim(log_key(alarm_id), -500, -1)
    pipe.expire(log_key(alarm_id), _ttl(history_days))
    pipe.execute()


def transitions(r, alarm_id: int) -> list[dict]:
    """The alarm's transitions, oldest first."""
    return [json.loads(x) for x in r.lrange(log_key(alarm_id), 0, -1)]


def raise_alarm(r, level: int, message: str, source: str = "", program: str = "",
                key: str | None = None, now: float | None = None, history_days: float = 30,
                name: str = "", priority: str | None = None, suppressed: str = "",
                clears: bool = False, latched: bool = False, annunciation: str | None = None) -> int:
    """Raise an alarm, or count a repeat of the open identical one; return its id.

    *key* groups repeats; by default it is the source, program, level and
    message, so only identical alarms are grouped.  Threshold alarms pass a key
    so that a changing value still counts as the same alarm.  *name* is the
    alarm definition (conf/alarms.cfg), *priority* one of PRIORITIES (default
    from the level), *suppressed* the reason it is suppressed by design (empty:
    not), *clears* marks a condition alarm that :func:`clear` returns to normal,
    *latched* one that then needs a reset, *annunciation* its class.
    """
    now = time.time() if now is None else now
    level = parse_level(level)
    priority = parse_priority(priority) if priority else default_priority(level)
    if annunciation is None:
        annunciation = "audible" if priority in ("critical", "high") else "banner"
    message = _clip(message, MAX_MESSAGE)
    key = key or f"{source}\0{program}\0{level}\0{message}"
    alarm_id, new = r.eval(_RAISE, 3, group_key(key), NEXT, INDEX, schema.ALARM_PREFIX, repr(now),
                           _ttl(history_days), level, source, message, program, _clip(key, 200),
                           name, priority, _clip(suppressed, 200), "1" if clears else "",
                           "1" if latched else "", annunciation)
    if new:
        record(r, int(alarm_id), "raised" if new == 1 else "active again", "", message, now, history_days)
    trim(r, now, history_days)
    return int(alarm_id)


def open_alarm(r, key: str) -> int | None:
    """The id of the open alarm of grouping *key*, or None."""
    raw = r.get(group_key(key))
    return int(raw) if raw else None


def clear(r, key: str, now: float | None = None, history_days: float = 30) -> int | None:
    """The condition of grouping *key* returned to normal: mark its alarm; return its id."""
    now = time.time() if now is None else now
    alarm_id = open_alarm(r, key)
    if alarm_id is None:
        return None
    h = _decode(r.hgetall(alarm_key(alarm_id)))
    if not h or h.get("clear_at") or h.get("clears") != "1":
        return None
    _update(r, alarm_id, {"clear_at": repr(now), "suppressed": ""}, history_days)
    record(r, alarm_id, "returned to normal", "", "", now, history_days)
    return alarm_id


def trim(r, now: float | None = None, history_days: float = 30) -> int:
    """Drop index entries older than the history (their hashes expire by themselves)."""
    now = time.time() if now is None else now
    return r.zremrangebyscore(INDEX, "-inf", now - _ttl(history_days))


def _decode(h: Mapping) -> dict[str, str]:
    """A Redis hash as str -> str."""
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in h.items()}


def state_of(h: Mapping[str, str], now: float, oos: bool = False) -> str:
    """The ISA-18.2 state of an alarm hash at *now* (see the module docstring)."""
    if oos:
        return "out_of_service"
    shelved_until = float(h["shelved_until"]) if h.get("shelved_until") else None
    acked, cleared = bool(h.get("ack_at")), bool(h.get("clear_at"))
    if h.get("clears") == "1" and h.get("latched") == "1" and h.get("reset_at"):
        return "normal"
    if h.get("clears") == "1" and cleared and acked:
        return "latched" if h.get("latched") == "1" else "normal"
    if h.get("clears") != "1" and acked:
        return "acknowledged"
    if h.get("suppressed"):
        return "suppressed"
    if shelved_until and shelved_until > now:
        return "shelved"
    if acked:
        return "acknowledged"
    if cleared and h.get("latched") != "1":
        return "rtn_unacknowledged"
    return "unacknowledged"


def _view(h: dict[str, str], now: float, oos: dict | None = None) -> dict:
    """An alarm hash as a dict for pages and JSON, with its state at *now*."""
    level = int(h.get("level", 0))
    shelved_until = float(h["shelved_until"]) if h.get("shelved_until") else None
    name = h.get("name", "")
    state = state_of(h, now, bool(oos and name and name in oos))
    priority = h.get("priority") or default_priority(level)
    klass = h.get("class") or ("audible" if priority in ("critical", "high") else "banner")
    num = lambda k: float(h[k]) if h.get(k) else None
    return {
        "id": int(h["id"]), "name": name, "priority": priority, "class": klass,
        "level": level, "level_name": level_name(level),
        "colour": level_colour(level), "source": h.get("source", ""),
        "program": h.get("program", ""), "message": h.get("message", ""),
        "first": num("first"), "last": num("last"), "count": int(h.get("count", 1)),
        "raised": num("first"), "cleared": num("clear_at"),
        "state": state, "ringing": state == "unacknowledged" and klass == "audible",
        "latched": h.get("latched") == "1", "condition": h.get("clears") == "1",
        "suppressed": h.get("suppressed") or None,
        "ack_by": h.get("ack_by"), "ack_at": num("ack_at"), "ack_comment": h.get("ack_comment"),
        "acknowledged": num("ack_at"),
        "shelved_until": shelved_until, "shelved_by": h.get("shelved_by"),
        "shelved": num("shelved_at"),
        "shelve_comment": h.get("shelve_comment"),
        "reset_at": num("reset_at"), "reset_by": h.get("reset_by"),
        "shelve_expired": bool(shelved_until and shelved_until <= now and state == "unacknowledged"),
    }


def out_of_service(r) -> dict[str, dict]:
    """Alarm names taken out of service -> who, when, comment."""
    return {k: json.loads(v) for k, v in _decode(r.hgetall(OOS)).items()}


def set_out_of_service(r, name: str, who: str, on: bool, comment: str = "", now: float | None = None) -> None:
    """Take the alarm definition *name* out of service (or back into service)."""
    now = time.time() if now is None else now
    if on:
        r.hset(OOS, name, json.dumps({"by": who, "at": now, "comment": _clip(comment, MAX_COMMENT)}))
    else:
        r.hdel(OOS, name)


def flags(r) -> dict[str, dict]:
    """Suppression flags set now (``crate:N``, ``run_type:NAME``) -> who, when, comment."""
    return {k: json.loads(v) for k, v in _decode(r.hgetall(FLAGS)).items()}


def set_flag(r, flag: str, who: str, on: bool, comment: str = "", now: float | None = None) -> None:
    """Set or remove a suppression flag (e.g. ``crate:3`` = crate 3 out of service)."""
    now = time.time() if now is None else now
    if on:
        r.hset(FLAGS, flag, json.dumps({"by": who, "at": now, "comment": _clip(comment, MAX_COMMENT)}))
    else:
        r.hdel(FLAGS, flag)


def get(r, alarm_id: int, now: float | None = None) -> dict | None:
    """One alarm by id, or None if it does not exist (or expired)."""
    h = r.hgetall(alarm_key(alarm_id))
    return _view(_decode(h), time.time() if now is None else now, out_of_service(r)) if h else None


def list_alarms(r, now: float | None = None, limit: int = 200, history_days: float = 30) -> list[dict]:
    """The most recently seen alarms, newest first (at most *limit*)."""
    now = time.time() if now is None else now
    trim(r, now, history_days)
    ids = r.zrevrange(INDEX, 0, max(0, limit - 1))
    pipe = r.pipeline(transaction=False)
    for i in ids:
        pipe.hgetall(alarm_key(int(i)))
    oos = out_of_service(r)
    return [_view(_decode(h), now, oos) for h in pipe.execute() if h]


def ringing(alarms: Iterable[dict]) -> bool:
    """True if any of *alarms* is unacknowledged and audible."""
    return any(a["ringing"] for a in alarms)


def summary(r, now: float | None = None, history_days: float = 30) -> dict:
    """Counts for the navigation bar and the beep: active (unacknowledged), ringing, shelved."""
    items = list_alarms(r, now, limit=500, history_days=history_days)
    return {
        "active": sum(a["state"] in ("unacknowledged", "rtn_unacknowledged") for a in items),
        "ringing": sum(a["ringing"] for a in items),
        "shelved": sum(a["state"] == "shelved" for a in items),
        "banner": sum(a["state"] == "unacknowledged" and a["class"] == "banner" for a in items),
        "latest": items[0]["id"] if items else 0,
    }


def _update(r, alarm_id: int, fields: dict, history_days: float) -> None:
    """Set *fields* on an alarm and keep it for another history period."""
    k = alarm_key(alarm_id)
    pipe = r.pipeline()
    pipe.hset(k, mapping=fields)
    pipe.expire(k, _ttl(history_days))
    pipe.execute()


def _existing(r, alarm_id: int, now: float) -> dict:
    """The alarm *alarm_id* or a LookupError."""
    a = get(r, alarm_id, now)
    if a is None:
        raise LookupError(f"alarm {alarm_id} does not exist")
    return a


def acknowledge(r, alarm_id: int, who: str, comment: str = "", now: float | None = None,
                history_days: float = 30) -> dict:
    """Acknowledge an alarm (who, when, comment); an event alarm's repeat then opens a new alarm."""
    now = time.time() if now is None else now
    a = _existing(r, alarm_id, now)
    if a["ack_at"] is not None:
        raise ValueError(f"alarm {alarm_id} was already acknowledged by {a['ack_by']}")
    if a["state"] == "normal":
        raise ValueError(f"alarm {alarm_id} is already back to normal")
    comment = _clip(comment.strip(), MAX_COMMENT)
    _update(r, alarm_id, {"ack_by": who, "ack_at": repr(now), "ack_comment": comment}, history_days)
    record(r, alarm_id, "acknowledged", who, comment, now, history_days)
    return _existing(r, alarm_id, now)


def reset(r, alarm_id: int, who: str, comment: str = "", now: float | None = None,
          history_days: float = 30) -> dict:
    """Reset a latched alarm whose condition has cleared (it then returns to normal)."""
    now = time.time() if now is None else now
    a = _existing(r, alarm_id, now)
    if not a["latched"]:
        raise ValueError(f"alarm {alarm_id} is not latched; it returns to normal by itself")
    if a["cleared"] is None:
        raise ValueError(f"alarm {alarm_id} cannot be reset: its condition is still active")
    if a["reset_at"] is not None:
        raise ValueError(f"alarm {alarm_id} was already reset by {a['reset_by']}")
    fields = {"reset_by": who, "reset_at": repr(now)}
    if a["ack_at"] is None:
        fields.update(ack_by=who, ack_at=repr(now), ack_comment=_clip(comment.strip(), MAX_COMMENT))
    _update(r, alarm_id, fields, history_days)
    record(r, alarm_id, "reset", who, comment, now, history_days)
    return _existing(r, alarm_id, now)


def shelve(r, alarm_id: int, who: str, until: float | None, comment: str = "",
           now: float | None = None, max_hours: float = 72, history_days: float = 30) -> dict:
    """Shelve an alarm until *until* (mandatory, in the future, at most *max_hours* away)."""
    now = time.time() if now is None else now
    if until is None or not isinstance(until, (int, float)) or not math.isfinite(until):
        raise ValueError("shelving needs an expiry time")
    if until <= now:
        raise ValueError("the shelve expiry must be in the future")
    if until - now > max_hours * 3600:
        raise ValueError(f"an alarm may be shelved for at most {max_hours:g} hours")
    a = _existing(r, alarm_id, now)
    if a["state"] not in ("unacknowledged", "rtn_unacknowledged", "shelved"):
        raise ValueError(f"alarm {alarm_id} is already {a['state']}")
    comment = _clip(comment.strip(), MAX_COMMENT)
    _update(r, alarm_id, {"shelved_until": repr(float(until)), "shelved_by": who, "shelved_at": repr(now),
                          "shelve_comment": comment}, history_days)
    record(r, alarm_id, f"shelved until {time.strftime('%Y-%m-%d %H:%M', time.localtime(until))}", who,
           comment, now, history_days)
    return _existing(r, alarm_id, now)


def unshelve(r, alarm_id: int, who: str, now: float | None = None, history_days: float = 30) -> dict:
    """End a shelve early: the alarm is active again."""
    now = time.time() if now is None else now
    _existing(r, alarm_id, now)
    # The shelve is removed, not made to expire now: the alarm reads as unacknowledged,
    # never "(shelve expired)", and who ended it is kept.
    r.hdel(alarm_key(alarm_id), "shelved_until")
    _update(r, alarm_id, {"shelved_by": who, "unshelved_by": who, "unshelved_at": repr(now)}, history_days)
    record(r, alarm_id, "unshelved", who, "", now, history_days)
    return _existing(r, alarm_id, now)


# -- thresholds on pipeline data ------------------------------------------------


@dataclass(frozen=True)
class Threshold:
    """A condition on one named value that raises an alarm while it holds.

    ``zero``: the value is 0 (e.g. the trigger rate).  ``above`` / ``below``:
    the value is outside a limit (e.g. consumer lag above 5 s).  ``moving``:
    a counter increased since the previous check (e.g. events lost).
    """

    metric: str
    above: float | None = None
    below: float | None = None
    zero: bool = False
    moving: bool = False
    level: int = WARNING
    label: str = ""

    def describe(self, value: float, previous: float | None) -> str | None:
        """The alarm message if *value* violates this threshold, else None."""
        name = self.label or self.metric
        if self.zero and value == 0:
            return f"{name} is zero"
        if self.above is not None and value > self.above:
            return f"{name} is {value:g}, above {self.above:g}"
        if self.below is not None and value < self.below:
            return f"{name} is {value:g}, below {self.below:g}"
        if self.moving and previous is not None and value > previous:
            return f"{name} increased by {value - previous:g} to {value:g}"
        return None


def check_thresholds(r, values: Mapping[str, float], thresholds: Iterable[Threshold],
                     source: str = "monitor", program: str = "", now: float | None = None,
                     history_days: float = 30) -> list[int]:
    """Raise an alarm for each threshold its value violates; return the alarm ids.

    *values* maps metric names to current values (missing ones are skipped).
    Each threshold's alarms share one grouping key, so a condition that holds
    over many checks is one alarm with a count, not one alarm per check.
    """
    now = time.time() if now is None else now
    raised = []
    for t in thresholds:
        value = values.get(t.metric)
        if value is None or not math.isfinite(float(value)):
            continue
        value = float(value)
        previous = None
        ident = f"{source}:{program}:{t.metric}"
        if t.moving:
            old = r.hget(COUNTERS, ident)
            r.hset(COUNTERS, ident, repr(value))
            previous = float(old) if old is not None else None
        message = t.describe(value, previous)
        if message:
            prefix = f"{program}: " if program else ""
            raised.append(raise_alarm(r, t.level, prefix + message, source=source, program=program,
                                      key=f"threshold:{ident}:{t.level}", now=now,
                                      history_days=history_days))
    return raised
