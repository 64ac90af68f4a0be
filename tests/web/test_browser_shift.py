"""The shift crew's dashboard (issue 15) in real headless Chromium, through nginx.

A module-scoped site: its own redis-server with ten minutes of data written by
the consumer's own writers (``minard.testing.sample``), gunicorn ``minard:app``
and nginx configured as ``minard up`` configures it (minard.stack.nginx_text,
conf/templates/nginx.conf.in) in front of it, serving the static files itself.  Every check runs at the
three window sizes a shift crew uses: 1400x1000, 1280x720 (laptop) and
390x844 (phone); screenshots go to test-artifacts/ (and docs/img/ with
MINARD_UPDATE_DOCS_IMG=1).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis as redis_py
from conftest import UPDATE_DOCS_IMG, gunicorn_argv, wait_for

from minard.ops.logserver import append_line, format_line
from minard.store import alarms
from minard.store import status as pipeline_status
from minard.store import timeseries as ts
from minard.testing import RedisServer, free_port, sample, stop_pid, wait_port

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
DOCS_IMG = REPO / "docs" / "img"
BIN = Path(sys.executable).parent
SIZES = {"wide": (1400, 1000), "laptop": (1280, 720), "phone": (390, 844)}
PAGES = ("/stream", "/detector", "/nhit?seconds=3600", "/runs", "/runs/1000", "/status", "/processes", "/logs",
         "/logs/daq", "/alarms", "/login")
#: Many runs close together, two hours ago (run labels must not overlap there).
CROWD_T0 = int(time.time()) - 7200
CROWD_RUNS = 120
REGISTRY = """
[daq]
host = buffer1
description = DAQ
timeout = 10

