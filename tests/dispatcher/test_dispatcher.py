"""The dispatcher as a real process on a real port: commands, run flow, flow control.

Every test starts its own ``minard dispatcher`` subprocess (stopped by pid) and
talks to it with the blocking client library over loopback TCP.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time

import numpy as np
import pytest

from minard.dispatcher.client import ConnectionClosed, DispatchClient
from minard.dispatcher.server import CommandError, ScalerRecord
from minard.formats import framing, pmt
from minard.testing.dispatcher import DispatcherProcess

pytestmark = pytest.mark.timeout(60)

HITS = {"crate": np.arange(40) % 19, "card": np.arange(40) % 16, "channel": np.arange(40) % 32}


def payloads(n: int, start: int = 0, run: int = 1) -> list[bytes]:
    """*n* 'PMT ' dispatch records of 40 hits (~536 bytes), EvNumber start..start+n-1."""
    base = bytearray(pmt.pack_dispatch(pmt.encode_event(
        run=run, evnum=0, gtid=0, trigger_word=1, hits=HITS)))
    out = []
    for i in range(start, start + n):
        struct.pack_into(">I", base, 12 + 8, i)  # EvNumber, record word 2
        out.append(bytes(base))
    return out


def evnum(payload: bytes) -> int:
    return struct.unpack_from(">I", payload, 20)[0]


@pytest.fixture
def start_dispatcher(start_dispatcher):
    """The shared starter (tests/conftest.py) with every command granted to every role.

    These tests are about what each command does; the role grants have their
    own tests (tests/dispatcher/test_auth.py).
    """
    every = {f"dispatcher_{role}_commands": "*" for role in ("source", "analyzer", "writer", "control")}

    def start(**settings) -> DispatcherProcess:
        return start_dispatcher(**{"log_level": "INFO", **every, **settings})

    return start


@pytest.fixture
def connect(disp):
    """Open clients to the default dispatcher; all closed at the end."""
    clients = []

    def open_client(role="control", name="", proc=None, **kwargs) -> DispatchClient:
        kwargs.setdefault("timeout", 5.0)
        client = DispatchClient.connect((proc or disp).address, role, name, **kwargs)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()


def collect(client: DispatchClient, until: str, timeout: float = 10.0):
    """Read frames until the CMD *until*; return (data payloads, command texts)."""
    data, cmds = [], []
    deadline = time.monotonic() + timeout
    while True:
        frame = client.recv(max(0.0, deadline - time.monotonic()))
        if frame is None:
            raise TimeoutError(f"no {until} within {timeout}s; got commands {cmds}")
        if frame.tag == "CMD":
            cmds.append(frame.text)
            if frame.text == until:
                return data, cmds
        else:
            data.append(frame.payload)


def begin(source: DispatchClient, run: int = 42, tape: int = 7) -> None:
    assert source.command(f"BEGINTAPE:{run}:{tape}") == "OK:BEGINTAPE"


def wait_state(control: DispatchClient, state: str, timeout: float = 5.0) -> None:
    """Poll STATS? until the dispatcher is in *state*."""
    deadline = time.monotonic() + timeout
    while control.stats()["state"] != state:
        assert time.monotonic() < deadline, f"dispatcher never reached {state}"
        time.sleep(0.02)


def wait_closed(client: DispatchClient, timeout: float = 5.0) -> None:
    """Assert that the dispatcher closes *client* within *timeout*."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed):
        while time.monotonic() < deadline:
            client.recv(0.1)
        raise AssertionError("connection still open")


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------

def test_dir_lists_every_command(connect):
    reply = connect().command("DIR?")
    assert reply.startswith("DIR:")
    assert set(reply[4:].split()) == {
        "ACCTREC", "ANALYZERS?", "BEGINTAPE", "BROADCAST", "DIR?", "DROP", "DUMP",
        "ENDTAPE", "EXIT", "FINISHED", "QUIT", "SCALERREC", "SCALERS?", "SCALERSUM",
        "SHUTDOWN", "STATS?"}


