"""Issue 14, measured failures of the website (Flask app, real Redis, real files).

Sessions that outlive logout and re-creation, off-site redirects, 500s from
Unicode digits, symlinks in the log directory, unlimited and timing-revealing
logins.  Every test here failed on the code before the fix.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path

import pytest
from conftest import wait_for

from minard.ops.keys import KeyStore
from minard.ops.logserver import append_line, format_line
from minard.ops.logserver import create_app as create_log_app
from minard.store import alarms, sessions
from minard.web import create_app


@pytest.fixture
def web_cfg(registry_cfg, tmp_path):
    """Operations config; login limits high unless a test lowers them."""
    registry_cfg.update(supervisor_socket=str(tmp_path / "no-supervisor.sock"),
                        web_login_limit_address="1000 per minute", web_login_limit_user="1000 per minute")
    return registry_cfg


@pytest.fixture
def users(web_cfg):
    store = KeyStore.from_config(web_cfg)
    return {"alice": store.add("alice", kind="user"), "daq": store.add("daq")}


@pytest.fixture
def client(web_cfg):
    return create_app(web_cfg).test_client()


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)


def login(client, name, password, next_="/alarms", **headers):
    token = csrf_of(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"username": name, "password": password, "csrf_token": token,
                                       "next": next_}, headers=headers)


def cookie_of(client) -> str:
    return client.get_cookie("minard_session").value


def shelve(client, alarm_id, cookie, minutes="15"):
    """POST the shelve form with a captured cookie and its CSRF token (as an attacker replays it)."""
    client.set_cookie("minard_session", cookie)
    token = csrf_of(client.get("/alarms").get_data(as_text=True))
    return client.post(f"/alarms/{alarm_id}/shelve", data={"csrf_token": token, "minutes": minutes})


# -- sessions ----------------------------------------------------------------------------


def test_a_cookie_captured_before_logout_cannot_shelve_after_logout(client, users, redis_client):
    login(client, "alice", users["alice"])
    captured = cookie_of(client)
    token = csrf_of(client.get("/alarms").get_data(as_text=True))
    client.post("/logout", data={"csrf_token": token})
    i = alarms.raise_alarm(redis_client, 40, "HV trip")
    resp = shelve(client, i, captured)
    assert resp.status_code == 302 and "/login" in resp.headers["Location"]
    assert alarms.get(redis_client, i)["state"] == "unacknowledged"


def test_revoking_and_re_adding_a_user_invalidates_the_old_cookie(client, users, redis_client, web_cfg):
    login(client, "alice", users["alice"])
    captured = cookie_of(client)
    store = KeyStore.from_config(web_cfg)
    store.revoke("alice")
    store.add("alice", kind="user")
    i = alarms.raise_alarm(redis_client, 40, "HV trip")
    resp = shelve(client, i, captured)
    assert resp.status_code == 302 and "/login" in resp.headers["Location"]
    assert alarms.get(redis_client, i)["state"] == "unacknowledged"


def test_a_session_ends_after_the_idle_lifetime(web_cfg, users, redis_client):
    web_cfg["web_session_idle_minutes"] = 1 / 60  # one second
    client = create_app(web_cfg).test_client()
    login(client, "alice", users["alice"])
    assert "Log out" in client.get("/alarms").get_data(as_text=True)
    wait_for(lambda: not redis_client.keys("minard:web:session:*"), 5, "the idle session to expire")
    assert "Log out" not in client.get("/alarms").get_data(as_text=True)


def test_a_session_ends_after_the_absolute_lifetime_even_when_used(web_cfg, users):
    web_cfg["web_session_hours"] = 1.5 / 3600  # 1.5 seconds
    client = create_app(web_cfg).test_client()
    login(client, "alice", users["alice"])
    start = time.monotonic()
    # Busy all the time (idle expiry never reached), still logged out after 1.5 s.
    wait_for(lambda: "Log out" not in client.get("/alarms").get_data(as_text=True), 5, "the absolute lifetime")
    assert time.monotonic() - start >= 1.0


def test_the_session_store_holds_no_cookie_value(client, users, redis_client):
    login(client, "alice", users["alice"])
    keys = [k.decode() for k in redis_client.keys("minard:web:session:*")]
    assert len(keys) == 1 and re.fullmatch(r"minard:web:session:[0-9a-f]{64}", keys[0])
    assert redis_client.ttl(keys[0]) > 0


def test_the_cookie_is_secure_when_the_site_is_reached_over_https(client, users):
    token = csrf_of(client.get("/login").get_data(as_text=True))
    resp = client.post("/login", data={"username": "alice", "password": users["alice"], "csrf_token": token},
                       headers={"X-Forwarded-Proto": "https"})
    cookie = resp.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    plain = client.get("/login").headers.get("Set-Cookie", "")
    assert "Secure" not in plain


# -- redirects ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", [
    "/\t/evil.example", "//evil.example", "/\\evil.example", "\\\\evil.example", "https://evil.example/",
    "javascript:alert(1)", "/\n/evil.example", "/\r\n/evil.example", " //evil.example",
    "http:/evil.example", "/\u2215\u2215evil.example", "evil.example", "/x\x00",
])
def test_login_redirects_only_to_a_same_site_relative_path(client, users, target):
    resp = login(client, "alice", users["alice"], next_=target)
    assert resp.status_code == 302
    location = resp.headers["Location"]
    assert location == "/stream", location


def test_a_local_next_path_is_kept(client, users):
    assert login(client, "alice", users["alice"], next_="/runs?x=1").headers["Location"] == "/runs?x=1"


# -- no 500 from Unicode digits ---------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "/api/alarms?limit=%C2%B2", "/api/logs/tail?name=daq&ino=%C2%B2&pos=0", "/api/logs/tail?name=daq&ino=0&pos=%C2%B3",
    "/api/logs/tail?name=daq&ino=1&pos=%D9%A3", "/api/alarms?limit=1&limit=2", "/api/stream?window=%C2%B2m",
    "/api/stream?start=%D9%A1%D9%A7", "/runs/%C2%B9", "/login?next=%0a//evil",
])
def test_unicode_digits_are_a_400_not_a_500(client, url):
    resp = client.get(url)
    assert 400 <= resp.status_code < 500 or resp.status_code == 200, (url, resp.status_code)
    if url.startswith("/api/"):
        assert resp.status_code == 400 and "error" in resp.get_json()


def test_shelve_form_with_a_unicode_digit_is_a_400(client, users, redis_client):
    login(client, "alice", users["alice"])
    i = alarms.raise_alarm(redis_client, 40, "HV trip")
    resp = shelve(client, i, cookie_of(client), minutes="\u00b2")
    assert resp.status_code == 400
    assert alarms.get(redis_client, i)["state"] == "unacknowledged"


def test_login_with_a_newline_in_next_is_not_a_500(client, users):
    resp = login(client, "alice", users["alice"], next_="/alarms\n")
    assert resp.status_code == 302 and resp.headers["Location"] == "/stream"


# -- log files never through a symlink ------------------------------------------------------


@pytest.fixture
def planted(web_cfg, tmp_path):
    """A secret file outside the log directory and daq.log made a symlink to it."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-LINE\n")
    logs = Path(web_cfg["var_dir"]) / "logs"
    logs.mkdir(parents=True)
    (logs / "daq.log").symlink_to(secret)
    return secret