[minard_dispatch_pull]
description = pull pool
timeout = 10
"""


def nginx_conf(work: Path, nginx_port: int, web_port: int) -> Path:
    """nginx.conf as ``minard up`` renders it (minard.stack.nginx_text, plain HTTP) for this test site."""
    from minard import config
    from minard.stack import Layout, nginx_text

    for d in ("run", "logs", "nginx"):
        (work / d).mkdir(parents=True, exist_ok=True)
    cfg = config.load({"nginx_port": nginx_port, "web_port": web_port, "log_port": free_port(),
                       "stack_bind": "127.0.0.1", "nginx_tls": False}, env={})
    path = work / "nginx.conf"
    path.write_text(nginx_text(cfg, Layout(work)))
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Redis with data, gunicorn and nginx in front; stopped by pid at the end."""
    work = tmp_path_factory.mktemp("shift")
    (work / "programs.cfg").write_text(REGISTRY)
    server = RedisServer().start()
    client = redis_py.Redis.from_url(server.url)
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "MINARD_REDIS_URL": server.url, "MINARD_VAR_DIR": str(work / "var"),
           "MINARD_PROGRAMS_FILE": str(work / "programs.cfg"), "MINARD_SUPERVISOR_SOCKET": str(work / "none.sock")}
    try:
        now = time.time()
        sample.write_seconds(client, now - 600, 590, rate=200, run=1000, subrun_every=100, run_every=200)
        client.zadd("runs:start", {str(5000 + i): CROWD_T0 + 3 * i for i in range(CROWD_RUNS)})
        pipe = client.pipeline()
        pipeline_status.beat(pipe, "minard_dispatch_pull", {"lag_seconds": 0.4, "workers": 2, "state": "running"},
                             started=now - 600, ttl=3600)
        pipeline_status.count(pipe, "pull", received=1000, processed=1200)  # inconsistent on purpose
        pipe.execute()
        web_port, nginx_port = free_port(), free_port()
        err = open(work / "gunicorn.err", "wb")  # noqa: SIM115 - handed to the child
        procs.append(subprocess.Popen(gunicorn_argv(web_port),
                                      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err))
        err.close()
        conf = nginx_conf(work, nginx_port, web_port)
        procs.append(subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-p", f"{work}/", "-c", str(conf),
                                       "-e", str(work / "logs" / "nginx-error.log")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(web_port, timeout=15)
        wait_port(nginx_port, timeout=15)
        yield {"url": f"http://127.0.0.1:{nginx_port}", "redis": client, "work": work, "var": work / "var"}
    finally:
        for p in reversed(procs):
            stop_pid(p)
        client.close()
        server.close()


@contextlib.contextmanager
def open_page(browser, size: str):
    """A page at one of the three sizes; fails the test on any console error or page error."""
    width, height = SIZES[size]
    # a browser far from UTC, so that "UTC by default" is a real check
    context = browser.new_context(viewport={"width": width, "height": height}, timezone_id="Asia/Kolkata")
    pg = context.new_page()
    pg.size = size
    problems = []
    pg.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    try:
        yield pg
    finally:
        context.close()
    assert problems == []


@pytest.fixture(params=list(SIZES), ids=list(SIZES))
def page(request, browser):
    """A page at each of the three sizes (see open_page)."""
    with open_page(browser, request.param) as pg:
        yield pg


def shot(page, name: str, docs: bool = False) -> None:
    """Screenshot to test-artifacts/ (and docs/img/ with MINARD_UPDATE_DOCS_IMG=1 at the wide size)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"shift-{name}-{page.size}.png"
    page.screenshot(path=str(path), full_page=True)
    if docs and UPDATE_DOCS_IMG and page.size == "wide":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS_IMG / f"{name}.png")


def loaded(page, key: str, count: int = 1) -> None:
    page.wait_for_function(f"() => Number(document.body.dataset.{key} || 0) >= {count}", timeout=15000)


def banner_loaded(page, count: int = 1) -> None:
    page.wait_for_function(f"() => Number(document.getElementById('status-banner').dataset.loaded || 0) >= {count}",
                           timeout=15000)


def utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def no_sideways_scroll(page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= page.viewport_size["width"], f"{page.url}: {width} px wide"


# ---------------------------------------------------------------- every page

def test_every_page_fits_the_window_and_shows_the_status_banner(site, page):
    """No page scrolls sideways at 1400, 1280 or 390 px; the banner is on each."""
    for path in PAGES:
        page.goto(site["url"] + path)
        banner_loaded(page)
        page.wait_for_timeout(300)  # the page's own scripts draw
        no_sideways_scroll(page)
        assert page.locator("#b-run .b-value").text_content() not in ("", "-"), path
        assert page.locator("#b-alarms .b-value").text_content() != "-"
        shot(page, path.strip("/").split("?")[0].replace("/", "-") or "home", docs=path == "/stream")


class FillingBuckets:
    """1000 events a second arriving late, as from a consumer: a second holds 30 % of its
    events while it lasts and all of them 2.5 s after it began (complete before COMPLETE_LAG ends).

    Written to the 1 s level only, from a thread, for the length of a test, and
    only from the next second on: the site caches seconds it has seen settle,
    and real data never changes a settled second.
    """

    RATE, EARLY = 1000, 300

    def __init__(self, redis):
        import threading

        self.redis, self.stop = redis, threading.Event()
        self.first = int(time.time()) + 1
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def write(self, now: float, first: int) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for b in range(max(first, self.first), int(now) + 1):
            pipe.hset(ts.scalar_key(1, b, "trig"), "TOTAL", self.RATE if now >= b + 2.5 else self.EARLY)
        pipe.execute()

    def run(self) -> None:
        end = time.monotonic() + 90
        while not self.stop.wait(0.05) and time.monotonic() < end:
            now = time.time()
            self.write(now, int(now) - 4)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.mark.slow
def test_headline_rate_and_newest_point_ignore_the_bucket_still_filling(site, browser):
    """1000 Hz true rate, the current second 30 % filled: the page must say 1000 Hz, not 300.

    One stream of filling seconds serves the three sizes in turn (it takes 14 s to build up).
    """
    filling = FillingBuckets(site["redis"])
    try:
        wait_for(lambda: time.time() > filling.first + 14, 20, "ten complete seconds of the filling data")
        for size in SIZES:
            with open_page(browser, size) as page:
                headline_is_the_true_rate(page, site["url"])
    finally:
        filling.close()


def headline_is_the_true_rate(page, url: str) -> None:
    """The stream page's headline, banner and newest plot point all read the full 1000 Hz."""
    page.goto(url + "/stream?window=10m&triggers=TOTAL")
    loaded(page, "streamLoaded")
    text = page.locator("#cur-rate").text_content()
    assert text == "1,000 Hz", (page.size, text)
    note = page.locator("#cur-rate-note").text_content()
    assert note.startswith("mean of ") and note.endswith(" UTC")  # labelled with the interval it covers
    banner_loaded(page)
    assert page.locator("#b-rate .b-value").text_content() == "1000 Hz"
    last = page.evaluate("""() => { const u = document.getElementById('chart-rate').uplot;
        const t = u.data[0], i = u.series.findIndex(s => s.label === 'TOTAL');
        return [t[t.length - 1], u.data[i][t.length - 1]]; }""")
    assert last[0] <= time.time() - 2 and last[1] == 1000  # the newest point is a whole bucket
    loaded(page, "streamPolls", 3)  # live updates merge complete buckets only
    last = page.evaluate("""() => { const u = document.getElementById('chart-rate').uplot;
        const i = u.series.findIndex(s => s.label === 'TOTAL'); return u.data[i][u.data[0].length - 1]; }""")
    assert last == 1000


# ---------------------------------------------------------------- time

def test_times_are_utc_by_default_24_hour_with_seconds_and_local_on_request(site, page):
    stop = int(time.time()) - 60
    start = stop - 300
    page.goto(site["url"] + f"/stream?start={start}&stop={stop}")
    loaded(page, "streamLoaded")
    assert page.locator("#window-label").text_content() == f"{utc(start)} \u2192 {utc(stop)} UTC"
    assert page.locator("#range-from").input_value() == utc(start)
    label = page.evaluate("document.getElementById('chart-rate').uplot.axes[0].label")
    assert label == "time (UTC)"
    ticks = page.evaluate("document.getElementById('chart-rate').uplot.axes[0]._values")
    assert all("am" not in v.lower() and "pm" not in v.lower() for v in ticks if v)
    page.locator("#chart-rate").scroll_into_view_if_needed()
    box = page.locator("#chart-rate .u-over").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    readout = page.locator("#chart-rate .u-series").first.locator(".u-value").text_content()
    hhmmss = readout.split()[1]
    assert len(readout) == 19 and hhmmss.count(":") == 2  # YYYY-MM-DD HH:MM:SS, 24-hour
    # the per-browser switch to local time (the browser is in UTC+05:30 here)
    page.evaluate("window.minard.setLocal(true)")
    page.reload()
    loaded(page, "streamLoaded")
    assert page.locator("#tz-toggle").text_content() == "Local time"
    expect = page.evaluate(f"window.minard.when({start})")
    local_offset = page.evaluate("new Date().getTimezoneOffset()")
    assert expect == datetime.fromtimestamp(start - local_offset * 60, UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert page.evaluate("document.getElementById('chart-rate').uplot.axes[0].label").startswith("time (local")
    page.click("#tz-toggle")  # back to UTC, for every page of this browser
    page.goto(site["url"] + "/runs")
    cell = page.locator("#runs-rows time").first
    assert cell.text_content() == utc(float(cell.get_attribute("data-t")))
    assert page.locator("#runs-table th .tz-label").first.text_content() == "UTC"


def test_typed_range_zoom_out_and_back_undoes_each_step(site, page):
    page.goto(site["url"] + "/stream?window=10m")
    loaded(page, "streamLoaded")
    page.fill("#range-from", "now-2h")
    page.fill("#range-to", "now")
    page.click("#range-form button[type=submit]")
    loaded(page, "streamLoaded", 2)
    assert "window=2h" in page.url
    stop = int(time.time()) - 1200
    page.fill("#range-from", utc(stop - 600))
    page.fill("#range-to", utc(stop))
    page.click("#range-form button[type=submit]")
    loaded(page, "streamLoaded", 3)
    assert f"start={stop - 600}" in page.url and f"stop={stop}" in page.url
    assert int(page.locator("#chart-rate").get_attribute("data-points")) >= 598
    page.click("#zoom-out")
    loaded(page, "streamLoaded", 4)
    assert f"start={stop - 900}" in page.url and f"stop={stop + 300}" in page.url  # twice the span, same middle
    page.fill("#range-from", "yesterday at noon")
    page.click("#range-form button[type=submit]")
    assert "now-6h" in page.locator("#range-error").text_content()
    page.go_back()
    page.wait_for_function(f"() => location.search.includes('stop={stop}') && !location.search.includes('start={stop - 900}')")
    loaded(page, "streamLoaded", 5)
    assert page.locator("#window-label").text_content().startswith(utc(stop - 600))
    page.go_back()
    page.wait_for_function("() => location.search.includes('window=2h')")
    page.go_back()
    page.wait_for_function("() => location.search.includes('window=10m')")
    assert page.url.startswith(site["url"])  # Back stayed on the site


def test_drag_zoom_then_double_click_zooms_out_and_back_returns(site, page):
    stop = int(time.time()) - 60
    page.goto(site["url"] + f"/stream?start={stop - 400}&stop={stop}")
    loaded(page, "streamLoaded")
    page.locator("#chart-rate").scroll_into_view_if_needed()
    box = page.locator("#chart-rate .u-over").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + 20)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + 20, steps=5)
    page.mouse.up()
    loaded(page, "streamLoaded", 2)
    zoomed = page.url
    assert f"start={stop - 400}" not in zoomed
    page.mouse.dblclick(box["x"] + box["width"] / 2, box["y"] + 40)
    loaded(page, "streamLoaded", 3)
    assert page.url != zoomed
    page.go_back()
    page.wait_for_function(f"() => location.href === {json.dumps(zoomed)}")
    page.go_back()
    page.wait_for_function(f"() => location.search.includes('start={stop - 400}')")


