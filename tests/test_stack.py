"""End to end: ``minard up`` on free ports in a temporary directory, the site through nginx.

One stack for the whole module (started once with the real ``minard up``
command, stopped with ``minard down``, and every pid checked at the end and
killed in the finalizer whatever happens).  Checked: every process RUNNING,
data on the pages through nginx within seconds (HTTP and headless Chromium),
nginx -t on the rendered configuration, no secret on a command line, in a log
or on a page, the pinger marks every program up, the monitors write their
series; faults: ``kill -9`` of each component in turn (supervisord restarts
it, data resumes, losses are on the status page), a clean Redis restart and a
dispatcher restart; finally ``minard down`` leaves no process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import redis as redis_py

from minard import config, metrics
from minard import stack as stack_mod
from minard.store import status
from minard.store import timeseries as ts
from minard.testing import free_port, wait_for
from minard.testing.stack import stack_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent
ALL = [p.name for p in stack_mod.PROGRAMS]
#: The registered programs the pinger reports (conf/programs.cfg).
REGISTERED = ["dispatcher", "minard_dispatch_push", "minard_dispatch_pull", "data_producer", "data_consumer_cmos",
              "data_consumer_base", "redis", "web", "snoplus_log", "nginx", "pinger", "monitors", "notifier", "dq_live"]


class Stack:
    """A running stack: its layout, configuration, URL, and helpers for the tests."""

    def __init__(self, directory: Path, env: dict[str, str], up_output: str):
        self.lay = stack_mod.Layout(directory)
        self.env = env
        self.up_output = up_output
        self.cfg = config.load(path=self.lay.minard_conf, env={})
        self.url = f"http://127.0.0.1:{self.cfg['nginx_port']}"
        self.redis = redis_py.Redis.from_url(str(self.cfg["redis_url"]), socket_timeout=3)
        self.stack_id = self.lay.id_file.read_text().strip()
        self.seen_pids: set[int] = set()
        self.down_done = False

    def minard(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "minard"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def processes(self) -> dict[str, dict]:
        rows = {r["name"]: r for r in stack_mod.process_rows(self.lay)}
        self.seen_pids.update(r["pid"] for r in rows.values() if r.get("pid"))
        return rows

    def all_pids(self) -> set[int]:
        """Every process of the stack now (tags, recorded groups, supervisord) plus all seen so far."""
        pids = set(stack_mod.tagged_pids(self.stack_id))
        for pgid in stack_mod.recorded_groups(self.lay).values():
            pids.update(stack_mod.group_pids(pgid))
        sup = stack_mod.read_int(self.lay.pidfile)
        if sup:
            pids.add(sup)
        self.seen_pids.update(pids)
        return pids

    def get(self, path: str, headers: dict | None = None, timeout: float = 10):
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def json(self, path: str):
        status, _, body = self.get(path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def last_data_time(self) -> float:
        """Bucket time of the newest second with events, read through nginx."""
        view = self.json("/api/stream?window=60")
        total = view["rate"].get("TOTAL") or next(iter(view["rate"].values()))
        times = [t for t, v in zip(view["t"], total) if v]
        return max(times) if times else 0.0

    def stage_counter(self, stage: str, field: str) -> int:
        """A loss-accounting counter (stats:STAGE), cumulative over process restarts."""
        return status.stats(self.redis).get(stage, {}).get(field, 0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """``minard up`` once for the module; ``minard down`` and a kill by pid of anything left."""
    directory = tmp_path_factory.mktemp("stack") / "s"
    env = stack_env(directory, supervisor_port=free_port(), stack_sim_events=10000)
    proc = subprocess.run([str(BIN / "minard"), "up"], env=env, capture_output=True, text=True, timeout=180,
                          check=False)
    s = None
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        s = Stack(directory, env, proc.stdout)
        s.all_pids()
        yield s
    finally:
        if s is None or not s.down_done:
            subprocess.run([str(BIN / "minard"), "down"], env=env, capture_output=True, timeout=180, check=False)
        leftovers = [p for p in (s.seen_pids if s else set()) if stack_mod.pid_alive(p)]
        if (directory / "run" / "stack.id").exists():
            leftovers += stack_mod.tagged_pids((directory / "run" / "stack.id").read_text().strip())
        for pid in set(leftovers):
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes left after minard down: {leftovers}"


# ----------------------------------------------------------------------------- start-up


def test_up_prints_the_url_and_every_process_runs(stack):
    assert f"open {stack.url}/" in stack.up_output
    rows = stack.processes()
    assert sorted(rows) == sorted(ALL)
    assert {r["state"] for r in rows.values()} == {"RUNNING"}
    out = stack.minard("status")
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ALL:
        assert any(line.split()[:2] == [name, "RUNNING"] for line in out.stdout.splitlines()), out.stdout
    again = stack.minard("up")
    assert again.returncode == 0 and "already running" in again.stdout


def test_rendered_configs_pass_nginx_t_and_hold_the_ports(stack):
    nginx = stack_mod.binary("nginx")
    lay = stack.lay
    out = subprocess.run([nginx, "-t", "-p", f"{lay.nginx}/", "-c", str(lay.nginx_conf), "-e",
                          str(lay.logs / "nginx-test.log")], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert "syntax is ok" in out.stderr and "test is successful" in out.stderr
    text = lay.nginx_conf.read_text()
    assert f"listen 127.0.0.1:{stack.cfg['nginx_port']};" in text
    assert f"server 127.0.0.1:{stack.cfg['web_port']};" in text and f"server 127.0.0.1:{stack.cfg['log_port']};" in text
    redis_conf = lay.redis_conf.read_text()
    assert "maxmemory-policy noeviction" in redis_conf and "bind 127.0.0.1" in redis_conf
    assert f"port {stack_mod.redis_port(stack.cfg)}" in redis_conf
    sup = lay.supervisord_conf.read_text()
    assert f"file={lay.socket}" in sup and "chmod=0700" in sup


def test_data_reaches_the_pages_through_nginx_within_seconds(stack):
    t0 = time.time()
    newest = wait_for(lambda: stack.last_data_time() >= t0 - 3 and stack.last_data_time(), 20,
                      "event rates on /api/stream through nginx", ignore=(Exception,))
    assert newest > 0
    def cmos_rates():
        values = stack.json("/api/detector?quantity=cmos&window=60")["values"]
        return sum(v is not None for v in values)
    assert wait_for(cmos_rates, 30, "CMOS rates on /api/detector through nginx", ignore=(Exception,)) > 1000
    status, headers, body = stack.get("/stream")
    assert status == 200 and b"<html" in body.lower()
    assert headers["Server"] == "nginx"  # nginx, without its version
    assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'self'" in headers["Content-Security-Policy"]


def test_nginx_serves_static_gzips_and_lists_no_directory(stack):
    status, headers, body = stack.get("/static/css/minard.css", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    assert headers["X-Frame-Options"] == "DENY"
    status, headers, _ = stack.get("/api/stream?window=60", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    for path in ("/static/", "/static/css/", "/static/vendor/"):
        status, _, body = stack.get(path)
        assert status in (403, 404) and b"Index of" not in body, path
    status, _, _ = stack.get("/static/.installed")
    assert status == 404
    status, _, body = stack.get("/logserver/healthz")
    assert status == 200 and json.loads(body)["ok"] is True


def test_secrets_are_private_and_never_on_a_command_line_a_log_or_a_page(stack):
    lay = stack.lay
    secrets = [lay.redis_password.read_text().strip(), lay.supervisor_password.read_text().strip(),
               *json.loads(lay.tokens.read_text()).values()]
    assert len(secrets) >= 2 + len(REGISTERED)
    for f in (lay.minard_conf, lay.supervisord_conf, lay.redis_auth, lay.redis_password, lay.tokens,
              lay.supervisor_password, lay.var / "keys.json"):
        assert f.stat().st_mode & 0o777 == 0o600, f
    assert lay.secrets.stat().st_mode & 0o777 == 0o700
    assert secrets[0] not in lay.redis_conf.read_text() and secrets[0] not in lay.supervisord_conf.read_text()
    for pid in stack.all_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert not any(s in cmdline for s in secrets), f"a secret is on the command line of pid {pid}"
    for path in ("/status", "/processes", "/api/status", "/api/processes", "/healthz", "/metrics", "/logs"):
        _, _, body = stack.get(path)
        assert not any(s.encode() in body for s in secrets), path
    assert_no_secret_in_logs(stack, secrets)


def assert_no_secret_in_logs(stack, secrets):
    for f in [*stack.lay.logs.glob("*.log*"), *(stack.lay.var / "logs").glob("*.log*")]:
        text = f.read_text(errors="replace")
        assert not any(s in text for s in secrets), f"a secret is in {f}"


# ----------------------------------------------------------------------------- in Chromium


@pytest.fixture
def page(browser):
    """A fresh page; the test fails on any page error."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    problems = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    yield pg
    context.close()
    assert problems == []


