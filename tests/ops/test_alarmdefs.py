"""Alarm definitions (conf/alarms.cfg) and their evaluation against a real Redis:
delays, deadband, chattering, latching, suppression by design, staleness."""

from __future__ import annotations

import time

import pytest

from minard.config import ROOT
from minard.ops import alarmdefs, monitors
from minard.store import alarms, status

T0 = 1_800_000_000.0


def test_the_shipped_definitions_parse_and_watch_existing_monitors():
    defs = alarmdefs.parse((ROOT / "conf" / "alarms.cfg").read_text())
    for d in defs.values():
        if d.metric:
            assert d.metric.split(".")[0] in monitors.CHECKS, d.name
        assert d.guidance, f"{d.name} has no guidance for the shifter"
    burst = defs["supernova_burst"]
    assert (burst.priority, burst.annunciation, burst.metric) == ("critical", "audible", "")
    assert defs["crate_no_hits"].suppress == ("crate:{1}", "run_type:calibration")


@pytest.mark.parametrize("text,message", [
    ("[a]\ncondition = lag >> 5\n", "condition"),
    ("[a]\ncondition = lag > 5\npriority = urgent\n", "priority"),
    ("[a]\ncondition = lag > 5\nclass = loud\n", "class"),
    ("[a]\ncondition = lag > 5\non_delay = soon\n", "delay"),
    ("[a]\ncondition = lag > 5\ncolour = red\n", "unknown key"),
    ("[a]\nlink = javascript:alert(1)\n", "link"),
    ("[a b]\npriority = low\n", "names"),
])
def test_mistakes_in_the_file_are_refused_with_the_section(text, message):
    with pytest.raises(ValueError, match=message) as err:
        alarmdefs.parse(text, "x.cfg")
    assert "x.cfg" in str(err.value)


def only(r, name):
    return [a for a in alarms.list_alarms(r, now=T0 + 10_000) if a["name"] == name]


def test_a_signal_crossing_its_limit_every_second_gives_one_alarm(redis_client):
    defs = alarmdefs.parse("[lag]\ncondition = lag.* > 5\non_delay = 1\noff_delay = 5\npriority = high\n")
    ev = alarmdefs.Evaluator(redis_client, defs)
    for k in range(300):  # 300 s of a value alternating 4, 6, 4, 6, ...
        ev.evaluate({"lag.pool": 6.0 if k % 2 else 4.0}, now=T0 + k)
    (a,) = only(redis_client, "lag")
    assert a["count"] == 1 and a["state"] == "unacknowledged" and a["program"] == "pool"


def test_without_off_delay_a_chattering_alarm_returns_and_reopens_the_same_alarm(redis_client):
    defs = alarmdefs.parse("[lag]\ncondition = lag.* > 5\npriority = high\n")
    ev = alarmdefs.Evaluator(redis_client, defs)
    for k in range(300):
        ev.evaluate({"lag.pool": 6.0 if k % 2 else 4.0}, now=T0 + k)
    (a,) = only(redis_client, "lag")
    assert a["count"] == 150  # every return counted into the one alarm, not 150 alarms
    actions = [e["action"] for e in alarms.transitions(redis_client, a["id"])]
    assert actions[0] == "raised" and actions.count("raised") == 1


def test_on_delay_deadband_and_return_to_normal(redis_client):
    defs = alarmdefs.parse("[lag]\ncondition = lag.x > 5\non_delay = 3\noff_delay = 2\ndeadband = 1\n")
    ev = alarmdefs.Evaluator(redis_client, defs)
    values = [6, 6, 4, 6, 6, 6, 4.5, 4.5, 4.5, 3.9, 3.9]
    raised = [ev.evaluate({"lag.x": v}, now=T0 + k) for k, v in enumerate(values)]
    assert [bool(x) for x in raised] == [False] * 5 + [True] + [False] * 5  # 3 in a row at k = 3..5
    (a,) = only(redis_client, "lag")
    assert a["cleared"] == T0 + 10  # 4.5 is inside the deadband (5 - 1): cleared only at two 3.9s
    assert a["state"] == "rtn_unacknowledged" and not a["ringing"]
    alarms.acknowledge(redis_client, a["id"], "alice", now=T0 + 11)
    assert alarms.get(redis_client, a["id"], now=T0 + 11)["state"] == "normal"
    ev.evaluate({"lag.x": 9}, now=T0 + 12)
    ev.evaluate({"lag.x": 9}, now=T0 + 13)
    assert len(only(redis_client, "lag")) == 1
    ev.evaluate({"lag.x": 9}, now=T0 + 14)  # back after normal: a new alarm
    assert len(only(redis_client, "lag")) == 2


def test_on_delay_in_seconds(redis_client):
    ev = alarmdefs.Evaluator(redis_client, alarmdefs.parse("[a]\ncondition = v > 1\non_delay = 10s\n"))
    assert not ev.evaluate({"v": 2}, now=T0) and not ev.evaluate({"v": 2}, now=T0 + 9)
    assert ev.evaluate({"v": 2}, now=T0 + 10)