def test_run_labels_never_overlap_and_ticks_never_collide(site, page):
    page.goto(site["url"] + f"/stream?start={CROWD_T0 - 30}&stop={CROWD_T0 + 3 * CROWD_RUNS + 30}")
    loaded(page, "streamLoaded")
    root = page.locator("#chart-rate .uplot")
    page.wait_for_function("() => Number(document.querySelector('#chart-rate .uplot').dataset.marks || 0) > 0")
    assert int(root.get_attribute("data-marks")) == CROWD_RUNS
    boxes = json.loads(root.get_attribute("data-label-boxes"))
    assert boxes and int(root.get_attribute("data-hidden-labels")) == CROWD_RUNS - len(boxes)
    for row in {b[0] for b in boxes}:
        spans = sorted(b[1:] for b in boxes if b[0] == row)
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), spans
    # full text on hover: the plot's tooltip names the run under the cursor
    page.locator("#chart-rate").scroll_into_view_if_needed()
    x = page.evaluate(f"document.getElementById('chart-rate').uplot.valToPos({CROWD_T0 + 30}, 'x')")
    over = page.locator("#chart-rate .u-over").bounding_box()
    page.mouse.move(over["x"] + x, over["y"] + 30)
    assert "run 5010 starts" in page.locator("#chart-rate .u-over").get_attribute("title")
    collide = page.evaluate("""() => {
        const u = document.getElementById('chart-rate').uplot, ax = u.axes[0];
        const ctx = document.createElement('canvas').getContext('2d');
        ctx.font = getComputedStyle(document.body).fontSize + ' ' + getComputedStyle(document.body).fontFamily;
        const spans = ax._splits.map((t, i) => {
            const x = u.valToPos(t, 'x'), lines = String(ax._values[i] || '').split('\\n');
            const w = Math.max(...lines.map(l => ctx.measureText(l).width));
            return [x - w / 2, x + w / 2];
        }).sort((a, b) => a[0] - b[0]);
        return spans.filter((s, i) => i && s[0] < spans[i - 1][1]).length; }""")
    assert collide == 0


