"""The operations pages in real headless Chromium (Playwright) against gunicorn minard:app."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import UPDATE_DOCS_IMG, gunicorn_argv

from minard.ops.keys import KeyStore
from minard.ops.logserver import append_line, format_line
from minard.store import alarms
from minard.testing import free_port, stop_pid, wait_port

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
XSS = '<script>window.__xss = 1; alert("xss")</script><img src=x onerror="window.__xss = 2">'


@pytest.fixture(scope="module")
def site(redis_server, tmp_path_factory):
    """gunicorn minard:app on a free port with its own var dir, registry and a user 'alice'."""
    work = tmp_path_factory.mktemp("site")
    (work / "programs.cfg").write_text(
        "[daq]\nhost = buffer1\ndescription = DAQ\ntimeout = 10\nlink = /logs/daq\n\n"
        "[pinger]\ndescription = heartbeats for the pipeline\ntimeout = 5\n")
    env = {**os.environ, "MINARD_REDIS_URL": redis_server.url, "MINARD_VAR_DIR": str(work / "var"),
           "MINARD_PROGRAMS_FILE": str(work / "programs.cfg"),
           "MINARD_SUPERVISOR_SOCKET": str(work / "none.sock")}
    password = KeyStore(work / "var" / "keys.json").add("alice", kind="user")
    port = free_port()
    err = open(work / "gunicorn.err", "wb")  # noqa: SIM115 - open while gunicorn runs
    proc = subprocess.Popen(gunicorn_argv(port), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_port(port, timeout=15)
        yield {"url": f"http://127.0.0.1:{port}", "password": password, "var": work / "var"}
    finally:
        stop_pid(proc)
        err.close()
        assert password not in (work / "gunicorn.err").read_text()


@pytest.fixture
def page(browser):
    """A fresh browser context; fails the test on console errors, page errors or dialogs."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    problems = []
    pg.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def on_dialog(dialog):
        problems.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    pg.on("dialog", on_dialog)
    pg.problems = problems
    yield pg
    context.close()
    assert problems == []


def shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def wait_rendered(page, count=1):
    page.wait_for_function(f"() => Number(document.body.dataset.alarmsRendered || 0) >= {count}")


def test_script_in_alarm_and_log_is_shown_as_text_and_never_runs(site, page, redis_client):
    alarms.raise_alarm(redis_client, 40, XSS, source="log", program="daq")
    append_line(site["var"] / "logs" / "daq.log", format_line(40, XSS, time.time()), 0, 0)
    page.goto(site["url"] + "/alarms")
    wait_rendered(page)
    cell = page.locator("#alarm-rows td.message").first
    assert cell.text_content() == XSS
    assert page.locator("#alarm-rows script, #alarm-rows img").count() == 0
    page.goto(site["url"] + "/logs/daq")
    assert XSS in page.locator("#log-text").text_content()
    page.wait_for_timeout(2300)  # one live poll of the tail
    assert page.evaluate("window.__xss") is None
    shot(page, "log-daq")


def test_operator_logs_in_and_acknowledges_an_alarm_and_the_bell_stops(site, page, redis_client):
    i = alarms.raise_alarm(redis_client, 40, "crate 7 HV trip", source="log", program="daq")
    alarms.raise_alarm(redis_client, 30, "disk 85% full", source="monitor", program="monitors")
    alarms.raise_alarm(redis_client, 21, "run 1234 started", source="log", program="daq")
    page.goto(site["url"] + "/alarms")
    page.wait_for_selector("#alarm-indicator.ringing")
    page.click("h1")  # a user gesture lets the page use sound
    page.wait_for_function("() => window.minard.bell.rings >= 2")
    shot(page, "alarms-ringing")

    page.click("#login-link")
    page.fill("#username", "alice")
    page.fill("#password", site["password"])
    page.click("#login-form button[type=submit]")
    page.wait_for_url("**/alarms")
    assert page.locator("#current-user").text_content() == "alice"
    wait_rendered(page)
    row = page.locator(f"#alarm-rows tr[data-id='{i}']")
    row.locator(".ack-form input[name=comment]").fill("called the HV expert")
    row.locator(".ack-form button").click()
    page.wait_for_url("**/alarms")
    assert f"Alarm {i} acknowledged." in page.locator(".flash").text_content()
    row = page.locator(f"#alarm-rows tr[data-id='{i}']")
    assert "acknowledged by alice" in row.text_content() and "called the HV expert" in row.text_content()
    page.wait_for_function("() => window.minard.bell.polls >= 1 && window.minard.bell.ringing === 0")
    assert "ringing" not in (page.locator("#alarm-indicator").get_attribute("class") or "")
    a = alarms.get(redis_client, i)
    assert (a["state"], a["ack_by"]) == ("acknowledged", "alice")


