"""Read-only access to supervisord's process table over XML-RPC on its unix socket.

Only ``supervisor.getState`` and ``supervisor.getAllProcessInfo`` are called:
the site shows the table but never starts or stops anything, and never
proxies supervisord's own web interface.
"""

from __future__ import annotations

import http.client
import socket
import time
import xmlrpc.client


class Unavailable(Exception):
    """supervisord cannot be asked (not running, no socket, no answer)."""


class _UnixConnection(http.client.HTTPConnection):
    """An HTTP connection over a unix stream socket."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class UnixTransport(xmlrpc.client.Transport):
    """An XML-RPC transport that talks to a unix socket instead of TCP."""

    def __init__(self, path: str, timeout: float = 2.0):
        super().__init__()
        self.path, self.timeout = path, timeout

    def make_connection(self, host):
        return _UnixConnection(self.path, self.timeout)


def process_table(socket_path: str, timeout: float = 2.0) -> dict:
    """supervisord's state and processes, or :class:`Unavailable` with a clear reason."""
    proxy = xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=UnixTransport(socket_path, timeout))
    try:
        state = proxy.supervisor.getState()
        infos = proxy.supervisor.getAllProcessInfo()
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
