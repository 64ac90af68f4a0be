"""Several "hosts" on one machine: Linux network namespaces joined by a bridge (issue 18).

Each host is a namespace with its own loopback and one address on a private
network 198.18.<net>.0/24 (RFC 2544's benchmarking range), attached to a bridge
that lives in a dedicated hub namespace, so that nothing is added to the
machine's own namespace.  The one exception, on request, is a point-to-point
veth link from the machine's namespace to one host (:meth:`Network.link_root`,
198.19.<net>.0/30, the same reserved range): how a browser on this machine
reaches the front host of ``minard up --hosts N``.

Everything made here is named from one *tag*, recorded by :meth:`Network.names`,
and deleted by name (:func:`remove`), also by a later process (``minard down``).
Deleting a namespace deletes its veth ends.  Needs root and iproute2's ``ip``;
:func:`available` says whether namespaces can be created here, and why not.

Used by :mod:`minard.hosts` (the CLI) and :mod:`minard.testing.netns` (tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip`` (inside namespace *ns* when given); with *check*, a failure raises with ip's message."""
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def available() -> str | None:
    """None when network namespaces can be created here, else the reason they cannot."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed (./manage.sh setup installs it)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    name = f"mnprobe{os.getpid() % 100000}"
    probe = ip("netns", "add", name, check=False)
    if probe.returncode != 0:
        return f"ip netns add failed: {probe.stderr.strip()}"
    ip("netns", "del", name, check=False)
    return None


def namespaces() -> set[str]:
    """Names of every network namespace of the machine (``ip netns list``)."""
    out = ip("netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def link_exists(name: str) -> bool:
    """Whether the machine's own namespace has a link called *name*."""
    return ip("link", "show", "dev", name, check=False).returncode == 0


def namespace_pids(ns: str) -> list[int]:
    """Processes running in namespace *ns* (``ip netns pids``); [] when it does not exist."""
    out = ip("netns", "pids", ns, check=False).stdout
    return sorted(int(p) for p in out.split() if p.isdigit())


def used_nets() -> set[int]:
    """Third octets of the 198.18/198.19 addresses already on this machine's interfaces."""
    out = ip("-4", "-o", "addr", "show", check=False).stdout
    nets = set()
    for word in out.split():
        parts = word.split("/")[0].split(".")
        if len(parts) == 4 and parts[0] == "198" and parts[1] in ("18", "19") and parts[2].isdigit():
            nets.add(int(parts[2]))
    return nets


def remove(names: list[str], links: list[str] = ()) -> list[str]:
    """Delete the root-namespace *links* and the namespaces *names*; return what could not be deleted."""
    left = []
    for link in links:
        if link_exists(link):
            ip("link", "del", "dev", link, check=False)
    existing = namespaces()
    for ns in reversed(names):
        if ns in existing:
            ip("netns", "del", ns, check=False)
    existing = namespaces()
    left += [ns for ns in names if ns in existing]
    left += [link for link in links if link_exists(link)]
    return left


@dataclass
class Host:
    """One namespace on the network."""

    name: str
    ns: str
    address: str
    veth_hub: str  # the veth end on the hub's bridge: set it down to cut this host's link

    def __str__(self) -> str:
        return f"{self.name}({self.address})"


class Network:
    """A bridge in a hub namespace and any number of host namespaces attached to it.

    *tag* names everything made (namespaces ``<prefix><tag>…``, veths
    ``mv<tag>…``); *net* is the third octet of the addresses.
    """

    def __init__(self, tag: str, net: int, prefix: str = "mn"):
        self.tag, self.net, self.prefix = tag, net, prefix
        self.hosts: dict[str, Host] = {}
        self.hub = f"{prefix}hub{tag}"
        self._made: list[str] = []
        self._links: list[str] = []
        self._add_namespace(self.hub)
        ip("link", "add", "br0", "type", "bridge", ns=self.hub)
        ip("link", "set", "br0", "up", ns=self.hub)
        ip("link", "set", "lo", "up", ns=self.hub)

    def _add_namespace(self, ns: str) -> None:
        ip("netns", "add", ns)
        self._made.append(ns)

    def add_host(self, name: str) -> Host:
        """A new namespace with loopback and address 198.18.<net>.<n>/24 on the bridge."""
        n = len(self.hosts) + 1
        ns = f"{self.prefix}{self.tag}{name}"[:40]
        here, there = f"mv{self.tag}h{n}"[:15], f"mv{self.tag}b{n}"[:15]
        self._add_namespace(ns)
        ip("link", "add", here, "netns", ns, "type", "veth", "peer", "name", there, "netns", self.hub)
        ip("link", "set", there, "master", "br0", ns=self.hub)
        ip("link", "set", there, "up", ns=self.hub)
        address = f"198.18.{self.net}.{n}"
        ip("addr", "add", f"{address}/24", "dev", here, ns=ns)
        ip("link", "set", here, "up", ns=ns)
        ip("link", "set", "lo", "up", ns=ns)
        host = Host(name, ns, address, there)
        self.hosts[name] = host
        return host

    def link_root(self, host: Host) -> tuple[str, str]:
        """A veth link from this machine's namespace to *host*: (this machine's address, the host's).

        198.19.<net>.1/30 on this side, .2 on the host's: only the host on the
        other end is reachable from here (no route to the rest of the network).
        """
        outside, inside = f"mv{self.tag}r"[:15], f"mv{self.tag}q"[:15]
        ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", host.ns)
        self._links.append(outside)
        mine, theirs = f"198.19.{self.net}.1", f"198.19.{self.net}.2"
        ip("addr", "add", f"{mine}/30", "dev", outside)
        ip("link", "set", outside, "up")
        ip("addr", "add", f"{theirs}/30", "dev", inside, ns=host.ns)
        ip("link", "set", inside, "up", ns=host.ns)
        return mine, theirs

    def cut(self, host: Host) -> None:
        """Cut *host*'s link to the network (its processes keep running)."""
        ip("link", "set", host.veth_hub, "down", ns=self.hub)

    def restore(self, host: Host) -> None:
        """Restore a link cut with :meth:`cut`."""
        ip("link", "set", host.veth_hub, "up", ns=self.hub)

    def names(self) -> dict[str, list[str]]:
        """``{"namespaces": [...], "links": [...]}``: everything made, for :func:`remove`."""
        return {"namespaces": list(self._made), "links": list(self._links)}

    def close(self) -> list[str]:
        """Delete every link and namespace made here; return what could not be deleted."""
        left = remove(self._made, self._links)
        self._made.clear()
        self._links.clear()
        return left