def test_mute_is_remembered_per_browser(site, page, redis_client):
    alarms.raise_alarm(redis_client, 40, "still ringing")
    page.goto(site["url"] + "/status")
    page.wait_for_selector("#alarm-indicator.ringing")
    page.click("#mute-toggle")
    assert page.locator("#mute-toggle").text_content() == "Muted"
    rings = page.evaluate("window.minard.bell.rings")
    page.wait_for_timeout(1700)
    assert page.evaluate("window.minard.bell.rings") == rings
    page.reload()
    page.wait_for_selector("#alarm-indicator.ringing")
    assert page.locator("#mute-toggle").text_content() == "Muted"
    assert page.evaluate("localStorage.getItem('minard.alarms.muted')") == "1"


def test_screenshots_of_every_operations_page(site, page, redis_client):
    alarms.raise_alarm(redis_client, 40, "dispatcher: trigger rate is zero", source="monitor", program="dispatcher")
    j = alarms.raise_alarm(redis_client, 30, "consumer lag is 7.5, above 5", source="monitor", program="data_consumer_cmos")
    for k in range(3):
        alarms.raise_alarm(redis_client, 40, "no data from crate 12", source="log", program="daq")
    alarms.raise_alarm(redis_client, 21, "daq is sending heartbeats again (silent for 45 s)", source="heartbeat", program="daq")
    alarms.shelve(redis_client, j, "alice", time.time() + 3600, "known: consumer restarting")
    redis_client.hset("minard:ops:hb:daq", mapping={"last": repr(time.time()), "since": repr(time.time() - 3725),
                                                     "status": "taking data", "host": "buffer1", "count": 745})
    redis_client.hset("minard:ops:metrics:daq", mapping={"lag": "0.2", "lost": "0", "updated": repr(time.time())})
    redis_client.hset("minard:ops:hb:pinger", mapping={"last": repr(time.time() - 60), "since": repr(time.time() - 900),
                                                        "status": "ok", "host": "localhost", "count": 90})
    from minard.store import status as pipeline_status

    pipe = redis_client.pipeline()
    pipeline_status.beat(pipe, "pull", {"lag_seconds": 0.4, "workers": 2}, started=time.time() - 600)
    pipeline_status.count(pipe, "pull", received=120000, processed=119990, dropped=10)
    pipe.execute()
    for path, name in [("/alarms", "alarms"), ("/status", "status"), ("/logs", "logs"),
                       ("/processes", "processes"), ("/login", "login")]:
        page.goto(site["url"] + path)
        if name == "alarms":
            wait_rendered(page)
        shot(page, name)
        if name == "alarms" and UPDATE_DOCS_IMG:
            (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(REPO / "docs" / "img" / "alarms.png"))
        if name == "processes":
            assert "supervisord is not running" in page.locator("#supervisor-down").text_content()
        if name == "status":
            assert page.locator("#status-rows tr[data-name=pinger] .badge").text_content() == "down"
            assert page.locator("#status-rows .stage[data-stage=pull] .lost").text_content() == "10 lost"