def test_every_trigger_has_its_own_colour_blind_safe_style_the_same_on_every_page(site, page):
    page.goto(site["url"] + "/stream?window=10m")
    loaded(page, "streamLoaded")
    styles = page.evaluate("window.MC.TRIGGERS.map(n => { const s = window.MC.style(n); return [n, s.stroke, String(s.dash)]; })")
    assert len(styles) == 28 and len({(s[1], s[2]) for s in styles}) == 28
    tol_muted = {"#332288", "#CC6677", "#117733", "#88CCEE", "#882255", "#44AA99", "#999933", "#AA4499", "#DDAA33"}
    assert {s[1] for s in styles if s[0] != "TOTAL"} <= tol_muted
    stroke = "(id, name) => { const u = document.getElementById(id).uplot; const s = u.series.find(x => x.label === name); return s && s._stroke; }"
    on_stream = page.evaluate(f"({stroke})('chart-rate', '100M')")
    page.goto(site["url"] + "/nhit?seconds=600")
    loaded(page, "nhitLoaded")
    assert page.evaluate(f"({stroke})('chart-nhit-dist', '100M')") == on_stream == "#CC6677"


# ---------------------------------------------------------------- banner

def test_banner_shows_run_state_rate_stale_data_and_the_worst_active_alarm(site, page):
    r = site["redis"]
    warn = alarms.raise_alarm(r, 30, "disk filling", source="disk")
    danger = alarms.raise_alarm(r, 40, "trigger rate zero", source="rate")
    # data 8 s old: it turns stale (amber at 10 s) soon after the page opens
    sample.write_seconds(r, int(time.time()) - 8, 1, rate=100, run=1002, orca=False)
    try:
        page.goto(site["url"] + "/detector")
        # The API reuses a response for RESPONSE_TTL s, so the first poll may predate the new alarms.
        page.wait_for_function("() => document.getElementById('b-alarms').dataset.level === 'red'", timeout=15000)
        assert page.locator("#b-alarms .b-value").text_content().endswith("worst danger")
        assert page.locator("#b-run").get_attribute("href").startswith("/runs/")
        assert page.locator("#b-age").get_attribute("href") == "/status"
        age = page.locator("#b-age")
        wait_for(lambda: age.get_attribute("data-level") in ("amber", "red"), 25, "data turning stale")
        assert page.locator("#b-state .b-value").text_content() in ("stalled", "no data")
        alarms.acknowledge(r, danger, "alice")
        banner_loaded(page, int(page.locator("#status-banner").get_attribute("data-loaded")) + 2)
        assert page.locator("#b-alarms .b-value").text_content().endswith("worst warning")
    finally:
        for i in (warn, danger):
            a = alarms.get(r, i)
            if a and a["state"] != "acknowledged":
                alarms.acknowledge(r, i, "cleanup")


