"""The data pages in real headless Chromium (Playwright) against gunicorn minard:app.

A module-scoped test stack: its own redis-server, the dispatcher, ``minard_dispatch
pull`` and ``push`` as real processes, a synthetic ZDAB file and the demo file
replayed through them, five minutes of history written by the consumer's own
writers (minard.testing.sample, including CMOS rates and base currents), and
gunicorn serving the site.  Every page is checked to show that data, with no
console error; a screenshot of each goes to test-artifacts/ (and a few to docs/img/ with MINARD_UPDATE_DOCS_IMG=1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis as redis_py
from conftest import UPDATE_DOCS_IMG, gunicorn_argv

from minard.formats.pmt import encode_event
from minard.formats.zdab import ZdabWriter
from minard.store import status as pipeline_status
from minard.store.runs import get_run, run_key
from minard.testing import RedisServer, free_port, sample, stop_pid, wait_for, wait_port
from minard.testing.dispatcher import DispatcherProcess

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
DOCS_IMG = REPO / "docs" / "img"
BIN = Path(sys.executable).parent
REPLAY_RUN = 5001
REPLAY_EVENTS = 3000
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


def synthetic_zdab(path: Path, n: int = REPLAY_EVENTS, run: int = REPLAY_RUN) -> Path:
    """A ZDAB file of *n* events of *run* in three subruns, with a hot channel 3/4/5."""
    rng = np.random.default_rng(11)
    with ZdabWriter(path) as w:
        for i in range(n):
            nh = int(rng.poisson(30))
            hits = {"crate": np.append(rng.integers(0, 19, nh), 3), "card": np.append(rng.integers(0, 16, nh), 4),
                    "channel": np.append(rng.integers(0, 32, nh), 5), "qhs": rng.integers(0, 4096, nh + 1)}
            word = int(rng.choice([1, 2, 3, 8, 1 << 12]))
            w.write_event(encode_event(run=run, subrun=i * 3 // n, evnum=i, gtid=100 + i, trigger_word=word,
                                       hits=hits, clock10=1_000_000 + i * 1000))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory, demo_zdab_path):
    """Redis + dispatcher + push/pull + replay + history + gunicorn, stopped by pid at the end."""
    work = tmp_path_factory.mktemp("dashboard")
    procs: list[subprocess.Popen] = []
    server = RedisServer().start()
    client = redis_py.Redis.from_url(server.url)
    env = {**os.environ, "MINARD_REDIS_URL": server.url, "MINARD_VAR_DIR": str(work / "var"),
           "MINARD_ZMQ_DISPATCH": f"tcp://127.0.0.1:{free_port()}", "MINARD_DISPATCH_EVENT_LOG": str(work / "pool.log"),
           "MINARD_PROGRAMS_FILE": str(work / "programs.cfg"), "MINARD_SUPERVISOR_SOCKET": str(work / "none.sock")}
    (work / "programs.cfg").write_text("")
    dispatcher = DispatcherProcess(log_path=work / "dispatcher.log", redis_url=server.url,
                                   dispatcher_accounting_dir=str(work / "var" / "dispatcher"))
    try:
        now = time.time()
        sample.write_seconds(client, now - 320, 300, rate=30, run=1000, subrun_every=100, run_every=200)
        dispatcher.start()
        env["MINARD_DISPATCHER_PORT"] = str(dispatcher.port)
        for name, args in (("pull", []), ("push", ["--host", dispatcher.address])):
            log = open(work / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
            procs.append(subprocess.Popen([str(BIN / "minard_dispatch"), name, *args], env=env, stdout=log, stderr=log))
            log.close()
        wait_for(lambda: int(client.hget("status:minard_dispatch_push", "consumers") or 0) >= 1, 20, "push/pull connected")
        wait_for(lambda: client.hget("status:minard_dispatch_push", "connected") == b"1", 20, "push connected")
        path = synthetic_zdab(work / "synthetic.zdab")
        for f, extra in ((path, ["--rate", "1000"]), (demo_zdab_path, ["--speed", "max"])):
            subprocess.run([sys.executable, "-m", "minard.cli", "replay", str(f), "--dispatcher", dispatcher.address,
                            "--no-progress", *extra], env=env, check=True, timeout=60, capture_output=True)
        wait_for(lambda: int(client.hget(run_key(REPLAY_RUN), "events") or 0) == REPLAY_EVENTS, 30, "replayed run in Redis")
        wait_for(lambda: client.zscore("runs:start", "3510") is not None, 30, "demo run in Redis")
        pipe = client.pipeline()
        pipeline_status.beat(pipe, XSS, {"state": "running"}, ttl=600)  # data shown must be escaped
        pipe.execute()
        port = free_port()
        err = open(work / "gunicorn.err", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(gunicorn_argv(port),
                                      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err))
        err.close()
        wait_port(port, timeout=15)
        yield {"url": f"http://127.0.0.1:{port}", "redis": client, "work": work}
    finally:
        for p in reversed(procs):
            stop_pid(p)
        dispatcher.stop()
        client.close()
        server.close()


@pytest.fixture(scope="module")
def demo_zdab_path():
    from conftest import DEMO_ZDAB

    if not DEMO_ZDAB.exists():
        pytest.fail(f"{DEMO_ZDAB} is missing: the shared/ directory must sit beside the checkout")
    return DEMO_ZDAB


@pytest.fixture
def page(browser):
    """A fresh context; the test fails on any console error, page error or dialog."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    problems = []
    pg.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    pg.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    yield pg
    context.close()
    assert problems == []


