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
import os
import signal
import socket

import pytest
import redis as redis_py
from test_dispatch_stream import Stack, settled_run, synthetic
from test_orca_stream import BASE_ID, CMOS_ID, write_chunks
from test_orca_stream import Stack as OrcaStack

from minard.dispatcher.client import DispatchClient
from minard.formats import orca
from minard.formats.pmt import pack_dispatch
from minard.formats.zdab import read_events
from minard.simulate.orca import OrcaSimulator
from minard.store import status
from minard.store.runs import get_run
from minard.testing import RedisServer, wait_for, wait_settled
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
    through the journal read back by the restarted dispatcher.  The push is stopped
    (SIGSTOP) meanwhile, so the dispatcher dies with events queued for it."""
    n, run = 24000, 2300
    records = [pack_dispatch(r) for r in read_events(synthetic(tmp_path / "disp.zdab", n=n, seed=17, run=run))]
    stack = Stack(cfg, tmp_path, redis_url, dispatch_workers=1)
    stack.dispatcher = DispatcherProcess(
        stack.port, tmp_path / "dispatcher.log", redis_url=redis_url,
        dispatcher_accounting_dir=tmp_path / "acct", dispatcher_accounting_period=600)
    stack.start()
    try:
        push = stack.procs["push"].pid
        os.kill(push, signal.SIGSTOP)
        source = send_run(stack.dispatcher.address, run, records[:n // 2])
        assert (get_run(redis_client, run) or {}).get("source_events") in (None, 0)  # not written yet
        stack.dispatcher.proc.kill()  # mid-run: its analyzer queue may still hold events
        stack.dispatcher.proc.wait(10)
        os.kill(push, signal.SIGCONT)
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
        assert lost > 0, "the kill lost nothing: the test did not test anything"
        assert got["source_events"] == n
        assert got["dropped"] + got["unaccounted"] == lost
        assert "recovered the counts of runs [2300]" in stack.dispatcher.log_text()
    finally:
        stack.stop()


def test_kill_9_of_redis_mid_run_loses_nothing_the_held_flushes_are_written_after_the_restart(cfg, tmp_path):
    """Redis with its append-only file, as the stack runs it: killed mid-run, started
    again on the same files, every writer reconnects; the pull workers hold the flushes
    Redis refused meanwhile and write them after the restart (minard.store.slots), so the
    run is complete and nothing is dropped or unaccounted."""
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
        assert got["source_events"] == n
        assert got["events"] == n and got["dropped"] == 0 and got["unaccounted"] == 0, got
        assert "held for a retry" in pull_log.read_text(errors="replace")
        wait_for(lambda: stack.status("minard_dispatch_push").get("connected") == "1", 10, "push beats again")
    finally:
        stack.stop()
        client.close()
        server.close()


# ------------------------------------------------------------------ the ORCA stream

class OrcaSource:
    """ORCA's data port, driven by the test: a client gets the run's header record
    first (as from ORCA, ORCA_FORMAT.md §1), then the records the test sends."""

    def __init__(self, port: int, header: bytes):
        self.header = header
        self.listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.conn: socket.socket | None = None

    def accept(self, timeout: float = 30.0) -> None:
        """Take the producer's (next) connection and send it the header."""
        if self.conn is not None:
            self.conn.close()
        self.listener.settimeout(timeout)
        self.conn, _ = self.listener.accept()
        self.conn.sendall(self.header)

    def send(self, records) -> None:
        self.conn.sendall(b"".join(r.raw for r in records))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def orca_counts(stack):
    """The ORCA accounting of the stage counters (``minard stats --orca``)."""
    return status.orca_accounting(status.stats(stack.redis))


def wait_read(stack, want: dict, what: str):
    """Until data_producer's counters show it read *want* ({stream: records})."""
    wait_for(lambda: all(orca_counts(stack)[s]["received"] == n for s, n in want.items()), 30,
             f"data_producer read {want} ({what})")


def settled_orca(stack, quiet=2.5, timeout=60):
    """The ORCA accounting once every pool's counters balance and stop moving for *quiet* s."""
    def snapshot():
        s = status.stats(stack.redis)
        balanced = all(s.get(k, {}).get("received", 0) == sum(s.get(k, {}).get(c, 0) for c in
                       ("processed", "errors", "dropped")) for k in ("cmos", "base"))
        return balanced, status.orca_accounting(s)
    return wait_settled(snapshot, quiet, timeout, "the ORCA counters", ready=lambda got: got[0])[1]


def _kill(stack, name):
    proc = stack.procs.pop(name)
    proc.kill()
    proc.wait(10)


@pytest.mark.parametrize("victim", ["producer", "cmos", "base"])
def test_kill_9_of_an_orca_process_mid_run_every_lost_reading_is_counted_or_unaccounted_exactly(
        cfg, tmp_path, victim):
    """For ORCA readings, lost = records of the stream ORCA sent - records stored; the
    stage counters say ``dropped`` and ``unaccounted`` (status.orca_accounting).

    The producer is killed holding a batch it has not sent (a long ``orca_batch_ms``);
    a consumer pool manager is killed stopped (SIGSTOP) with batches waiting for it in
    ZMQ.  Both are restarted as supervisord would; ORCA sends the rest of the run."""
    sim = OrcaSimulator(29, cmos_id=CMOS_ID, base_id=BASE_ID, poll_period=0.25, crates=[1, 4, 9])
    path = write_chunks(tmp_path / "run.orca", sim.stream(6.0))
    records = list(orca.read_file(path))
    header = next(r for r in records if r.kind == "header")
    data = [r for r in records if r.kind in ("cmos", "base")]
    half = len(data) // 2
    sent = {s: sum(r.kind == s for r in data) for s in ("cmos", "base")}
    first = {s: sum(r.kind == s for r in data[:half]) for s in ("cmos", "base")}
    batching = {"orca_batch_ms": 600_000, "orca_batch_records": 100_000} if victim == "producer" else \
        {"orca_batch_ms": 1, "orca_batch_records": 2}
    stack = OrcaStack(cfg, tmp_path, **batching)
    source = OrcaSource(stack.port, header.raw)
    try:
        stack.start_all()
        source.accept()
        if victim != "producer":
            os.kill(stack.procs[victim].pid, signal.SIGSTOP)  # its batches wait in ZMQ
        source.send(data[:half])
        wait_read(stack, first, "the first half")
        if victim != "producer":
            wait_for(lambda: status.stats(stack.redis)["orca_producer"].get(victim, 0) > 0, 30,
                     f"batches pushed towards the stopped {victim} pool")
        _kill(stack, victim)
        if victim == "producer":
            stack.start("producer")
            source.accept()
        else:
            stack.start(victim, "--stream", victim)
        stack.wait_consumers()
        source.send(data[half:])
        wait_read(stack, sent, "the whole run")
        if victim == "producer":
            stack.stop("producer")  # SIGTERM: the restarted producer hands on its batch
        got = settled_orca(stack)
        for stream in ("cmos", "base"):
            acct = got[stream]
            lost = sent[stream] - acct["stored"]  # records ORCA sent minus records stored
            assert acct["received"] == sent[stream]
            assert acct["dropped"] + acct["unaccounted"] == lost, (stream, acct)
            if stream == victim or victim == "producer":
                assert lost > 0, f"the kill lost no {stream} reading: the test did not test anything"
            else:
                assert lost == 0, (stream, acct)
    finally:
        source.close()
        stack.close()
