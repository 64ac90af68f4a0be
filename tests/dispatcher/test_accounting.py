"""The dispatcher's per-run event accounting in Redis, and the alarm on unaccounted events."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from minard.dispatcher.client import DispatchClient
from minard.store import alarms
from minard.store.runs import get_run
from minard.testing import wait_for
from minard.testing.dispatcher import DispatcherProcess
from tests.dispatcher.test_dispatcher import collect, payloads

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def disp(cfg, tmp_path):
    proc = DispatcherProcess(log_path=tmp_path / "dispatcher.log", redis_url=cfg["redis_url"],
                             dispatcher_accounting_dir=cfg["dispatcher_accounting_dir"],
                             dispatcher_finished_timeout=5, dispatcher_unaccounted_delay=0.5,
                             dispatcher_accounting_interval=1)
    yield proc.start()
    proc.stop()


def run_of(disp, run: int, n: int, analyzer: DispatchClient | None = None) -> None:
    """One run of *n* events from a source; the analyzer (if any) answers FINISHED."""
    with DispatchClient.connect(disp.address, "source", timeout=5.0) as source:
        assert source.command(f"BEGINTAPE:{run}:1") == "OK:BEGINTAPE"
        source.send_batch(payloads(n, run=run))
        source.send_command("ENDTAPE")
        if analyzer is not None:
            data, _ = collect(analyzer, "ENDTAPE")
            assert len(data) == n
            analyzer.finished()
        source.wait_command("ALLFINISHED", timeout=10.0)


def test_events_with_no_monitoring_analyzer_are_counted_dropped_and_nothing_is_unaccounted(
        disp, redis_client):
    run_of(disp, 31, 500)
    got = wait_for(lambda: get_run(redis_client, 31), 10, "the run's accounting")
    assert (got["source_events"], got["dispatched"], got["dropped"]) == (500, 0, 500)
    assert got["dropped_by"] == {"no_analyzer": 500} and got["unaccounted"] == 0


def test_events_delivered_but_never_stored_are_unaccounted_and_raise_an_alarm(disp, redis_client):
    with DispatchClient.connect(disp.address, "analyzer", timeout=5.0) as analyzer:
        run_of(disp, 32, 300, analyzer)
    got = wait_for(lambda: get_run(redis_client, 32), 10, "the run's accounting")
    assert (got["source_events"], got["dispatched"], got["dropped"]) == (300, 300, 0)
    assert got["events"] == 0 and got["unaccounted"] == 300  # nothing behind the analyzer stored them
    alarm = wait_for(lambda: [a for a in alarms.list_alarms(redis_client)
                              if "run 32: 300 events unaccounted" in a["message"]], 10, "the alarm")
    assert alarm[0]["level"] == alarms.WARNING


def test_a_long_run_is_accounted_per_interval_for_each_analyzer(disp, redis_client):
    """Per interval (1 s here): events received, handed to each analyzer, dropped; they sum to the run's."""
    with DispatchClient.connect(disp.address, "analyzer", timeout=5.0) as analyzer, \
            DispatchClient.connect(disp.address, "source", timeout=5.0) as source, \
            ThreadPoolExecutor(1) as pool:
        reading = pool.submit(collect, analyzer, "ENDTAPE")
        assert source.command("BEGINTAPE:35:1") == "OK:BEGINTAPE"
        for i in range(3):  # one batch in each of three consecutive intervals
            second = int(time.time())
            source.send_batch(payloads(100, start=100 * i, run=35))
            wait_for(lambda: int(time.time()) > second, 3, "the next interval")
        source.send_command("ENDTAPE")
        data, _ = reading.result(10)
        assert len(data) == 300
        analyzer.finished()
        source.wait_command("ALLFINISHED", timeout=10.0)
    got = wait_for(lambda: (g := get_run(redis_client, 35)) and g["source_events"] == 300 and g, 10, "the accounting")
    rows = got["intervals"]
    assert len(rows) >= 2 and all(r["stop"] - r["start"] == 1 for r in rows)
    assert [r["start"] for r in rows] == sorted(r["start"] for r in rows)
    assert sum(r["source_events"] for r in rows) == got["source_events"] == 300
    (name,) = {name for r in rows for name in r["sent"]}  # the one analyzer, by its program name
    assert name == "minard_dispatch_push"
    assert sum(r["sent"].get(name, 0) for r in rows) == got["dispatched"] == 300
    assert sum(r["dropped"] for r in rows) == got["dropped"] == 0


def test_a_run_taken_again_before_its_check_is_checked_when_it_ends_not_while_its_events_fly(
        disp, redis_client, tmp_path):
    """Measured on the bundled stack's looping replay: each new pass over run 1000 was alarmed
    as '885 events unaccounted' (its newest events on their way to Redis), 26 times in 10 min."""
    def alarmed():
        return [a for a in alarms.list_alarms(redis_client) if a["message"].startswith("run 33:")]

    def tape(source, analyzer, pool, number, before_end=lambda: None):
        reading = pool.submit(collect, analyzer, "ENDTAPE")
        assert source.command(f"BEGINTAPE:33:{number}") == "OK:BEGINTAPE"
        source.send_batch(payloads(100, start=100 * number, run=33))
        before_end()
        source.send_command("ENDTAPE")
        assert len(reading.result(10)[0]) == 100
        analyzer.finished()
        source.wait_command("ALLFINISHED", timeout=10.0)

    def still_open():
        wait_for(lambda: "run 33 is being taken again" in log.read_text(), 10, "the skipped check")
        assert not alarmed()

    log = tmp_path / "dispatcher.log"
    with DispatchClient.connect(disp.address, "analyzer", timeout=5.0) as analyzer, \
            DispatchClient.connect(disp.address, "source", timeout=5.0) as source, \
            ThreadPoolExecutor(1) as pool:
        tape(source, analyzer, pool, 1)
        tape(source, analyzer, pool, 2, still_open)
    alarm = wait_for(alarmed, 10, "the check at the run's end")
    assert "run 33: 200 events unaccounted" in alarm[0]["message"]
