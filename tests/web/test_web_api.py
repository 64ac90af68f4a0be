"""The dashboard's JSON API (Flask test client, real Redis), against data written by the consumer's writers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime

import numpy as np
import pytest

from minard.analysis.aggregate import NAMES
from minard.formats.detector import NCHANNELS_TOTAL
from minard.store import status
from minard.store import timeseries as ts
from minard.store.runs import get_run
from minard.testing import free_port, sample
from minard.web import api, create_app, data
from minard.web.params import ParamError, parse_duration, parse_time, time_window

SECONDS = 120


@pytest.fixture
def app(cfg):
    return create_app(cfg)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def filled(redis_client):
    """Two minutes of data ending 5 s ago: runs 1000 (subruns every 30 s) then 1001 after 80 s."""
    t0 = int(time.time()) - SECONDS - 5
    totals = sample.write_seconds(redis_client, t0, SECONDS, rate=40, run=1000, subrun_every=30, run_every=80)
    return {"t0": t0, "t1": t0 + SECONDS, **totals}


def get(client, url, status_code=200):
    resp = client.get(url)
    assert resp.status_code == status_code, resp.get_data(as_text=True)[:300]
    return resp


# ------------------------------------------------------------------ stream

def test_stream_rates_times_step_give_back_every_event_written(client, filled):
    d = get(client, "/api/stream?window=10m").get_json()
    assert d["step"] == 1
    for i, name in enumerate(NAMES):
        if name in d["rate"]:
            assert np.nansum(np.array(d["rate"][name], dtype=float)) * d["step"] == filled["counts"][i], name
    assert set(d["triggers"]) == {n for i, n in enumerate(NAMES) if filled["counts"][i]}
    assert d["latest"]["run"] == 1001


def test_stream_average_nhit_is_nhit_sum_over_events(client, filled, redis_client):
    d = get(client, "/api/stream?window=10m").get_json()
    t = d["t"]
    i = next(k for k, v in enumerate(d["rate"]["TOTAL"]) if v)
    row = redis_client.hmget(ts.scalar_key(1, t[i], "trig"), ["TOTAL", "TOTAL:nhit", "TOTAL:qhs"])
    n, nhit, qhs = (int(x) for x in row)
    assert d["nhit"]["TOTAL"][i] == pytest.approx(nhit / n, abs=0.01)
    assert d["qhs"]["TOTAL"][i] == pytest.approx(qhs / n, abs=0.1)


def test_stream_marks_run_and_subrun_boundaries(client, filled):
    d = get(client, "/api/stream?window=10m").get_json()
    runs = [(b["run"], b["t"]) for b in d["boundaries"] if b["kind"] == "run"]
    subs = [(b["run"], b["subrun"]) for b in d["boundaries"] if b["kind"] == "subrun"]
    assert runs == [(1000, filled["t0"]), (1001, filled["t0"] + 80)]
    assert subs == [(1000, 1), (1000, 2), (1001, 1)]


def test_stream_coarse_window_uses_a_coarser_level_with_the_same_totals(client, filled):
    d = get(client, "/api/stream?window=1d").get_json()
    assert d["step"] == 60 and len(d["t"]) <= 1442
    # the minute still filling is left out: compare with the 1 s buckets up to the same end
    assert d["complete_until"] == d["t"][-1] + 60 <= time.time() - 2
    fine = get(client, f"/api/stream?start={filled['t0'] - 60}&stop={d['complete_until'] - 1}&step=1s").get_json()
    assert fine["step"] == 1
    assert np.nansum(np.array(d["rate"]["TOTAL"], dtype=float)) * 60 == pytest.approx(
        np.nansum(np.array(fine["rate"]["TOTAL"], dtype=float)), abs=0.5)  # rates are rounded to 3 digits


def test_stream_poll_with_start_and_step_keeps_the_resolution(client, filled):
    start = filled["t1"] - 20
    d = get(client, f"/api/stream?start={start}&step=1s&triggers=TOTAL,100L").get_json()
    assert d["step"] == 1 and d["triggers"] == ["TOTAL", "100L"]
    assert d["t"][0] == start and set(d["rate"]) == {"TOTAL", "100L"}


def test_stream_csv_has_one_row_per_bucket(client, filled):
    resp = get(client, "/api/stream?window=5m&format=csv")
    assert resp.mimetype == "text/csv" and "attachment" in resp.headers["Content-Disposition"]
    lines = resp.get_data(as_text=True).splitlines()
    assert lines[0].startswith("time,run,subrun,gtid,rate_")
    assert 297 <= len(lines) - 1 <= 300  # 301 buckets of the window less the ones still filling


# ------------------------------------------------------------------ detector, channel

def test_detector_occupancy_is_hits_per_event_and_flags_the_hot_and_dead_channels(client, filled):
    d = get(client, "/api/detector?window=10m").get_json()
    events = filled["counts"][-1]
    assert d["events"] == events and len(d["values"]) == NCHANNELS_TOTAL
    want = filled["hits"] / events
    got = np.array([np.nan if v is None else v for v in d["values"]])
    assert np.allclose(got, want, atol=1e-5)
    assert sample.HOT_CHANNEL in d["hot"]
    assert d["dead"] == [sample.DEAD_CHANNEL]
    assert len(d["crate"]["mean"]) == 20 and len(d["card"]["max"]) == 20 and len(d["card"]["max"][0]) == 16
    assert d["crate"]["max"][3] == pytest.approx(max(got[3 * 512:4 * 512]), abs=1e-5)


@pytest.mark.parametrize("quantity", ["cmos", "base"])
def test_detector_cmos_and_base_flag_the_hot_channel_and_the_silent_one(client, filled, quantity):
    d = get(client, f"/api/detector?quantity={quantity}&window=10m").get_json()
    assert d["hot"] == [sample.HOT_CHANNEL]
    assert d["dead"] == [sample.DEAD_CHANNEL]
    assert d["values"][sample.DEAD_CHANNEL] is None
    assert d["values"][sample.HOT_CHANNEL] == (25000.0 if quantity == "cmos" else 60.0)


def unpack_f32(text: str) -> list:
    """The Detector page's decoding of an encoding=f32 array (static/js/detector.js unpackF32)."""
    import base64

    x = np.frombuffer(base64.b64decode(text), "<f4").astype(float)
    return [float(f"{v:.5g}") if np.isfinite(v) else None for v in x]


