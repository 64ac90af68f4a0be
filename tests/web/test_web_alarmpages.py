"""Alarm pages (Flask test client, real Redis): detail and history, reset, flags, KPIs,
Bursts and its export, Roster editing with login, Shift handover."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from test_web_ops import app, client, csrf_of, login, ops_cfg, page_csrf, users  # noqa: F401 - fixtures

from minard.analysis import burst as ana
from minard.ops import alarmdefs
from minard.store import alarms, bursts, roster

XSS = '<script>alert(1)</script>'


@pytest.mark.parametrize("path", ["/bursts", "/shift", "/roster", "/alarms/kpi", "/alarms?state=unacknowledged"])
def test_new_pages_need_no_login_to_read_and_join_the_navigation(client, path):
    resp = client.get(path)
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    for label in ("Bursts", "Shift", "Roster"):
        assert f">{label}</a>" in html


def test_alarm_detail_shows_guidance_and_every_transition(client, users, redis_client):
    i = alarms.raise_alarm(redis_client, 40, "burst " + XSS, name="supernova_burst", priority="critical")
    login(client, "alice", users["alice"])
    token = page_csrf(client)
    assert client.post(f"/alarms/{i}/ack", data={"csrf_token": token, "comment": "called Carol " + XSS}).status_code == 303
    html = client.get(f"/alarms/{i}").get_data(as_text=True)
    assert "Call the supernova expert" in html and XSS not in html
    data = client.get(f"/api/alarms/{i}").get_json()
    assert [e["action"] for e in data["history"]] == ["raised", "acknowledged"]
    assert data["history"][1]["who"] == "alice" and data["alarm"]["state"] == "acknowledged"
    assert client.get("/alarms/999999").status_code == 404


def test_latched_alarm_needs_a_reset_after_it_clears(client, users, redis_client):
    d = alarmdefs.parse("[oom]\ncondition = increase(redis.oom) > 0\npriority = critical\nlatch = yes\n")
    ev = alarmdefs.Evaluator(redis_client, d)
    ev.evaluate({"redis.oom": 0})
    (i,) = ev.evaluate({"redis.oom": 3})
    ev.evaluate({"redis.oom": 3})  # no further increase: the condition clears, the alarm stays latched
    a = alarms.get(redis_client, i)
    assert a["cleared"] and a["state"] == "unacknowledged" and a["ringing"]
    login(client, "alice", users["alice"])
    token = page_csrf(client)
    client.post(f"/alarms/{i}/ack", data={"csrf_token": token})
    assert alarms.get(redis_client, i)["state"] == "latched"
    assert client.post(f"/alarms/{i}/reset", data={"csrf_token": token, "comment": "OOM fixed"}).status_code == 303
    assert alarms.get(redis_client, i)["state"] == "normal"
    assert client.post(f"/alarms/{i}/reset", data={"csrf_token": token}).status_code == 409


def test_flags_and_out_of_service_need_login_and_validate(client, users, redis_client):
    token = page_csrf(client, "/alarms/kpi")
    assert client.post("/alarms/flags", data={"csrf_token": token, "flag": "crate:3"}).status_code in (302, 303, 401)
    assert alarms.flags(redis_client) == {}
    login(client, "alice", users["alice"])
    token = page_csrf(client, "/alarms/kpi")
    for bad in ("crate:19", "../x", "crate:3 ", XSS):
        if bad.strip() != "crate:3":
            assert client.post("/alarms/flags", data={"csrf_token": token, "flag": bad}).status_code == 400
    assert client.post("/alarms/flags", data={"csrf_token": token, "flag": "crate:3", "comment": "HV off"}).status_code == 303
    assert alarms.flags(redis_client)["crate:3"]["by"] == "alice"
    assert client.post("/alarms/oos", data={"csrf_token": token, "name": "consumer_lag"}).status_code == 303
    assert "consumer_lag" in alarms.out_of_service(redis_client)
    assert client.post("/alarms/oos", data={"csrf_token": token, "name": "nope"}).status_code == 400


def test_kpis_count_alarms_per_ten_minutes_floods_and_chattering(client, redis_client):
    now = time.time()
    for k in range(12):  # a flood: 12 distinct alarms in one 10-minute interval
        alarms.raise_alarm(redis_client, 30, f"flood {k}", name="flood", now=now - 60)
    for _ in range(30):
        alarms.raise_alarm(redis_client, 30, "same", name="chatty", now=now - 30)
    k = client.get("/api/alarms/kpi").get_json()
    assert k["raised"] == 13 and k["peak_10min"] == 13 and k["time_in_flood_minutes"] == 10
    assert k["chattering"][0] == {"name": "chatty", "repeats": 30} and not k["ok"]["peak_10min"]
    assert "EEMUA 191" in client.get("/alarms/kpi").get_data(as_text=True)


def test_bursts_page_lists_records_and_exports_json(client, redis_client):
    ev = np.zeros(5, ana.EVENT_DTYPE)
    ev["clock10"] = np.arange(5) * 100 + 10**15
    ev["gtid"] = np.arange(0x100, 0x105)
    ev["nhit"] = 90
    rec = bursts.store_burst(redis_client, 4321, ev, 1.0, 5, 4, 0.5)
    html = client.get("/bursts").get_data(as_text=True)
    assert "4321" in html and "0x000100" in html
    resp = client.get(f"/api/bursts/{rec['id']}?download=1")
    assert "attachment" in resp.headers["Content-Disposition"]
    data = resp.get_json()
    assert data["gtids"] == list(range(0x100, 0x105)) and data["nhits"] == [90] * 5
    assert client.get("/api/bursts").get_json()[0]["run"] == 4321
    assert client.get("/api/bursts/999").status_code == 404


def test_roster_is_edited_with_login_and_rejects_bad_input(client, users, redis_client):
    token = page_csrf(client, "/roster")
    client.post("/roster", data={"csrf_token": token, "role": "shifter", "name": "Mallory"})
    assert roster.show(redis_client)["shifter"] is None
    login(client, "alice", users["alice"])
    token = page_csrf(client, "/roster")
    ok = client.post("/roster", data={"csrf_token": token, "role": "shifter", "name": "Alice " + XSS,
                                      "email": "alice@example.org"})
    assert ok.status_code == 303
    assert client.post("/roster", data={"csrf_token": token, "role": "boss", "name": "x"}).status_code == 400
    assert client.post("/roster", data={"csrf_token": token, "role": "expert", "name": "x",
                                        "email": "x@@"}).status_code == 400
    html = client.get("/roster").get_data(as_text=True)
    assert "alice@example.org" in html and XSS not in html
    assert client.get("/api/roster").get_json()["shifter"]["by"] == "alice"
    resp = client.post("/roster/test", data={"csrf_token": token}, follow_redirects=True)
    assert "FAILED" in resp.get_data(as_text=True)  # no smtp_host / webhook configured: said clearly


def test_shift_page_and_json_list_the_shift_and_keep_the_note(client, users, redis_client):
    login(client, "alice", users["alice"])
    roster.set_person(redis_client, "shifter", "Alice", who="alice", now=time.time() - 3600)
    old = alarms.raise_alarm(redis_client, 40, "before the shift", now=time.time() - 7200)
    i = alarms.raise_alarm(redis_client, 40, "during the shift")
    j = alarms.raise_alarm(redis_client, 40, "shelved one")
    alarms.shelve(redis_client, j, "alice", time.time() + 1800, "known")
    token = page_csrf(client, "/shift")
    client.post("/shift/note", data={"csrf_token": token, "note": "crate 3 HV off " + XSS})
    s = client.get("/api/shift").get_json()
    assert {a["id"] for a in s["raised"]} == {i, j} and old not in {a["id"] for a in s["raised"]}
    assert [a["id"] for a in s["shelves_expiring"]] == [j] and s["note"]["by"] == "alice"
    html = client.get("/shift").get_data(as_text=True)
    assert "### Alarms raised (2)" in html and XSS not in html
    assert client.get("/api/shift?since=abc").status_code == 400
    everything = client.get(f"/api/shift?since={time.time() - 10000}").get_json()
    assert old in {a["id"] for a in everything["raised"]}
    assert json.dumps(everything)


def test_the_alarms_page_shows_the_kpis_against_eemua_191(client, redis_client):
    now = time.time()
    for k in range(12):
        alarms.raise_alarm(redis_client, 30, f"flood {k}", name="flood", now=now - 60)
    html = client.get("/alarms").get_data(as_text=True)
    kpis = html.split('id="alarm-kpis"')[1]
    assert "EEMUA 191" in kpis and 'class="num kpi-bad">12 (≤ 10)' in kpis and "flood ×12" in kpis