@pytest.mark.parametrize("text, error", [
    ("FOO", "unknown command"), ("analyzers?", "unknown command"),
    ("BEGINTAPE:1", "only a source"), ("DROP:abc", "usage DROP:isocket"),
    ("DROP:9999", "no client on socket 9999"), ("SCALERSUM:a=x", "not a number"),
    ("SCALERSUM:", "key=value"), ("SCALERSUM:run=3", "reserved"),
    ("SCALERREC:a=1", "spill=N"), ("BROADCAST:nowhere:QUIT", "unknown destination"),
    ("BROADCAST:all", "usage BROADCAST"), ("ACCTREC:", "needs data"),
    ("ENDTAPE", "only a source"), ("FINISHED", "only an analyzer"),
])
def test_unknown_and_malformed_commands_get_an_error_and_keep_the_connection(connect, text, error):
    client = connect()
    reply = client.command(text)
    assert reply.startswith("ERROR:") and error in reply
    assert client.command("ANALYZERS?") == "ANALYZERS:\nEND"


def test_source_commands_out_of_order_are_errors(connect):
    source = connect("source")
    assert "no tape is open" in source.command("ENDTAPE")
    begin(source)
    assert "still open" in source.command("BEGINTAPE:43:1")
    assert source.command("BEGINTAPE:x:1").startswith("ERROR:BEGINTAPE: usage")


def test_analyzers_reply_is_exactly_the_seed_format(connect):
    source = connect("source")
    a1, a2 = connect("analyzer", "one"), connect("analyzer", "two")
    connect("writer")
    begin(source)
    source.send_dispatch(payloads(25))
    for a in (a1, a2):
        data = []
        while len(data) < 25:
            frame = a.recv(5)
            if frame.tag == "RAWDATA":
                data.append(frame)
    reply = connect().command("ANALYZERS?")
    lines = reply.split("\n")
    assert lines[0] == "ANALYZERS:" and lines[-1] == "END" and len(lines) == 4
    for seq, (line, a) in enumerate(zip(lines[1:3], (a1, a2)), 1):
        port = a.sock.getsockname()[1]
        assert line == f"{seq} {a.socket_number} tcp/127.0.0.1:{port} 25"
        assert re.fullmatch(r"\d+ \d+ tcp/[\d.]+:\d+ \d+", line)


def test_scalerrec_for_a_spill_already_added_is_not_added_again(connect):
    a1, a2 = connect("analyzer"), connect("analyzer")
    assert a1.command("SCALERREC:spill=3,eos=10,bos=2") == "OK:SCALERREC:added"
    assert a2.command("SCALERREC:spill=3,eos=10,bos=2") == "OK:SCALERREC:duplicate"
    assert a2.command("SCALERREC:spill=4,eos=5") == "OK:SCALERREC:added"
    assert a1.command("SCALERS?") == "SCALERS:run=,tape=,spills=2,bos=2,eos=15"


def test_scalersum_adds_every_time_ints_and_floats(connect):
    a1, a2 = connect("analyzer"), connect("analyzer")
    assert a1.command("SCALERSUM:processed=10,rate=1.5") == "OK:SCALERSUM"
    assert a2.command("SCALERSUM: processed = 5 ,vetoed=1") == "OK:SCALERSUM"
    assert a1.command("SCALERS?") == "SCALERS:run=,tape=,spills=0,processed=15,rate=1.5,vetoed=1"


def test_scaler_record_parsing_rules():
    record = ScalerRecord(7, 1)
    record.add_sum("a=1,b=2.5")
    assert record.add_spill("spill=0,a=1") and not record.add_spill("spill=0,a=1")
    assert record.as_dict() == {"run": 7, "tape": 1, "spills": 1, "a": 2, "b": 2.5}
    for bad in ("a=1,a=2", "a=nan", "1a=2", "a", "a=1,,b=2", "spills=1"):
        with pytest.raises(CommandError):
            record.add_sum(bad)
    with pytest.raises(CommandError):
        record.add_spill("spill=-1,a=1")