@pytest.mark.browser
def test_chromium_shows_live_data_status_and_processes_through_nginx(stack, page):
    page.goto(stack.url + "/stream?window=5m")
    page.wait_for_function("() => Number(document.body.dataset.streamLoaded || 0) >= 1", timeout=15000)
    page.wait_for_function("() => /^[0-9]+$/.test(document.getElementById('cur-run').textContent)", timeout=15000)
    assert int(page.locator("#chart-rate").get_attribute("data-points") or 0) > 0
    # Status: every registered program up, thanks to the pinger's heartbeats.
    deadline = time.monotonic() + 30
    while True:
        page.goto(stack.url + "/status")
        up = page.eval_on_selector_all("#status-rows tr.state-up", "rows => rows.map(r => r.dataset.name)")
        if set(REGISTERED) <= set(up) or time.monotonic() > deadline:
            break
        page.wait_for_timeout(1000)
    assert set(REGISTERED) <= set(up), f"not up on /status: {set(REGISTERED) - set(up)}"
    assert page.locator("#status-rows .stage[data-stage=push]").count() == 1
    page.goto(stack.url + "/processes")
    assert page.locator("#supervisor-state").text_content() == "RUNNING"
    text = page.locator("#process-table").text_content()
    assert all(name in text for name in ALL)


