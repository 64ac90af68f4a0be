"""The dispatcher's per-run event accounting in Redis, and the alarm on unaccounted events."""

from __future__ import annotations

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
                             dispatcher_finished_timeout=5, dispatcher_unaccounted_delay=0.5)
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
