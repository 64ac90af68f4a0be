"""The on-call roster: who is shifter, on-call expert and supernova expert now.

Redis hash ``minard:roster`` role -> JSON ``{"name", "email", "by", "at"}``
(docs/operations.md, "Notifications").  Written by ``minard roster set`` and
the Roster page (login), read by the notifier.
"""

from __future__ import annotations

import json
import re
import time

from minard.store import schema

ROSTER = schema.ROSTER
ROLES = ("shifter", "expert", "supernova")
ROLE_TITLES = {"shifter": "Shifter", "expert": "On-call expert", "supernova": "Supernova expert"}
_EMAIL = re.compile(r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}$")


def validate(role: str, name: str, email: str) -> tuple[str, str, str]:
    """Checked (role, name, email); ValueError says what is wrong."""
    role = str(role).strip().lower()
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    name = str(name).strip()
    if not 1 <= len(name) <= 100 or any(ord(c) < 32 for c in name):
        raise ValueError("name must be 1 to 100 printable characters")
    email = str(email or "").strip()
    if email and not _EMAIL.match(email):
        raise ValueError(f"{email[:80]!r} is not an email address")
    return role, name, email


def set_person(r, role: str, name: str, email: str = "", who: str = "", now: float | None = None) -> dict:
    """Put *name* (with *email*) on duty as *role*; returns the entry."""
    role, name, email = validate(role, name, email)
    entry = {"name": name, "email": email, "by": who, "at": time.time() if now is None else now}
    r.hset(ROSTER, role, json.dumps(entry))
    return entry


def clear_role(r, role: str) -> None:
    """Nobody on duty as *role*."""
    r.hdel(ROSTER, role)


def show(r) -> dict[str, dict | None]:
    """Every role -> its entry or None."""
    raw = {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in r.hgetall(ROSTER).items()}
    return {role: raw.get(role) for role in ROLES}