# ----------------------------------------------------------------------------- pinger, monitors


def test_pinger_posts_a_heartbeat_with_uptime_for_every_program(stack):
    def all_up():
        progs = {p["name"]: p for p in stack.json("/logserver/programs")["programs"]}
        return all(progs[n]["state"] == "up" for n in REGISTERED) and progs
    progs = wait_for(all_up, 30, "every program up on the log server", ignore=(Exception,))
    assert progs["minard_dispatch_pull"]["metrics"]["uptime_s"] > 0
    assert progs["redis"]["metrics"]["keys"] > 0
    assert progs["dispatcher"]["metrics"]["clients"] >= 2  # push and the replay


def test_monitors_write_their_series(stack):
    def series():
        now = time.time()
        _, vals, _ = ts.fetch(stack.redis, "mon", ["redis.used_memory", "disk.logs_free", "dispatcher.up",
                                                  "lag.minard_dispatch_pull", "losses.push",
                                                  "queues.minard_dispatch_pull.queued"], now - 30, now)
        return all((~np.isnan(v)).any() for v in vals.values()) and vals
    vals = wait_for(series, 30, "the monitors' time series", ignore=(Exception,))
    assert vals["dispatcher.up"][~np.isnan(vals["dispatcher.up"])][-1] == 1


def test_every_long_running_process_serves_its_metrics(stack):
    from prometheus_client.parser import text_string_to_metric_families

    expected = {"dispatcher": "minard_dispatcher_received_events", "minard_dispatch_pull": "minard_pool_records_received",
                "data_consumer_cmos": "minard_pool_records_received", "data_consumer_base": "minard_pool_records_received",
                "minard_dispatch_push": "minard_push_consumers", "data_producer": "minard_producer_orca_connected",
                "web": "minard_http_requests", "snoplus_log": "minard_http_requests",
                "pinger": "minard_pinger_rounds", "monitors": "minard_monitor_checks",
                "notifier": "minard_notifier_messages", "dq_live": "minard_dq_judgements"}
    assert set(expected) == set(metrics.PROGRAMS)
    assert (stack.lay.root / "prometheus.yml").exists()
    for program, family in expected.items():
        port = metrics.port(stack.cfg, program)
        assert f"'127.0.0.1:{port}']\n        labels: {{program: {program}}}" in \
            (stack.lay.root / "prometheus.yml").read_text()

        def families(port=port):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                return {f.name for f in text_string_to_metric_families(resp.read().decode())}
        names = wait_for(lambda f=family, g=families: f in g() and g(), 30, f"{family} from {program}",
                         ignore=(OSError,))
        if program.startswith(("minard_dispatch", "data_")):
            assert "minard_stage_records" in names, program


# ----------------------------------------------------------------------------- faults


def restart_seen(stack, name: str, old_pid: int, timeout: float = 30) -> int:
    """Wait until supervisord runs *name* again with a new pid; return it."""
    def running():
        r = stack.processes()[name]
        return r["state"] == "RUNNING" and r["pid"] and r["pid"] != old_pid and r["pid"]
    return wait_for(running, timeout, f"supervisord to restart {name}", ignore=(Exception,))


def data_resumes(stack, since: float, timeout: float = 40) -> None:
    """Events after *since* on the pages (through nginx), and ORCA records being consumed again."""
    wait_for(lambda: stack.last_data_time() >= since, timeout, "event rates after the restart", ignore=(Exception,))
    base = stack.stage_counter("cmos", "processed")
    wait_for(lambda: stack.stage_counter("cmos", "processed") > base, timeout,
             "CMOS records consumed after the restart", ignore=(Exception,))


def stages(stack) -> dict[str, dict]:
    """The loss counters per stage as the status page serves them (through nginx)."""
    return {s["stage"]: s for s in stack.json("/api/status")["stages"]}


def losses(stage: dict) -> int:
    """Records a stage counted as lost: dropped + errors."""
    c = stage["counters"]
    return c.get("dropped", 0) + c.get("errors", 0)