def test_acctrec_appends_one_line_per_record_to_accounting_dat(connect, cfg):
    analyzer = connect("analyzer", "prod")
    assert analyzer.command("ACCTREC:events=100 rate=20Hz") == "OK:ACCTREC"
    assert analyzer.command("ACCTREC:events=200\tcpu=3") == "OK:ACCTREC"
    path = cfg.path("dispatcher_accounting_dir") / "Accounting.dat"
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    # The name is the program whose key the analyzer proved (docs/protocol.md 2.1).
    assert lines[0].endswith(
        f"\trun=-\tanalyzer:minard_dispatch_push#{analyzer.socket_number}\tevents=100 rate=20Hz")
    assert lines[1].endswith("\tevents=200 cpu=3")  # control characters are blanked


def test_broadcast_reaches_exactly_the_named_clients(connect):
    source = connect("source")
    begin(source)
    analyzers = [connect("analyzer"), connect("analyzer")]
    writer = connect("writer")
    control = connect()
    everyone = [source, *analyzers, writer]
    for a in analyzers + [writer]:
        collect(a, "BEGINTAPE:42:7")

    def received(client):
        return [f.text for f in client.poll() if f.tag == "CMD"]

    cases = [("analyzers", analyzers), ("writers", [writer]), ("source", [source]),
             ("all", everyone), (str(analyzers[1].socket_number), [analyzers[1]])]
    for to, expected in cases:
        reply = control.command(f"BROADCAST:{to}:HELLO THERE:{to}")
        assert reply == f"OK:BROADCAST:{len(expected)}"
        time.sleep(0.2)
        for client in everyone:
            got = [t for t in received(client) if t.startswith("HELLO THERE")]
            assert got == ([f"HELLO THERE:{to}"] if client in expected else []), (to, client.role)
    assert received(control) == []


def test_drop_closes_the_client_on_that_socket_only(connect):
    a1, a2 = connect("analyzer"), connect("analyzer")
    control = connect()
    assert control.command(f"DROP:{a1.socket_number}") == f"OK:DROP:{a1.socket_number}"
    wait_closed(a1)
    reply = control.command("ANALYZERS?")
    assert reply.count("\n") == 2 and f" {a2.socket_number} tcp/" in reply


def test_dump_writes_state_clients_and_queues_into_the_log(disp, connect):
    analyzer = connect("analyzer", "dumpme")
    assert connect().command("DUMP") == "OK:DUMP"
    time.sleep(0.2)
    text = disp.log_text()
    assert "DUMP state=NoTape" in text and "DUMP counters received_events=0" in text
    assert re.search(rf"DUMP client analyzer\[minard_dispatch_push\]#{analyzer.socket_number}"
                     " .*queued_events=0", text)


def test_stats_reply_is_one_json_line_with_global_and_per_client_counters(connect):
    source, analyzer = connect("source"), connect("analyzer")
    begin(source, 5, 1)
    source.send_dispatch(payloads(10))
    collect(analyzer, "BEGINTAPE:5:1")
    for _ in range(10):
        assert analyzer.recv(5).tag == "RAWDATA"
    reply = connect().command("STATS?")
    assert reply.startswith("STATS:") and "\n" not in reply
    stats = json.loads(reply[6:])
    assert stats["state"] == "Tape" and stats["run"] == 5
    assert stats["received_events"] == 10 and stats["dropped_events"] == 0
    mine = next(c for c in stats["clients"] if c["socket"] == analyzer.socket_number)
    assert mine["events_sent"] == 10 and mine["events_dropped"] == 0
    assert mine["bytes_sent"] >= 10 * (12 + len(payloads(1)[0]))


def test_client_quit_closes_only_its_own_connection(connect):
    control = connect()
    assert control.command("QUIT") == "OK:QUIT"
    wait_closed(control)
    assert connect().command("ANALYZERS?") == "ANALYZERS:\nEND"


