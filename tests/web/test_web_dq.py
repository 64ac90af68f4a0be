"""Data-quality API and pages through the Flask test client against a real Redis."""

from __future__ import annotations

import csv
import io
import json
import re
import time

import pytest

from minard.ops.keys import KeyStore
from minard.simulate.events import Faults
from minard.store import channel_status as channels
from minard.store import dq as store_dq
from minard.store import registry
from minard.testing.dq import write_run
from minard.web import create_app

T0 = time.time() - 3600
XSS = '<script>window.__xss=1</script>'


@pytest.fixture
def web_cfg(registry_cfg, tmp_path):
    registry_cfg.update(supervisor_socket=str(tmp_path / "no-supervisor.sock"), dq_experts="expert")
    return registry_cfg


@pytest.fixture
def users(web_cfg):
    store = KeyStore.from_config(web_cfg)
    return {name: store.add(name, kind="user") for name in ("shifter", "expert")}


@pytest.fixture
def client(web_cfg):
    return create_app(web_cfg).test_client()


@pytest.fixture
def runs(redis_client):
    write_run(redis_client, 1000, 20000, 1, T0)
    write_run(redis_client, 7, 20000, 2, T0 + 100, faults=Faults(hot_channel=4321))
    return redis_client


def csrf(client, path):
    return re.search(r'name="csrf-token" content="([^"]+)"', client.get(path).get_data(as_text=True)).group(1)


def login(client, name, password):
    client.post("/login", data={"username": name, "password": password, "csrf_token": csrf(client, "/login")})


def test_api_dq_is_the_cli_object_and_a_reference_can_be_given(client, runs):
    resp = client.get("/api/runs/2/dq?reference=1")
    assert resp.status_code == 200
    body = resp.get_json()
    assert {"run", "reference", "status", "checks"} <= set(body) and body["reference"] == 1
    hot = next(c for c in body["checks"] if c["name"] == "occupancy_hot")
    assert hot["detail"]["channels"] == [4321]
    store_dq.compute(runs, 2, store_dq.load_config({"dq_file": "conf/dq.cfg"}), reference=1)
    assert client.get("/api/runs/2/dq").get_json()["status"] == body["status"]  # the stored report


def test_api_dq_refuses_bad_input_without_a_500(client, runs):
    for url, code in (("/api/runs/abc/dq", 400), ("/api/runs/99/dq", 404), ("/api/runs/2/dq?reference=77", 404),
                      ("/api/runs/2/dq?reference=x", 400), ("/api/runs/2/dq?bogus=1", 400),
                      ("/api/runs/-1/dq", 400), ("/runs/2/dq?reference=%00", 400)):
        assert client.get(url).status_code == code, url


def test_signing_needs_a_login_and_the_expert_states_need_an_expert(client, runs, users):
    token = csrf(client, "/runs/2/dq")
    resp = client.post("/runs/2/sign", data={"state": "good", "comment": "x", "csrf_token": token})
    assert resp.status_code == 302 and "/login" in resp.headers["Location"]
    assert registry.state(runs, 2)["state"] == "unreviewed"
    login(client, "shifter", users["shifter"])
    page = client.get("/runs/2/dq").get_data(as_text=True)
    assert 'value="pass"' not in page  # a shifter is not offered the expert states
    token = csrf(client, "/runs/2/dq")
    client.post("/runs/2/sign", data={"state": "good", "comment": XSS, "csrf_token": token})
    client.post("/runs/2/sign", data={"state": "pass", "comment": "sneaky", "csrf_token": token})
    assert registry.state(runs, 2)["state"] == "good"
    page = client.get("/runs/2/dq").get_data(as_text=True)
    assert XSS not in page and "&lt;script&gt;" in page and "Not signed: only an expert" in page
    assert client.post("/runs/2/sign", data={"state": "bad", "comment": "no token"}).status_code == 400
    client.post("/logout", data={"csrf_token": token})
    login(client, "expert", users["expert"])
    client.post("/runs/2/sign", data={"state": "pass", "comment": "fine", "csrf_token": csrf(client, "/runs/2/dq")})
    assert [h["who"] for h in registry.history(runs, 2)] == ["shifter", "expert"]
    hist = client.get("/api/runs/2/registry").get_json()
    assert hist["state"] == "pass" and len(hist["history"]) == 2


