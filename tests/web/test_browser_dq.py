"""Run registry and channel flags in real headless Chromium against gunicorn minard:app, with login."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import gunicorn_argv

from minard.ops.keys import KeyStore
from minard.simulate.events import Faults
from minard.store import channel_status as channels
from minard.store import registry
from minard.testing import free_port, stop_pid, wait_port
from minard.testing.dq import write_run

pytestmark = pytest.mark.browser
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site(redis_server, tmp_path_factory):
    """gunicorn minard:app with users 'shifter' and 'expert' (the only expert)."""
    work = tmp_path_factory.mktemp("dqsite")
    env = {**os.environ, "MINARD_REDIS_URL": redis_server.url, "MINARD_VAR_DIR": str(work / "var"),
           "MINARD_SUPERVISOR_SOCKET": str(work / "none.sock"), "MINARD_DQ_EXPERTS": "expert"}
    keys = KeyStore(work / "var" / "keys.json")
    passwords = {name: keys.add(name, kind="user") for name in ("shifter", "expert")}
    port = free_port()
    err = open(work / "gunicorn.err", "wb")  # noqa: SIM115 - open while gunicorn runs
    proc = subprocess.Popen(gunicorn_argv(port), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_port(port, timeout=15)
        yield {"url": f"http://127.0.0.1:{port}", "passwords": passwords}
    finally:
        stop_pid(proc)
        err.close()
        text = (work / "gunicorn.err").read_text()
        assert not any(p in text for p in passwords.values())


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    problems = []
    pg.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    yield pg
    context.close()
    assert problems == []


def log_in(page, site, name):
    page.click("#login-link")
    page.fill("#username", name)
    page.fill("#password", site["passwords"][name])
    page.click("#login-form button[type=submit]")


def test_shifter_then_expert_sign_a_run_and_a_channel_is_flagged_in_chromium(site, page, redis_client):
    t0 = time.time() - 1800
    write_run(redis_client, 1000, 20000, 1, t0)
    write_run(redis_client, 7, 20000, 2, t0 + 60, faults=Faults(hot_channel=4321))
    page.goto(site["url"] + "/runs/2/dq?reference=1")
    page.wait_for_function("() => document.body.dataset.overlayLoaded === '2'")
    assert page.locator('tr[data-check="occupancy_hot"]').get_attribute("data-status") == "warning"
    assert page.locator("#dq-rates tbody tr").count() > 5
    assert page.locator("#dq-map svg rect.cell").count() > 9000
    assert page.locator("#sign-form").count() == 0  # not logged in: no form
    log_in(page, site, "shifter")
    page.goto(site["url"] + "/runs/2/dq?reference=1")
    assert page.locator("#sign-state option").all_inner_texts() == ["good", "bad", "unsure"]
    page.select_option("#sign-state", "bad")
    page.fill("#sign-comment", "hot channel 4321 <b>fires</b> in half the events")
    page.click("#sign-submit")
    page.wait_for_selector(".flash-success")
    assert page.locator("#registry-state strong").inner_text() == "bad"
    assert "<b>fires</b>" in page.locator("#registry-history tbody").inner_text()  # shown as text
    page.click("form.inline button[type=submit]")  # log out
    log_in(page, site, "expert")
    page.goto(site["url"] + "/runs/2/dq")
    page.select_option("#sign-state", "fail")
    page.fill("#sign-comment", "confirmed")
    page.click("#sign-submit")
    page.wait_for_selector(".flash-success")
    assert [h["to"] for h in registry.history(redis_client, 2)] == ["bad", "fail"]
    assert page.locator("#registry-history tbody tr").count() == 2

    page.goto(site["url"] + "/dq/runs?state=fail")
    assert page.locator("#registry-table tbody tr").count() == 1
    assert page.locator('tr[data-run="2"]').get_attribute("data-state") == "fail"

    page.goto(site["url"] + "/channels")
    page.fill("#flag-lcn", "4321")
    page.select_option("#flag-flag", "hot")
    page.fill("#flag-reason", "fires in half the events")
    page.click("#flag-submit")
    page.wait_for_selector('tr[data-lcn="4321"][data-flag="hot"]')
    assert channels.status(redis_client)[4321]["hot"]["who"] == "expert"
    page.goto(site["url"] + "/detector?window=1h")
    page.wait_for_function("() => Number(document.body.dataset.mapLoaded || 0) >= 1")
    assert page.locator('#map rect.cell.flagged-channel[data-lcn="4321"]').count() == 1
