"""The log server (snoplus_log:app): auth, validation, log files, alarms, heartbeats."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from minard import stack
from minard.ops import programs
from minard.ops.keys import KeyStore
from minard.ops.logserver import create_app, format_line
from minard.store import alarms
from minard.testing import free_port, stop_pid, wait_port

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0

@pytest.fixture
def ops_cfg(registry_cfg):
    """The test configuration with its own programs.cfg and small log limits."""
    registry_cfg.update(log_max_message=1000, log_max_bytes=4000, log_backups=2)
    return registry_cfg


@pytest.fixture
def tokens(ops_cfg):
    store = KeyStore.from_config(ops_cfg)
    return {"daq": store.add("daq"), "pinger": store.add("pinger"), "ghost": store.add("ghost")}


@pytest.fixture
def client(ops_cfg):
    return create_app(ops_cfg).test_client()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def basic(name, token):
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{token}".encode()).decode()}


# -- credentials -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/heartbeat", "/log"])
def test_posts_without_credentials_get_401_with_a_clear_message(client, tokens, path):
    resp = client.post(path, json={"name": "daq", "status": "ok", "level": 20, "message": "m"})
    assert resp.status_code == 401
    assert "credentials required" in resp.get_json()["error"]
    assert "Bearer" in resp.headers["WWW-Authenticate"]


@pytest.mark.parametrize("path", ["/heartbeat", "/log"])
def test_wrong_token_gets_401_and_the_secret_is_never_echoed(client, tokens, path):
    wrong = tokens["daq"][:-3] + "zzz"
    body = {"name": "daq", "status": "ok", "level": 20, "message": "m"}
    for headers in (bearer(wrong), basic("daq", wrong), bearer(tokens["pinger"])):
        resp = client.post(path, json=body, headers=headers)
        assert resp.status_code == 401
        assert "invalid, unknown or revoked token for program daq" in resp.get_json()["error"]
        for secret in (wrong, tokens["daq"], tokens["pinger"]):
            assert secret not in resp.get_data(as_text=True)


def test_revoked_token_is_refused_on_the_next_request(client, tokens, ops_cfg):
    ok = client.post("/heartbeat", json={"name": "daq", "status": "ok"}, headers=bearer(tokens["daq"]))
    assert ok.status_code == 200
    KeyStore.from_config(ops_cfg).revoke("daq")
    resp = client.post("/heartbeat", json={"name": "daq", "status": "ok"}, headers=bearer(tokens["daq"]))
    assert resp.status_code == 401


def test_basic_auth_with_program_name_and_form_body_is_accepted(client, tokens):
    resp = client.post("/heartbeat", data={"status": "running"}, headers=basic("daq", tokens["daq"]))
    assert resp.status_code == 200 and resp.get_json()["name"] == "daq"


def test_valid_token_of_an_unregistered_program_gets_404(client, tokens):
    resp = client.post("/heartbeat", json={"name": "ghost", "status": "ok"}, headers=bearer(tokens["ghost"]))
    assert resp.status_code == 404
    assert resp.get_json()["error"] == "program ghost is not registered in programs.cfg"


# -- validation ------------------------------------------------------------------


@pytest.mark.parametrize("body,status,message", [
    ({"status": "ok"}, 400, "missing field 'name'"),
    ({"name": "daq"}, 400, "missing field 'status'"),
    ({"name": "daq", "status": 5}, 400, "field 'status' must be a string"),
    ({"name": "daq", "status": "x" * 65}, 413, "the limit is 64"),
    ({"name": "daq", "status": "ok", "metrics": {"lag": "slow"}}, 400, "must be a finite number"),
])
def test_bad_heartbeats_get_4xx_with_a_clear_message(client, tokens, body, status, message):
    resp = client.post("/heartbeat", json=body, headers=bearer(tokens["daq"]))
    assert resp.status_code == status
    assert message in resp.get_json()["error"]


@pytest.mark.parametrize("body,status,message", [
    ({"name": "daq", "message": "m"}, 400, "missing field 'level'"),
    ({"name": "daq", "level": 20}, 400, "missing field 'message'"),
    ({"name": "daq", "level": "loud", "message": "m"}, 400, "unknown level"),
    ({"name": "daq", "level": 99, "message": "m"}, 400, "from 0 to 50"),
    ({"name": "daq", "level": 20, "message": "m" * 1001}, 413, "1001 characters; the limit is 1000"),
])
def test_bad_log_records_get_4xx_with_a_clear_message(client, tokens, body, status, message):
    resp = client.post("/log", json=body, headers=bearer(tokens["daq"]))
    assert resp.status_code == status
    assert message in resp.get_json()["error"]


def test_oversize_body_gets_413_json(client, tokens):
    resp = client.post("/log", data=json.dumps({"name": "daq", "level": 20, "message": "m" * 50000}),
                       content_type="application/json", headers=bearer(tokens["daq"]))
    assert resp.status_code == 413 and "too large" in resp.get_json()["error"]


def test_non_object_json_gets_400(client, tokens):
    resp = client.post("/log", data="[1,2]", content_type="application/json", headers=bearer(tokens["daq"]))
    assert resp.status_code == 400 and "JSON object" in resp.get_json()["error"]


# -- log records -------------------------------------------------------------------


def test_log_records_are_appended_to_the_registered_programs_file(client, tokens, ops_cfg):
    for level, msg in [(10, "debugging"), (20, "run 100 started"), (21, "calibrated"), (30, "slow")]:
        resp = client.post("/log", json={"name": "daq", "level": level, "message": msg}, headers=bearer(tokens["daq"]))
        assert resp.status_code == 200 and resp.get_json()["alarm"] is None
    text = (Path(ops_cfg["var_dir"]) / "logs" / "daq.log").read_text()
    lines = text.splitlines()
    assert [ln.split()[2] for ln in lines] == ["DEBUG", "INFO", "SUCCESS", "WARNING"]
    assert lines[1].endswith("run 100 started")


def test_level_40_or_notify_raises_an_alarm(client, tokens, redis_client):
    danger = client.post("/log", json={"name": "daq", "level": 40, "message": "HV trip"}, headers=bearer(tokens["daq"]))
    notify = client.post("/log", json={"name": "daq", "level": 20, "message": "run ended", "notify": True},
                         headers=bearer(tokens["daq"]))
    quiet = client.post("/log", json={"name": "daq", "level": 30, "message": "meh"}, headers=bearer(tokens["daq"]))
    a = alarms.get(redis_client, danger.get_json()["alarm"])
    assert (a["level"], a["message"], a["program"], a["source"], a["ringing"]) == (40, "HV trip", "daq", "log", True)
    n = alarms.get(redis_client, notify.get_json()["alarm"])
    assert n["level"] == 20 and not n["ringing"]
    assert quiet.get_json()["alarm"] is None


def test_repeated_error_lines_are_one_grouped_alarm(client, tokens, redis_client):
    ids = {client.post("/log", json={"name": "daq", "level": "error", "message": "no data"},
                       headers=bearer(tokens["daq"])).get_json()["alarm"] for _ in range(3)}
    assert len(ids) == 1 and alarms.get(redis_client, ids.pop())["count"] == 3


def test_log_file_rotates_at_max_bytes_keeping_backups(client, tokens, ops_cfg):
    for i in range(40):
        client.post("/log", json={"name": "daq", "level": 20, "message": f"{i:03d} " + "x" * 300},
                    headers=bearer(tokens["daq"]))
    logs = Path(ops_cfg["var_dir"]) / "logs"
    assert sorted(p.name for p in logs.glob("daq.log*")) == ["daq.log", "daq.log.1", "daq.log.2"]
    assert all(p.stat().st_size <= 4000 for p in logs.glob("daq.log*"))
    assert (logs / "daq.log").read_text().splitlines()[-1].split()[3] == "039"


def test_multiline_message_cannot_forge_a_log_line():
    line = format_line(20, "ok\n2024-01-01 00:00:00.000 DANGER fake\x1b[31m", T0)
    _first, second = line.rstrip("\n").split("\n")
    assert second.startswith("    2024") and "\x1b" not in line


# -- heartbeats --------------------------------------------------------------------


def test_heartbeat_state_machine_uptime_expiry_and_return(ops_cfg, redis_client):
    r = redis_client
    reg = programs.Registry.from_config(ops_cfg)
    daq = reg.get("daq")
    by_name = lambda now: {s["name"]: s for s in programs.statuses(r, reg, now)}
    assert by_name(T0)["daq"]["state"] == "unknown"
    assert programs.record_heartbeat(r, daq, "ok", "buffer1", now=T0) == "unknown"
    assert programs.record_heartbeat(r, daq, "ok", "buffer1", now=T0 + 5) == "up"
    s = by_name(T0 + 8)["daq"]
    assert (s["state"], s["uptime"], s["age"], s["heartbeats"]) == ("up", 8.0, 3.0, 2)
    assert by_name(T0 + 15.5)["daq"]["state"] == "down"           # 10 s timeout passed
    assert programs.check_heartbeats(r, reg, T0 + 15.5) == ["daq"]
    assert programs.check_heartbeats(r, reg, T0 + 20) == []         # one alarm per silence
    down = [a for a in alarms.list_alarms(r, now=T0 + 20) if a["source"] == "heartbeat"]
    assert len(down) == 1 and down[0]["level"] == 40 and "daq stopped sending heartbeats" in down[0]["message"]
    assert programs.record_heartbeat(r, daq, "ok", now=T0 + 30) == "down"
    s = by_name(T0 + 31)["daq"]
    assert s["state"] == "up" and s["uptime"] == 1.0                 # uptime restarts
    back = alarms.list_alarms(r, now=T0 + 31)[0]
    assert back["level"] == alarms.SUCCESS and "daq is sending heartbeats again" in back["message"]


def test_heartbeat_metrics_are_shown_with_the_program(client, tokens, redis_client, ops_cfg):
    resp = client.post("/heartbeat", json={"name": "pinger", "status": "ok", "metrics": {"lag": 0.25, "lost": 3}},
                       headers=bearer(tokens["pinger"]))
    assert resp.status_code == 200 and resp.get_json()["was"] == "unknown"
    listing = client.get("/programs").get_json()["programs"]
    pinger = next(p for p in listing if p["name"] == "pinger")
    assert pinger["state"] == "up" and pinger["metrics"] == {"lag": 0.25, "lost": 3}
    assert next(p for p in listing if p["name"] == "daq")["state"] == "unknown"


def test_health_endpoint_reports_redis(client):
    assert client.get("/healthz").get_json() == {"ok": True}


def test_unknown_endpoint_and_method_get_json_errors(client):
    assert client.get("/nope").status_code == 404
    assert client.get("/log").status_code == 405 and "error" in client.get("/log").get_json()


# -- the real thing ----------------------------------------------------------------


def _post(url, body, headers):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_gunicorn_serves_snoplus_log_app(ops_cfg, tokens, tmp_path):
    port = free_port()
    env = {**os.environ, "MINARD_REDIS_URL": ops_cfg["redis_url"], "MINARD_VAR_DIR": ops_cfg["var_dir"],
           "MINARD_PROGRAMS_FILE": ops_cfg["programs_file"]}
    argv = stack.gunicorn_command(ops_cfg, "snoplus_log", port=port, workers=2)  # as minard up runs it
    errlog = open(tmp_path / "gunicorn.err", "wb")  # noqa: SIM115 - open while gunicorn runs
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=errlog)
    try:
        wait_port(port, timeout=15)
        base = f"http://127.0.0.1:{port}"
        assert _post(base + "/heartbeat", {"name": "daq", "status": "ok"}, bearer(tokens["daq"]))[0] == 200
        code, body = _post(base + "/log", {"name": "daq", "level": 40, "message": "from gunicorn"}, bearer(tokens["daq"]))
        assert code == 200 and body["alarm"]
        code, body = _post(base + "/log", {"name": "daq", "level": 40, "message": "x"}, bearer("mnd_wrong"))
        assert code == 401 and "mnd_wrong" not in json.dumps(body)
        with urllib.request.urlopen(base + "/programs", timeout=5) as resp:
            states = {p["name"]: p["state"] for p in json.load(resp)["programs"]}
        assert states == {"daq": "up", "pinger": "unknown"}
    finally:
        stop_pid(proc)
        errlog.close()
    err = (tmp_path / "gunicorn.err").read_text()
    assert tokens["daq"] not in err and "Traceback" not in err
