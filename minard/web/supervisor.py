"""Read-only access to supervisord's process table over XML-RPC on its unix socket.

Only ``supervisor.getState`` and ``supervisor.getAllProcessInfo`` are called:
the site shows the table but never starts or stops anything, and never
proxies supervisord's own web interface.  The connection is supervisor's own
:class:`supervisor.xmlrpc.SupervisorTransport` (the one supervisorctl uses),
with a timeout added so that a hung supervisord cannot hang a page.
"""

from __future__ import annotations

import http.client
import time
import xmlrpc.client

from supervisor.xmlrpc import SupervisorTransport


class Unavailable(Exception):
    """supervisord cannot be asked (not running, no socket, no answer)."""


class TimedTransport(SupervisorTransport):
    """supervisor's transport (``unix://`` or ``http://``) whose sockets time out after *timeout* s."""

    def __init__(self, serverurl: str, timeout: float = 2.0, username: str | None = None,
                 password: str | None = None):
        super().__init__(username, password, serverurl)
        make = self._get_connection

        def connection():
            conn = make()
            conn.timeout = timeout
            connect = conn.connect

            def connect_with_timeout():
                connect()
                conn.sock.settimeout(timeout)

            conn.connect = connect_with_timeout
            return conn

        self._get_connection = connection


def proxy(serverurl: str, timeout: float = 2.0, username: str | None = None,
          password: str | None = None) -> xmlrpc.client.ServerProxy:
    """An XML-RPC proxy to supervisord at *serverurl* (``unix:///path/supervisor.sock``)."""
    transport = TimedTransport(serverurl, timeout, username, password)
    return xmlrpc.client.ServerProxy("http://127.0.0.1/RPC2", transport=transport)


def unix_url(socket_path: str) -> str:
    """The serverurl of supervisord's unix socket *socket_path*."""
    return f"unix://{socket_path}"


def process_table(socket_path: str, timeout: float = 2.0) -> dict:
    """supervisord's state and processes, or :class:`Unavailable` with a clear reason."""
    server = proxy(unix_url(socket_path), timeout)
    try:
        state = server.supervisor.getState()
        infos = server.supervisor.getAllProcessInfo()
    except (FileNotFoundError, ConnectionRefusedError):
        raise Unavailable(f"supervisord is not running (nothing listens on {socket_path})") from None
    except PermissionError:
        raise Unavailable(f"no permission to use supervisord's socket {socket_path}") from None
    except (OSError, xmlrpc.client.Error, http.client.HTTPException) as exc:
        raise Unavailable(f"supervisord did not answer on {socket_path}: {type(exc).__name__}") from None
    now = time.time()
    processes = []
    for p in infos:
        running = p.get("statename") == "RUNNING"
        processes.append({
            "name": p.get("name", ""), "group": p.get("group", ""),
            "state": p.get("statename", ""), "description": p.get("description", ""),
            "pid": p.get("pid") or None,
            "uptime": (now - p["start"]) if running and p.get("start") else None,
            "exitstatus": p.get("exitstatus"), "spawnerr": p.get("spawnerr", ""),
            "logfile": p.get("stdout_logfile", ""),
        })
    return {"state": state.get("statename", ""), "processes": processes}