@pytest.mark.parametrize("quantity", ["occupancy", "cmos", "base"])
def test_detector_f32_encoding_decodes_to_the_plain_answers_values(client, filled, quantity):
    window = f"quantity={quantity}&start={filled['t1'] - 100}&stop={filled['t1']}"
    plain = get(client, f"/api/detector?{window}").get_json()
    packed = get(client, f"/api/detector?{window}&encoding=f32").get_json()
    assert "values" not in packed and "baseline" not in packed
    for key in ("values", "baseline"):
        assert unpack_f32(packed[f"{key}_f32"]) == plain[key]
    assert any(v for v in plain["values"]) and (quantity == "occupancy" or None in plain["values"])
    rest = {k: v for k, v in plain.items() if k not in ("values", "baseline", "now")}
    assert rest == {k: v for k, v in packed.items() if k not in ("values_f32", "baseline_f32", "now")}
    get(client, f"/api/detector?{window}&encoding=f64", 400)


def test_stream_f64_encoding_decodes_to_the_plain_answers_values(client, filled):
    """The Stream page asks for encoding=f64 (static/js/charts.js unpackF64: the doubles, NaN as null)."""
    import base64

    window = f"start={filled['t0']}&stop={filled['t1']}"
    plain = get(client, f"/api/stream?{window}").get_json()
    packed = get(client, f"/api/stream?{window}&encoding=f64").get_json()
    for key in ("rate", "nhit", "qhs"):
        assert key not in packed and packed[f"{key}_f64"].keys() == plain[key].keys()
        for name, values in plain[key].items():
            x = np.frombuffer(base64.b64decode(packed[f"{key}_f64"][name]), "<f8")
            assert [float(v) if np.isfinite(v) else None for v in x] == values, (key, name)
    assert any(v for v in plain["rate"]["TOTAL"])
    # the window's answer is the same; its live part (headline, latest, heartbeats) is of each request's now
    live = ("now", "headline", "latest", "heartbeat", "dispatcher")
    rest = {k: v for k, v in plain.items() if k not in ("rate", "nhit", "qhs", *live)}
    assert rest == {k: v for k, v in packed.items() if k not in ("rate_f64", "nhit_f64", "qhs_f64", *live)}
    assert set(live) <= packed.keys()
    get(client, f"/api/stream?{window}&encoding=f32", 400)


