"""Redis through Sentinel (issue 18): the primary, or a replica for the web tier's reads.

Used by :func:`minard.store.connection.redis` when the config key
``redis_sentinels`` is set (a comma list of ``host:port``).  Then ``redis_url``
supplies only the user, the password and the database; the address of the primary
(service ``redis_master_name``) is asked of the Sentinels at every new connection,
so after a failover the next connection -- the role's retry after the connection
error, or the writer's next flush -- reaches the promoted replica.  redis-py's
:class:`redis.sentinel.Sentinel` does the asking and turns a ``READONLY`` answer
from a demoted primary into a connection error.

Sentinels need no password unless ``redis_sentinel_password_file`` names a file
(mode 0600, one line) holding it; the password is never logged.
"""

from __future__ import annotations

import stat
from pathlib import Path

import redis as redis_py
from redis.sentinel import Sentinel

#: parse_url() results that name where to connect: Sentinel decides that instead.
_ADDRESS_OPTIONS = ("host", "port", "path", "connection_class")


class SentinelConfigError(ValueError):
    """The Sentinel settings are unusable; never shows a password."""


def addresses(value: str) -> list[tuple[str, int]]:
    """``[(host, port)]`` of ``redis_sentinels`` (``"h1:26379,h2:26379"``); [] when empty."""
    out = []
    for item in (part.strip() for part in str(value or "").split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SentinelConfigError(f"redis_sentinels: {item!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    return out


def password(path: str) -> str | None:
    """The Sentinels' password from *path* (empty path: None); refuses a world-readable file."""
    if not path:
        return None
    p = Path(path)
    try:
        if p.stat().st_mode & stat.S_IROTH:
            raise SentinelConfigError(f"{p} is readable by everyone: chmod 600 it (it holds a password)")
        return p.read_text(encoding="utf-8").strip() or None
    except OSError as exc:
        raise SentinelConfigError(f"cannot read redis_sentinel_password_file {p}: {type(exc).__name__}") from None


def client(sentinels: list[tuple[str, int]], master_name: str, options: dict, *,
           sentinel_password: str | None = None, replica: bool = False) -> redis_py.Redis:
    """A client of the primary (or of a replica with *replica*) of *master_name*.

    *options* are the client's keyword arguments (timeouts, retry, user,
    password, db, decode_responses ...); the address options of a parsed URL
    are dropped.  The Sentinels are asked with the same connect and socket
    timeouts as the client.
    """
    kwargs = {k: v for k, v in options.items() if k not in _ADDRESS_OPTIONS}
    sentinel_kwargs = {"socket_connect_timeout": kwargs.get("socket_connect_timeout", 1.0),
                       "socket_timeout": kwargs.get("socket_connect_timeout", 1.0) or 1.0}
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password
    manager = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)
    if replica:
        return manager.slave_for(master_name, **kwargs)
    return manager.master_for(master_name, **kwargs)


def from_config(cfg, options: dict, *, replica: bool = False) -> redis_py.Redis | None:
    """The client :func:`minard.store.connection.redis` builds when ``redis_sentinels`` is set.

    *options* are the parsed ``redis_url`` merged with the role's keyword
    arguments; None when ``redis_sentinels`` is empty (connect to ``redis_url``).
    """
    sentinels = addresses(str(cfg.get("redis_sentinels") or ""))
    if not sentinels:
        return None
    secret = password(str(cfg.get("redis_sentinel_password_file") or ""))
    return client(sentinels, str(cfg.get("redis_master_name") or "minard"), options,
                  sentinel_password=secret, replica=replica)