def test_hello_with_an_unknown_role_is_refused_and_closed(disp):
    with socket.create_connection(("127.0.0.1", disp.port), timeout=5) as sock:
        sock.sendall(framing.encode_frame("HELLO", "superuser"))
        frames = read_until_closed(sock)
    assert frames and frames[0].text.startswith("ERROR:protocol: HELLO: unknown role")


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> list:
    """Every frame the server sends before closing *sock*."""
    sock.settimeout(timeout)
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return framing.decode_all(b"".join(chunks))
        chunks.append(data)


# --------------------------------------------------------------------------
# Run flow
# --------------------------------------------------------------------------

def test_full_run_flow_with_several_analyzers_and_a_writer(connect, redis_client):
    source = connect("source", "daq")
    analyzers = [connect("analyzer", f"a{i}") for i in range(3)]
    writer = connect("writer", "rec")
    begin(source, 42, 7)
    sent = payloads(500)
    source.send_dispatch(sent[:250])
    source.send_frame("RECHDR", pmt.pack_rechdr("TRIG", b"\0" * 8))
    source.send_dispatch(sent[250:])
    source.send_command("ENDTAPE")
    for i, a in enumerate(analyzers):
        data, cmds = collect(a, "ENDTAPE")
        assert cmds == ["BEGINTAPE:42:7", "ENDTAPE"]
        assert [d for d in data if d[:4] == b"PMT "] == sent and len(data) == 501
        assert a.command(f"SCALERREC:spill=1,eos={10 + i}") == (
            "OK:SCALERREC:added" if i == 0 else "OK:SCALERREC:duplicate")
        assert a.command("SCALERSUM:processed=500") == "OK:SCALERSUM"
        if i < 2:
            a.finished()
    time.sleep(0.3)
    assert not any(f.text == "ALLFINISHED" for f in source.poll()), "ALLFINISHED before the last FINISHED"
    analyzers[2].finished()
    for client in [source, *analyzers, writer]:
        collect(client, "ALLFINISHED")
    control = connect()
    wait_state(control, "NoTape")  # the scalers are flushed after ALLFINISHED
    assert control.command("SCALERS?") == "SCALERS:run=,tape=,spills=0"
    stored = {k.decode(): v.decode() for k, v in redis_client.hgetall("dispatcher:scalers:42").items()}
    assert stored["run"] == "42" and stored["tape"] == "7" and stored["spills"] == "1"
    assert stored["eos"] == "10" and stored["processed"] == "1500"
    assert redis_client.zscore("dispatcher:scaler_runs", "42") == 42
    begin(source, 43, 1)  # the next run can start


def test_writer_gets_begintape_events_endtape_and_allfinished_in_order(connect):
    source, writer = connect("source"), connect("writer")
    begin(source, 9, 2)
    sent = payloads(100)
    source.send_dispatch(sent)
    source.send_command("ENDTAPE")
    data, cmds = collect(writer, "ALLFINISHED")
    assert cmds == ["BEGINTAPE:9:2", "ENDTAPE", "ALLFINISHED"] and data == sent


def test_analyzer_that_never_sends_finished_is_dropped_after_the_timeout(start_dispatcher, connect):
    disp = start_dispatcher(dispatcher_finished_timeout=0.5)
    source = connect("source", proc=disp)
    good, silent = connect("analyzer", proc=disp), connect("analyzer", proc=disp)
    begin(source)
    source.send_dispatch(payloads(20))
    source.send_command("ENDTAPE")
    collect(good, "ENDTAPE")
    good.finished()
    collect(silent, "ENDTAPE")
    t0 = time.monotonic()
    collect(source, "ALLFINISHED")
    assert 0.3 < time.monotonic() - t0 < 3
    collect(good, "ALLFINISHED")
    wait_closed(silent)
    control = connect(proc=disp)
    wait_state(control, "NoTape")
    stats = control.stats()
    assert stats["finished_timeouts"] == 1 and stats["state"] == "NoTape"
    assert "sent no FINISHED within 0.5s" in disp.log_text()