def shot(page, name: str, docs: bool = False) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    if docs and UPDATE_DOCS_IMG:
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copy(ARTIFACTS / f"{name}.png", DOCS_IMG / f"{name}.png")


def loaded(page, key: str, count: int = 1) -> None:
    page.wait_for_function(f"() => Number(document.body.dataset.{key} || 0) >= {count}", timeout=15000)


# ---------------------------------------------------------------------------- Stream

def test_stream_page_shows_the_replayed_run_rates_and_heartbeats(stack, page):
    page.goto(stack["url"] + "/")
    loaded(page, "streamLoaded")
    assert page.url.split("?")[0].endswith("/stream")  # the home page
    page.wait_for_function("() => document.getElementById('cur-run').textContent === '3510'")
    assert int(page.locator("#chart-rate").get_attribute("data-points")) > 100
    assert page.locator("#trigger-rows tr").count() >= 2
    assert page.locator(".hb[data-name=minard_dispatch_pull].hb-up").count() == 1
    assert page.locator("#cur-dispatcher").text_content().startswith("127.0.0.1:")
    names = page.eval_on_selector_all("#heartbeats .hb", "els => els.map(e => e.textContent)")
    assert any(n.startswith(XSS) for n in names)  # shown as text, never run
    assert page.locator("#heartbeats img, #heartbeats script").count() == 0
    assert page.evaluate("window.__xss") is None
    assert page.locator("#chart-rate canvas").count() == 1
    shot(page, "stream", docs=True)


def test_stream_shows_new_data_within_two_seconds(stack, page):
    page.goto(stack["url"] + "/stream?window=10m")
    loaded(page, "streamLoaded")
    page.wait_for_timeout(1200)  # the page is now polling
    t0 = time.time()
    sample.write_seconds(stack["redis"], t0, 1, rate=20, run=7777, orca=False)
    page.wait_for_function("() => document.getElementById('cur-run').textContent === '7777'", timeout=2500)
    assert time.time() - t0 < 2.5


def test_stream_window_permalink_restores_the_view_and_zoom_writes_it(stack, page):
    stop = int(time.time()) - 60
    start = stop - 240
    page.goto(stack["url"] + f"/stream?start={start}&stop={stop}&hide=100M&log=1")
    loaded(page, "streamLoaded")
    assert page.locator("#log-scale").is_checked()
    assert "\u2192" in page.locator("#window-label").text_content()
    points = int(page.locator("#chart-rate").get_attribute("data-points"))
    assert 235 <= points <= 245  # 1 s buckets of the fixed window
    scale = page.evaluate("() => { const u = document.querySelector('#chart-rate .uplot'); return !!u; }")
    assert scale
    assert f"start={start}" in page.url and f"stop={stop}" in page.url and "hide=100M" in page.url
    # drag across the rate plot: the zoomed window goes into the URL, and reloading restores it
    box = page.locator("#chart-rate .u-over").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + 20)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + 20, steps=5)
    page.mouse.up()
    loaded(page, "streamLoaded", 2)
    zoomed = page.url
    assert f"start={start}" not in zoomed
    zpoints = int(page.locator("#chart-rate").get_attribute("data-points"))
    assert zpoints < points
    page.goto(zoomed)
    loaded(page, "streamLoaded")
    assert page.url == zoomed
    assert int(page.locator("#chart-rate").get_attribute("data-points")) == zpoints
    shot(page, "stream-zoomed")


def test_stream_preset_window_buttons_change_resolution(stack, page):
    page.goto(stack["url"] + "/stream?window=1d")
    loaded(page, "streamLoaded")
    assert page.locator("button[data-window='1d']").get_attribute("class").endswith("active")
    page.click("button[data-window='10m']")
    loaded(page, "streamLoaded", 2)
    assert "window=10m" in page.url
    assert page.locator("#window-label").text_content() == "live, last 10m"


