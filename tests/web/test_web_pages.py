"""The data pages as HTML (Flask test client, real Redis): layout, navigation, CSP, escaping, run pages."""

from __future__ import annotations

import re
import time

import pytest

from minard.config import ROOT
from minard.testing import sample
from minard.web import create_app, data

PAGES = {"/stream": "stream.js", "/detector": "detector.js", "/nhit": "nhit.js", "/runs": None}


@pytest.fixture
def client(cfg):
    return create_app(cfg).test_client()


@pytest.fixture
def runs(redis_client):
    sample.write_seconds(redis_client, int(time.time()) - 40, 30, rate=20, run=2000, subrun_every=10, orca=False)


def test_home_page_is_the_stream_page(client):
    resp = client.get("/")
    assert resp.status_code == 302 and resp.headers["Location"].endswith("/stream")


@pytest.mark.parametrize("path,script", PAGES.items())
def test_data_pages_load_their_scripts_from_files_only(client, path, script):
    resp = client.get(path)
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert "<script>" not in html and "style=" not in html and "<style" not in html
    assert not re.search(r"https?://", re.sub(r'<meta name="viewport"[^>]*>', "", html))  # no CDN
    for src in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        assert (ROOT / src.lstrip("/")).exists() or src.startswith("/static/vendor/"), src
    if script:
        assert f"/static/js/{script}" in html and "/static/vendor/uPlot.iife.min.js" in html
        assert "/static/js/charts.js" in html and "/static/vendor/d3.min.js" in html


def test_navigation_lists_the_data_pages_before_the_operations_pages(client):
    html = client.get("/stream").get_data(as_text=True)
    labels = re.findall(r'<nav class="nav">(.*?)</nav>', html, re.DOTALL)[0]
    order = re.findall(r">(\w+)</a>", labels)
    assert order[:4] == ["Stream", "Detector", "Nhit", "Runs"] and "Alarms" in order[4:]
    assert 'class="active"' in html.split("Stream</a>")[0].rsplit("<a", 1)[1]


def test_window_presets_go_from_ten_minutes_to_a_year(client):
    html = client.get("/stream").get_data(as_text=True)
    assert re.findall(r'data-window="(\w+)"', html) == ["10m", "1h", "6h", "1d", "1w", "30d", "1y"]


def test_runs_page_lists_runs_with_links(client, runs):
    html = client.get("/runs").get_data(as_text=True)
    assert 'data-run="2000"' in html and 'href="/runs/2000"' in html


def test_run_page_shows_the_per_trigger_counts_and_subruns(client, runs, redis_client):
    from minard.store.runs import get_run

    summary = get_run(redis_client, 2000)
    html = client.get("/runs/2000").get_data(as_text=True)
    assert f'<span class="stat-value" id="run-events">{summary["events"]}</span>' in html
    assert f'data-trigger="100L"><td>100L</td><td class="num">{summary["triggers"]["100L"]}</td>' in html
    # subruns shown consistently: the count (as in the runs list) and the list
    assert '<span class="stat-value" id="run-subruns">3</span>' in html
    assert '<span class="stat-note" id="run-subrun-list">0, 1, 2</span>' in html
    assert "/api/runs/2000?format=csv&amp;part=channels" in html


def test_unknown_or_malformed_run_pages_are_clear_errors(client, runs):
    resp = client.get("/runs/31337")
    assert resp.status_code == 404 and "Run 31337 is not known" in resp.get_data(as_text=True)
    resp = client.get("/runs/<script>")
    assert resp.status_code == 400 and "<script>" not in resp.get_data(as_text=True)


def test_page_scripts_never_insert_data_as_html():
    for name in ("stream", "detector", "nhit", "runs", "charts"):
        js = (ROOT / "static" / "js" / f"{name}.js").read_text()
        assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js, name
        assert ".html(" not in js, name  # d3 selection.html


def test_runs_list_searches_by_number_range_and_date_and_pages(client, redis_client):
    from datetime import UTC, datetime

    day = datetime(2026, 3, 14, tzinfo=UTC).timestamp()
    redis_client.zadd("runs:start", {str(n): day - 86400 + n * 60 for n in range(1, 121)})  # 120 runs
    redis_client.zadd("runs:start", {"500": day + 3600})
    html = client.get("/runs").get_data(as_text=True)
    assert 'id="runs-count">121 runs<' in html and "page 1 of 3" in html
    assert html.count("<tr data-run=") == 50 and 'data-run="500"' in html  # newest first
    page3 = client.get("/runs?page=3").get_data(as_text=True)
    assert page3.count("<tr data-run=") == 21 and 'data-run="1"' in page3
    one = client.get("/runs?q=77").get_data(as_text=True)
    assert one.count("<tr data-run=") == 1 and 'data-run="77"' in one
    rng = client.get("/runs?q=10-19").get_data(as_text=True)
    assert rng.count("<tr data-run=") == 10
    date = client.get("/runs?q=2026-03-14").get_data(as_text=True)
    assert date.count("<tr data-run=") == 1 and 'data-run="500"' in date
    bad = client.get("/runs?q=%3Cscript%3E")
    assert bad.status_code == 200 and "search by run number" in bad.get_data(as_text=True)
    assert "<script>" not in bad.get_data(as_text=True).split("<body", 1)[1].replace('<script src=', '')
    assert client.get("/runs?page=0").status_code == 400


def test_every_page_has_the_status_banner_and_utc_labels(client, runs):
    for path in ("/stream", "/detector", "/nhit", "/runs", "/runs/2000", "/alarms", "/status", "/logs", "/login"):
        html = client.get(path).get_data(as_text=True)
        assert 'id="status-banner"' in html and 'id="tz-toggle"' in html, path
    runs_html = client.get("/runs").get_data(as_text=True)
    assert 'Start (<span class="tz-label">UTC</span>)' in runs_html
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ" data-t="[\d.]+">\d{4}-\d\d-\d\d \d\d:\d\d:\d\d</time>',
                     runs_html)


def test_run_and_status_pages_show_the_event_accounting_and_flag_unaccounted_events(client, redis_client):
    from minard.store.runs import add_accounting, interval_field

    pipe = redis_client.pipeline()
    add_accounting(pipe, 4242, {"source_events": 120, "dispatched": 100, "dropped:no_analyzer": 20,
                                interval_field(600, 600, "source_events"): 70,
                                interval_field(600, 600, "sent:<b>push</b>"): 70,
                                interval_field(1200, 600, "source_events"): 50,
                                interval_field(1200, 600, "sent:<b>push</b>"): 30,
                                interval_field(1200, 600, "dropped:no_analyzer"): 20})
    pipe.zadd("runs:start", {"4242": 1.0})
    pipe.execute()
    page = client.get("/runs/4242").get_data(as_text=True)
    assert 'id="run-accounting"' in page and 'id="run-unaccounted">100<' in page
    assert "no_analyzer=20" in page
    intervals = page[page.index('id="run-intervals"'):page.index("</details>")]
    assert "2 intervals of 600 s" in intervals and intervals.count("<tr") == 3
    assert "&lt;b&gt;push&lt;/b&gt;=30" in intervals and "<b>" not in intervals  # names are escaped
    assert 'class="state-down"' in intervals  # the interval with a drop
    status = client.get("/status").get_data(as_text=True)
    assert 'id="accounting-table"' in status and 'data-run="4242"' in status