def test_source_disconnecting_mid_tape_ends_the_run_as_if_it_sent_endtape(connect):
    source, analyzer, writer = connect("source"), connect("analyzer"), connect("writer")
    begin(source, 11, 1)
    sent = payloads(50)
    source.send_dispatch(sent)
    source.close()
    data, cmds = collect(analyzer, "ENDTAPE")
    assert data == sent
    analyzer.finished()
    collect(analyzer, "ALLFINISHED")
    data, cmds = collect(writer, "ALLFINISHED")
    assert data == sent and cmds == ["BEGINTAPE:11:1", "ENDTAPE", "ALLFINISHED"]
    new_source = connect("source")
    begin(new_source, 12, 1)


def test_second_source_begintape_is_ignored_and_that_client_disconnected(connect):
    first, second = connect("source", "first"), connect("source", "second")
    analyzer = connect("analyzer")
    begin(first, 1, 1)
    reply = second.command("BEGINTAPE:2:1")
    assert reply == "ERROR:BEGINTAPE: the dispatcher already has a data source"
    wait_closed(second)
    first.send_dispatch(payloads(5))
    first.send_command("ENDTAPE")
    data, cmds = collect(analyzer, "ENDTAPE")
    assert cmds == ["BEGINTAPE:1:1", "ENDTAPE"] and len(data) == 5


def test_data_from_a_client_that_is_not_the_source_is_rejected(connect):
    source, analyzer, other = connect("source"), connect("analyzer"), connect("analyzer")
    begin(source)
    other.send_dispatch(payloads(3))
    assert other.wait_command(lambda t: t.startswith("ERROR:data rejected"), 5)
    source.send_dispatch(payloads(2))
    source.send_command("ENDTAPE")
    data, _ = collect(analyzer, "ENDTAPE")
    assert len(data) == 2
    assert connect().stats()["rejected_events"] == 3


def test_analyzer_joining_mid_tape_is_told_the_current_run(connect):
    source = connect("source")
    begin(source, 77, 3)
    late = connect("analyzer")
    assert late.wait_command(lambda t: t.startswith("BEGINTAPE"), 5) == "BEGINTAPE:77:3"


# --------------------------------------------------------------------------
# SHUTDOWN, EXIT, SIGTERM
# --------------------------------------------------------------------------

def test_shutdown_without_a_run_exits_at_once(disp, connect):
    analyzer = connect("analyzer")
    assert connect().command("SHUTDOWN") == "OK:SHUTDOWN"
    assert analyzer.wait_command("QUIT", 5) == "QUIT"
    assert disp.wait(5) == 0


def test_shutdown_during_a_run_quits_the_source_then_the_others(start_dispatcher, connect):
    disp = start_dispatcher(dispatcher_shutdown_wait=1.0)
    source, analyzer = connect("source", proc=disp), connect("analyzer", proc=disp)
    writer = connect("writer", proc=disp)
    begin(source)
    source.send_dispatch(payloads(10))
    t0 = time.monotonic()
    assert connect(proc=disp).command("SHUTDOWN") == "OK:SHUTDOWN"
    assert source.wait_command("QUIT", 5) == "QUIT"
    assert disp.proc.poll() is None  # still running: the run is not over
    source.send_command("ENDTAPE")
    data, _ = collect(analyzer, "ENDTAPE")
    assert len(data) == 10
    analyzer.finished()
    collect(source, "ALLFINISHED")
    collect(analyzer, "ALLFINISHED")
    assert analyzer.wait_command("QUIT", 5) == "QUIT"
    data, cmds = collect(writer, "QUIT")
    assert cmds[-3:] == ["ENDTAPE", "ALLFINISHED", "QUIT"] and len(data) == 10
    assert disp.wait(10) == 0
    assert time.monotonic() - t0 >= 0.9  # the configured wait after QUIT


def test_shutdown_ends_the_run_itself_when_the_source_ignores_quit(start_dispatcher, connect):
    disp = start_dispatcher(dispatcher_finished_timeout=0.5, dispatcher_shutdown_wait=0.2)
    source, writer = connect("source", proc=disp), connect("writer", proc=disp)
    begin(source)
    connect(proc=disp).send_command("SHUTDOWN")
    source.wait_command("QUIT", 5)
    _, cmds = collect(writer, "QUIT")
    assert cmds == ["BEGINTAPE:42:7", "ENDTAPE", "ALLFINISHED", "QUIT"]
    assert disp.wait(10) == 0