# ---------------------------------------------------------------- detector, nhit, runs

def test_detector_map_fills_the_width_reads_out_on_hover_and_moves_with_the_keyboard(site, page):
    page.goto(site["url"] + "/detector?window=10m")
    loaded(page, "mapLoaded")
    widths = page.evaluate("[document.querySelector('#map svg').getBoundingClientRect().width, document.getElementById('map').clientWidth]")
    assert abs(widths[0] - widths[1]) <= 2 and widths[0] >= page.viewport_size["width"] * 0.85
    cell = page.evaluate("document.querySelector('#map rect.cell').getBoundingClientRect().width")
    assert cell >= 4
    page.hover("#map rect.cell[data-lcn='1669']")
    readout = page.locator("#map-readout").text_content()
    assert readout.startswith("crate 3 \u00b7 card 4 \u00b7 ch 5 (lcn 1669): ") and ", baseline " in readout
    assert ("HOT" in readout) == (page.locator("#hot-list a[data-lcn='1669']").count() == 1)
    page.focus("#map")  # the keyboard cursor starts on the channel last hovered
    page.wait_for_function("() => document.getElementById('map').dataset.cursor === '1669'")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("PageDown")
    assert int(page.locator("#map").get_attribute("data-cursor")) == 1669 + 32 + 1 + 512
    assert page.locator("#map-readout").text_content().startswith("crate 4 \u00b7 card 5 \u00b7 ch 6 (lcn 2214)")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.body.dataset.channelLoaded === '2214'")
    assert page.locator("#channel-title").text_content() == "crate 4 \u00b7 card 5 \u00b7 ch 6 (lcn 2214)"
    shot(page, "detector-map")


