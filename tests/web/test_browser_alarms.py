"""The ISA-18.2 alarm states in real headless Chromium against gunicorn minard:app:
acknowledge, shelve with expiry, latch and reset, suppression by a crate out of service."""

from __future__ import annotations

import time

import pytest
from test_browser_ops import page, shot, site, wait_rendered  # noqa: F401 - fixtures

from minard.ops import alarmdefs
from minard.store import alarms

pytestmark = pytest.mark.browser

DEFS = alarmdefs.parse("""
[crate_no_hits]
condition = crates.occupancy.* < 0.001
priority = high
suppress = crate:{1}
guidance = Check the crate's HV.

[redis_oom]
condition = increase(redis.oom_errors) > 0
priority = critical
latch = yes

[consumer_lag]
condition = lag.* > 5
priority = high
""")


def log_in(page, site, then="/alarms"):
    page.goto(site["url"] + "/login?next=" + then)
    page.fill("#username", "alice")
    page.fill("#password", site["password"])
    page.click("#login-form button[type=submit]")
    page.wait_for_url("**" + then)


def row(page, alarm_id):
    return page.locator(f"#alarm-rows tr[data-id='{alarm_id}']")


def test_shelve_with_expiry_then_acknowledge_in_the_browser(site, page, redis_client):
    ev = alarmdefs.Evaluator(redis_client, DEFS)
    (i,) = ev.evaluate({"lag.pool": 9.0})
    log_in(page, site)
    wait_rendered(page)
    r = row(page, i)
    assert "unacknowledged" in r.text_content() and "high" in r.locator("td").first.text_content()
    r.locator(".shelve-form select").select_option("15")
    r.locator(".shelve-form input[name=comment]").fill("known, expert on it")
    r.locator(".shelve-form button").click()
    page.wait_for_url("**/alarms")
    assert "shelved by alice" in row(page, i).text_content()
    a = alarms.get(redis_client, i)
    assert a["state"] == "shelved" and 890 < a["shelved_until"] - time.time() <= 900
    page.wait_for_function("() => window.minard.bell.polls >= 1 && window.minard.bell.ringing === 0")
    # The expiry passes (moved into the past instead of waiting 15 minutes): active and ringing again.
    redis_client.hset(alarms.alarm_key(i), "shelved_until", repr(time.time() - 1))
    page.reload()
    wait_rendered(page)
    assert "unacknowledged (shelve expired)" in row(page, i).text_content()
    page.wait_for_selector("#alarm-indicator.ringing")
    row(page, i).locator(".ack-form input[name=comment]").fill("lag understood")
    row(page, i).locator(".ack-form button").click()
    page.wait_for_url("**/alarms")
    assert "acknowledged by alice" in row(page, i).text_content()
    page.goto(site["url"] + f"/alarms/{i}")
    history = page.locator("#alarm-history").text_content()
    assert "raised" in history and "shelved until" in history and "acknowledged" in history
    assert "lag understood" in history
    shot(page, "alarm-history")


def test_latched_alarm_stays_until_reset_in_the_browser(site, page, redis_client):
    ev = alarmdefs.Evaluator(redis_client, DEFS)
    ev.evaluate({"redis.oom_errors": 0})
    (i,) = ev.evaluate({"redis.oom_errors": 4})
    ev.evaluate({"redis.oom_errors": 4})  # no new OOM errors: the condition has cleared
    log_in(page, site)
    wait_rendered(page)
    assert "unacknowledged" in row(page, i).text_content()  # latched: not returned-to-normal
    page.wait_for_selector("#alarm-indicator.ringing")
    row(page, i).locator(".ack-form button").click()
    page.wait_for_url("**/alarms")
    wait_rendered(page)
    assert "acknowledged by alice" in row(page, i).text_content() or "latched" in row(page, i).text_content()
    assert alarms.get(redis_client, i)["state"] == "latched"
    row(page, i).locator(".reset-form button").click()
    page.wait_for_url("**/alarms")
    assert f"Alarm {i} reset." in page.locator(".flash").text_content()
    assert alarms.get(redis_client, i)["state"] == "normal"
    page.goto(site["url"] + "/alarms?state=normal")
    wait_rendered(page)
    assert row(page, i).count() == 1


def test_a_crate_set_out_of_service_in_the_browser_suppresses_its_alarm(site, page, redis_client):
    log_in(page, site, "/alarms/kpi")
    page.fill("#flag-form input[name=flag]", "crate:3")
    page.fill("#flag-form input[name=comment]", "HV off for repair")
    page.click("#flag-form button")
    page.wait_for_url("**/alarms/kpi")
    assert "crate:3" in page.locator("#flag-table").text_content()
    ev = alarmdefs.Evaluator(redis_client, DEFS)
    ids = ev.evaluate({"crates.occupancy.3": 0.0, "crates.occupancy.4": 0.0, "crates.occupancy.5": 1.5})
    by = {alarms.get(redis_client, i)["program"]: i for i in ids}
    page.goto(site["url"] + "/alarms")
    wait_rendered(page)
    assert "suppressed by crate:3 (set by alice: HV off for repair)" in row(page, by["3"]).text_content()
    assert "unacknowledged" in row(page, by["4"]).text_content()
    page.wait_for_function("() => window.minard.bell.polls >= 1 && window.minard.bell.ringing === 1")
    shot(page, "alarms-suppressed")
    page.goto(site["url"] + "/alarms?state=suppressed")
    wait_rendered(page)
    assert page.locator("#alarm-rows tr[data-id]").count() == 1