def test_exit_terminates_immediately_even_during_a_run(start_dispatcher, connect):
    disp = start_dispatcher(dispatcher_shutdown_wait=30)
    source, analyzer = connect("source", proc=disp), connect("analyzer", proc=disp)
    begin(source)
    t0 = time.monotonic()
    connect(proc=disp).send_command("EXIT")
    assert disp.wait(5) == 0 and time.monotonic() - t0 < 3
    wait_closed(analyzer)


def test_sigterm_behaves_like_shutdown(disp, connect):
    source = connect("source")
    analyzer = connect("analyzer")
    begin(source)
    disp.proc.terminate()
    assert source.wait_command("QUIT", 5) == "QUIT"
    source.send_command("ENDTAPE")
    collect(analyzer, "ENDTAPE")
    analyzer.finished()
    collect(source, "ALLFINISHED")
    assert analyzer.wait_command("QUIT", 5) == "QUIT"
    assert disp.wait(10) == 0
    assert "SIGTERM: shutting down as for SHUTDOWN" in disp.log_text()


def test_redis_unreachable_keeps_the_scaler_record_in_the_log(start_dispatcher, connect):
    from minard.testing import free_port

    disp = start_dispatcher(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    source = connect("source", proc=disp)
    analyzer = connect("analyzer", proc=disp)
    begin(source, 5, 1)
    analyzer.command("SCALERSUM:x=3")
    source.send_command("ENDTAPE")
    collect(analyzer, "ENDTAPE")
    analyzer.finished()
    collect(source, "ALLFINISHED")
    control = connect(proc=disp)
    wait_state(control, "NoTape")
    assert control.stats()["redis_failures"] == 1
    text = disp.log_text()
    assert 'scaler record run 5: {"run": 5, "tape": 1, "spills": 0, "x": 3}' in text
    assert "cannot store the scaler record of run 5 in Redis" in text


# --------------------------------------------------------------------------
# Bad input on one connection
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bad, error", [
    (b"GET / HTTP/1.1\r\nHost: dispatcher\r\n\r\n", "invalid frame tag"),
    (framing.encode_header("RAWDATA", 2**31), "above the limit"),
    (framing.encode_frame("CMD", "SCALERS?")[:7], None),
    (framing.encode_frame("RAWDATA", b"x" * 100)[:60], None),
])
def test_bad_bytes_on_one_connection_close_only_that_connection(connect, disp, bad, error):
    source, analyzer = connect("source"), connect("analyzer")
    begin(source)
    with socket.create_connection(("127.0.0.1", disp.port), timeout=5) as sock:
        sock.sendall(framing.encode_frame("HELLO", "source:bad") + bad)
        if error:
            frames = read_until_closed(sock)
            assert frames[-1].text.startswith("ERROR:protocol:") and error in frames[-1].text
        else:
            time.sleep(0.1)  # a half frame: the server waits for the rest...
            sock.shutdown(socket.SHUT_WR)  # ...until the stream ends
            read_until_closed(sock)
    sent = payloads(30)
    source.send_dispatch(sent)
    source.send_command("ENDTAPE")
    data, _ = collect(analyzer, "ENDTAPE")
    assert data == sent
    if error:
        assert connect().stats()["protocol_errors"] == 1
    else:
        time.sleep(0.1)
        assert "stream ended inside a frame" in disp.log_text()


def test_unknown_tag_with_valid_framing_gets_an_error_and_the_connection_stays(connect):
    client = connect()
    client.send_frame("CMOSDATA", b"\0" * 8)
    assert client.wait_command(lambda t: t.startswith("ERROR:"), 5) == "ERROR:unknown frame tag 'CMOSDATA'"
    assert client.command("ANALYZERS?") == "ANALYZERS:\nEND"


