"""Several "hosts" on one machine: Linux network namespaces joined by a bridge.

Multi-host tests (issue 18) run each part of the stack in its own namespace, with
its own loopback and one address on a private test network, so that every
connection between parts is a real TCP connection between hosts and a link can be
cut.  Only addresses of these namespaces are ever used: the network is
198.18.<net>.0/24 (RFC 2544's benchmarking range), built inside a dedicated hub
namespace, so nothing is added to the machine's own namespace.

``Network`` (the namespaces themselves are :mod:`minard.ops.netns`, shared with
``minard up --hosts N``) creates and, on ``close()``, deletes every namespace it
made (deleting a namespace deletes its veth ends); processes started with
``Network.popen`` are stopped by pid first.  Needs root and iproute2's ``ip``;
``available()`` says whether namespaces can be created here, so tests can skip
with the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import subprocess

from minard.ops import netns as _ops
from minard.ops.netns import Host, available  # noqa: F401 - the tests' names for them
from minard.testing import stop_pid

_COUNTER = itertools.count()
_ip = _ops.ip


class Network(_ops.Network):
    """:class:`minard.ops.netns.Network` that also starts processes in its hosts and stops them."""

    def __init__(self, net: int | None = None):
        tag = f"{os.getpid() % 10000}{next(_COUNTER)}"
        super().__init__(tag, 18 + (os.getpid() + next(_COUNTER)) % 200 if net is None else net)
        self.procs: list[subprocess.Popen] = []

    def popen(self, host: Host, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start *cmd* inside *host*'s namespace (``ip netns exec`` execs it: same pid)."""
        proc = subprocess.Popen(["ip", "netns", "exec", host.ns, *map(str, cmd)], **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, host: Host, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run *cmd* to completion inside *host*'s namespace."""
        return subprocess.run(["ip", "netns", "exec", host.ns, *map(str, cmd)], **kwargs)

    def stop_all(self) -> None:
        """Stop every process started here by pid, the last started first (as supervisord
        stops by priority): writers stop while the servers they flush to still answer."""
        for proc in reversed(self.procs):
            stop_pid(proc)

    def close(self) -> list[str]:
        """Stop every process started here (:meth:`stop_all`), then delete every namespace made here."""
        self.stop_all()
        return super().close()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def inside(ns: str):
    """Run the body with this thread in namespace *ns*; sockets made there stay in it.

    A socket belongs to the namespace it was created in, whichever thread later
    uses it, so a test can hold connections to several "hosts" at once.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(f"/var/run/netns/{ns}") as target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
        try:
            yield
        finally:
            libc.setns(home.fileno(), _CLONE_NEWNET)


def connection_class(ns: str):
    """A redis-py Connection class whose sockets are made inside namespace *ns*."""
    import redis as redis_py

    class NamespacedConnection(redis_py.Connection):
        """Connects from inside namespace *ns* (see :func:`inside`)."""

        def _connect(self):
            with inside(ns):
                return super()._connect()

    return NamespacedConnection


def redis_client(ns: str, host: str, port: int, **kwargs):
    """A redis-py client of *host*:*port* whose connections are made inside namespace *ns*."""
    import redis as redis_py

    pool = redis_py.ConnectionPool(connection_class=connection_class(ns), host=host, port=port, **kwargs)
    return redis_py.Redis(connection_pool=pool)