def test_detector_page_decodes_the_f32_map_to_the_plain_json_values(site, page):
    page.goto(site["url"] + "/detector?window=10m")
    loaded(page, "mapLoaded")
    diff = page.evaluate("""async () => {
      const stop = Math.floor(Date.now() / 1000) - 5, q = `quantity=occupancy&start=${stop - 600}&stop=${stop}`;
      const plain = await (await fetch(`/api/detector?${q}`)).json();
      const packed = await (await fetch(`/api/detector?${q}&encoding=f32`)).json();
      const out = [];
      for (const key of ["values", "baseline"]) {
        const got = MC.unpackF32(packed[key + "_f32"]);
        if (got.length !== plain[key].length) out.push(`${key} length ${got.length}`);
        got.forEach((v, i) => { if (v !== plain[key][i] && out.length < 5) out.push(`${key}[${i}] ${v} != ${plain[key][i]}`); });
      }
      return {out, nonzero: plain.values.filter(v => v).length};
    }""")
    assert diff["out"] == [] and diff["nonzero"] > 1000


def test_stream_page_decodes_the_f64_series_to_the_plain_json_values(site, page):
    page.goto(site["url"] + "/stream?window=1h")
    loaded(page, "streamLoaded")
    diff = page.evaluate("""async () => {
      const stop = Math.floor(Date.now() / 1000) - 5, q = `start=${stop - 3600}&stop=${stop}`;
      const plain = await (await fetch(`/api/stream?${q}`)).json();
      const packed = await (await fetch(`/api/stream?${q}&encoding=f64`)).json();
      const out = [];
      for (const key of ["rate", "nhit", "qhs"]) {
        for (const name of Object.keys(plain[key])) {
          const got = MC.unpackF64(packed[key + "_f64"][name]);
          if (got.length !== plain[key][name].length) out.push(`${key}.${name} length ${got.length}`);
          got.forEach((v, i) => { if (v !== plain[key][name][i] && out.length < 5) out.push(`${key}.${name}[${i}]`); });
        }
      }
      return {out, points: plain.rate.TOTAL.filter(v => v).length};
    }""")
    assert diff["out"] == [] and diff["points"] > 10


def test_detector_card_view_has_matching_headers_channel_names_and_one_precision(site, page):
    page.goto(site["url"] + "/detector?window=10m&crate=3&card=4")
    loaded(page, "mapLoaded")
    headers = page.locator("#stats-table th").all_text_contents()
    assert headers == ["Channel", "Value (hits/event)", "Baseline (hits/event)"]
    rows = page.locator("#stats-rows tr")
    assert rows.count() == 32
    assert rows.nth(26).locator("td").first.text_content() == "crate 3 \u00b7 card 4 \u00b7 ch 26"
    values = [t for t in page.locator("#stats-rows td.num").all_text_contents() if t != "-"]
    decimals = {len(v.split(".")[1]) if "." in v else 0 for v in values}
    assert len(decimals) == 1 and not any("," in v for v in values)
    width = page.evaluate("document.querySelector('#map svg').getBoundingClientRect().width")
    assert width >= page.viewport_size["width"] * 0.85
    page.goto(site["url"] + "/detector?window=10m")
    loaded(page, "mapLoaded")
    means = page.locator("#stats-rows tr td:nth-child(2)").all_text_contents()
    assert len({len(v.split(".")[1]) for v in means}) == 1  # crate means share one precision


def test_nhit_axis_fits_the_data_with_log_and_full_range_options(site, page):
    page.goto(site["url"] + "/nhit?seconds=600")
    loaded(page, "nhitLoaded")
    xmax = float(page.locator("#chart-nhit-dist").get_attribute("data-xmax"))
    assert 60 <= xmax <= 200  # data around 40 hits, never the fixed 0-1000
    page.check("#log-x")
    page.wait_for_function("() => location.search.includes('logx=1')")
    loaded(page, "nhitLoaded", 2)
    assert page.evaluate("document.getElementById('chart-nhit-dist').querySelector('.u-over') !== null")
    page.check("#nhit-full")
    page.wait_for_function("() => location.search.includes('full=1')")
    loaded(page, "nhitLoaded", 3)
    assert float(page.locator("#chart-nhit-dist").get_attribute("data-xmax")) >= xmax


