"""Website operations pages (Flask test client, real Redis): alarms, status, logs, processes, login."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minard.ops import programs
from minard.ops.keys import KeyStore
from minard.ops.logserver import append_line, format_line
from minard.store import alarms
from minard.testing import supervisor as supervisor_harness
from minard.testing import wait_for
from minard.web import create_app, logtail, secret_key


@pytest.fixture
def ops_cfg(registry_cfg, tmp_path):
    """The test configuration with its own programs.cfg and no supervisord to talk to."""
    registry_cfg.update(supervisor_socket=str(tmp_path / "no-supervisor.sock"))
    return registry_cfg


@pytest.fixture
def users(ops_cfg):
    store = KeyStore.from_config(ops_cfg)
    return {"alice": store.add("alice", kind="user"), "daq": store.add("daq")}


@pytest.fixture
def app(ops_cfg):
    return create_app(ops_cfg)


@pytest.fixture
def client(app):
    return app.test_client()


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)


def login(client, name, password):
    token = csrf_of(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"username": name, "password": password, "csrf_token": token, "next": "/alarms"})


def page_csrf(client, path="/alarms"):
    return csrf_of(client.get(path).get_data(as_text=True))


# -- read-only pages --------------------------------------------------------------


@pytest.mark.parametrize("path", ["/alarms", "/status", "/logs", "/logs/daq", "/processes", "/login"])
def test_read_only_pages_need_no_login_and_share_the_layout(client, path):
    resp = client.get(path)
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    for label in ("Alarms", "Status", "Logs", "Processes"):
        assert f">{label}</a>" in html
    assert "/static/js/minard.js" in html and "<script>" not in html  # no inline script


def test_home_redirects_to_the_stream_page(client):
    resp = client.get("/")
    assert resp.status_code == 302 and resp.headers["Location"].endswith("/stream")


def test_pages_send_a_strict_content_security_policy(client):
    headers = client.get("/alarms").headers
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"


def test_static_assets_are_served_locally(client):
    for path in ("/static/css/minard.css", "/static/js/minard.js", "/static/js/alarms.js"):
        assert client.get(path).status_code == 200


def test_alarm_message_with_script_is_escaped(client, redis_client):
    alarms.raise_alarm(redis_client, 40, '<script>alert("x")</script> & <b>bold</b>', program="daq")
    html = client.get("/alarms").get_data(as_text=True)
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
    assert '<script>alert("x")' not in html
    api = client.get("/api/alarms").get_json()
    assert api["alarms"][0]["message"].startswith("<script>") and api["summary"]["ringing"] == 1


def test_alarm_summary_counts_ringing_alarms(client, redis_client):
    alarms.raise_alarm(redis_client, 40, "a")
    alarms.raise_alarm(redis_client, 30, "b")
    s = client.get("/api/alarms/summary").get_json()
    assert (s["active"], s["ringing"]) == (2, 1)


def test_status_page_shows_state_uptime_host_and_metrics(client, redis_client, ops_cfg):
    reg = programs.Registry.from_config(ops_cfg)
    now = time.time()
    programs.record_heartbeat(redis_client, reg.get("daq"), "taking data", "buffer1", {"lag": 0.5, "lost": 2}, now=now - 3)
    html = client.get("/status").get_data(as_text=True)
    assert "DAQ &lt;b&gt;main&lt;/b&gt;" in html and "<b>main</b>" not in html
    assert 'class="badge state-up">up<' in html and 'class="badge state-unknown">unknown<' in html
    assert "taking data" in html and "lost</dt><dd>2<" in html  # readable fields, not key=value dumps
    shown = {r["name"]: r for r in client.get("/api/status").get_json()["rows"]}
    assert shown["daq"]["lag"] == "0.5" and shown["daq"]["log"] == "/logs/daq" and shown["daq"]["state"] == "up"
    rows = {p["name"]: p for p in client.get("/api/status").get_json()["programs"]}
    assert rows["daq"]["state"] == "up" and rows["daq"]["uptime"] >= 3 and rows["daq"]["host"] == "buffer1"


def test_status_read_raises_the_heartbeat_alarm_lazily(client, redis_client, ops_cfg):
    reg = programs.Registry.from_config(ops_cfg)
    programs.record_heartbeat(redis_client, reg.get("pinger"), "ok", now=time.time() - 60)
    rows = {p["name"]: p for p in client.get("/api/status").get_json()["programs"]}
    assert rows["pinger"]["state"] == "down"
    assert any("pinger stopped sending heartbeats" in a["message"] for a in alarms.list_alarms(redis_client))


# -- login and alarm actions ---------------------------------------------------------


def test_acknowledge_needs_login(client, redis_client):
    i = alarms.raise_alarm(redis_client, 40, "x")
    resp = client.post(f"/alarms/{i}/ack", data={"csrf_token": page_csrf(client)})
    assert resp.status_code == 302 and "/login" in resp.headers["Location"]
    assert alarms.get(redis_client, i)["state"] == "unacknowledged"


def test_wrong_password_is_refused_without_echoing_it(client, users):
    resp = login(client, "alice", "hunter2-not-it")
    assert resp.status_code == 401
    html = resp.get_data(as_text=True)
    assert "Wrong user name or password." in html and "hunter2-not-it" not in html


def test_program_token_is_not_a_website_login(client, users):
    assert login(client, "daq", users["daq"]).status_code == 401


def test_logged_in_user_acknowledges_with_comment(client, users, redis_client):
    i = alarms.raise_alarm(redis_client, 40, "HV trip")
    resp = login(client, "alice", users["alice"])
    assert resp.status_code == 302 and resp.headers["Location"] == "/alarms"
    html = client.get("/alarms").get_data(as_text=True)
    assert 'class="ack-form"' in html and users["alice"] not in html
    resp = client.post(f"/alarms/{i}/ack", data={"csrf_token": csrf_of(html), "comment": "expert called"},
                       follow_redirects=True)
    assert f"Alarm {i} acknowledged." in resp.get_data(as_text=True)
    a = alarms.get(redis_client, i)
    assert (a["state"], a["ack_by"], a["ack_comment"]) == ("acknowledged", "alice", "expert called")


def test_post_without_csrf_token_is_refused(client, users, redis_client):
    i = alarms.raise_alarm(redis_client, 40, "x")
    login(client, "alice", users["alice"])
    resp = client.post(f"/alarms/{i}/ack", data={"comment": "no token"})
    assert resp.status_code == 400 and "CSRF" in resp.get_data(as_text=True)
    resp = client.post(f"/alarms/{i}/ack", data={"csrf_token": "forged"})
    assert resp.status_code == 400
    assert alarms.get(redis_client, i)["state"] == "unacknowledged"


def test_shelve_needs_an_expiry_and_then_silences_until_unshelved(client, users, redis_client):
    i = alarms.raise_alarm(redis_client, 40, "x")
    login(client, "alice", users["alice"])
    token = page_csrf(client)
    resp = client.post(f"/alarms/{i}/shelve", data={"csrf_token": token, "minutes": ""})
    assert resp.status_code == 400 and "expiry is mandatory" in resp.get_data(as_text=True)
    resp = client.post(f"/alarms/{i}/shelve", data={"csrf_token": token, "minutes": "60", "comment": "known"})
    assert resp.status_code == 303
    a = alarms.get(redis_client, i)
    assert a["state"] == "shelved" and 3500 < a["shelved_until"] - time.time() <= 3600
    assert client.get("/api/alarms/summary").get_json()["ringing"] == 0
    assert client.post(f"/alarms/{i}/unshelve", data={"csrf_token": token}).status_code == 303
    assert alarms.get(redis_client, i)["ringing"]


def test_acting_on_a_missing_or_acknowledged_alarm_says_why(client, users, redis_client):
    login(client, "alice", users["alice"])
    token = page_csrf(client)
    assert client.post("/alarms/999/ack", data={"csrf_token": token}).status_code == 404
    i = alarms.raise_alarm(redis_client, 40, "x")
    client.post(f"/alarms/{i}/ack", data={"csrf_token": token})
    resp = client.post(f"/alarms/{i}/ack", data={"csrf_token": token})
    assert resp.status_code == 409 and "already acknowledged by alice" in resp.get_data(as_text=True)


def test_revoked_user_loses_the_login_at_once(client, users, redis_client, ops_cfg):
    login(client, "alice", users["alice"])
    token = page_csrf(client)
    KeyStore.from_config(ops_cfg).revoke("alice")
    i = alarms.raise_alarm(redis_client, 40, "x")
    resp = client.post(f"/alarms/{i}/ack", data={"csrf_token": token})
    assert resp.status_code == 302 and "/login" in resp.headers["Location"]


def test_logout_ends_the_session(client, users):
    login(client, "alice", users["alice"])
    assert "Log out" in client.get("/alarms").get_data(as_text=True)
    client.post("/logout", data={"csrf_token": page_csrf(client)})
    assert "Log out" not in client.get("/alarms").get_data(as_text=True)


def test_login_never_redirects_off_site(client, users):
    token = csrf_of(client.get("/login").get_data(as_text=True))
    resp = client.post("/login", data={"username": "alice", "password": users["alice"], "csrf_token": token,
                                       "next": "//evil.example/x"})
    assert resp.headers["Location"] == "/stream"


# -- logs -------------------------------------------------------------------------------


@pytest.mark.parametrize("query", [
    "name=../../etc/passwd", "name=/etc/passwd", "name=..", "name=daq/../../x", "name=%2Fetc%2Fpasswd",
    "name=daq&path=/etc/passwd", "name=daq&file=../x", "",
])
def test_tail_refuses_paths_and_traversal(client, query):
    resp = client.get("/api/logs/tail?" + query)
    assert resp.status_code == 400
    assert "root:" not in resp.get_data(as_text=True)


@pytest.mark.parametrize("path", ["/logs/..%2F..%2Fetc%2Fpasswd", "/logs/%2Fetc%2Fpasswd", "/logs/..", "/logs//etc/passwd"])
def test_log_page_refuses_paths(client, path):
    resp = client.get(path)
    assert 400 <= resp.status_code < 500 and "root:" not in resp.get_data(as_text=True)


def test_unregistered_program_log_is_404(client):
    assert client.get("/api/logs/tail?name=nobody").status_code == 404
    assert client.get("/logs/nobody").status_code == 404


def test_log_page_shows_the_tail_escaped_and_the_api_follows(client, ops_cfg):
    path = Path(ops_cfg["var_dir"]) / "logs" / "daq.log"
    append_line(path, format_line(20, "<script>alert(1)</script>", time.time()), 0, 0)
    html = client.get("/logs/daq").get_data(as_text=True)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert(1)" not in html
    first = client.get("/api/logs/tail?name=daq").get_json()
    append_line(path, format_line(30, "second", time.time()), 0, 0)
    nxt = client.get(f"/api/logs/tail?name=daq&ino={first['ino']}&pos={first['pos']}").get_json()
    assert nxt["text"].rstrip().endswith("second") and "script" not in nxt["text"]


def test_tail_follows_rotation_without_losing_lines(tmp_path):
    path = tmp_path / "p.log"
    append_line(path, "one\n", 30, 3)
    cur = logtail.follow(path, 0, 0)
    assert cur["text"] == "one\n"
    append_line(path, "two\n", 30, 3)
    append_line(path, "three-is-a-long-line-to-rotate\n", 30, 3)  # rotates: p.log -> p.log.1
    assert (tmp_path / "p.log.1").exists()
    nxt = logtail.follow(path, cur["ino"], cur["pos"])
    assert nxt["rotated"] and nxt["text"] == "two\nthree-is-a-long-line-to-rotate\n"
    path.write_text("")  # truncated in place
    append_line(path, "four\n", 0, 0)
    assert logtail.follow(path, nxt["ino"], nxt["pos"])["text"] == "four\n"


def test_tail_returns_only_whole_lines(tmp_path):
    path = tmp_path / "p.log"
    path.write_text("done\npartial")
    cur = logtail.follow(path, 0, 0)
    assert cur["text"] == "done\n"
    with open(path, "a") as fh:
        fh.write(" now\n")
    assert logtail.follow(path, cur["ino"], cur["pos"])["text"] == "partial now\n"


# -- processes ------------------------------------------------------------------------


def test_processes_page_says_clearly_when_supervisord_is_not_running(client):
    resp = client.get("/processes")
    assert resp.status_code == 200
    assert "supervisord is not running" in resp.get_data(as_text=True)
    assert client.get("/api/processes").status_code == 503


def test_processes_page_lists_supervisords_table_over_its_unix_socket(ops_cfg):
    with supervisor_harness.supervisord() as sock:
        ops_cfg["supervisor_socket"] = str(sock)
        client = create_app(ops_cfg).test_client()

        def running():
            data = client.get("/api/processes").get_json()
            return data.get("running") and data["processes"] and data["processes"][0]["state"] == "RUNNING"

        wait_for(running, 10, "sleeper RUNNING on /api/processes")
        html = client.get("/processes").get_data(as_text=True)
        assert "sleeper" in html and "RUNNING" in html and "not running" not in html


# -- app plumbing ---------------------------------------------------------------------


def test_secret_key_is_generated_once_with_mode_0600(tmp_path):
    path = tmp_path / "var" / "web_secret_key"
    key = secret_key(path)
    assert len(key) >= 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret_key(path) == key


def test_importing_minard_does_not_import_flask_but_minard_app_is_the_site(ops_cfg):
    env = {**os.environ, "MINARD_VAR_DIR": ops_cfg["var_dir"], "MINARD_REDIS_URL": ops_cfg["redis_url"]}
    code = ("import sys, minard, minard.cli; assert 'flask' not in sys.modules; "
            "app = minard.app; assert 'ops.alarms_page' in app.view_functions; assert minard.app is app")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).resolve().parents[2])


def test_status_page_shows_pipeline_heartbeats_and_loss_counters(client, redis_client):
    from minard.store import status as pipeline_status

    pipe = redis_client.pipeline()
    pipeline_status.beat(pipe, "pull", {"lag_seconds": 1.5, "queue": 7}, started=time.time() - 120)
    pipeline_status.count(pipe, "pull", received=100, processed=95, dropped=5, skipped=7)
    pipe.execute()
    html = client.get("/status").get_data(as_text=True)
    assert 'data-name="pull"' in html and "queue</dt><dd>7<" in html and "5 dropped" in html
    assert html.count('data-name="pull"') == 1  # one row per program
    assert "processed &gt; received" not in html
    data = client.get("/api/status").get_json()
    proc = next(p for p in data["pipeline"] if p["name"] == "pull")
    assert proc["state"] == "up" and proc["lag"] == "1.5" and proc["uptime"] >= 120
    stage = next(s for s in data["stages"] if s["stage"] == "pull")
    assert stage["lost"] == 5
    row = next(r for r in data["rows"] if r["name"] == "pull")
    assert row["lost"] == 5 and row["lag"] == "1.5" and not row["flag"]
    assert row["stages"][0]["other"] == {"skipped": "7"}


def test_status_page_lists_consumer_pools_on_two_hosts_separately(client, redis_client):
    from minard.store import status as pipeline_status

    pipe = redis_client.pipeline()
    pipeline_status.beat_pool(pipe, "minard_dispatch_pull", {"workers": 3})
    pipeline_status.count(pipe, "pull", received=70, processed=68, dropped=2)
    pipe.execute()
    other = "mon-b<script>:4711"  # a pool on another host (and a name needing escapes)
    redis_client.hset(f"status:pool:{other}", mapping={"time": time.time(), "host": "mon-b<script>",
                                                       "pid": 4711, "component": "minard_dispatch_pull",
                                                       "workers": 1})
    redis_client.zadd("pipeline:pools", {other: time.time()})
    redis_client.hset("stats:pull", mapping={f"received|{other}.1": 30, f"processed|{other}/4712.1": 30})
    html = client.get("/status").get_data(as_text=True)
    assert f'data-pool="{pipeline_status.pool_id()}"' in html and "<script>:4711" not in html
    pools = {p["pool"]: p for p in client.get("/api/status").get_json()["pools"]}
    assert pools[pipeline_status.pool_id()]["received"] == 70 and pools[pipeline_status.pool_id()]["lost"] == 2
    assert pools[other]["received"] == 30 and pools[other]["processed"] == 30 and pools[other]["lost"] == 0
    assert pools[other]["state"] == "up" and pools[other]["workers"] == "1"


def test_status_flags_a_stage_that_processed_more_than_it_received(client, redis_client, ops_cfg):
    """The counters must not silently read processed > received with nothing lost."""
    from minard.store import status as pipeline_status

    reg = programs.Registry.from_config(ops_cfg)
    programs.record_heartbeat(redis_client, reg.get("daq"), "ok", "buffer1", now=time.time())
    pipe = redis_client.pipeline()
    pipeline_status.beat(pipe, "daq", {"lag_seconds": 0.1}, started=time.time() - 50)
    pipeline_status.count(pipe, "daq", received=100, processed=130)
    pipe.execute()
    html = client.get("/status").get_data(as_text=True)
    assert html.count('data-name="daq"') == 1  # registered program and pipeline heartbeat: one row
    assert 'class="state-up flagged"' in html and "processed &gt; received" in html
    row = next(r for r in client.get("/api/status").get_json()["rows"] if r["name"] == "daq")
    assert row["flag"] and row["stages"][0]["over"] and row["log"] == "/logs/daq"


def test_processed_leading_received_by_one_report_is_not_flagged_but_a_real_excess_is(client, redis_client):
    """Measured on the bundled stack: every pool showed 'processed > received' (the workers' flush
    had written processed before the manager's next heartbeat wrote received)."""
    from minard.store import status as pipeline_status

    pipe = redis_client.pipeline()
    pipeline_status.beat(pipe, "pull", {"lag_seconds": 0.1}, started=time.time() - 100)
    pipeline_status.beat_pool(pipe, "pull", {"workers": 2}, started=time.time() - 100)
    pipeline_status.count(pipe, "pull", received=10_000, processed=10_100)  # 100/s: 1 s ahead
    pipe.execute()
    data = client.get("/api/status").get_json()
    row = next(r for r in data["rows"] if r["name"] == "pull")
    assert not row["flag"] and not data["pools"][0]["over"]
    assert "processed &gt; received" not in client.get("/status").get_data(as_text=True)
    pipeline_status.count(redis_client, "pull", processed=2_000)  # 21 s ahead: counters disagree
    data = client.get("/api/status").get_json()
    row = next(r for r in data["rows"] if r["name"] == "pull")
    assert row["flag"] and data["pools"][0]["over"]
    assert client.get("/status").get_data(as_text=True).count("processed &gt; received") == 2


def test_pages_answer_503_not_500_while_redis_is_unreachable(client, ops_cfg):
    import redis as redis_py

    from minard.testing import free_port

    app = client.application
    saved = app.extensions["minard_redis"]
    app.extensions["minard_redis"] = redis_py.Redis(port=free_port(), socket_connect_timeout=0.2)
    try:
        resp = client.get("/status")
    finally:
        app.extensions["minard_redis"] = saved
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
    assert "switching over" in resp.get_data(as_text=True)
