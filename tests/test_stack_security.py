"""Issue 14 on a live stack: ``minard up --tls`` with the default supervisord and Redis settings.

One stack for the module (real supervisord, Redis, gunicorn, nginx; stopped
with ``minard down`` and checked by pid).  Checked: HTTPS in Chromium with a
Secure session cookie, HTTP redirected with HSTS, gunicorn and supervisord
reachable only on loopback / the 0700 unix socket, per-role Redis users in the
running Redis, every file and directory of the stack private (after a Redis
snapshot, AOF and log writes), and 50 half-sent requests not stalling others.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import redis as redis_py
from redis.exceptions import NoPermissionError

from minard import config
from minard import stack as stack_mod
from minard.testing import wait_for
from minard.testing.stack import stack_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent


class Stack:
    """The running TLS stack and its addresses."""

    def __init__(self, directory: Path, env: dict[str, str], up_output: str):
        self.lay = stack_mod.Layout(directory)
        self.env = env
        self.up_output = up_output
        self.cfg = config.load(path=self.lay.minard_conf, env={})
        self.https = f"https://127.0.0.1:{self.cfg['nginx_tls_port']}"
        self.http = f"http://127.0.0.1:{self.cfg['nginx_port']}"
        self.context = ssl.create_default_context(cafile=str(self.lay.tls_cert))
        self.admin = redis_py.Redis.from_url(str(self.cfg["redis_url"]), socket_timeout=5)

    def minard(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "minard"), *args], env={**self.env, "MINARD_CONFIG": str(self.lay.minard_conf)},
                              capture_output=True, text=True, timeout=120, check=False)

    def request(self, path: str, method: str = "GET", timeout: float = 10) -> tuple[int, dict, bytes]:
        """One HTTPS request verified against the stack's own certificate."""
        conn = http.client.HTTPSConnection("127.0.0.1", int(self.cfg["nginx_tls_port"]), timeout=timeout,
                                           context=self.context)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """``minard up --tls`` once; ``minard down`` and a kill by pid of anything left."""
    directory = tmp_path_factory.mktemp("tlsstack") / "s"
    env = stack_env(directory, stack_sim_events=5000, stack_start_timeout=150)
    proc = subprocess.run([str(BIN / "minard"), "up", "--tls"], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield Stack(directory, env, proc.stdout)
    finally:
        subprocess.run([str(BIN / "minard"), "down"], env=env, capture_output=True, timeout=180, check=False)
        stack_id = (directory / "run" / "stack.id").read_text().strip() if (directory / "run" / "stack.id").exists() else ""
        left = stack_mod.tagged_pids(stack_id) if stack_id else []
        for pid in left:
            os.kill(pid, 9)
        assert not left, f"processes left after minard down: {left}"


def listening(port: int) -> set[str]:
    """The local addresses (hex, as in /proc/net/tcp*) listening on TCP *port*."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hexport = fields[1].split(":")
            if int(hexport, 16) == port and fields[3] == "0A":  # LISTEN
                found.add(address)
    return found


# ----------------------------------------------------------------------------- TLS


def test_up_prints_the_https_address(stack):
    assert f"open https://127.0.0.1:{stack.cfg['nginx_tls_port']}/" in stack.up_output


def test_plain_http_is_redirected_to_https_and_https_sends_hsts(stack):
    conn = http.client.HTTPConnection("127.0.0.1", int(stack.cfg["nginx_port"]), timeout=10)
    conn.request("GET", "/alarms?x=1", headers={"Host": "127.0.0.1"})
    resp = conn.getresponse()
    assert resp.status == 301
    assert resp.getheader("Location") == f"{stack.https}/alarms?x=1"
    conn.close()
    status, headers, body = stack.request("/stream")
    assert status == 200 and b"<html" in body.lower()
    assert headers["Strict-Transport-Security"] == "max-age=31536000"
    assert "default-src 'self'" in headers["Content-Security-Policy"]


def test_a_page_over_https_in_chromium_with_a_secure_session_cookie(stack, browser):
    made = stack.minard("keys", "add", "alice", "--user")
    assert made.returncode == 0, made.stderr
    password = made.stdout.strip()
    context = browser.new_context(ignore_https_errors=True)  # the stack's own self-signed certificate
    page = context.new_page()
    problems = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    try:
        page.goto(stack.http + "/login")  # typed without https: the redirect takes the browser there
        assert page.url.startswith(stack.https + "/login")
        page.fill("#username", "alice")
        page.fill("#password", password)
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#current-user")
        assert page.locator("#current-user").text_content() == "alice"
        page.goto(stack.https + "/alarms")
        assert page.locator("h1").first.is_visible()
        cookie = next(c for c in context.cookies() if c["name"] == "minard_session")
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Lax"
        assert not problems, problems
    finally:
        context.close()


def test_the_private_key_and_certificate_are_private(stack):
    assert stat.S_IMODE(stack.lay.tls_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(stack.lay.tls_cert.stat().st_mode) & 0o077 == 0 or \
        stat.S_IMODE(stack.lay.tls_cert.stat().st_mode) == 0o640


# ----------------------------------------------------------------------------- listening sockets


def test_gunicorn_and_supervisord_listen_only_on_loopback_or_a_private_socket(stack):
    loopback = {"0100007F", "00000000000000000000000001000000"}
    for port in (stack.cfg["web_port"], stack.cfg["log_port"]):
        addresses = listening(int(port))
        assert addresses and addresses <= loopback, (port, addresses)
    sup = stack.lay.supervisord_conf.read_text()
    assert "[inet_http_server]" not in sup and not stack.lay.supervisor_password.exists()
    assert stat.S_IMODE(stack.lay.socket.stat().st_mode) == 0o700
    assert stat.S_IMODE(stack.lay.run.stat().st_mode) == 0o700


# ----------------------------------------------------------------------------- Redis users


def test_the_running_redis_has_one_user_per_role_and_the_dashboard_cannot_flush(stack):
    acl_file = Path(str(stack.cfg["redis_acl_file"]))
    assert acl_file == stack.lay.redis_acl and stat.S_IMODE(acl_file.stat().st_mode) == 0o600
    users = json.loads(acl_file.read_text())
    port = urllib.parse.urlsplit(str(stack.cfg["redis_url"])).port
    dash = redis_py.Redis(host="127.0.0.1", port=port, username=users["dashboard"]["username"],
                          password=users["dashboard"]["password"], socket_timeout=5)
    for call in (dash.flushall, lambda: dash.config_get("*"), lambda: dash.hset("ts:1:1:trig", "TOTAL", 0),
                 lambda: dash.delete("pipeline:components")):
        with pytest.raises(NoPermissionError):
            call()
    assert dash.scard("pipeline:components") > 0  # it reads what the pages show
    assert users["dashboard"]["password"] not in stack.lay.redis_conf.read_text()
    assert users["dashboard"]["password"] not in stack.lay.redis_auth.read_text()


def test_the_stack_processes_connect_as_their_role_users_not_as_the_administrator(stack):
    """Pipeline, web and log server each reach Redis as their own ACL user (CLIENT LIST)."""
    users = json.loads(Path(str(stack.cfg["redis_acl_file"])).read_text())

    own = stack.admin.client_id()  # this test's own connection, with the stack's redis_url

    def connected():
        seen = {c.get("user") for c in stack.admin.client_list() if int(c["id"]) != own}
        wanted = {users[r]["username"] for r in ("pipeline", "dashboard", "logserver")}
        return seen if wanted <= seen else None

    # The dashboard connects on its first request; ask for one page.
    assert stack.request("/stream")[0] == 200
    seen = wait_for(connected, 30, "pipeline, dashboard and log-server users connected", ignore=(Exception,))
    assert "default" not in seen


# ----------------------------------------------------------------------------- file modes


def test_every_file_and_directory_of_the_stack_is_private(stack):
    stack.admin.bgsave()
    wait_for(lambda: (stack.lay.redis / "dump.rdb").exists() and stack.admin.info("persistence")["rdb_bgsave_in_progress"] == 0,
             30, "a Redis snapshot", ignore=(Exception,))
    wait_for(lambda: any((stack.lay.redis / "appendonly").glob("*.aof")), 30, "the append-only file", ignore=(Exception,))
    wait_for(lambda: any((stack.lay.logs).glob("*.log")) and (stack.lay.logs / "nginx-access.log").exists(), 30,
             "log files", ignore=(Exception,))
    loose = []
    for dirpath, dirnames, filenames in os.walk(stack.lay.root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            if stat.S_IMODE(st.st_mode) & 0o027:
                loose.append(f"{path.relative_to(stack.lay.root)} {oct(stat.S_IMODE(st.st_mode))}")
    assert not loose, f"readable by others or writable by the group: {loose}"
    assert stat.S_IMODE(stack.lay.root.stat().st_mode) & 0o027 == 0
    for f in (stack.lay.redis / "dump.rdb", stack.lay.logs / "web.log", stack.lay.logs / "supervisord.log"):
        assert stat.S_IMODE(f.stat().st_mode) in (0o600, 0o640), f


# ----------------------------------------------------------------------------- slow clients


def _half_sent(port: int, tls: bool, body: bool) -> socket.socket:
    """A connection that sends part of a request and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    if body:
        sock.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 100000\r\n\r\nusername=al")
    else:
        sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    return sock


def test_fifty_half_sent_requests_do_not_stall_other_clients(stack):
    port = int(stack.cfg["nginx_tls_port"])
    held = [_half_sent(port, tls=True, body=i % 2 == 1) for i in range(50)]
    try:
        worst = 0.0
        for _ in range(5):
            t0 = time.perf_counter()
            status, _, body = stack.request("/api/alarms/summary", timeout=5)
            worst = max(worst, time.perf_counter() - t0)
            assert status == 200 and json.loads(body)
        assert worst < 1.0, f"a normal request took {worst:.2f} s beside 50 half-sent ones"
    finally:
        for s in held:
            s.close()


def test_fifty_half_sent_requests_straight_to_gunicorn_do_not_block_it(stack):
    """Measured before: two half-sent requests to gunicorn's port (sync workers) blocked the site for 62 s,
    and 50 held every thread of the gthread workers (tests/web/test_slow_clients.py covers both apps)."""
    port = int(stack.cfg["web_port"])
    held = [_half_sent(port, tls=False, body=i % 2 == 1) for i in range(50)]
    try:
        for _ in range(3):
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/alarms/summary")
            assert conn.getresponse().status == 200
            conn.close()
            assert time.perf_counter() - t0 < 1.0
    finally:
        for s in held:
            s.close()