def test_runs_list_searches_pages_and_the_run_page_shows_subruns_as_count_and_list(site, page):
    page.goto(site["url"] + "/runs")
    assert page.locator("#runs-pager").text_content().strip().startswith("page 1 of")
    page.fill("#runs-q", "5010-5019")
    page.click("#runs-search button[type=submit]")
    page.wait_for_url("**/runs?q=5010-5019")
    assert page.locator("#runs-rows tr[data-run]").count() == 10
    page.fill("#runs-q", "1000")
    page.click("#runs-search button[type=submit]")
    row = page.locator("#runs-rows tr[data-run='1000']")
    assert row.locator("td").nth(5).text_content() == "2"  # subruns: a count in the list
    row.locator("a").click()
    page.wait_for_url("**/runs/1000")
    loaded(page, "runLoaded")
    assert page.locator("#run-subruns").text_content() == "2"
    assert page.locator("#run-subrun-list").text_content() == "0, 1"
    no_sideways_scroll(page)


# ---------------------------------------------------------------- status, processes, logs, alarms

def test_status_has_one_row_per_program_with_a_flag_when_processed_exceeds_received(site, page):
    page.goto(site["url"] + "/status")
    rows = page.locator("#status-rows tr[data-name='minard_dispatch_pull']")
    assert rows.count() == 1
    row = rows.first
    assert row.locator(".badge.flag").text_content() == "processed > received"
    assert row.locator("a").get_attribute("href") == "/logs/minard_dispatch_pull"
    assert "workers" in row.locator("td.details dt").all_text_contents()
    assert "=" not in row.locator("td.details").text_content()  # readable fields, no key=value dump
    no_sideways_scroll(page)


def test_logs_are_coloured_and_filtered_by_level(site, page):
    log = site["var"] / "logs" / "daq.log"
    now = time.time()
    for level, msg in ((10, "debug detail"), (20, "run started"), (30, "buffer 80% full"), (40, "crate 12 lost")):
        append_line(log, format_line(level, msg, now), 0, 0)
    page.goto(site["url"] + "/logs/daq")
    page.wait_for_function("() => document.getElementById('log-text').dataset.rendered === '1'")
    assert page.locator("#log-text .lvl-error").first.text_content().strip().endswith("crate 12 lost")
    assert page.locator("#log-text .lvl-warning").first.text_content().strip().endswith("buffer 80% full")
    color = page.evaluate("getComputedStyle(document.querySelector('#log-text .lvl-error')).color")
    assert color == "rgb(255, 107, 107)"
    assert not page.locator("#log-text .lvl-debug").first.is_visible()  # debug hidden by default
    page.uncheck("#log-levels input[data-level=info]")
    assert not page.locator("#log-text .lvl-info").first.is_visible()
    assert page.locator("#log-text .lvl-error").first.is_visible()
    page.check("#log-levels input[data-level=debug]")
    assert page.locator("#log-text .lvl-debug").first.is_visible()
    assert int(page.locator("#count-error").text_content()) >= 1


def test_alarms_active_only_filter_and_a_manual_unshelve_reads_active_again(site, page):
    r = site["redis"]
    shelved = alarms.raise_alarm(r, 30, "shelved one", source="t1")
    acked = alarms.raise_alarm(r, 30, "acknowledged one", source="t2")
    active = alarms.raise_alarm(r, 30, "active one", source="t3")
    back = alarms.raise_alarm(r, 30, "unshelved one", source="t4")
    alarms.shelve(r, shelved, "alice", time.time() + 3600)
    alarms.acknowledge(r, acked, "alice")
    alarms.shelve(r, back, "alice", time.time() + 3600)
    alarms.unshelve(r, back, "bob")
    try:
        page.goto(site["url"] + "/alarms")
        row = page.locator(f"#alarm-rows tr[data-id='{back}'] td").nth(6)
        assert row.text_content().strip() == "unacknowledged"  # active again, never "(shelve expired)"
        page.check("#active-only")
        page.wait_for_function("() => location.search.includes('active=1')")
        assert page.locator(f"#alarm-rows tr[data-id='{active}']").is_visible()
        assert not page.locator(f"#alarm-rows tr[data-id='{shelved}']").is_visible()
        assert not page.locator(f"#alarm-rows tr[data-id='{acked}']").is_visible()
        page.reload()
        assert page.locator("#active-only").is_checked()
        assert not page.locator(f"#alarm-rows tr[data-id='{acked}']").is_visible()
        no_sideways_scroll(page)
    finally:
        for i in (shelved, active, back):
            alarms.acknowledge(r, i, "cleanup")