# --------------------------------------------------------------------------
# Flow control
# --------------------------------------------------------------------------

def test_a_client_flooding_commands_without_reading_is_paused_not_buffered_forever(connect):
    flooder = connect(rcvbuf=16384)
    n = 100_000
    sender = threading.Thread(target=flooder.send_raw, args=(framing.command_frame("DIR?") * n,))
    sender.start()
    control = connect()
    deadline = time.monotonic() + 20
    while True:  # the server stops reading the flooder once its replies pile up
        mine = next(c for c in control.stats()["clients"] if c["socket"] == flooder.socket_number)
        if "replies" in mine["input_held"]:
            break
        assert time.monotonic() < deadline, mine
        time.sleep(0.05)
    assert mine["queued_bytes"] < 16 * 1024 * 1024
    assert control.command("ANALYZERS?") == "ANALYZERS:\nEND"  # others are still served
    replies = 0
    while replies < n:
        frame = flooder.recv(10)
        assert frame is not None and frame.text.startswith("DIR:ACCTREC ")
        replies += 1
    sender.join(10)


class Reader(threading.Thread):
    """Read a client's frames in the background until a command arrives."""

    def __init__(self, client: DispatchClient, until: str, reply_finished: bool = False,
                 delay: float = 0.0):
        super().__init__(daemon=True)
        self.client, self.until, self.reply_finished, self.delay = client, until, reply_finished, delay
        self.events: list[int] = []
        self.commands: list[str] = []
        self.error: BaseException | None = None

    def run(self):
        try:
            time.sleep(self.delay)
            while True:
                frame = self.client.recv(20)
                if frame is None:
                    raise TimeoutError("reader timed out")
                if frame.tag == "RAWDATA":
                    self.events.append(evnum(frame.payload))
                    continue
                self.commands.append(frame.text)
                if frame.text == "ENDTAPE" and self.reply_finished:
                    self.client.finished()
                if frame.text == self.until:
                    return
        except BaseException as exc:  # reported by the test
            self.error = exc

    def result(self, timeout: float = 30.0) -> list[int]:
        self.join(timeout)
        assert not self.is_alive(), "reader did not finish"
        if self.error:
            raise self.error
        return self.events


def test_slow_analyzer_loses_only_its_own_events_and_they_are_counted(start_dispatcher, connect):
    disp = start_dispatcher(dispatcher_analyzer_queue=1000)
    source = connect("source", proc=disp)
    fast = connect("analyzer", "fast", proc=disp)
    slow = connect("analyzer", "slow", proc=disp, rcvbuf=16384)
    writer = connect("writer", proc=disp)
    fast_reader = Reader(fast, "ALLFINISHED", reply_finished=True)
    writer_reader = Reader(writer, "ALLFINISHED")
    fast_reader.start(), writer_reader.start()
    begin(source)
    n = 20000
    sent = payloads(n)
    for i in range(0, n, 500):
        source.send_dispatch(sent[i:i + 500])
        time.sleep(0.005)
    source.send_command("ENDTAPE")
    # The fast analyzer has everything and ENDTAPE while the slow one has read nothing.
    deadline = time.monotonic() + 20
    while "ENDTAPE" not in fast_reader.commands and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "ENDTAPE" in fast_reader.commands
    by_socket = {c["socket"]: c for c in connect(proc=disp).stats()["clients"]}
    stats = {"fast": by_socket[fast.socket_number], "slow": by_socket[slow.socket_number]}
    assert stats["fast"]["events_dropped"] == 0 and stats["fast"]["events_sent"] == n
    assert stats["slow"]["events_dropped"] > 0
    slow_now = stats["slow"]
    assert slow_now["events_sent"] + slow_now["queued_events"] + slow_now["events_dropped"] == n
    slow_reader = Reader(slow, "ALLFINISHED", reply_finished=True)
    slow_reader.start()
    got = slow_reader.result()
    assert len(got) == n - slow_now["events_dropped"] and got == sorted(got)
    assert fast_reader.result() == list(range(n))
    assert writer_reader.result() == list(range(n))
    reply = connect(proc=disp).command("ANALYZERS?")
    assert f" {slow.socket_number} tcp/127.0.0.1:{slow.sock.getsockname()[1]} {len(got)}\n" in reply
    assert connect(proc=disp).stats()["dropped_events"] == slow_now["events_dropped"]