def test_the_log_viewer_does_not_follow_a_planted_symlink(client, planted):
    page = client.get("/logs/daq")
    assert page.status_code == 200 and "TOP-SECRET" not in page.get_data(as_text=True)
    assert "symbolic link" in page.get_data(as_text=True)
    tail = client.get("/api/logs/tail?name=daq")
    assert tail.status_code == 200 and tail.get_json()["refused"] and "TOP-SECRET" not in tail.get_data(as_text=True)
    again = client.get("/api/logs/tail?name=daq&ino=5&pos=0").get_json()
    assert again["refused"] and again["text"] == ""


def test_the_log_viewer_does_not_follow_a_symlinked_rotated_file(client, web_cfg, tmp_path):
    logs = Path(web_cfg["var_dir"]) / "logs"
    append_line(logs / "daq.log", format_line(20, "first", time.time()), 0, 0)
    first = client.get("/api/logs/tail?name=daq").get_json()
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-LINE\n" * 10)
    os.replace(logs / "daq.log", logs / "daq.log.moved")
    (logs / "daq.log.1").symlink_to(secret)
    append_line(logs / "daq.log", format_line(20, "second", time.time()), 0, 0)
    nxt = client.get(f"/api/logs/tail?name=daq&ino={first['ino']}&pos=0").get_json()
    assert "TOP-SECRET" not in nxt["text"] and "second" in nxt["text"]


def test_posting_a_log_record_does_not_append_through_a_planted_symlink(web_cfg, users, planted):
    client = create_log_app(web_cfg).test_client()
    resp = client.post("/log", json={"name": "daq", "level": 20, "message": "appended"},
                       headers={"Authorization": f"Bearer {users['daq']}"})
    assert resp.status_code == 409 and "error" in resp.get_json()
    assert planted.read_text() == "TOP-SECRET-LINE\n"