def test_hot_and_dead_rules_against_the_baseline():
    base = np.full(NCHANNELS_TOTAL, 0.01)
    vals = base.copy()
    vals[5], vals[6] = 0.1, 0.0
    hot, dead = data.flag_channels("occupancy", vals, base, events=10_000)
    assert np.flatnonzero(hot).tolist() == [5] and np.flatnonzero(dead).tolist() == [6]
    hot, dead = data.flag_channels("occupancy", vals, base, events=100)  # 1 expected hit: too few to say dead
    assert np.flatnonzero(dead).tolist() == []
    cmos = np.full(NCHANNELS_TOTAL, 1000.0)
    now = cmos.copy()
    now[1], now[2], now[3] = 5000.0, 10.0, np.nan
    hot, dead = data.flag_channels("cmos", now, cmos, 0)
    assert np.flatnonzero(hot).tolist() == [1] and np.flatnonzero(dead).tolist() == [2, 3]


def test_detector_csv_of_a_card_has_its_32_channels(client, filled):
    text = get(client, "/api/detector?window=10m&crate=3&card=4&format=csv").get_data(as_text=True)
    rows = text.splitlines()
    assert rows[0] == "lcn,crate,card,channel,occupancy,baseline,hits,hot,dead"
    assert len(rows) == 33 and rows[6].startswith(f"{sample.HOT_CHANNEL},3,4,5,") and rows[6].endswith(",1,0")


def test_channel_history_has_all_three_quantities_on_one_time_axis(client, filled):
    d = get(client, f"/api/channel/{sample.HOT_CHANNEL}?window=10m").get_json()
    assert (d["crate"], d["card"], d["channel"]) == (3, 4, 5)
    n = len(d["t"])
    assert n == len(d["occupancy"]) == len(d["cmos"]) == len(d["base"]) == len(d["hits"])
    assert sum(h for h in d["hits"] if h) == filled["hits"][sample.HOT_CHANNEL]
    assert {v for v in d["cmos"] if v is not None} == {25000.0}
    csv_text = get(client, f"/api/channel/{sample.HOT_CHANNEL}?window=10m&format=csv").get_data(as_text=True)
    assert csv_text.splitlines()[0] == "time,occupancy,hits,cmos,base"


# ------------------------------------------------------------------ nhit, runs

def test_nhit_distribution_counts_every_event(client, filled):
    d = get(client, "/api/nhit?seconds=1h").get_json()
    assert sum(d["counts"]["TOTAL"]) == filled["counts"][-1]
    assert d["bin"] == 5 and d["nhit"][:3] == [0, 5, 10]
    one = get(client, "/api/nhit?seconds=1h&triggers=100L").get_json()
    assert one["triggers"] == ["100L"] and sum(one["counts"]["100L"]) == filled["counts"][0]


