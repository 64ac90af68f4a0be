"""Data quality on runs stored by the pull worker's own aggregation and writers
(minard.testing.dq), against a real redis-server; the run registry and the
channel-status database."""

from __future__ import annotations

import json
import time

import pytest

from minard.analysis import dq
from minard.config import ROOT
from minard.simulate.events import Faults
from minard.store import channel_status as channels
from minard.store import dq as store_dq
from minard.store import registry
from minard.testing.dq import write_run

CFG = dq.load_config(path=ROOT / "conf" / "dq.cfg")
T0 = time.time() - 3600


def flagged(report):
    return {c["name"]: c for c in report["checks"] if c["status"] in ("warning", "error")}


def test_simulated_faults_are_flagged_with_exactly_those_problems(redis_client):
    write_run(redis_client, 1000, 20000, 1, T0)
    write_run(redis_client, 7, 20000, 2, T0 + 100, faults=Faults(hot_channel=4321, dead_cards=((11, 2),)),
              trigger_scale={"PULGT": 3.0, "20LB": 0.5})
    report = store_dq.compute(redis_client, 2, CFG, reference=1)
    bad = flagged(report)
    assert set(bad) == {"occupancy_hot", "dead_card", "trigger_rate:PULGT", "trigger_rate:20LB"}
    assert bad["occupancy_hot"]["detail"]["channels"] == [4321]
    assert bad["dead_card"]["detail"]["cards"] == [{"crate": 11, "card": 2}]
    assert bad["trigger_rate:PULGT"]["detail"]["ratio"] > 2 and bad["trigger_rate:20LB"]["detail"]["ratio"] < 0.6
    assert report["reference"] == 1
    assert store_dq.result(redis_client, 2)["status"] == report["status"] == "error"
    assert store_dq.statuses(redis_client) == {2: "error"}


def test_a_run_of_1000_events_is_too_few_where_statistics_cannot_decide(redis_client):
    write_run(redis_client, 1000, 20000, 1, T0)
    write_run(redis_client, 8, 1000, 3, T0 + 100)
    checks = {c["name"]: c for c in store_dq.compute(redis_client, 3, CFG, reference=1)["checks"]}
    for name in ("occupancy_hot", "occupancy_dead", "nhit_distribution", "trigger_rate:100L"):
        assert checks[name]["status"] == "too_few", checks[name]
    assert not flagged({"checks": list(checks.values())})


@pytest.mark.slow
def test_false_positives_over_20_clean_seeds_none_error_at_most_one_warning(redis_client):
    write_run(redis_client, 1000, 20000, 1, T0)
    warnings, errors = [], []
    for seed in range(1, 21):
        write_run(redis_client, seed, 20000, 100 + seed, T0 + 60 * seed)
        for name, c in flagged(store_dq.compute(redis_client, 100 + seed, CFG, reference=1)).items():
            (errors if c["status"] == "error" else warnings).append((seed, name))
    assert errors == [] and len(warnings) <= 1, (errors, warnings)


def test_stored_integrity_counters_reach_the_integrity_check(redis_client):
    write_run(redis_client, 9, 5000, 4, T0, faults=Faults(gtid_jump=(2000, 50), corrupt=3))
    c = {c["name"]: c for c in store_dq.compute(redis_client, 4, CFG)["checks"]}["integrity"]
    assert c["detail"]["corrupt"] == 3 and c["detail"]["gtid_missing"] == 50
    assert c["status"] == "error"


def test_cmos_screamers_come_from_the_orca_series_of_the_run_window(redis_client):
    import numpy as np

    from minard.store.channels import ChannelWriter

    write_run(redis_client, 1, 5000, 5, T0)
    pipe = redis_client.pipeline()
    rates = np.full(10240, 800.0)
    rates[[99, 100]] = 60000.0
    writer = ChannelWriter(redis_client)
    writer.add_values("cmos", T0 + 1, np.arange(10240), rates)  # as the CMOS consumers write them
    writer.add(pipe)
    pipe.execute()
    channels.change(redis_client, 100, "screamer", "flag", "known screamer", "alice")
    c = {c["name"]: c for c in store_dq.compute(redis_client, 5, CFG)["checks"]}["cmos_outliers"]
    assert c["detail"]["channels"] == [99] and c["detail"]["known"] == [100] and c["status"] == "warning"


def test_reference_is_the_experts_choice_else_the_latest_run_signed_pass(redis_client):
    for run, seed in ((1, 1), (2, 2), (3, 3), (4, 4)):
        write_run(redis_client, seed, 1000, run, T0 + 10 * run)
    assert store_dq.choose_reference(redis_client, 4, "") is None
    for run in (1, 2):
        registry.sign(redis_client, run, "good", "shifter", "looks fine", False)
        registry.sign(redis_client, run, "pass", "expert", "ok", True)
    assert store_dq.choose_reference(redis_client, 4, "") == 2
    store_dq.set_run_type(redis_client, 2, "calibration")
    assert store_dq.choose_reference(redis_client, 4, "") == 1  # only runs of the same type
    store_dq.set_reference(redis_client, "", 3)
    assert store_dq.choose_reference(redis_client, 4, "") == 3
    assert store_dq.compute(redis_client, 4, CFG)["reference"] == 3
    store_dq.set_reference(redis_client, "", None)
    assert store_dq.choose_reference(redis_client, 4, "") == 1


