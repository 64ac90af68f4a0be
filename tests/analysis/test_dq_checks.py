"""The pure data-quality checks on hand-made run aggregates (no Redis)."""

from __future__ import annotations

import numpy as np
import pytest

from minard.analysis import dq
from minard.analysis.aggregate import NHIT_BINS
from minard.config import ROOT

CFG = dq.load_config(path=ROOT / "conf" / "dq.cfg")


def make_run(run, events=20000, hits_per_channel=80, duration=20.0, seed=0, scale=None, hot=(), dead_cards=(),
             dead=()):
    """A run whose channels fire Poisson(hits_per_channel * events / 20000) times."""
    rng = np.random.default_rng(seed)
    hits = rng.poisson(hits_per_channel * events / 20000, 10240)
    for lcn in hot:
        hits[lcn] += events // 2
    for lcn in dead:
        hits[lcn] = 0
    for crate, card in dead_cards:
        hits[crate * 512 + card * 32: crate * 512 + card * 32 + 32] = 0
    base = {"100L": 0.945, "PULGT": 0.05, "EXTA": 0.005}
    triggers = {n: int(rng.poisson(events * f * (scale or {}).get(n, 1.0))) for n, f in base.items()}
    nhit = rng.poisson(30, events)
    hist = np.bincount(np.minimum(nhit // 5, NHIT_BINS - 1), minlength=NHIT_BINS)
    return dq.RunData(run=run, events=events, duration=duration, triggers=triggers, nhit_hist={"100L": hist},
                      channel_hits=hits, integrity={"orphans": events // 1000, "hits": int(hits.sum())})


def by_name(report):
    return {c["name"]: c for c in report["checks"]}


def test_a_hot_channel_a_dead_card_and_a_changed_trigger_are_exactly_what_is_flagged():
    ref = make_run(1, seed=1)
    bad = make_run(2, seed=2, hot=(1234,), dead_cards=((3, 7),), scale={"PULGT": 3.0})
    report = dq.evaluate(bad, ref, CFG)
    flagged = {c["name"] for c in report["checks"] if c["status"] in ("warning", "error")}
    assert flagged == {"occupancy_hot", "dead_card", "trigger_rate:PULGT"}
    checks = by_name(report)
    assert checks["occupancy_hot"]["detail"]["channels"] == [1234]
    assert checks["dead_card"]["detail"]["cards"] == [{"crate": 3, "card": 7}]
    assert checks["occupancy_dead"]["detail"]["channels"] == []  # the card's channels are reported once
    assert checks["trigger_rate:PULGT"]["detail"]["ratio"] == pytest.approx(3.0, rel=0.15)
    assert report["status"] == "error" and report["reference"] == 1


def test_every_check_has_the_interface_fields():
    report = dq.evaluate(make_run(2, seed=2), make_run(1, seed=1), CFG)
    assert set(report) == {"run", "reference", "status", "checks"}
    names = [c["name"] for c in report["checks"]]
    for name in ("nhit_distribution", "occupancy_hot", "occupancy_dead", "dead_card", "dead_crate",
                 "cmos_outliers", "base_outliers", "integrity", "trigger_rate:100L"):
        assert name in names
    for c in report["checks"]:
        assert set(c) == {"name", "status", "value", "expected", "threshold", "detail"}
        assert c["status"] in dq.STATES and isinstance(c["detail"], dict)


def test_known_flagged_channels_are_listed_apart_and_do_not_count():
    ref = make_run(1, seed=1)
    bad = make_run(2, seed=2, hot=(1234,), dead=(77,))
    checks = by_name(dq.evaluate(bad, ref, CFG, flagged={1234, 77}))
    assert checks["occupancy_hot"]["status"] == "good" and checks["occupancy_hot"]["detail"]["known"] == [1234]
    assert checks["occupancy_dead"]["status"] == "good" and checks["occupancy_dead"]["detail"]["known"] == [77]


def test_a_dead_crate_is_reported_once_as_a_crate():
    ref = make_run(1, seed=1)
    bad = make_run(2, seed=2, dead_cards=tuple((5, k) for k in range(16)))
    checks = by_name(dq.evaluate(bad, ref, CFG))
    assert checks["dead_crate"]["detail"]["crates"] == [5] and checks["dead_crate"]["status"] == "error"
    assert checks["dead_card"]["detail"]["cards"] == [] and checks["occupancy_dead"]["detail"]["channels"] == []


def test_a_short_run_is_too_few_where_statistics_cannot_decide():
    ref = make_run(1, seed=1)
    short = make_run(2, events=1000, duration=1.0, seed=2)
    checks = by_name(dq.evaluate(short, ref, CFG))
    assert checks["occupancy_dead"]["status"] == "too_few"
    assert checks["occupancy_hot"]["status"] == "too_few"
    assert checks["nhit_distribution"]["status"] == "too_few"
    assert checks["trigger_rate:100L"]["status"] == "too_few"
    assert checks["dead_crate"]["status"] == "good"  # a whole crate is still decided by 1000 events


def test_a_shifted_nhit_distribution_is_an_error():
    ref = make_run(1, seed=1)
    bad = make_run(2, seed=2)
    nhit = np.random.default_rng(3).poisson(45, 20000)
    bad.nhit_hist["100L"] = np.bincount(np.minimum(nhit // 5, NHIT_BINS - 1), minlength=NHIT_BINS)
    c = by_name(dq.evaluate(bad, ref, CFG))["nhit_distribution"]
    assert c["status"] == "error" and c["value"] > 0.15 and c["detail"]["p_value"] < 1e-7


def test_screamers_and_base_outliers_are_found_and_no_readings_is_too_few():
    run = make_run(2)
    assert by_name(dq.evaluate(run, None, CFG))["cmos_outliers"]["status"] == "too_few"
    run.cmos = np.full(10240, 500.0)
    run.cmos[[10, 20]] = 50000.0
    run.base = np.full(10240, 5.0)
    run.base[30] = 90.0
    checks = by_name(dq.evaluate(run, None, CFG, flagged={20}))
    assert checks["cmos_outliers"]["detail"]["channels"] == [10] and checks["cmos_outliers"]["detail"]["known"] == [20]
    assert checks["cmos_outliers"]["status"] == "warning"
    assert checks["base_outliers"]["detail"]["channels"] == [30] and checks["base_outliers"]["expected"] == 5.0


def test_integrity_counts_losses_and_orphans():
    run = make_run(2)
    assert by_name(dq.evaluate(run, None, CFG))["integrity"]["status"] == "good"
    run.integrity.update(gtid_missing=500, corrupt=5)
    c = by_name(dq.evaluate(run, None, CFG))["integrity"]
    assert c["status"] == "error" and c["detail"]["lost"] == 505
    run.integrity.update(gtid_missing=3, corrupt=0)
    assert by_name(dq.evaluate(run, None, CFG))["integrity"]["status"] == "warning"


def test_without_reference_the_comparisons_are_too_few():
    report = dq.evaluate(make_run(2), None, CFG)
    checks = by_name(report)
    assert report["reference"] is None
    for name in ("trigger_rate:TOTAL", "nhit_distribution", "occupancy_hot", "dead_card"):
        assert checks[name]["status"] == "too_few" and checks[name]["detail"]["reason"]


def test_the_default_file_applies_to_runs_without_a_type_and_run_types_restrict():
    assert all(CFG.applies(c, "") for c in dq.CHECKS)
    cfg = dq.load_config(text="[cmos_outliers]\nrun_types = physics\n")
    assert cfg.applies("cmos_outliers", "physics") and not cfg.applies("cmos_outliers", "")
    assert "cmos_outliers" not in by_name(dq.evaluate(make_run(2), None, cfg))


def test_a_typo_in_the_file_is_an_error_at_load():
    with pytest.raises(ValueError, match="unknown section"):
        dq.load_config(text="[occupancy_hott]\nwarning = 1\n")
    with pytest.raises(ValueError, match="not a number"):
        dq.load_config(text="[occupancy]\nz = five\n")


def test_worst_orders_the_states():
    assert dq.worst(["good", "too_few"]) == "too_few"
    assert dq.worst(["warning", "too_few", "good"]) == "warning"
    assert dq.worst(["error", "warning"]) == "error" and dq.worst([]) == "good"


def test_reports_are_strict_json_even_with_infinite_thresholds_or_empty_runs():
    import json

    cfg = dq.load_config(text="[trigger_rate]\nerror = 0 inf\n")
    empty = dq.RunData(run=3, duration=20.0, triggers={"EXTA": 5})
    for report in (dq.evaluate(empty, make_run(1), cfg), dq.evaluate(make_run(2), empty, cfg)):
        json.dumps(report, allow_nan=False)
