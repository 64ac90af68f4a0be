"""``minard up --hosts 5`` through the command line: five namespaces, the bundled run, ``minard down``.

The real commands as subprocesses (as an operator runs them): every host's
programs run under its own supervisord inside its namespace; the bundled run
reaches Redis on the data host through the whole pipeline; the dashboard is
fetched through nginx from this machine's namespace over the front host's
link; ``minard down`` leaves no namespace, no link and no process of ours.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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


@pytest.mark.skipif(not stack_mod.DEMO_ZDAB.exists(), reason="the bundled recorded run is not beside the checkout")
def test_up_hosts_5_carries_the_bundled_run_across_five_namespaces_and_down_leaves_nothing(short_dir):
    directory = short_dir / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINARD_")}
    env["MINARD_STACK_SIM_EVENTS"] = "5000"
    (demo_run, want), = {run: w["events"] + w["orphans"] for run, w in file_totals(stack_mod.DEMO_ZDAB)[0].items()}.items()
    namespaces_before = ops_netns.namespaces()
    seen: set[int] = set()
    state = None
    try:
        up = minard(env, "up", "--hosts", "5", "--dir", str(directory))
        assert up.returncode == 0, up.stdout + up.stderr
        state = hosts.read_state(directory)
        assert [h["name"] for h in state["hosts"]] == ["data", "event_builder", "monitoring", "daq", "front"]
        assert set(state["namespaces"]) == ops_netns.namespaces() - namespaces_before  # five hosts and the hub
        assert len(state["namespaces"]) == 6 and all(ops_netns.link_exists(link) for link in state["links"])
        for address in [h["address"] for h in state["hosts"]] + [state["front_address"], state["root_address"]]:
            assert ipaddress.ip_address(address) in TEST_NET, address
        seen |= our_pids(directory, state)
        url = hosts.url(state, config.load(path=hosts.host_layout(directory, "front").minard_conf, env={}))
        assert f"open {url}" in up.stdout
        login = next(line for line in up.stdout.splitlines() if "shift-crew login:" in line)
        user, password = login.split("login:")[1].split("(")[0].strip().split(" / ")
        assert KeyStore(directory / "var" / "keys.json").verify(user, password, kind="user")

        # every program runs, on the host of its role, under that host's supervisord
        st = minard(env, "status", "--dir", str(directory), timeout=60)
        assert st.returncode == 0, st.stdout + st.stderr
        rows = {line.split()[0]: line.split()[1] for line in st.stdout.splitlines() if line.strip()}
        assert rows == {f"{h.name}/{p}": "RUNNING" for h in hosts.plan(5) for p in h.programs}, st.stdout

        # the bundled run through dispatcher (event builder) -> push/pull (monitoring) -> Redis (data host)
        data = next(h for h in state["hosts"] if h["name"] == "data")
        dcfg = config.load(path=hosts.host_layout(directory, "data").minard_conf, env={})
        redis_url = urllib.parse.urlsplit(str(dcfg["redis_url"]))
        assert redis_url.hostname == data["address"]
        r = netns.redis_client(data["ns"], data["address"], redis_url.port,
                               password=urllib.parse.unquote(redis_url.password), socket_timeout=5)

        def stored():
            run = get_run(r, demo_run) or {}
            return run if run.get("events", 0) + run.get("orphans", 0) >= want else None
        wait_for(stored, 120, f"the bundled run {demo_run} in Redis on the data host", interval=0.5)
        pools = status.pools(r)
        assert any(p.get("alive") for p in pools.values()), pools
        assert status.stats(r).get("orca_producer", {}).get("processed", 0) > 0  # ORCA from the DAQ host

        # the dashboard through nginx on the front host, from this machine's namespace
        code, body = get(url + "status")
        assert code == 200 and b"event_builder (198.18." in body
        def stream():
            code, body = get(url + "api/stream?window=60")
            return code == 200 and any(any(v) for v in json.loads(body)["rate"].values())
        wait_for(stream, 60, "live rates on the dashboard through nginx", interval=0.5)
        seen |= our_pids(directory, state)

        down = minard(env, "down", "--dir", str(directory), timeout=300)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not set(state["namespaces"]) & ops_netns.namespaces()
        assert not any(ops_netns.link_exists(link) for link in state["links"])
        assert not [p for p in seen if stack_mod.pid_alive(p)]
        assert not hosts.state_path(directory).exists()
    finally:
        if state is None:
            state = hosts.read_state(directory)
        if state is not None:  # whatever failed: nothing of ours stays behind
            seen |= our_pids(directory, state)
            minard(env, "down", "--dir", str(directory), timeout=300)
            for pid in [p for p in seen if stack_mod.pid_alive(p)]:
                os.kill(pid, signal.SIGKILL)
            ops_netns.remove(state["namespaces"], state["links"])


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
    assert ops_netns.namespaces() == before and not hosts.state_path(directory).exists()


def test_up_hosts_refuses_a_directory_too_deep_for_the_supervisord_sockets(tmp_path):
    directory = tmp_path / ("d" * 80) / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINARD_")}
    before = ops_netns.namespaces()
    proc = minard(env, "up", "--hosts", "5", "--dir", str(directory), timeout=120)
    assert proc.returncode == 1 and "use a shorter --dir" in proc.stderr, proc.stdout + proc.stderr
    assert ops_netns.namespaces() == before and not hosts.state_path(directory).exists()
