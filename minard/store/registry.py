"""The run registry: every run's sign-off state, and its history, never deleted.

A run moves ``unreviewed`` -> shifter checked (``good`` / ``bad`` /
``unsure``, with a comment) -> expert signed (``pass`` / ``fail``, with a
comment).  A shifter may revise their check until an expert signs; an expert
may re-sign.  Every change is appended to the run's history (who, when, from
what, to what, comment); nothing is removed or expires.

Keys (docs/dq.md):

* ``registry:state`` hash: run -> JSON ``{"state", "who", "when", "comment"}``;
* ``registry:history:<run>`` list: JSON entries ``{"from", "to", "who",
  "when", "comment"}``, oldest first (RPUSH only).

Writes are one optimistic transaction (WATCH the state), so two people
signing the same run at once both end up in the history in order.
"""

from __future__ import annotations

import json
import time

import redis as redis_py

from minard.store import schema

STATE_KEY = schema.REGISTRY_STATE
HISTORY_KEY = schema.REGISTRY_HISTORY.template
SHIFTER_STATES = ("good", "bad", "unsure")
EXPERT_STATES = ("pass", "fail")
STATES = ("unreviewed",) + SHIFTER_STATES + EXPERT_STATES
MAX_COMMENT = 2000


class SignError(ValueError):
    """A sign-off that the registry's rules refuse (message says why)."""


def states(redis) -> dict[int, dict]:
    """Run -> current state entry, for every run ever signed."""
    return {int(k): json.loads(v) for k, v in redis.hgetall(STATE_KEY).items()}


def state(redis, run: int) -> dict:
    """The run's current state entry (``unreviewed`` if never signed)."""
    raw = redis.hget(STATE_KEY, str(int(run)))
    return json.loads(raw) if raw else {"state": "unreviewed", "who": None, "when": None, "comment": ""}


def history(redis, run: int) -> list[dict]:
    """Every change of the run's state, oldest first."""
    return [json.loads(x) for x in redis.lrange(HISTORY_KEY.format(run=int(run)), 0, -1)]


def check_transition(current: str, new: str, is_expert: bool) -> None:
    """Raise SignError unless a user (expert or not) may move a run from *current* to *new*."""
    if new not in SHIFTER_STATES + EXPERT_STATES:
        raise SignError(f"unknown state {new!r}: use one of {', '.join(SHIFTER_STATES + EXPERT_STATES)}")
    if new in EXPERT_STATES:
        if not is_expert:
            raise SignError(f"only an expert may sign a run {new}")
        if current == "unreviewed":
            raise SignError("a shifter must check the run (good/bad/unsure) before an expert signs it")
    elif current in EXPERT_STATES and not is_expert:
        raise SignError(f"the run is already signed {current} by an expert")


def sign(redis, run: int, new: str, who: str, comment: str, is_expert: bool,
         now: float | None = None) -> dict:
    """Move *run* to state *new* by *who* with *comment*; return the history entry.

    Raises SignError for a refused transition or an empty comment.
    """
    comment = (comment or "").strip()
    if not comment:
        raise SignError("a comment is required")
    if len(comment) > MAX_COMMENT:
        raise SignError(f"the comment is longer than {MAX_COMMENT} characters")
    run = int(run)
    for _ in range(20):
        with redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(STATE_KEY)
                raw = pipe.hget(STATE_KEY, str(run))
                current = json.loads(raw)["state"] if raw else "unreviewed"
                check_transition(current, new, is_expert)
                when = time.time() if now is None else now
                entry = {"from": current, "to": new, "who": who, "when": when, "comment": comment}
                pipe.multi()
                pipe.hset(STATE_KEY, str(run), json.dumps({"state": new, "who": who, "when": when,
                                                           "comment": comment}))
                pipe.rpush(HISTORY_KEY.format(run=run), json.dumps(entry))
                pipe.execute()
                return entry
            except redis_py.WatchError:
                continue
    raise SignError("the registry is busy; try again")


def golden(redis) -> list[dict]:
    """The runs signed ``pass``: run, who, when, comment, oldest run first."""
    rows = [{"run": r, "signed_by": s["who"], "signed_at": s["when"], "comment": s["comment"]}
            for r, s in states(redis).items() if s["state"] == "pass"]
    return sorted(rows, key=lambda r: r["run"])
