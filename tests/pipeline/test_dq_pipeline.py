"""Data quality end to end: `minard simulate zdab` files replayed through the real
dispatcher -> push -> pull pool -> Redis, judged live by `minard dq-live` and on
demand by `minard dq RUN --reference REF --json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import wait_for
from test_dispatch_stream import BIN, Stack

from minard.config import ROOT
from minard.store import dq as store_dq
from minard.testing import stop_pid

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
REF, BAD, SHORT = 501, 502, 503
HOT, CRATE, CARD = 2222, 9, 4


def simulate(path, run, seed, events, *extra):
    """One run's file; GTIDs go on from the previous run's (run - 501) * 20000, as the hardware's do."""
    subprocess.run([str(BIN / "minard"), "simulate", "zdab", str(path), "--events", str(events), "--seed", str(seed),
                    "--run", str(run), "--rate", "1000", "--start-gtid", str((run - REF) * 20000 + 1),
                    "--no-progress", *extra], check=True, capture_output=True)
    return path


def dq_json(env, run, *args):
    proc = subprocess.run([str(BIN / "minard"), "dq", str(run), *args, "--json"], env=env, check=False, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def flagged(report):
    return {c["name"]: c for c in report["checks"] if c["status"] in ("warning", "error")}


@pytest.fixture
def stack(cfg, tmp_path, redis_url):
    # Rates are taken over the runs' 10 MHz clock span, so the replay may go flat out.
    s = Stack(cfg, tmp_path, redis_url, dq_file=str(ROOT / "conf" / "dq.cfg"), dq_interval=1)
    s.start()
    yield s
    s.stop()


def test_pipeline_runs_are_judged_live_at_endtape_and_by_the_cli(stack, tmp_path):
    ref = simulate(tmp_path / "ref.zdab", REF, 11, 20000)
    bad = simulate(tmp_path / "bad.zdab", BAD, 12, 20000, "--hot-channel", str(HOT), "--dead-card", f"{CRATE}/{CARD}",
                   "--trigger-scale", "PULGT=3", "--trigger-scale", "20LB=0.5")
    short = simulate(tmp_path / "short.zdab", SHORT, 13, 1000)
    with open(tmp_path / "dq-live.log", "ab") as log:
        live = subprocess.Popen([str(BIN / "minard"), "dq-live"], env=stack.env, stdout=log, stderr=log)
    try:
        wait_for(lambda: stack.status("dq_live").get("state") == "running", 30, "dq-live heartbeat")
        stack.replay(ref, "--speed", "max")
        store_dq.set_reference(stack.redis, "", REF)  # an expert's choice for runs without a type
        stack.replay(bad, "--speed", "max")
        final = wait_for(lambda: (store_dq.result(stack.redis, BAD) or {}).get("final") and
                         store_dq.result(stack.redis, BAD), 60, "final live result of the bad run")
        stack.replay(short, "--speed", "max")
        stack.wait_settled(41000)
    finally:
        stop_pid(live)
    assert live.returncode == 0, (tmp_path / "dq-live.log").read_text()[-3000:]
    assert final["reference"] == REF and final["status"] == "error"
    assert set(flagged(final)) == {"occupancy_hot", "dead_card", "trigger_rate:PULGT", "trigger_rate:20LB"}, \
        flagged(final)

    report = dq_json(stack.env, BAD, "--reference", str(REF))
    bad_checks = flagged(report)
    assert set(bad_checks) == {"occupancy_hot", "dead_card", "trigger_rate:PULGT", "trigger_rate:20LB"}, bad_checks
    assert bad_checks["occupancy_hot"]["detail"]["channels"] == [HOT]
    assert bad_checks["dead_card"]["detail"]["cards"] == [{"crate": CRATE, "card": CARD}]
    assert set(report) >= {"run", "reference", "status", "checks"} and report["reference"] == REF

    short_report = dq_json(stack.env, SHORT, "--reference", str(REF))
    checks = {c["name"]: c for c in short_report["checks"]}
    assert not flagged(short_report)
    for name in ("occupancy_hot", "occupancy_dead", "nhit_distribution"):
        assert checks[name]["status"] == "too_few", checks[name]
    assert short_report["status"] == "too_few"
    # Stored, and shown by the web API in the same shape.
    assert store_dq.result(stack.redis, SHORT)["status"] == "too_few"


def test_dq_of_an_unknown_run_is_a_clear_error(cfg, redis_url):
    env = dict(os.environ, MINARD_REDIS_URL=redis_url)
    proc = subprocess.run([sys.executable, "-m", "minard.cli", "dq", "999", "--json"], env=env, check=False,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "run 999 is not known" in proc.stderr