def test_slow_writer_back_pressures_the_source_and_nothing_is_lost(start_dispatcher, connect):
    disp = start_dispatcher(dispatcher_writer_queue=100)
    source = connect("source", proc=disp, sndbuf=65536)
    analyzer = connect("analyzer", proc=disp)
    writer = connect("writer", proc=disp, rcvbuf=16384)
    analyzer_reader = Reader(analyzer, "ALLFINISHED", reply_finished=True)
    writer_reader = Reader(writer, "ALLFINISHED", delay=1.5)
    analyzer_reader.start(), writer_reader.start()
    begin(source)
    n = 30000
    sent = payloads(n)
    t0 = time.monotonic()
    for i in range(0, n, 1000):
        source.send_dispatch(sent[i:i + 1000])
    elapsed = time.monotonic() - t0
    source.send_command("ENDTAPE")
    assert elapsed > 1.0, f"the source was not slowed down ({elapsed:.2f}s)"
    assert writer_reader.result() == list(range(n))
    assert analyzer_reader.result() == list(range(n))
    stats = connect(proc=disp).stats()
    assert stats["backpressure_pauses"] >= 1 and stats["dropped_events"] == 0


# --------------------------------------------------------------------------
# RAWBATCH (docs/protocol.md section 1)
# --------------------------------------------------------------------------

def test_rawbatch_goes_as_is_to_batch_clients_and_as_rawdata_frames_to_the_others(connect):
    source = connect("source")
    plain, batched = connect("analyzer", "plain"), connect("analyzer", "batched", batch=True)
    writer = connect("writer")
    begin(source, 5, 1)
    sent = payloads(300)
    source.send_batch(sent[:200])
    source.send_dispatch(sent[200:])
    source.send_command("ENDTAPE")
    for client in (plain, writer):
        data, _ = collect(client, "ENDTAPE")
        assert data == sent  # one RAWDATA frame each, byte for byte
    data, _ = collect(batched, "ENDTAPE")
    _, records, count = framing.split_rawbatch(data[0])
    assert count == 200 and bytes(records) == b"".join(sent[:200]) and data[1:] == sent[200:]
    for a in (plain, batched):
        a.finished()
    collect(source, "ALLFINISHED")
    by_socket = {c["socket"]: c for c in connect().stats()["clients"]}
    stats = {"plain": by_socket[plain.socket_number], "batched": by_socket[batched.socket_number]}
    assert stats["plain"]["events_sent"] == stats["batched"]["events_sent"] == 300
    assert stats["batched"]["batch"] and not stats["plain"]["batch"]


def test_a_malformed_rawbatch_is_rejected_counted_and_the_stream_goes_on(connect):
    source, analyzer = connect("source"), connect("analyzer")
    begin(source, 6, 1)
    source.send_dispatch(payloads(3))
    source.send_frame("RAWBATCH", (7).to_bytes(4, "big") + b"\0" * 12)
    source.send_dispatch(payloads(2, start=3))
    reply = source.wait_command(lambda t: t.startswith("ERROR:"), 5)
    assert reply.startswith("ERROR:RAWBATCH rejected: RAWBATCH says 7 records")
    source.send_command("ENDTAPE")
    data, _ = collect(analyzer, "ENDTAPE")
    assert [evnum(d) for d in data] == [0, 1, 2, 3, 4]
    assert connect().stats()["malformed_batches"] == 1


def test_hello_with_an_unknown_option_is_refused(disp):
    with socket.create_connection(("127.0.0.1", disp.port), timeout=5) as sock:
        sock.sendall(framing.encode_frame("HELLO", "analyzer:minard_dispatch_push:zip"))
        frames = read_until_closed(sock)
    assert len(frames) == 1 and "unknown option 'zip'" in frames[0].text
