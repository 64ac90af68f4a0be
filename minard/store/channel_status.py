"""The channel-status database: per channel, flags with reason, who and when, and history.

Flags come from the documented set :data:`minard.analysis.dq.FLAGS`
(screamer, hot, dead, bad cable, no N100, no N20, no ESUM, bad calibration,
bad base current, masked).  Keys (docs/dq.md):

* ``channels:status`` hash: lcn -> JSON ``{flag: {"reason", "who", "when"}}``
  (a channel without flags has no field);
* ``channels:history`` list: JSON ``{"lcn", "flag", "action" (flag|unflag),
  "reason", "who", "when"}``, oldest first, never trimmed.

Flagged channels are *known*: the occupancy and CMOS/base checks list them
apart and do not count them (docs/dq.md).
"""

from __future__ import annotations

import json
import time

import redis as redis_py

from minard.analysis.dq import FLAGS
from minard.formats.detector import NCHANNELS_TOTAL
from minard.store import schema

STATUS_KEY = schema.CHANNELS_STATUS
HISTORY_KEY = schema.CHANNELS_HISTORY
MAX_REASON = 1000


class FlagError(ValueError):
    """A flag change the database refuses (message says why)."""


def _lcn(lcn) -> int:
    try:
        value = int(lcn)
    except (TypeError, ValueError):
        raise FlagError(f"channel {lcn!r} is not a number") from None
    if not 0 <= value < NCHANNELS_TOTAL:
        raise FlagError(f"channel {value} is outside 0..{NCHANNELS_TOTAL - 1}")
    return value


def status(redis) -> dict[int, dict]:
    """lcn -> {flag: {reason, who, when}} for every flagged channel."""
    return {int(k): json.loads(v) for k, v in redis.hgetall(STATUS_KEY).items()}


def flagged(redis) -> frozenset[int]:
    """The channels with at least one flag."""
    return frozenset(int(k) for k in redis.hkeys(STATUS_KEY))


def history(redis, lcn: int | None = None, limit: int = 1000) -> list[dict]:
    """The newest *limit* flag changes (of one channel if *lcn*), oldest first."""
    rows = [json.loads(x) for x in redis.lrange(HISTORY_KEY, 0, -1)]
    if lcn is not None:
        rows = [r for r in rows if r["lcn"] == int(lcn)]
    return rows[-limit:]


def change(redis, lcn, flag: str, action: str, reason: str, who: str, now: float | None = None) -> dict:
    """Set (``flag``) or clear (``unflag``) *flag* on channel *lcn*; return the history entry."""
    lcn = _lcn(lcn)
    if flag not in FLAGS:
        raise FlagError(f"unknown flag {flag!r}: use one of {', '.join(FLAGS)}")
    if action not in ("flag", "unflag"):
        raise FlagError("action must be flag or unflag")
    reason = (reason or "").strip()
    if not reason:
        raise FlagError("a reason is required")
    if len(reason) > MAX_REASON:
        raise FlagError(f"the reason is longer than {MAX_REASON} characters")
    when = time.time() if now is None else now
    for _ in range(20):
        with redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(STATUS_KEY)
                raw = pipe.hget(STATUS_KEY, str(lcn))
                flags = json.loads(raw) if raw else {}
                if action == "flag":
                    flags[flag] = {"reason": reason, "who": who, "when": when}
                elif flag in flags:
                    del flags[flag]
                else:
                    raise FlagError(f"channel {lcn} has no flag {flag}")
                entry = {"lcn": lcn, "flag": flag, "action": action, "reason": reason, "who": who, "when": when}
                pipe.multi()
                if flags:
                    pipe.hset(STATUS_KEY, str(lcn), json.dumps(flags))
                else:
                    pipe.hdel(STATUS_KEY, str(lcn))
                pipe.rpush(HISTORY_KEY, json.dumps(entry))
                pipe.execute()
                return entry
            except redis_py.WatchError:
                continue
    raise FlagError("the channel database is busy; try again")


def flag_array(redis) -> list[list[str]]:
    """Per channel (10240 entries), the sorted list of its flags: for the detector map."""
    out: list[list[str]] = [[] for _ in range(NCHANNELS_TOTAL)]
    for lcn, flags in status(redis).items():
        if 0 <= lcn < NCHANNELS_TOTAL:
            out[lcn] = sorted(flags)
    return out
