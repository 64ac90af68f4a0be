"""The one place a Redis client is built: :func:`redis` (``redis(cfg, role)``).

Every process connects as one *role* (docs/security.md, areas of the Redis ACL):

==============  ============================================================
``pipeline``    dispatcher, ``minard_dispatch push|pull``, ``data_producer``,
                ``data_consumer`` pools
``dashboard``   the web app (``gunicorn minard:app``)
``logserver``   the log server, the pinger, the monitors, alarm notifications
``admin``       command-line tools (``minard runs|stats|query``, ``minard up``,
                the data-quality runner)
==============  ============================================================

Credentials: the Redis ACL user of a role comes from the JSON file named by the
config key ``redis_acl_file`` (``{role: {"username": ..., "password": ...}}``,
mode 0600, written by ``minard up``).  When that key is empty, the file does
not exist, or the role is not in it, the client uses the credentials of
``redis_url`` (none, or the default user's password).  A file readable by
everyone is refused (the passwords would be exposed); the passwords are never
logged.

Timeouts and retries are chosen here once per role (:data:`PROFILES`):

* every role connects within ``connect_timeout`` seconds and checks a pooled
  connection that was idle for ``health_check_interval`` seconds with a PING
  before using it, so a Redis restart is noticed at the next command instead
  of as a broken pipe;
* ``pipeline`` and ``dashboard`` wait at most 5 s for a reply: a consumer's
  flush keeps its data and retries it (``minard.pipeline``), a page answers
  with an error rather than holding a gunicorn worker;
* ``logserver`` waits 3 s: the pinger and monitors run rounds every few
  seconds and must not stall a round on one slow reply;
* ``admin`` waits 10 s: command-line reads such as ``minard query`` fetch
  whole per-channel maps at once;
* a command is retried ``retries`` times (exponential back-off from 0.05 s up
  to ``backoff_cap``) after a connection error only -- a closed or refused
  connection, e.g. a pooled connection to a Redis that restarted, where the
  command did not run.  A timeout is never retried: the command may have run,
  and running a counter increment twice would break the loss accounting
  (redis-py's own default retries timeouts three times, up to 10 s apart).

Redis Sentinel (issue 18) is handled in :func:`_client` only: with
``redis_sentinels`` set, :func:`minard.store.sentinel.from_config` asks the
Sentinels for the primary (or, with ``replica=True``, a replica) of
``redis_master_name`` and connects with the same keyword arguments; ``redis_url``
then supplies only the user, password and database.
"""

from __future__ import annotations

import json
import logging
import stat
from dataclasses import dataclass
from pathlib import Path

import redis as redis_py
from redis.backoff import ExponentialBackoff
from redis.connection import parse_url
from redis.retry import Retry

from minard.config import redact

log = logging.getLogger("minard.store.connection")

#: The roles a process may connect as (each a Redis ACL user when redis_acl_file is set).
ROLES = ("pipeline", "dashboard", "logserver", "admin")


@dataclass(frozen=True)
class Profile:
    """Socket timeouts (s), health-check period (s) and retry policy of one role."""

    connect_timeout: float
    socket_timeout: float
    health_check_interval: int = 30
    retries: int = 1
    backoff_cap: float = 0.5


#: role -> its :class:`Profile` (the reasons are in the module docstring).
PROFILES: dict[str, Profile] = {
    "pipeline": Profile(connect_timeout=1.0, socket_timeout=5.0),
    "dashboard": Profile(connect_timeout=1.0, socket_timeout=5.0),
    "logserver": Profile(connect_timeout=2.0, socket_timeout=3.0),
    "admin": Profile(connect_timeout=3.0, socket_timeout=10.0, retries=2, backoff_cap=1.0),
}


class RedisConfigError(ValueError):
    """The Redis settings are unusable (unknown role, bad ACL file); never shows a password."""


def redis(cfg, role: str, *, replica: bool = False, **opts) -> redis_py.Redis:
    """A Redis client for *role* built from *cfg* (``redis_url``, ``redis_acl_file``).

    *opts* are passed to the client and win over the role's defaults (e.g.
    ``decode_responses=True``, or ``socket_timeout=None`` for a blocking read).
    *replica*: with ``redis_sentinels`` set, a read-only client of a replica
    (the web's reads when ``web_redis_replica`` is on); otherwise the primary.
    Raises :class:`RedisConfigError` for an unknown role or an unreadable ACL file.
    """
    return _client(str(cfg["redis_url"]), {**client_kwargs(cfg, role), **opts}, cfg, replica)


def client_kwargs(cfg, role: str) -> dict:
    """The keyword arguments of a *role* client: timeouts, retry, health checks, ACL user."""
    profile = PROFILES.get(role)
    if profile is None:
        raise RedisConfigError(f"unknown Redis role {role!r} (one of {', '.join(ROLES)})")
    kwargs = {
        "socket_connect_timeout": profile.connect_timeout,
        "socket_timeout": profile.socket_timeout,
        "health_check_interval": profile.health_check_interval,
        "retry": Retry(ExponentialBackoff(cap=profile.backoff_cap, base=0.05), profile.retries,
                       supported_errors=(redis_py.ConnectionError,)),
    }
    kwargs.update(credentials(cfg, role))
    return kwargs


def credentials(cfg, role: str) -> dict:
    """``{"username", "password"}`` of *role* from ``redis_acl_file``, or ``{}`` to use ``redis_url``'s."""
    name = str(cfg.get("redis_acl_file") or "")
    if not name:
        return {}
    path = Path(name)
    if not path.is_absolute() and hasattr(cfg, "path"):
        path = cfg.path("redis_acl_file")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return {}
    if mode & stat.S_IROTH:
        raise RedisConfigError(f"{path} is readable by everyone: chmod 600 it (it holds Redis passwords)")
    try:
        users = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RedisConfigError(f"cannot read the Redis ACL file {path}: {type(exc).__name__}") from None
    entry = users.get(role) if isinstance(users, dict) else None
    if entry is None:
        log.warning("no Redis user for role %s in %s: using the credentials of redis_url", role, path)
        return {}
    if not (isinstance(entry, dict) and isinstance(entry.get("username"), str)
            and isinstance(entry.get("password"), str)):
        raise RedisConfigError(f"{path}: role {role} needs a string username and password")
    return {"username": entry["username"], "password": entry["password"]}


def _client(url: str, kwargs: dict, cfg=None, replica: bool = False) -> redis_py.Redis:
    """The client for *url*, or through the Sentinels of *cfg* (see the module docstring).

    Keyword arguments win over the URL's own options (unlike ``Redis.from_url``),
    so that the role's ACL user replaces the credentials written in the URL.
    """
    try:
        options = parse_url(url)
    except ValueError:
        raise RedisConfigError(f"redis_url {redact(url)} is not a redis://, rediss:// or unix:// URL") from None
    options.update(kwargs)
    if cfg is not None and str(cfg.get("redis_sentinels") or ""):
        from minard.store import sentinel

        return sentinel.from_config(cfg, options, replica=replica)
    return redis_py.Redis.from_pool(redis_py.ConnectionPool(**options))

