"""Several "hosts" on one machine: Linux network namespaces joined by a bridge.

Multi-host tests (issue 18) run each part of the stack in its own namespace, with
its own loopback and one address on a private test network, so that every
connection between parts is a real TCP connection between hosts and a link can be
cut.  Only addresses of these namespaces are ever used: the network is
198.18.<net>.0/24 (RFC 2544's benchmarking range), built inside a dedicated hub
namespace, so nothing is added to the machine's own namespace.

``Network`` creates and, on ``close()``, deletes every namespace it made (deleting a
namespace deletes its veth ends); processes started with ``Network.popen`` are
stopped by pid first.  Needs root and iproute2's ``ip``; ``available()`` says
whether namespaces can be created here, so tests can skip with the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass, field

from minard.testing import stop_pid

_COUNTER = itertools.count()


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip`` (inside namespace *ns* when given)."""
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def available() -> str | None:
    """None when network namespaces can be created here, else the reason they cannot."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    name = f"mnprobe{os.getpid() % 100000}"
    probe = _ip("netns", "add", name, check=False)
    if probe.returncode != 0:
        return f"ip netns add failed: {probe.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


@dataclass
class Host:
    """One namespace on the test network."""

    name: str
    ns: str
    address: str
    veth_hub: str  # the veth end on the hub's bridge: set it down to cut this host's link

    def __str__(self) -> str:
        return f"{self.name}({self.address})"


@dataclass
class Network:
    """A bridge in a hub namespace and any number of host namespaces attached to it."""

    net: int = field(default_factory=lambda: 18 + (os.getpid() + next(_COUNTER)) % 200)
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self):
        self.tag = f"{os.getpid() % 10000}{next(_COUNTER)}"
        self.hub = f"mnhub{self.tag}"
        self._made: list[str] = []
        _ip("netns", "add", self.hub)
        self._made.append(self.hub)
        _ip("link", "add", "br0", "type", "bridge", ns=self.hub)
        _ip("link", "set", "br0", "up", ns=self.hub)
        _ip("link", "set", "lo", "up", ns=self.hub)

    def add_host(self, name: str) -> Host:
        """A new namespace with loopback and address 198.18.<net>.<n>/24 on the bridge."""
        n = len(self.hosts) + 1
        ns = f"mn{self.tag}{name}"[:30]
        here, there = f"mv{self.tag}h{n}"[:15], f"mv{self.tag}b{n}"[:15]
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("link", "add", here, "netns", ns, "type", "veth", "peer", "name", there, "netns", self.hub)
        _ip("link", "set", there, "master", "br0", ns=self.hub)
        _ip("link", "set", there, "up", ns=self.hub)
        address = f"198.18.{self.net}.{n}"
        _ip("addr", "add", f"{address}/24", "dev", here, ns=ns)
        _ip("link", "set", here, "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        host = Host(name, ns, address, there)
        self.hosts[name] = host
        return host

    def popen(self, host: Host, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start *cmd* inside *host*'s namespace (``ip netns exec`` execs it: same pid)."""
        proc = subprocess.Popen(["ip", "netns", "exec", host.ns, *map(str, cmd)], **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, host: Host, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run *cmd* to completion inside *host*'s namespace."""
        return subprocess.run(["ip", "netns", "exec", host.ns, *map(str, cmd)], **kwargs)

    def cut(self, host: Host) -> None:
        """Cut *host*'s link to the network (its processes keep running)."""
        _ip("link", "set", host.veth_hub, "down", ns=self.hub)

    def restore(self, host: Host) -> None:
        """Restore a link cut with :meth:`cut`."""
        _ip("link", "set", host.veth_hub, "up", ns=self.hub)

    def close(self) -> None:
        """Stop every process started here (by pid), then delete every namespace made here."""
        for proc in self.procs:
            stop_pid(proc)
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)
        self._made.clear()

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
