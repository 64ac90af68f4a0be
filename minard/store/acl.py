"""Redis ACL users per role: who may run which commands on which keys.

``minard up`` (and a production install, docs/deploy.md) creates one Redis
user per role of :func:`minard.store.connection.redis` and writes their
passwords to ``redis_acl_file`` (JSON ``{role: {"username", "password"}}``,
mode 0600).  Redis receives the users as ``user`` lines with SHA-256 password
hashes, so its configuration never holds a usable password.

Every role reads every key (``%R~*``: the pages, monitors and tools look at
everything) and writes only the key families it owns, named from
:mod:`minard.store` (docs/storage.md).  No role but ``admin`` has the
``@dangerous`` commands (FLUSHALL, FLUSHDB, CONFIG, KEYS, DEBUG, SHUTDOWN,
MONITOR, REPLICAOF, ...).  docs/security.md shows the matrix.

A family added later is added here, to the roles that legitimately write it;
``tests/store/test_acl.py`` checks the matrix against a real redis-server.
"""

from __future__ import annotations

import hashlib
import secrets
from fnmatch import fnmatchcase

from minard.store import schema, sessions

#: Every single key of the alarms (next id, index, counters) and their groups.
_ALARMS = schema.ALARMS_INDEX.rsplit(":", 1)[0] + ":*"

#: The roles (contract with minard.store.connection).
ROLES = ("pipeline", "dashboard", "logserver", "admin")

#: Key families written by the pipeline: time series, runs, ORCA state, pool
#: accounting, heartbeats and loss counters, dispatcher scalers, DQ results and
#: the alarms/bursts the pipeline raises.  (Families of minard/store/schema.py
#: by their pattern; prefixes of families declared elsewhere as prefixes.)
PIPELINE_WRITES = (schema.SCALAR.pattern, schema.CHANNEL.pattern, schema.RUN.pattern, schema.RUN_PART.pattern,
                   schema.FLUSH_MARK.pattern, "runs:*", "orca:*",
                   "pool:*", schema.STATUS.pattern, schema.STATS.pattern, schema.COMPONENTS, schema.POOLS,
                   "dispatcher:*", "accounting:*", "dq:*", schema.ALARM.pattern, _ALARMS, schema.BURST.pattern,
                   "minard:bursts:*")

#: What the website legitimately writes: its sessions, login limits and
#: counters; alarm acknowledgements and shelves (and the heartbeat alarms its
#: reads raise lazily); run sign-offs (run registry), channel flags, DQ
#: reference runs, the shift roster and handover notes; its shared cache of
#: decoded settled blocks (``webcache:``).
DASHBOARD_WRITES = (sessions.WEB_PREFIX + "*", schema.ALARM.pattern, _ALARMS, schema.OPS_HEARTBEAT.pattern,
                    "registry:*", "channels:*", "dq:reference*", "minard:roster*", "minard:shift:*",
                    schema.WEB_BLOCK.pattern, schema.WEB_BASELINE.pattern, schema.WEB_SUM.pattern,
                    schema.WEB_WARM_LOCK)

#: The log server, pinger, monitors and alarm notifier: program heartbeats and
#: metrics, alarms, notifications, roster and escalation state, the burst
#: monitor, the monitors' series (group ``mon``) and their own heartbeats;
#: never the website's sessions.
LOGSERVER_WRITES = ("minard:ops:*", schema.ALARM.pattern, _ALARMS, "minard:notify:*", "minard:roster*",
                    "minard:shift:*", "minard:escalation*", "minard:kpi*", schema.BURST.pattern, "minard:bursts:*",
                    schema.SCALAR.key(step="*", bucket="*", group="mon"), schema.STATUS.pattern, schema.COMPONENTS)

WRITES = {"pipeline": PIPELINE_WRITES, "dashboard": DASHBOARD_WRITES, "logserver": LOGSERVER_WRITES}

#: Commands: everything but @dangerous; INFO back for the monitors (memory,
#: errorstats), and KEYS (read-only, though slow on a big database: minard's own
#: code uses SCAN, tools of other areas may still list a family with KEYS).
COMMANDS = {"pipeline": "+@all -@dangerous +keys", "dashboard": "+@all -@dangerous +keys",
            "logserver": "+@all -@dangerous +info +keys", "admin": "+@all"}


def username(role: str) -> str:
    """The Redis user name of *role*."""
    return f"minard-{role}"


def rule(role: str, password: str) -> str:
    """The ``user`` line of *role* for redis.conf (password as its SHA-256, never in clear)."""
    digest = hashlib.sha256(password.encode("utf-8")).hexdigest()
    if role == "admin":
        keys = "~* &*"
    else:
        keys = "%R~* " + " ".join(f"~{pattern}" for pattern in WRITES[role]) + " resetchannels"
    return f"user {username(role)} reset on #{digest} {keys} {COMMANDS[role]}"


def new_credentials() -> dict[str, dict[str, str]]:
    """Fresh random credentials for every role (the content of ``redis_acl_file``)."""
    return {role: {"username": username(role), "password": secrets.token_urlsafe(32)} for role in ROLES}


def config_lines(credentials: dict[str, dict[str, str]]) -> str:
    """The ``user`` lines of every role in *credentials*."""
    return "".join(rule(role, credentials[role]["password"]) + "\n" for role in ROLES if role in credentials)


def writers(key: str) -> list[str]:
    """The roles (besides admin) whose write patterns match *key*."""
    return [role for role, patterns in WRITES.items() if any(fnmatchcase(key, p) for p in patterns)]