#: kill -9 order: first the programs off the data path, all at once (none of them carries
#: events, so their losses are not in question); then the data path one program at a time,
#: last, so each of its restarts is checked with everything else up.
KILL_TOGETHER = ["pinger", "monitors", "notifier", "dq_live", "snoplus_log", "web", "nginx"]
KILL_IN_TURN = ["orca_replay", "data_producer", "data_consumer_cmos", "data_consumer_base", "replay",
                "minard_dispatch_push", "minard_dispatch_pull", "dispatcher", "redis"]


def test_kill_9_of_each_component_is_restarted_and_data_resumes(stack):
    assert sorted(KILL_TOGETHER + KILL_IN_TURN) == sorted(ALL)
    report = []
    for names in [KILL_TOGETHER, *([n] for n in KILL_IN_TURN)]:
        before = stages(stack)
        old = {name: stack.processes()[name]["pid"] for name in names}
        stack.all_pids()
        t_kill = time.time()
        for pid in old.values():
            os.kill(pid, signal.SIGKILL)
        new = {name: restart_seen(stack, name, pid) for name, pid in old.items()}
        data_resumes(stack, t_kill + 1)
        after = stages(stack)
        lost = {s: losses(after[s]) - (losses(before[s]) if s in before else 0) for s in after}
        lost = {s: n for s, n in lost.items() if n}
        report.append(f"{', '.join(f'{n}: pid {old[n]} -> {new[n]}' for n in names)},"
                      f" back in {time.time() - t_kill:.1f}s, lost counted {lost}")
    print("\n".join(report))
    # Every stage's counters are on the status page, with the invariant's parts.
    for s in ("dispatcher", "push", "pull", "redis", "cmos", "base", "orca_producer"):
        assert s in stages(stack), s
    _, _, body = stack.get("/status")
    assert b'data-stage="push"' in body and b'data-stage="pull"' in body


def test_redis_clean_restart_keeps_the_series_and_the_pipeline_reconnects(stack):
    proxy = stack_mod.rpc(stack.lay, 60)
    t0 = time.time()
    keys_before = stack.redis.dbsize()
    assert proxy.supervisor.stopProcess("redis", True)
    time.sleep(2)  # writes fail meanwhile: counted, never silent
    assert proxy.supervisor.startProcess("redis", True)
    deadline = time.monotonic() + 30
    while True:  # Redis answers LOADING until its snapshot is read back
        try:
            keys_after = stack.redis.dbsize()
            break
        except redis_py.exceptions.BusyLoadingError:
            assert time.monotonic() < deadline, "Redis still loading its snapshot after 30 s"
            time.sleep(0.2)
    assert keys_after >= keys_before * 0.9  # the snapshot written at shutdown was loaded
    data_resumes(stack, t0 + 3)
    assert stack.processes()["redis"]["state"] == "RUNNING"


def test_dispatcher_clean_restart_and_the_replay_and_push_reconnect(stack):
    proxy = stack_mod.rpc(stack.lay, 60)
    t0 = time.time()
    assert proxy.supervisor.stopProcess("dispatcher", True)
    assert proxy.supervisor.startProcess("dispatcher", True)
    data_resumes(stack, t0 + 1)
    push = stack.redis.hgetall("status:minard_dispatch_push")
    assert push[b"connected"] == b"1"


def test_no_secret_in_any_log_after_the_faults(stack):
    lay = stack.lay
    secrets = [lay.redis_password.read_text().strip(), *json.loads(lay.tokens.read_text()).values()]
    assert_no_secret_in_logs(stack, secrets)


# ----------------------------------------------------------------------------- down


def test_down_stops_everything_and_leaves_no_process(stack):
    pids = stack.all_pids() | stack.seen_pids
    assert len(pids) > len(ALL)
    log = stack.lay.logs / "supervisord.log"
    logged = log.stat().st_size
    out = stack.minard("down")
    stack.down_done = True
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no process of the stack is left" in out.stdout
    alive = [p for p in pids if stack_mod.pid_alive(p)]
    assert alive == [], f"still alive after minard down: {alive}"
    assert stack_mod.tagged_pids(stack.stack_id) == []
    # sources first, Redis last: the programs stopped in priority order, highest number first
    with open(log, "rb") as f:
        f.seek(logged)
        stopped = re.findall(r"INFO stopped: (\w+) ", f.read().decode(errors="replace"))
    priority = {p.name: p.priority for p in stack_mod.PROGRAMS}
    assert sorted(stopped) == sorted(ALL), stopped
    assert [priority[n] for n in stopped] == sorted((priority[n] for n in stopped), reverse=True), stopped
    status = stack.minard("status")
    assert status.returncode == 3 and "not running" in status.stdout
    for key in ("nginx_port", "web_port", "log_port", "dispatcher_port"):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server would (TIME_WAIT)
            s.bind(("127.0.0.1", int(stack.cfg[key])))  # nothing listens any more