# ---------------------------------------------------------------------------- Detector

def test_detector_drill_down_from_crate_to_card_to_channel_history(stack, page):
    page.goto(stack["url"] + "/detector?window=10m")
    loaded(page, "mapLoaded")
    assert page.locator("#map rect.cell").count() == 10240
    assert page.locator("#hot-list a[data-lcn='1669']").count() == 1  # the synthetic hot channel
    shot(page, "detector", docs=True)
    page.locator("#map text.crate-label", has_text="crate 3").first.click()
    page.wait_for_function("() => document.getElementById('map').dataset.view === 'crate'")
    assert page.locator("#map rect.cell").count() == 512
    assert page.locator("#stats-rows tr").count() == 16
    page.click("#map text.card-label[data-card='4']")
    page.wait_for_function("() => document.getElementById('map').dataset.view === 'card'")
    assert page.locator("#map rect.cell").count() == 32
    shot(page, "detector-card")
    page.click("#map rect.cell[data-lcn='1669']")
    page.wait_for_function("() => document.body.dataset.channelLoaded === '1669'")
    assert page.locator("#channel-title").text_content() == "crate 3 \u00b7 card 4 \u00b7 ch 5 (lcn 1669)"
    for q in ("occupancy", "cmos", "base"):
        assert int(page.locator(f"#chart-{q}").get_attribute("data-points")) > 10
    assert "crate=3" in page.url and "card=4" in page.url and "lcn=1669" in page.url
    shot(page, "detector-channel", docs=True)


def test_detector_permalink_restores_quantity_selection_and_channel(stack, page):
    page.goto(stack["url"] + "/detector?quantity=cmos&window=1h&crate=3&card=4&lcn=1669")
    loaded(page, "mapLoaded")
    assert page.locator("#quantity").input_value() == "cmos"
    assert page.locator("#map").get_attribute("data-view") == "card"
    assert page.locator("button[data-window='1h']").get_attribute("class").endswith("active")
    page.wait_for_function("() => document.body.dataset.channelLoaded === '1669'")
    assert "Crate 3" in page.locator("#crumbs").text_content()
    href = page.locator("#download-csv").get_attribute("href")
    assert "quantity=cmos" in href and "crate=3" in href and "format=csv" in href
    page.select_option("#quantity", "base")
    loaded(page, "mapLoaded", 2)
    assert "quantity=base" in page.url


# ---------------------------------------------------------------------------- Nhit, Runs

def test_nhit_page_shows_the_distribution_per_trigger(stack, page):
    page.goto(stack["url"] + "/nhit?seconds=3600")
    loaded(page, "nhitLoaded")
    assert int(page.locator("#chart-nhit-dist").get_attribute("data-points")) > 5
    assert page.locator("#nhit-rows tr").count() >= 2
    page.check("#trigger-picks input[value='TOTAL']")
    page.wait_for_function("() => location.search.includes('triggers=TOTAL')")
    loaded(page, "nhitLoaded", 3)
    assert page.locator("#nhit-rows tr").count() == 1
    shot(page, "nhit", docs=True)


def test_runs_pages_show_the_replayed_run(stack, page):
    page.goto(stack["url"] + "/runs")
    row = page.locator(f"#runs-rows tr[data-run='{REPLAY_RUN}']")
    assert row.locator("td").nth(4).text_content() == str(REPLAY_EVENTS)
    shot(page, "runs")
    row.locator("a").click()
    page.wait_for_url(f"**/runs/{REPLAY_RUN}")
    loaded(page, "runLoaded")
    assert page.locator("#run-events").text_content() == str(REPLAY_EVENTS)
    assert page.locator("#run-subruns").text_content() == "3"
    assert page.locator("#run-subrun-list").text_content() == "0, 1, 2"
    assert int(page.locator("#chart-run-nhit").get_attribute("data-points")) > 10
    hist = {int(k): v for k, v in get_run(stack["redis"], REPLAY_RUN)["nhit_histogram"].items()}
    xmax = float(page.locator("#chart-run-nhit").get_attribute("data-xmax"))  # fitted to 99.9 % of the events
    assert sum(v for k, v in hist.items() if k <= xmax) >= 0.999 * sum(hist.values()) and xmax <= max(hist)
    assert page.locator("#run-map rect.cell").count() == 10240
    page.click("#run-map rect.cell[data-lcn='1669']")
    hits = get_run(stack["redis"], REPLAY_RUN)["channel_hits"]["1669"]
    assert hits > REPLAY_EVENTS  # the hot channel: one hit per event plus random ones
    assert f"crate 3 \u00b7 card 4 \u00b7 ch 5 (lcn 1669): {hits} hits" in page.locator("#run-channel").text_content()
    shot(page, "run", docs=True)