def test_run_endpoint_returns_exactly_the_cli_object(client, filled, cfg):
    d = get(client, "/api/runs/1000").get_json()
    assert d == json.loads(json.dumps(get_run(client.application.extensions["minard_redis"], 1000)))
    assert d["events"] == filled["runs"][1000].events and d["subruns"] == [0, 1, 2]
    env = {"MINARD_REDIS_URL": cfg["redis_url"], "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "minard.cli", "runs", "show", "1000", "--json"], env=env,
                         capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(out.stdout) == d


def test_runs_list_and_run_csv_parts(client, filled):
    rows = get(client, "/api/runs").get_json()
    assert [r["run"] for r in rows] == [1001, 1000]
    trig = get(client, "/api/runs/1000?format=csv&part=triggers").get_data(as_text=True).splitlines()
    assert trig[0] == "trigger,events" and len(trig) == 28
    chans = get(client, "/api/runs/1000?format=csv&part=channels").get_data(as_text=True).splitlines()
    assert len(chans) == NCHANNELS_TOTAL + 1


def test_unknown_run_is_404_json(client, filled):
    assert get(client, "/api/runs/424242", 404).get_json() == {"error": "run 424242 is not known"}


# ------------------------------------------------------------------ original minard

def test_metric_total_is_a_rate_and_run_a_last_value(client, filled):
    d = get(client, f"/metric?expr=TOTAL&start={filled['t0']}&stop={filled['t1']}&step=1").get_json()
    assert np.nansum(np.array(d["values"], dtype=float)) == pytest.approx(filled["counts"][-1])
    runs = get(client, f"/metric?expr=run&start={filled['t0']}&stop={filled['t1']}").get_json()["values"]
    assert runs[0] == 1000 and runs[-2] == 1001
    nhit = get(client, "/metric?expr=TOTAL:nhit&window=10m").get_json()["values"]
    assert 25 < np.nanmean(np.array(nhit, dtype=float)) < 60


def test_metric_hash_crate_gives_hits_per_crate(client, filled):
    d = get(client, "/metric_hash?name=crate&window=10m").get_json()
    per_crate = filled["hits"].reshape(20, -1).sum(axis=1)
    for c in range(20):
        assert np.nansum(np.array(d["values"][f"c{c}"], dtype=float)) == per_crate[c]


def test_query_names_of_the_original_minard(client, filled, redis_client):
    occ = get(client, "/query?name=occupancy&window=10m").get_json()["values"]
    assert str(sample.DEAD_CHANNEL) in occ and occ[str(sample.DEAD_CHANNEL)] == 0
    cmos = get(client, "/query?name=cmos&window=10m").get_json()["values"]
    assert str(sample.DEAD_CHANNEL) not in cmos and cmos[str(sample.HOT_CHANNEL)] == 25000.0
    assert len(get(client, "/query?name=base&window=10m").get_json()["values"]) == NCHANNELS_TOTAL - 1
    nhit = get(client, "/query?name=nhit&seconds=1h").get_json()
    assert sum(nhit["values"]) == filled["counts"][-1]
    assert get(client, "/query?name=dispatcher").get_json()["value"] is None
    redis_client.hset("status:minard_dispatch_push", "dispatcher", "buffer1:4000")
    assert get(client, "/query?name=dispatcher").get_json()["value"] == "buffer1:4000"


# ------------------------------------------------------------------ validation

BAD = [
    ("/api/stream?window=bad", "window must be a duration"),
    ("/api/stream?window=5", "window must be between"),
    ("/api/stream?window=2y", "window must be between"),
    ("/api/stream?start=yesterday", "start must be"),
    ("/api/stream?start=100&stop=50", "outside the data kept"),
    ("/api/stream?start=-60&stop=-120", "stop must be after start"),
    ("/api/stream?start=-600&stop=-60&window=1h", "at most two"),
    ("/api/stream?triggers=100L,NOPE", "unknown name 'NOPE'"),
    ("/api/stream?step=0", "step must be between"),
    ("/api/stream?format=xml", "format must be one of"),
    ("/api/stream?windw=1h", "unknown parameter 'windw'"),
    ("/api/detector?quantity=temperature", "quantity must be one of"),
    ("/api/detector?card=3", "card needs crate"),
    ("/api/detector?crate=20", "crate must be between 0 and 19"),
    ("/api/channel/10240", "channel must be between 0 and 10239"),
    ("/api/channel/-1", "channel must be between"),
    ("/api/channel/1e3", "channel must be an integer"),
    ("/api/nhit?seconds=0", "seconds must be between"),
    ("/api/runs?limit=0", "limit must be between 1 and 1000"),
    ("/api/runs/12ab", "run must be an integer"),
    ("/api/runs/1?part=all&format=csv", "part must be one of"),
    ("/metric", "missing parameter expr"),
    ("/metric?expr=__import__('os')", "is not known"),
    ("/metric_hash", "missing parameter name"),
    ("/metric_hash?name=../../etc", "name must be one of"),
    ("/query", "missing parameter name"),
    ("/query?name=nhit&trigger=XYZ", "trigger must be one of"),
]


@pytest.mark.parametrize("url,message", BAD)
def test_bad_or_missing_parameter_is_400_json_with_a_clear_error(client, url, message):
    resp = client.get(url)
    assert resp.status_code == 400 and resp.mimetype == "application/json"
    body = resp.get_json()
    assert set(body) == {"error"} and message in body["error"]
    assert "Traceback" not in resp.get_data(as_text=True)


def test_time_parameters_accept_epoch_relative_and_iso():
    now = 1_700_000_000.0
    assert parse_time("start", "-600", now) == now - 600
    assert parse_time("start", "1699999000.5", now) == 1699999000.5
    iso = datetime.fromtimestamp(now - 3600, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert parse_time("start", iso, now) == now - 3600
    assert parse_time("start", iso + "Z", now) == parse_time("start", iso + "+00:00", now) == now - 3600
    assert parse_duration("w", "1y") == 365 * 86400 and parse_duration("w", "10m") == 600
    assert time_window({"window": "1h"}, now) == (now - 3600, now)
    assert time_window({"start": "-120"}, now) == (now - 120, now)
    assert time_window({"start": "-7200", "window": "1h"}, now) == (now - 7200, now - 3600)
    with pytest.raises(ParamError):
        time_window({"start": "nan"}, now)


def test_redis_down_gives_503_json_without_a_trace(cfg):
    cfg["redis_url"] = f"redis://127.0.0.1:{free_port()}/0"
    client = create_app(cfg).test_client()
    for url in ("/api/stream", "/api/detector", "/metric?expr=TOTAL", "/api/runs/1"):
        resp = client.get(url)
        assert resp.status_code == 503 and resp.get_json() == {"error": "the database (Redis) is not answering"}
    resp = client.get("/healthz")
    assert resp.status_code == 503 and resp.get_json()["ok"] is False
    assert "minard_redis_up 0" in client.get("/metrics").get_data(as_text=True)


# ------------------------------------------------------------------ health, metrics, openapi, cache

def test_healthz_reports_redis_and_components(client, redis_client):
    pipe = redis_client.pipeline()
    status.beat(pipe, "minard_dispatch_pull", {"workers": 2})
    pipe.execute()
    d = get(client, "/healthz").get_json()
    assert d["ok"] is True and d["components"] == {"minard_dispatch_pull": True} and d["redis_ms"] >= 0


def test_prometheus_metrics_expose_counters_heartbeats_and_rates(client, filled, redis_client):
    from prometheus_client.parser import text_string_to_metric_families

    pipe = redis_client.pipeline()
    status.beat(pipe, 'odd"name\\', {})
    status.count(pipe, "pull", received=10, processed=9, errors=1, wire_bad_magic=1)
    status.count(pipe, "orca_producer", bytes_skipped=512)
    pipe.execute()
    resp = get(client, "/metrics")
    assert resp.mimetype == "text/plain"
    families = {f.name: f for f in text_string_to_metric_families(resp.get_data(as_text=True))}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert families["minard_pipeline_records"].type == "counter"
    assert samples[("minard_pipeline_records_total", (("outcome", "received"), ("stage", "pull")))] == 10
    assert samples[("minard_pipeline_records_total", (("outcome", "errors"), ("stage", "pull")))] == 1
    # a named reason is not an outcome, and bytes are not records: one unit per family
    assert samples[("minard_pipeline_reason_records_total", (("reason", "wire_bad_magic"), ("stage", "pull")))] == 1
    assert samples[("minard_pipeline_skipped_bytes_total", (("stage", "orca_producer"),))] == 512
    assert not any(k[0] == "minard_pipeline_records_total" and dict(k[1])["outcome"] == "bytes_skipped"
                   for k in samples)
    assert samples[("minard_component_up", (("component", 'odd"name\\'),))] == 1
    assert samples[("minard_trigger_rate_hz", (("trigger", "TOTAL"),))] > 0
    assert samples[("minard_current_run", ())] == 1001
    assert samples[("minard_redis_up", ())] == 1


def test_openapi_documents_every_api_route(client, app):
    doc = get(client, "/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    routes = {re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", r.rule) for r in app.url_map.iter_rules()
              if r.endpoint.startswith("api.")}
    assert routes <= set(doc["paths"])  # tests/web/test_openapi.py checks every app route


def test_settled_buckets_are_cached_and_the_live_bucket_is_not(client, app, redis_client):
    now = time.time()
    old, live = int(now) - 100, int(now)
    pipe = redis_client.pipeline()
    ts.add(pipe, "trig", old, {"TOTAL": 5})
    ts.add(pipe, "trig", live, {"TOTAL": 7})
    pipe.execute()
    first = get(client, "/metric?expr=TOTAL&window=5m").get_json()
    redis_client.hset(ts.scalar_key(1, old, "trig"), "TOTAL", 500)  # a settled bucket never changes
    redis_client.hset(ts.scalar_key(1, live, "trig"), "TOTAL", 9)
    app.extensions["minard_responses"].clear()  # as if RESPONSE_TTL had passed
    again = get(client, "/metric?expr=TOTAL&window=5m").get_json()
    i_old = again["t"].index(old)
    assert again["values"][i_old] == 5 == first["values"][first["t"].index(old)]
    assert again["values"][again["t"].index(live)] == 9


# ------------------------------------------------------------------ complete buckets, banner, original names

def test_headline_and_newest_point_leave_out_the_bucket_still_filling(client, redis_client):
    """A second still filling (a few events so far) must not pull the rate down."""
    now = time.time()
    full = int(now) - 40
    # whole seconds up to a few seconds ahead (writing takes a while on a loaded machine) ...
    sample.write_seconds(redis_client, full, 45, rate=1000, run=42, orca=False)
    pipe = redis_client.pipeline()
    ts.add(pipe, "trig", full + 45, {"TOTAL": 3})  # ... then seconds still filling: only a few events so far
    ts.add(pipe, "trig", full + 46, {"TOTAL": 5})
    pipe.execute()
    assert time.time() < full + 45  # the filling seconds are still ahead
    d = get(client, "/api/stream?window=10m&triggers=TOTAL").get_json()
    assert d["t"][-1] + d["step"] == d["complete_until"] <= time.time() - 2
    assert d["rate"]["TOTAL"][-1] > 800  # the newest point is a whole second
    head = d["headline"]
    assert head["stop"] - head["start"] == head["seconds"] == 10 and head["stop"] <= time.time() - 2
    assert 900 < head["rates"]["TOTAL"] < 1100
    b = get(client, "/api/banner").get_json()
    assert 900 < b["rate"] < 1100 and b["rate_stop"] - b["rate_start"] == 10
    assert b["run"] == 42 and b["state"] == "running" and b["data_class"] == "ok"


def test_banner_counts_active_alarms_with_the_worst_level_and_flags_stale_data(client, redis_client):
    from minard.store import alarms as alarm_store

    sample.write_seconds(redis_client, int(time.time()) - 100, 30, rate=50, run=77, orca=False)
    redis_client.zadd("runs:start", {"77": time.time() - 3700})
    a = alarm_store.raise_alarm(redis_client, 30, "disk filling", source="disk")
    alarm_store.raise_alarm(redis_client, 40, "trigger rate zero", source="rate")
    acked = alarm_store.raise_alarm(redis_client, 50, "old", source="x")
    alarm_store.acknowledge(redis_client, int(acked["id"] if isinstance(acked, dict) else acked), "bob")
    b = get(client, "/api/banner").get_json()
    assert b["alarms"] == {"active": 2, "worst": "danger", "worst_level": 40}
    assert b["run"] == 77 and 3690 < b["elapsed"] < 3720
    assert b["data_class"] == "red" and b["state"] == "no data" and 65 < b["data_age"] < 80
    assert a is not None


def test_original_minard_stream_page_queries_are_answered(client, filled):
    """Replay the original stream page's /metric?expr=NAME&start=ISO&stop=ISO&now=ISO&step=S forms."""
    def iso(t):
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    start, stop = filled["t0"], filled["t0"] + 120
    names = ["TOTAL", "100L", "TOTAL-nhit", "TOTAL-charge", "PULGT-nhit", "PULGT-charge", "EXTA-nhit",
             "DISPATCH_ORPHANS", "gtid", "run", "subrun", "heartbeat"]
    got = {}
    for step in (1, 10):
        for name in names:
            url = f"/metric?expr={name}&start={iso(start)}&stop={iso(stop)}&now={iso(time.time())}&step={step}"
            d = get(client, url).get_json()
            assert len(d["values"]) == (stop - start) // step, (name, step)
            got[name, step] = np.array([np.nan if v is None else v for v in d["values"]], dtype=float)
    for step in (1, 10):
        assert np.nansum(got["TOTAL", step]) * step == pytest.approx(filled["counts"][-1], abs=0.01)
        assert np.isnan(got["PULGT-nhit", step]).all() and np.isnan(got["EXTA-nhit", step]).all()  # no such events
        assert (got["heartbeat", step] == 1).all()  # data arrived in every step
        assert got["run", step][0] == 1000 and got["run", step][-1] == 1001
    # averages over 10 s are event-weighted means of the 1 s averages
    w = got["TOTAL", 1][:10]
    assert got["TOTAL-nhit", 10][0] == pytest.approx(np.nansum(got["TOTAL-nhit", 1][:10] * w) / np.nansum(w), abs=0.01)
    assert 25 < np.nanmean(got["TOTAL-nhit", 1]) < 60 and np.nanmean(got["TOTAL-charge", 1]) > 100
    assert get(client, "/metric?expr=NOPE-nhit&window=10m", 400).get_json()["error"].startswith("expr 'NOPE-nhit'")


def test_rows_read_through_the_cache_match_redis_for_any_window(app, redis_client):
    """Blocks fully settled, partly settled (cached head, read tail) and unsettled give Redis's rows."""
    now = time.time()
    pipe = redis_client.pipeline()
    for t in range(int(now) - 200, int(now) + 1):
        ts.add(pipe, "trig", t, {"TOTAL": t % 97}, levels=ts.SCALAR_LEVELS[:1])
    pipe.execute()
    src = app.extensions["minard_source"]
    for b0, b1 in ((int(now) - 200, int(now)), (int(now) - 40, int(now) - 5), (int(now) - 10, int(now) - 2),
                   (int(now) - 3, int(now)), (int(now) - 70, int(now) - 33)):
        for _ in range(2):  # the second pass reads through the cache
            rows = data.scalar_rows(src, "trig", ("TOTAL",), 1, b0, b1, now)
            assert rows[:, 0].tolist() == [float(t % 97) for t in range(b0, b1 + 1)], (b0, b1)


def test_settled_blocks_are_shared_by_every_worker_through_redis(cfg, redis_client):
    """A second app (another gunicorn worker) reads a settled block from the shared cache, not the rows."""
    from minard.store import schema

    t0 = (int(time.time()) - 400) // 32 * 32
    pipe = redis_client.pipeline()
    for t in range(t0, t0 + 64):
        ts.add(pipe, "trig", t, {"TOTAL": t % 13}, levels=ts.SCALAR_LEVELS[:1])
    pipe.execute()
    first = create_app(cfg).extensions["minard_source"]
    rows = data.scalar_rows(first, "trig", ("TOTAL",), 1, t0, t0 + 63, time.time())
    keys = sorted(k.decode() for k in redis_client.scan_iter(schema.WEB_BLOCK.pattern))
    assert len(keys) == 2 and all(redis_client.ttl(k) > 80000 for k in keys)
    for t in range(t0, t0 + 64):  # the stored rows change under the cache: only the shared copy can answer
        redis_client.hset(ts.scalar_key(1, t, "trig"), "TOTAL", 999)
    second = create_app(cfg).extensions["minard_source"]
    again = data.scalar_rows(second, "trig", ("TOTAL",), 1, t0, t0 + 63, time.time())
    assert again.tolist() == rows.tolist() == [[float(t % 13)] for t in range(t0, t0 + 64)]


def test_sigfigs_table_lookup_rounds_exactly_as_raising_ten_to_the_exponent():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.exponential(0.01, 20000), 10 ** rng.uniform(-300, 300, 20000), -rng.exponential(100, 2000),
                        [0.0, np.nan, np.inf, -np.inf, 1e-320, 5e-324, 1.7e308], 10.0 ** np.arange(-20, 20)])
    with np.errstate(all="ignore"):
        mag = np.floor(np.log10(np.abs(x)))
        scale = 10.0 ** np.where(np.isfinite(mag), 4 - mag, 0)
        want = np.round(x * scale) / scale
    assert np.array_equal(api.sigfigs(x), want, equal_nan=True)