def test_registry_moves_through_its_states_and_keeps_every_change(redis_client):
    with pytest.raises(registry.SignError, match="shifter must check"):
        registry.sign(redis_client, 7, "pass", "exp", "too early", True)
    with pytest.raises(registry.SignError, match="comment"):
        registry.sign(redis_client, 7, "good", "bob", "  ", False)
    registry.sign(redis_client, 7, "unsure", "bob", "odd rates", False, now=1.0)
    registry.sign(redis_client, 7, "good", "bob", "rates explained", False, now=2.0)
    with pytest.raises(registry.SignError, match="only an expert"):
        registry.sign(redis_client, 7, "pass", "bob", "I say so", False)
    registry.sign(redis_client, 7, "pass", "exp", "signed", True, now=3.0)
    with pytest.raises(registry.SignError, match="already signed pass"):
        registry.sign(redis_client, 7, "bad", "bob", "changed my mind", False)
    assert registry.state(redis_client, 7)["state"] == "pass"
    assert [(h["from"], h["to"], h["who"]) for h in registry.history(redis_client, 7)] == [
        ("unreviewed", "unsure", "bob"), ("unsure", "good", "bob"), ("good", "pass", "exp")]
    assert registry.golden(redis_client) == [{"run": 7, "signed_by": "exp", "signed_at": 3.0, "comment": "signed"}]
    assert redis_client.ttl(registry.HISTORY_KEY.format(run=7)) == -1  # never expires


def test_channel_flags_keep_reason_who_when_and_history(redis_client):
    channels.change(redis_client, 1234, "screamer", "flag", "CMOS 50 kHz", "alice", now=1.0)
    channels.change(redis_client, 1234, "bad_cable", "flag", "swapped", "bob", now=2.0)
    channels.change(redis_client, 1234, "screamer", "unflag", "fixed", "alice", now=3.0)
    assert channels.status(redis_client) == {1234: {"bad_cable": {"reason": "swapped", "who": "bob", "when": 2.0}}}
    assert channels.flagged(redis_client) == {1234}
    assert [h["action"] for h in channels.history(redis_client)] == ["flag", "flag", "unflag"]
    for bad in ((10240, "dead", "r"), (1, "sparkly", "r"), (1, "dead", ""), ("x", "dead", "r")):
        with pytest.raises(channels.FlagError):
            channels.change(redis_client, bad[0], bad[1], "flag", bad[2], "alice")
    with pytest.raises(channels.FlagError, match="has no flag"):
        channels.change(redis_client, 5, "dead", "unflag", "r", "alice")
    assert json.loads(redis_client.hget(channels.STATUS_KEY, "1234"))


def test_overlay_has_rates_normalized_nhit_and_occupancy_ratio(redis_client):
    write_run(redis_client, 1000, 20000, 1, T0)
    write_run(redis_client, 7, 20000, 2, T0 + 100, faults=Faults(hot_channel=4321))
    out = store_dq.overlay(redis_client, 2, 1)
    assert out["triggers"]["100L"]["run"] > 0 and out["triggers"]["100L"]["reference"] > 0
    assert sum(out["nhit"]["run"]) == pytest.approx(1.0, abs=1e-3)
    assert out["occupancy_ratio"][4321] > 10 and 0.5 < out["occupancy_ratio"][0] < 2


def test_dispatcher_accounting_adds_dropped_and_at_the_end_unaccounted_losses(redis_client):
    from minard.store.runs import add_accounting, get_run

    write_run(redis_client, 9, 5000, 6, T0)
    summary = get_run(redis_client, 6)
    records = summary["events"] + summary["orphans"]
    pipe = redis_client.pipeline()
    add_accounting(pipe, 6, {"source_events": records + 100 + 5, "dispatched": records + 100,
                             "dropped:dispatcher_queue": 5})
    pipe.execute()
    live = {c["name"]: c for c in store_dq.compute(redis_client, 6, CFG, now=T0 + 10)["checks"]}["integrity"]
    assert live["detail"]["dropped"] == 5 and "unaccounted" not in live["detail"]  # events may be in flight
    final = {c["name"]: c for c in store_dq.compute(redis_client, 6, CFG, final=True)["checks"]}["integrity"]
    assert final["detail"]["unaccounted"] == 100 and final["detail"]["lost"] == 105
    assert final["status"] == "error"  # 105 of 5105 records: 2 %
