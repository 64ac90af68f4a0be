"""``minard up --hosts 6 --sentinels`` through the command line: six namespaces, the bundled run, a failover, ``minard down``.

The real commands as subprocesses (as an operator runs them): every host's
programs run under its own supervisord inside its namespace; the bundled run
reaches Redis on the data host through the whole pipeline; the dashboard is
fetched through nginx from this machine's namespace over the front host's
link; ``minard down`` leaves no namespace, no link and no process of ours.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from minard import config, hosts
from minard import stack as stack_mod
from minard.ops import netns as ops_netns
from minard.ops.keys import KeyStore
from minard.store import status
from minard.store.runs import get_run
from minard.testing import netns, wait_for
from tests.pipeline.test_dispatch_stream import file_totals

REASON = netns.available()
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(REASON is not None, reason=f"network namespaces: {REASON}")]

BIN = Path(sys.executable).parent
TEST_NET = ipaddress.ip_network("198.18.0.0/15")


@pytest.fixture
def short_dir():
    """A directory short enough for every host's supervisord socket (pytest's tmp_path may not be)."""
    path = Path(tempfile.mkdtemp(prefix="mnh-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def minard(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "minard"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def our_pids(directory: Path, state: dict) -> set[int]:
    """Every process of the stack now: supervisords, their programs (by tag) and whatever is in the namespaces."""
    pids = set()
    for h in state["hosts"]:
        lay = hosts.host_layout(directory, h["name"])
        pids.update(stack_mod.tagged_pids(lay.id_file.read_text().strip()))
        sup = stack_mod.read_int(lay.pidfile)
        if sup:
            pids.add(sup)
    for ns in state["namespaces"]:
        pids.update(ops_netns.namespace_pids(ns))
    return pids


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=15) as resp:
        return resp.status, resp.read()


class Running:
    """A stack started with ``minard up --hosts ...`` in *directory*, and what the test saw of it."""

    def __init__(self, directory: Path, env: dict[str, str], up: subprocess.CompletedProcess):
        self.directory, self.env, self.up = directory, env, up
        self.state = hosts.read_state(directory)
        self.seen: set[int] = set()
        self.url = hosts.url(self.state, config.load(path=hosts.host_layout(directory, "front").minard_conf, env={}))

    def host(self, name: str) -> dict:
        return next(h for h in self.state["hosts"] if h["name"] == name)

    def pids(self) -> set[int]:
        self.seen |= our_pids(self.directory, self.state)
        return self.seen

    def redis(self, name: str = "data", port: int | None = None, **kwargs):
        """A client of the Redis on host *name*, connected from inside its namespace."""
        h = self.host(name)
        url = urllib.parse.urlsplit(str(config.load(path=hosts.host_layout(self.directory, name).minard_conf,
                                                    env={})["redis_url"]))
        return netns.redis_client(h["ns"], h["address"], port or url.port,
                                  password=urllib.parse.unquote(url.password) if port is None else None,
                                  socket_timeout=5, socket_connect_timeout=2, **kwargs)

    def down_leaves_nothing(self) -> None:
        """``minard down``: no namespace, no link, no process of the stack, no state file."""
        self.pids()
        down = minard(self.env, "down", "--dir", str(self.directory), timeout=300)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not set(self.state["namespaces"]) & ops_netns.namespaces()
        assert not any(ops_netns.link_exists(link) for link in self.state["links"])
        assert not [p for p in self.seen if stack_mod.pid_alive(p)]
        assert not hosts.state_path(self.directory).exists()


@contextlib.contextmanager
def up_hosts(directory: Path, *args: str):
    """``minard up --hosts ... --dir DIRECTORY``; whatever fails, nothing of ours stays behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINARD_")}
    env["MINARD_STACK_SIM_EVENTS"] = "5000"
    before = ops_netns.namespaces()
    running = None
    try:
        up = minard(env, "up", *args, "--dir", str(directory))
        assert up.returncode == 0, up.stdout + up.stderr
        running = Running(directory, env, up)
        made = set(running.state["namespaces"])  # the hosts and the hub, all new, all named after the stack
        assert made <= ops_netns.namespaces() - before, (made, before)
        assert all(ns.startswith(hosts.PREFIX) for ns in made)
        running.pids()
        yield running
    finally:
        state = hosts.read_state(directory)
        if state is not None:
            seen = (running.seen if running else set()) | our_pids(directory, state)
            minard(env, "down", "--dir", str(directory), timeout=300)
            for pid in [p for p in seen if stack_mod.pid_alive(p)]:
                os.kill(pid, signal.SIGKILL)
            ops_netns.remove(state["namespaces"], state["links"])