def test_a_planted_lock_symlink_is_not_followed_either(web_cfg, users, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    logs = Path(web_cfg["var_dir"]) / "logs"
    logs.mkdir(parents=True)
    (logs / ".daq.log.lock").symlink_to(victim)
    client = create_log_app(web_cfg).test_client()
    resp = client.post("/log", json={"name": "daq", "level": 20, "message": "x"},
                       headers={"Authorization": f"Bearer {users['daq']}"})
    assert resp.status_code == 409 and victim.read_text() == "keep\n"


def test_new_log_files_are_not_world_readable(web_cfg, users):
    client = create_log_app(web_cfg).test_client()
    assert client.post("/log", json={"name": "daq", "level": 20, "message": "x"},
                       headers={"Authorization": f"Bearer {users['daq']}"}).status_code == 200
    path = Path(web_cfg["var_dir"]) / "logs" / "daq.log"
    assert path.stat().st_mode & 0o007 == 0


# -- login limits and timing -------------------------------------------------------------------


def test_forty_wrong_passwords_get_429_with_retry_after_and_are_counted(web_cfg, users, redis_client):
    web_cfg.update(web_login_limit_user="5 per minute", web_login_limit_address="20 per minute")
    client = create_app(web_cfg).test_client()
    codes = []
    retry = None
    for _ in range(40):
        resp = login(client, "alice", "wrong")
        codes.append(resp.status_code)
        if resp.status_code == 429:
            retry = resp.headers.get("Retry-After")
    assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}
    assert retry is not None and 0 < int(retry) <= 60
    # Even the right password waits: the limit protects the account, not the guess.
    assert login(client, "alice", users["alice"]).status_code == 429
    counted = sessions.counters(redis_client)
    assert counted["login_failed"] == 5 and counted["login_limited"] >= 35


def test_the_per_user_limit_holds_across_client_addresses(web_cfg, users):
    web_cfg.update(web_login_limit_user="3 per minute", web_login_limit_address="100 per minute")
    client = create_app(web_cfg).test_client()
    codes = [login(client, "alice", "wrong", **{"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(6)]
    assert codes == [401, 401, 401, 429, 429, 429]
    # Another user from the same addresses is not locked out by alice's limit.
    assert login(client, "bob", "wrong", **{"X-Forwarded-For": "10.0.0.9"}).status_code == 401


def test_the_per_address_limit_holds_across_user_names(web_cfg, users):
    web_cfg.update(web_login_limit_user="100 per minute", web_login_limit_address="4 per minute")
    client = create_app(web_cfg).test_client()
    codes = [login(client, f"user{i}", "wrong", **{"X-Forwarded-For": "10.1.1.1"}).status_code for i in range(6)]
    assert codes == [401] * 4 + [429] * 2
    assert login(client, "alice", users["alice"], **{"X-Forwarded-For": "10.1.1.2"}).status_code == 302


def test_successful_logins_do_not_count_against_the_limit(web_cfg, users):
    web_cfg.update(web_login_limit_user="2 per minute", web_login_limit_address="2 per minute")
    client = create_app(web_cfg).test_client()
    assert all(login(client, "alice", users["alice"]).status_code == 302 for _ in range(5))


def test_unknown_and_known_users_take_the_same_time_to_refuse(client, users):
    def once_ms(name):
        t0 = time.perf_counter()
        assert login(client, name, "wrong-password").status_code == 401
        return (time.perf_counter() - t0) * 1000

    once_ms("alice")  # warm-up
    known, unknown = [], []
    for _ in range(9):  # interleaved, so that load from other processes hits both alike
        known.append(once_ms("alice"))
        unknown.append(once_ms("nobody-here"))
    k, u = statistics.median(known), statistics.median(unknown)
    # Before: 37 ms against 1.4 ms.  Now both pay one scrypt derivation.
    assert u > 0.5 * k and k > 0.5 * u, (k, u)


def test_the_rate_limiter_runs_for_login_requests_only_and_still_limits_them(web_cfg, users, monkeypatch):
    """Flask-Limiter hooks every request; only the login view has limits, so only it pays for them."""
    from flask import request
    from flask_limiter import Limiter

    seen = []
    check = Limiter._check_request_limit

    def spy(self, *args, **kwargs):
        seen.append(request.endpoint)
        return check(self, *args, **kwargs)

    monkeypatch.setattr(Limiter, "_check_request_limit", spy)
    web_cfg.update(web_login_limit_user="2 per minute")
    client = create_app(web_cfg).test_client()
    for path in ("/healthz", "/api/runs", "/stream", "/no/such/page", "/static/css/minard.css"):
        client.get(path)
    assert seen == []
    codes = [login(client, "alice", "wrong").status_code for _ in range(3)]
    assert codes == [401, 401, 429] and set(seen) == {"auth.login"}


def test_the_session_serializer_is_made_once_per_key(web_cfg, users):
    app = create_app(web_cfg)
    iface = app.session_interface
    first = iface.get_signing_serializer(app)
    assert iface.get_signing_serializer(app) is first
    client = app.test_client()
    assert login(client, "alice", users["alice"]).status_code == 302
    assert 'data-logged-in="yes"' in client.get("/alarms").get_data(as_text=True)  # its cookie is read back
    app.secret_key = "another key of at least thirty-two characters"
    assert iface.get_signing_serializer(app) is not first
    assert 'data-logged-in="no"' in client.get("/alarms").get_data(as_text=True)  # the old cookie no longer opens