def test_golden_run_list_as_json_and_csv(client, runs):
    registry.sign(runs, 1, "good", "s", "ok", False)
    registry.sign(runs, 1, "pass", "e", "golden", True)
    registry.sign(runs, 2, "bad", "s", "hot channel", False)
    store_dq.set_run_type(runs, 1, "physics")
    body = client.get("/api/runs/golden").get_json()
    assert [r["run"] for r in body] == [1] and body[0]["run_type"] == "physics" and body[0]["signed_by"] == "e"
    resp = client.get("/api/runs/golden?format=csv")
    assert resp.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(resp.get_data(as_text=True))))
    assert rows == [{"run": "1", "run_type": "physics", "dq_status": "", "signed_by": "e",
                     "signed_at": str(body[0]["signed_at"]), "comment": "golden"}]
    assert client.get("/api/runs/golden?format=xml").status_code == 400


def test_runs_list_shows_dq_and_signoff_and_filters(client, runs):
    cfg = store_dq.load_config({"dq_file": "conf/dq.cfg"})
    store_dq.compute(runs, 2, cfg, reference=1)
    registry.sign(runs, 1, "good", "s", "ok", False)
    page = client.get("/dq/runs").get_data(as_text=True)
    assert 'data-run="2" data-dq="warning" data-state="unreviewed"' in page
    assert 'data-run="1" data-dq="" data-state="good"' in page
    only = client.get("/dq/runs?status=warning").get_data(as_text=True)
    assert 'data-run="2"' in only and 'data-run="1"' not in only
    only = client.get("/dq/runs?state=good").get_data(as_text=True)
    assert 'data-run="1"' in only and 'data-run="2"' not in only
    assert client.get("/dq/runs?state=<x>").status_code == 400


def test_channel_flags_through_the_page_and_in_the_detector_data(client, runs, users):
    token = csrf(client, "/channels")
    resp = client.post("/channels", data={"lcn": "4321", "flag": "hot", "reason": "r", "csrf_token": token})
    assert resp.status_code == 302 and "/login" in resp.headers["Location"]
    login(client, "shifter", users["shifter"])
    token = csrf(client, "/channels")
    client.post("/channels", data={"lcn": "4321", "flag": "hot", "action": "flag", "reason": XSS, "csrf_token": token})
    for bad in ({"lcn": "99999", "flag": "hot"}, {"lcn": "1", "flag": "nope"}, {"lcn": "x", "flag": "hot"}):
        assert client.post("/channels", data={**bad, "reason": "r", "csrf_token": token}).status_code == 303
    page = client.get("/channels").get_data(as_text=True)
    assert XSS not in page and 'data-lcn="4321" data-flag="hot"' in page and "Not changed" in page
    assert client.get("/api/channels/status").get_json()["channels"]["4321"]["hot"]["who"] == "shifter"
    assert client.get("/api/detector?window=1h").get_json()["flags"] == {"4321": ["hot"]}
    # Known now: the occupancy check lists it apart.
    body = client.get("/api/runs/2/dq?reference=1").get_json()
    hot = next(c for c in body["checks"] if c["name"] == "occupancy_hot")
    assert hot["detail"]["channels"] == [] and hot["detail"]["known"] == [4321] and hot["status"] == "good"
    assert channels.history(runs)[-1]["action"] == "flag"


def test_overlay_and_report_page_render(client, runs):
    out = client.get("/api/runs/2/dq/overlay?reference=1").get_json()
    assert out["occupancy_ratio"][4321] > 10 and out["nhit"]["trigger"] == "100L"
    page = client.get("/runs/2/dq?reference=1").get_data(as_text=True)
    assert 'data-check="occupancy_hot" data-status="warning"' in page
    assert client.get("/runs/2").status_code == 200 and "/runs/2/dq" in client.get("/runs/2").get_data(as_text=True)
    assert json.loads(client.get("/api/runs/2/dq/overlay").get_data(as_text=True))["run"] == 2


def test_the_runs_page_shows_each_runs_dq_status_and_signoff(client, runs):
    store_dq.compute(runs, 2, store_dq.load_config({"dq_file": "conf/dq.cfg"}), reference=1)
    registry.sign(runs, 2, "unsure", "s", "look again", False)
    page = client.get("/runs").get_data(as_text=True)
    assert 'data-dq="warning"' in page and 'data-state="unsure"' in page