def stored_processed(r) -> int:
    """Records the pools have written to Redis (stats:redis processed) as *r* sees them."""
    return status.stats(r).get("redis", {}).get("processed", 0)


@pytest.mark.skipif(not stack_mod.DEMO_ZDAB.exists(), reason="the bundled recorded run is not beside the checkout")
def test_up_hosts_6_with_sentinels_carries_the_bundled_run_fails_over_when_the_primary_stops_and_down_leaves_nothing(
        short_dir):
    """One stack (``minard up --hosts 6 --sentinels``, each bring-up and ``minard down`` costs
    half a minute) for both stories.  The bundled run crosses the namespaces: dispatcher on the
    event builder -> push/pull on monitoring -> Redis on the data host, ORCA from the DAQ host,
    the dashboard through nginx on the front host.  Then the Sentinels: primary on ``data``,
    replica on ``data2``, Sentinels on both and on ``front``; every process finds Redis through
    them.  The primary's program stopped on its host: the replica is promoted, the pools write to
    it within the 30 s limit, the dashboard still answers through nginx.  Finally ``minard down``
    leaves no namespace, link or process."""
    (demo_run, want), = {run: w["events"] + w["orphans"] for run, w in file_totals(stack_mod.DEMO_ZDAB)[0].items()}.items()
    with up_hosts(short_dir / "stack", "--hosts", "6", "--sentinels") as s:
        state = s.state
        assert [h["name"] for h in state["hosts"]] == ["data", "data2", "event_builder", "monitoring", "daq", "front"]
        assert len(state["namespaces"]) == 7 and all(ops_netns.link_exists(link) for link in state["links"])
        for address in [h["address"] for h in state["hosts"]] + [state["front_address"], state["root_address"]]:
            assert ipaddress.ip_address(address) in TEST_NET, address
        assert f"open {s.url}" in s.up.stdout
        login = next(line for line in s.up.stdout.splitlines() if "shift-crew login:" in line)
        user, password = login.split("login:")[1].split("(")[0].strip().split(" / ")
        assert KeyStore(s.directory / "var" / "keys.json").verify(user, password, kind="user")
        private = [*(s.directory / "secrets").rglob("*"), *(s.directory / "hosts").glob("*/minard.conf"),
                   *(s.directory / "hosts").glob("*/supervisord.conf"), *(s.directory / "hosts").glob("*/secrets/*")]
        modes = {str(p): oct(p.stat().st_mode & 0o777) for p in private if p.is_file()}
        assert len(modes) >= 15 and set(modes.values()) == {"0o600"}, modes

        # every program runs, on the host of its role, under that host's supervisord
        st = minard(s.env, "status", "--dir", str(s.directory), timeout=60)
        assert st.returncode == 0, st.stdout + st.stderr
        rows = {line.split()[0]: line.split()[1] for line in st.stdout.splitlines() if line.strip()}
        assert rows == {f"{h.name}/{p}": "RUNNING" for h in hosts.plan(6, sentinels=True) for p in h.programs}, \
            st.stdout

        # the bundled run through dispatcher (event builder) -> push/pull (monitoring) -> Redis (data host)
        data = s.host("data")
        dcfg = config.load(path=hosts.host_layout(s.directory, "data").minard_conf, env={})
        assert urllib.parse.urlsplit(str(dcfg["redis_url"])).hostname == data["address"]
        primary = s.redis()

        def stored():
            run = get_run(primary, demo_run) or {}
            return run if run.get("events", 0) + run.get("orphans", 0) >= want else None
        wait_for(stored, 120, f"the bundled run {demo_run} in Redis on the data host", interval=0.5)
        pools = status.pools(primary)
        assert any(p.get("alive") for p in pools.values()), pools
        assert status.stats(primary).get("orca_producer", {}).get("processed", 0) > 0  # ORCA from the DAQ host

        # the dashboard through nginx on the front host, from this machine's namespace
        code, body = get(s.url + "status")
        assert code == 200 and b"event_builder (198.18." in body

        def stream():
            code, body = get(s.url + "api/stream?window=60")
            return code == 200 and any(any(v) for v in json.loads(body)["rate"].values())
        wait_for(stream, 60, "live rates on the dashboard through nginx", interval=0.5)

        # the Sentinels: the primary's program stopped, the replica promoted, the writers resume
        cfg = config.load(path=hosts.host_layout(s.directory, "monitoring").minard_conf, env={})
        assert cfg["redis_sentinels"] == ",".join(f"{s.host(h)['address']}:{hosts.SENTINEL_PORT}"
                                                  for h in ("data", "data2", "front"))
        sentinel = s.redis("data2", hosts.SENTINEL_PORT, decode_responses=True)

        def sentinels_ready():
            master = sentinel.sentinel_master(cfg["redis_master_name"])
            return int(master["num-slaves"]) >= 1 and int(master["num-other-sentinels"]) >= 2
        wait_for(sentinels_ready, 60, "three Sentinels that know the replica", interval=0.5)
        wait_for(lambda: stored_processed(primary) > 1000, 120, "data stored on the primary", interval=0.5)
        assert s.redis("data2").info("replication")["role"] == "slave"

        before = stored_processed(primary)
        t_stop = time.monotonic()
        assert stack_mod.rpc(hosts.host_layout(s.directory, "data"), 30).supervisor.stopProcess("redis")
        wait_for(lambda: sentinel.sentinel_get_master_addr_by_name(cfg["redis_master_name"])[0]
                 == s.host("data2")["address"], 30, "the Sentinels promoting the replica on data2", interval=0.2)
        promoted = s.redis("data2")
        wait_for(lambda: stored_processed(promoted) > before, 30, "the pools writing to the new primary",
                 interval=0.2)
        print(f"writers resumed {time.monotonic() - t_stop:.2f} s after the primary stopped")
        assert promoted.info("replication")["role"] == "master"
        code, _ = get(s.url + "status")
        assert code == 200
        s.down_leaves_nothing()


def test_up_hosts_refuses_clearly_without_root(tmp_path):
    """As an ordinary user (setpriv to nobody) the command says why and makes nothing."""
    directory = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINARD_")}
    env["HOME"] = str(tmp_path)
    before = ops_netns.namespaces()
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           str(BIN / "minard"), "up", "--hosts", "5", "--dir", str(directory)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cannot create network namespaces: creating network namespaces needs root" in proc.stderr
    assert not {ns for ns in ops_netns.namespaces() - before if ns.startswith(hosts.PREFIX)}
    assert not hosts.state_path(directory).exists()


def test_up_hosts_refuses_a_directory_too_deep_for_the_supervisord_sockets(tmp_path):
    directory = tmp_path / ("d" * 80) / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINARD_")}
    before = ops_netns.namespaces()
    proc = minard(env, "up", "--hosts", "5", "--dir", str(directory), timeout=120)
    assert proc.returncode == 1 and "use a shorter --dir" in proc.stderr, proc.stdout + proc.stderr
    assert not {ns for ns in ops_netns.namespaces() - before if ns.startswith(hosts.PREFIX)}
    assert not hosts.state_path(directory).exists()
