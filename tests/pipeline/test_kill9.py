"""kill -9 mid-run of the processes the dispatch-stream tests do not kill (issue 13).

Each test runs the real processes, kills one with SIGKILL in the middle of a
run, restarts it as supervisord would, and checks the run's accounting
against the file's own contents: what was lost (events of the file minus
events stored) equals what was counted (``dropped``) plus what no counter saw
(``unaccounted``), exactly.  The push, the pull manager and a pull worker are
killed in ``test_dispatch_stream.py``.
"""

from __future__ import annotations

import json

import pytest
import redis as redis_py
from test_dispatch_stream import Stack, settled_run, synthetic

from minard.dispatcher.client import DispatchClient
from minard.formats.pmt import pack_dispatch
from minard.formats.zdab import read_events
from minard.store.runs import get_run
from minard.testing import RedisServer, wait_for
from minard.testing.dispatcher import DispatcherProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def analyzers(source: DispatchClient) -> list[dict]:
    """The analyzer connections of the dispatcher, from its STATS? reply."""
    return [c for c in json.loads(source.command("STATS?").partition(":")[2]).get("clients", [])
            if c.get("role") == "analyzer"]


def send_run(address: str, run: int, records: list[bytes], batch: int = 500) -> DispatchClient:
    """Connect as the data source, BEGINTAPE *run*, send *records* in RAWBATCHes.

    Returns once the dispatcher has read every one of them: it answers a
    STATS? sent after them, and it reads a connection's frames in order.
    """
    source = DispatchClient.connect(address, "source", timeout=10.0)
    assert source.command(f"BEGINTAPE:{run}:1") == "OK:BEGINTAPE"
    for i in range(0, len(records), batch):
        source.send_batch(records[i:i + batch])
    source.command("STATS?")
    return source


def test_kill_9_of_the_dispatcher_mid_run_loses_none_of_its_counts(cfg, tmp_path, redis_url, redis_client):
    """The dispatcher's counts not yet in Redis survive in its journal: with a write
    period longer than the test, every count of the first half reaches Redis only
    through the journal read back by the restarted dispatcher."""
    n, run = 12000, 2300
    records = [pack_dispatch(r) for r in read_events(synthetic(tmp_path / "disp.zdab", n=n, seed=17, run=run))]
    stack = Stack(cfg, tmp_path, redis_url, dispatch_workers=1)
    stack.dispatcher = DispatcherProcess(
        stack.port, tmp_path / "dispatcher.log", redis_url=redis_url,
        dispatcher_accounting_dir=tmp_path / "acct", dispatcher_accounting_period=600)
    stack.start()
    try:
        source = send_run(stack.dispatcher.address, run, records[:n // 2])
        assert (get_run(redis_client, run) or {}).get("source_events") in (None, 0)  # not written yet
        stack.dispatcher.proc.kill()  # mid-run: its analyzer queue may still hold events
        stack.dispatcher.proc.wait(10)
        source.close()
        stack.dispatcher.start(timeout=30)
        probe = DispatchClient.connect(stack.dispatcher.address, "source", timeout=10.0)
        wait_for(lambda: analyzers(probe), 30, "the push reconnected to the restarted dispatcher")
        probe.close()
        source = send_run(stack.dispatcher.address, run, records[n // 2:])
        source.send_command("ENDTAPE")
        source.wait_command("ALLFINISHED", timeout=60)
        source.close()

        wait_for(lambda: (get_run(redis_client, run) or {}).get("source_events") == n, 30,
                 "the accounting of both halves of the run")
        got = settled_run(redis_client, run)
        lost = n - got["events"]  # the file's own count minus what reached Redis
        assert got["source_events"] == n
        assert got["dropped"] + got["unaccounted"] == lost
        assert "recovered the counts of runs [2300]" in stack.dispatcher.log_text()
    finally:
        stack.stop()


def test_kill_9_of_redis_mid_run_what_the_restart_lost_is_counted_against_the_run(cfg, tmp_path):
    """Redis with its append-only file, as the stack runs it: killed mid-run, started
    again on the same files, every writer reconnects; the aggregates of the flushes
    Redis refused meanwhile are counted against the run (``pull_redis_down``)."""
    n, run = 8000, 2400
    path = synthetic(tmp_path / "redis.zdab", n=n, seed=19, run=run)
    server = RedisServer(appendonly=True).start()
    client = redis_py.Redis.from_url(server.url)
    stack = Stack(cfg, tmp_path, server.url, dispatch_workers=2)
    try:
        stack.start()
        replay = stack.replay(path, "--rate", "2000", wait=False)
        wait_for(lambda: stack.pull_stats().get("processed", 0) > 1500, 30, "data flowing")
        server.proc.kill()
        server.proc.wait(10)
        server.proc = None
        pull_log = tmp_path / "pull.log"
        wait_for(lambda: "Redis write failed" in pull_log.read_text(errors="replace"), 30,
                 "a pull worker's flush refused")
        server.start()  # the same port and append-only file
        assert replay.wait(60) == 0

        wait_for(lambda: (get_run(client, run) or {}).get("source_events") == n, 30,
                 "the dispatcher's accounting of the whole run")
        got = settled_run(client, run)
        lost = n - got["events"]
        assert lost > 0, "the outage lost nothing: the test did not test anything"
        assert got["source_events"] == n
        assert got["dropped"] + got["unaccounted"] == lost
        assert got["dropped_by"].get("pull_redis_down", 0) > 0
        wait_for(lambda: stack.status("minard_dispatch_push").get("connected") == "1", 10, "push beats again")
    finally:
        stack.stop()
        client.close()
        server.close()