def test_a_crate_out_of_service_suppresses_only_its_own_alarm(redis_client):
    defs = alarmdefs.parse("[crate_no_hits]\ncondition = crates.occupancy.* < 0.001\npriority = high\n"
                           "suppress = crate:{1}, run_type:calibration\n")
    ev = alarmdefs.Evaluator(redis_client, defs)
    alarms.set_flag(redis_client, "crate:3", "alice", True, "HV off for repair")
    ev.evaluate({"crates.occupancy.3": 0.0, "crates.occupancy.4": 0.0, "crates.occupancy.5": 2.0}, now=T0)
    by_crate = {a["program"]: a for a in only(redis_client, "crate_no_hits")}
    assert set(by_crate) == {"3", "4"}
    assert by_crate["3"]["state"] == "suppressed" and not by_crate["3"]["ringing"]
    assert "crate:3 (set by alice: HV off for repair)" == by_crate["3"]["suppressed"]
    assert by_crate["4"]["state"] == "unacknowledged" and by_crate["4"]["ringing"]
    alarms.set_flag(redis_client, "crate:3", "alice", False)
    ev.evaluate({"crates.occupancy.3": 0.0, "crates.occupancy.4": 0.0}, now=T0 + 1)
    assert alarms.get(redis_client, by_crate["3"]["id"])["state"] == "unacknowledged"
    alarms.set_flag(redis_client, "run_type:calibration", "bob", True)
    ev.evaluate({"crates.occupancy.3": 0.0, "crates.occupancy.4": 0.0}, now=T0 + 2)
    assert {alarms.get(redis_client, a["id"])["state"] for a in by_crate.values()} == {"suppressed"}


def test_out_of_service_definition_shows_its_alarms_out_of_service(redis_client):
    ev = alarmdefs.Evaluator(redis_client, alarmdefs.parse("[a]\ncondition = v > 1\npriority = high\n"))
    (i,) = ev.evaluate({"v": 2}, now=T0)
    alarms.set_out_of_service(redis_client, "a", "alice", True, "sensor broken")
    a = alarms.get(redis_client, i)
    assert a["state"] == "out_of_service" and not a["ringing"]


def test_a_restarted_evaluator_clears_the_alarm_its_predecessor_left_open(redis_client):
    defs = alarmdefs.parse("[a]\ncondition = v > 1\n")
    (i,) = alarmdefs.Evaluator(redis_client, defs).evaluate({"v": 2}, now=T0)
    alarmdefs.Evaluator(redis_client, defs).evaluate({"v": 0}, now=T0 + 5)
    assert alarms.get(redis_client, i)["cleared"] == T0 + 5


def test_staleness_monitor_reports_silent_components_and_streams(cfg, redis_client):
    pipe = redis_client.pipeline()
    status.beat(pipe, "minard_dispatch_pull", {})
    status.count(pipe, "pull", received=10, processed=10)
    pipe.execute()
    ctx = monitors.Context(cfg, redis_client)
    now = time.time()
    v = monitors.check_staleness(ctx, now)
    assert v["component.minard_dispatch_pull"] < 2 and v["stream.pull"] == 0.0
    v = monitors.check_staleness(ctx, now + 45)
    assert v["component.minard_dispatch_pull"] > 44 and v["stream.pull"] == pytest.approx(45)
    defs = alarmdefs.load(cfg)
    ev = alarmdefs.Evaluator(redis_client, defs)
    named = {f"staleness.{k}": x for k, x in v.items()}
    ev.evaluate(named, now + 45, only=alarmdefs.matching(defs, "staleness.*"))
    ev.evaluate(named, now + 46, only=alarmdefs.matching(defs, "staleness.*"))
    names = {a["name"] for a in alarms.list_alarms(redis_client)}
    assert {"component_stale"} <= names


def test_a_calibration_run_suppresses_the_rate_alarm_it_would_trip(cfg, redis_client):
    """The rates monitor on real series; the shipped event_rate_high is suppressed by run_type:calibration."""
    from minard.store import schema
    from minard.store import timeseries as ts

    now = time.time()
    pipe = redis_client.pipeline()
    for k in range(3, 14):
        ts.add(pipe, schema.GROUP_STREAM, now - k, {"events": 9000})
    pipe.execute()
    defs = alarmdefs.load(cfg)
    ev = alarmdefs.Evaluator(redis_client, defs)
    ctx = monitors.Context(cfg, redis_client, ev)
    alarms.set_flag(redis_client, "run_type:calibration", "alice", True, "laserball scan")
    for _ in range(3):  # on_delay = 3
        values = monitors.run_check(ctx, "rates", now=now)
    assert 8000 < values["events"] <= 9000
    (a,) = [a for a in alarms.list_alarms(redis_client) if a["name"] == "event_rate_high"]
    assert a["state"] == "suppressed" and not a["ringing"] and "laserball scan" in a["suppressed"]
    assert not [a for a in alarms.list_alarms(redis_client) if a["name"] == "event_rate_zero"]
