"""Issue 14: slow clients cannot exhaust gunicorn, straight to its port (no nginx in front).

Both apps run under real gunicorn started with the command ``minard up`` gives
supervisord (:func:`minard.stack.gunicorn_command`: gevent workers), on a real
Redis.  50 half-sent requests (headers cut, or a body promised and not sent)
are held open while another client is answered within 1 s; a body that does
not come is answered 408 after ``web_body_timeout`` and counted, cut headers are
dropped after ``--keep-alive`` s, and a body that comes slowly but in time
reaches the app intact.  (With the gthread options used before, 2 workers x 8
threads, the first test fails: the 51st request waits until the 50 close.)
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from minard import config, stack
from minard.testing import free_port, stop_pid, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: web_body_timeout of these servers (s): short, so that the 408 test is quick.
BODY_TIMEOUT = 2.0
#: Paths answered without a login by each app (Redis is pinged).
HEALTH = "/healthz"


class Served:
    """One web app under gunicorn, started by the stack's command builder; stopped by pid."""

    def __init__(self, program: str, redis_url: str, tmp_path: Path):
        self.program, self.port, self.metrics_port = program, free_port(), free_port()
        settings = {"redis_url": redis_url, "var_dir": tmp_path / "var", "web_body_timeout": BODY_TIMEOUT,
                    f"metrics_port_{program}": self.metrics_port, "log_level": "INFO"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINARD_")}
        env.update({f"MINARD_{k.upper()}": str(v) for k, v in settings.items()})
        cfg = config.load(settings, env={})
        self.argv = stack.gunicorn_command(cfg, program, port=self.port)
        self.log_path = tmp_path / f"{program}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, env=env, stdout=log, stderr=log, cwd=str(config.ROOT))
        wait_for(lambda: self.get(HEALTH)[0] == 200, 30, f"{program} on :{self.port}", ignore=(OSError,))

    def get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        """One GET on a new connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def metric(self, name: str) -> float:
        """A sample of the master's /metrics (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == name and s.labels.get("app") == self.program)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> int | None:
        return stop_pid(self.proc, 15)


@pytest.fixture(params=["web", "snoplus_log"])
def served(request, redis_url, tmp_path):
    app = Served(request.param, redis_url, tmp_path)
    yield app
    assert app.stop() == 0, app.log()


def half_sent(port: int, body: bool) -> socket.socket:
    """A connection that sends part of a request and then nothing: headers cut, or a body promised."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if body:
        sock.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 1000\r\n\r\nusername=al")
    else:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    return sock


def closed_by_server(sock: socket.socket) -> bytes | None:
    """What the server sent before closing *sock*; None while it keeps the connection open."""
    sock.settimeout(0.05)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return None
    return data


def test_fifty_half_sent_requests_straight_to_gunicorn_do_not_delay_another_client(served):
    held = [half_sent(served.port, body=i % 2 == 1) for i in range(50)]
    try:
        worst = 0.0
        for _ in range(10):
            t0 = time.perf_counter()
            status, body = served.get(HEALTH, timeout=5)
            worst = max(worst, time.perf_counter() - t0)
            assert status == 200 and json.loads(body)["ok"] is True
        assert worst < 1.0, f"{served.program}: a request took {worst:.2f} s beside 50 half-sent ones"
        assert all(closed_by_server(s) is None for s in held), "the half-sent requests were still open"
    finally:
        for s in held:
            s.close()


def test_a_body_that_never_comes_is_answered_408_after_the_body_timeout_and_counted(served):
    before = served.metric("minard_http_body_timeouts_total")
    sock = half_sent(served.port, body=True)
    t0 = time.monotonic()
    try:
        sock.settimeout(BODY_TIMEOUT + 5)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        waited = time.monotonic() - t0
        answer = json.loads(resp.read())
        assert resp.status == 408 and "request body not received" in answer["error"], answer
        assert BODY_TIMEOUT - 0.2 <= waited < BODY_TIMEOUT + 1.5, waited
        wait_for(lambda: closed_by_server(sock) is not None, 8, "the connection closed within --keep-alive s")
    finally:
        sock.close()
    wait_for(lambda: served.metric("minard_http_body_timeouts_total") == before + 1, 10, "the 408 counted")
    assert "not received within 2 s: 408" in served.log()


def test_cut_headers_are_dropped_after_the_keep_alive_deadline(served):
    keep_alive = float(served.argv[served.argv.index("--keep-alive") + 1])
    sock = half_sent(served.port, body=False)
    t0 = time.monotonic()
    try:
        answered: list[bytes] = []

        def dropped() -> bool:
            data = closed_by_server(sock)
            if data is not None:
                answered.append(data)
            return data is not None

        wait_for(dropped, keep_alive + 5, "cut headers dropped")
        assert answered == [b""], answered  # closed without an answer
        assert keep_alive - 0.5 <= time.monotonic() - t0 < keep_alive + 3
    finally:
        sock.close()


def test_a_body_sent_slowly_within_the_deadline_reaches_the_log_server_intact(redis_url, tmp_path):
    """The body read ahead is the one the app sees: Basic user 'daq' against name 'other' in the body."""
    app = Served("snoplus_log", redis_url, tmp_path)
    try:
        body = json.dumps({"name": "other", "level": 20, "message": "x" * 3000}).encode()
        auth = base64.b64encode(b"daq:not-a-token").decode()
        sock = socket.create_connection(("127.0.0.1", app.port), timeout=10)
        try:
            sock.sendall(f"POST /log HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {auth}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            for i in range(0, len(body), 1000):  # three parts: slow, but within the deadline
                sock.sendall(body[i:i + 1000])
                if i + 1000 < len(body):  # the server waits for the rest instead of answering a part
                    assert not select.select([sock], [], [], 0.3)[0], "answered before the body was complete"
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            answer = json.loads(resp.read())
            assert resp.status == 400 and "does not match" in answer["error"], answer
        finally:
            sock.close()
        assert app.metric("minard_http_body_timeouts_total") == 0
    finally:
        assert app.stop() == 0, app.log()
