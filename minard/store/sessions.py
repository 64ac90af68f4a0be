"""Website login sessions, kept server-side in Redis so that they can be ended.

The browser's cookie holds only a random session id (inside Flask's signed
cookie).  The session itself is the hash ``minard:web:session:<sha256(id)>``
(the id is hashed so that a leaked Redis dump holds no usable cookie value):

- ``user``: who logged in;
- ``generation``: the ``created`` time of the user's credentials in the key
  store when they logged in.  Revoking a user and adding them again gives new
  credentials with a new ``created``, so every earlier session stops matching;
- ``created``: login time, for the absolute lifetime (``web_session_hours``).

The key expires after the idle lifetime (``web_session_idle_minutes``) and
every authenticated request pushes the expiry forward.  Logout deletes it.
Nothing here trusts the cookie beyond looking up its id.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from minard.store import schema

#: One login session (hash: user, generation, created).
SESSION_KEY = schema.WEB_SESSION.template
#: Counters of the website's security events (hash: login_failed, login_limited, ...).
WEB_COUNTERS_KEY = schema.WEB_COUNTERS
#: Prefix of Flask-Limiter's counters (login attempts per address and per user).
LIMITS_PREFIX = schema.WEB_LIMITS.template.split(":{", 1)[0]
#: Every key the website writes starts with this (the dashboard's Redis ACL allows it).
WEB_PREFIX = LIMITS_PREFIX.rsplit(":", 1)[0] + ":"


def _key(session_id: str) -> str:
    """The Redis key of *session_id* (its SHA-256, never the id itself)."""
    return SESSION_KEY.format(digest=hashlib.sha256(session_id.encode("utf-8")).hexdigest())


def create(r, user: str, generation: str, idle_seconds: float, now: float | None = None) -> str:
    """Start a session for *user*; return its new random id (for the cookie)."""
    session_id = secrets.token_urlsafe(32)
    now = time.time() if now is None else now
    key = _key(session_id)
    pipe = r.pipeline()
    pipe.hset(key, mapping={"user": user, "generation": generation, "created": repr(now)})
    pipe.expire(key, max(1, int(idle_seconds)))
    pipe.execute()
    return session_id


def lookup(r, session_id: object, absolute_seconds: float, idle_seconds: float,
           now: float | None = None) -> dict | None:
    """The live session *session_id* (``user``, ``generation``, ``created``), or None.

    A session older than *absolute_seconds* is deleted; a live one has its
    idle expiry renewed.
    """
    if not isinstance(session_id, str) or not 20 <= len(session_id) <= 100:
        return None
    key = _key(session_id)
    raw = r.hgetall(key)
    if not raw:
        return None
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    now = time.time() if now is None else now
    try:
        created = float(fields.get("created", "nan"))
    except ValueError:
        created = float("nan")
    if not now - created < absolute_seconds:  # also false for NaN
        r.delete(key)
        return None
    r.expire(key, max(1, int(idle_seconds)))
    return fields


def end(r, session_id: object) -> None:
    """Delete session *session_id* (logout): every copy of its cookie is dead."""
    if isinstance(session_id, str) and session_id:
        r.delete(_key(session_id))


def count(r, reason: str) -> None:
    """Add one to the website's security counter *reason* (``minard:web:counters``)."""
    r.hincrby(WEB_COUNTERS_KEY, reason, 1)


def counters(r) -> dict[str, int]:
    """The website's security counters."""
    return {k.decode(): int(v) for k, v in r.hgetall(WEB_COUNTERS_KEY).items()}
