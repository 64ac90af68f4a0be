"""``minard replay`` and ``minard record`` as real processes around a real dispatcher.

The round trip file -> replay -> dispatcher -> record -> file must give the
same records, byte for byte.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minard.dispatcher.client import DispatchClient, query
from minard.dispatcher.recorder import Recorder
from minard.dispatcher.replay import Pacer, peek
from minard.formats import pmt
from minard.formats.framing import Frame
from minard.testing import stop_pid, wait_for
from minard.testing.dispatcher import DispatcherProcess

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[2]


def zdab():
    """minard.formats.zdab (written alongside this module), imported when needed."""
    from minard.formats import zdab as module

    return module


def read_records(paths) -> list[bytes]:
    out = []
    for path in sorted(paths, key=lambda p: [int(x) for x in Path(p).stem.split("_")[1:]]):
        out.extend(bytes(r) for r in zdab().read_events(str(path)))
    return out


def write_file(path: Path, records) -> Path:
    with zdab().ZdabWriter(str(path)) as writer:
        for record in records:
            writer.write_event(record)
    return path


def make_events(n: int, run: int = 1, start: int = 0, clock_step: int = 1000) -> list[bytes]:
    rng = np.random.default_rng(run)
    out = []
    for i in range(start, start + n):
        k = int(rng.poisson(40))
        hits = {"crate": rng.integers(0, 19, k), "card": rng.integers(0, 16, k),
                "channel": rng.integers(0, 32, k), "qhs": rng.integers(0, 4096, k)}
        out.append(pmt.encode_event(run=run, evnum=i, gtid=i + 1, trigger_word=1,
                                    clock10=1_000_000 + i * clock_step, hits=hits))
    return out


@pytest.fixture
def disp(cfg, tmp_path):
    proc = DispatcherProcess(log_path=tmp_path / "dispatcher.log", redis_url=cfg["redis_url"],
                             dispatcher_accounting_dir=cfg["dispatcher_accounting_dir"],
                             dispatcher_finished_timeout=5, dispatcher_shutdown_wait=0.3)
    yield proc.start()
    proc.stop()


@pytest.fixture
def run_cli(tmp_path):
    """Start ``python -m minard.cli ...`` subprocesses; stopped by pid at the end."""
    procs = []

    def start(*args, name="cli") -> subprocess.Popen:
        log = open(tmp_path / f"{name}-{len(procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "minard.cli", *map(str, args)],
                                stdout=log, stderr=log, cwd=ROOT, env=dict(os.environ))
        log.close()
        proc.log_path = tmp_path / f"{name}-{len(procs)}.log"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop_pid(proc)


def wait_for_clients(address: str, role: str, n: int = 1, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with DispatchClient.connect(address, "control") as c:
            if sum(1 for x in c.stats()["clients"] if x["role"] == role) >= n:
                return
        assert time.monotonic() < deadline, f"no {role} connected"
        time.sleep(0.05)


def replay(run_cli, address, *files, extra=()):
    proc = run_cli("replay", *files, "--dispatcher", address, "--speed", "max",
                   "--no-progress", *extra, name="replay")
    assert proc.wait(60) == 0, Path(proc.log_path).read_text()
    return proc


def start_recorder(run_cli, address, out: Path, *extra):
    proc = run_cli("record", "--dispatcher", address, "--out", out, *extra, name="record")
    wait_for_clients(address, "writer")
    return proc


def stop_recorder(proc, runs: int = 1) -> None:
    """Wait until the recorder has handled *runs* ENDTAPEs, then SIGTERM it."""
    deadline = time.monotonic() + 20
    while Path(proc.log_path).read_text().count(" INFO ENDTAPE run ") < runs:
        assert time.monotonic() < deadline, Path(proc.log_path).read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0, Path(proc.log_path).read_text()


# --------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------

def test_demo_file_replayed_into_a_recorder_gives_identical_records(disp, run_cli, tmp_path, demo_zdab):
    out = tmp_path / "rec"
    recorder = start_recorder(run_cli, disp.address, out)
    replay(run_cli, disp.address, demo_zdab)
    stop_recorder(recorder)
    assert [p.name for p in out.iterdir()] == ["run_3510_1_0.zdab"]
    original = [bytes(r) for r in zdab().read_events(str(demo_zdab))]
    assert len(original) == 1
    assert read_records(out.iterdir()) == original


def test_large_synthetic_file_survives_record_replay_record_byte_identical(disp, run_cli, tmp_path):
    from minard.simulate.events import generate_events, write_zdab

    source = tmp_path / "synthetic.zdab"
    write_zdab(source, generate_events(7, 20000, run=200), progress=False)
    original = [bytes(r) for r in zdab().read_events(str(source))]
    assert len(original) == 20000
    first, second = tmp_path / "first", tmp_path / "second"
    recorder = start_recorder(run_cli, disp.address, first)
    replay(run_cli, disp.address, source)
    stop_recorder(recorder)
    assert read_records(first.iterdir()) == original
    recorder = start_recorder(run_cli, disp.address, second)
    replay(run_cli, disp.address, *sorted(first.iterdir()), extra=["--per-record"])  # as the DAQ frames them
    stop_recorder(recorder)
    assert read_records(second.iterdir()) == original
    stats = DispatchClient.connect(disp.address).stats()
    assert stats["dropped_events"] == 0 and stats["runs_ended"] == 2


def test_replay_begins_a_new_tape_when_the_run_number_changes(disp, run_cli, tmp_path):
    path = write_file(tmp_path / "two_runs.zdab", make_events(30, run=100) + make_events(20, run=101))
    out = tmp_path / "rec"
    recorder = start_recorder(run_cli, disp.address, out)
    with DispatchClient.connect(disp.address, "analyzer", timeout=10) as analyzer:
        proc = run_cli("replay", path, "--dispatcher", disp.address, "--speed", "max",
                       "--no-progress", "--tape", 4, name="replay")
        commands, events = [], 0
        while len([c for c in commands if c == "ALLFINISHED"]) < 2:
            frame = analyzer.recv(10)
            assert frame is not None, commands
            if frame.tag == "RAWDATA":
                events += 1
            elif not frame.text.startswith("OK:"):  # OK:FINISHED replies
                commands.append(frame.text)
                if frame.text == "ENDTAPE":
                    analyzer.finished()
        assert proc.wait(30) == 0
    assert commands == ["BEGINTAPE:100:4", "ENDTAPE", "ALLFINISHED",
                        "BEGINTAPE:101:4", "ENDTAPE", "ALLFINISHED"]
    assert events == 50
    stop_recorder(recorder, runs=2)
    assert sorted(p.name for p in out.iterdir()) == ["run_100_4_0.zdab", "run_101_4_0.zdab"]
    assert len(read_records([out / "run_101_4_0.zdab"])) == 20


def test_replay_run_option_overrides_the_run_in_the_data(disp, run_cli, tmp_path):
    path = write_file(tmp_path / "two_runs.zdab", make_events(5, run=100) + make_events(5, run=101))
    out = tmp_path / "rec"
    recorder = start_recorder(run_cli, disp.address, out)
    replay(run_cli, disp.address, path, extra=("--run", 555, "--tape", 2))
    stop_recorder(recorder)
    assert [p.name for p in out.iterdir()] == ["run_555_2_0.zdab"]
    assert len(read_records(out.iterdir())) == 10


def test_recorder_rotates_files_at_max_bytes_without_losing_records(disp, run_cli, tmp_path):
    events = make_events(300, run=9)
    path = write_file(tmp_path / "in.zdab", events)
    out = tmp_path / "rec"
    recorder = start_recorder(run_cli, disp.address, out, "--max-bytes", 40000)
    replay(run_cli, disp.address, path)
    stop_recorder(recorder)
    names = sorted(p.name for p in out.iterdir())
    assert len(names) >= 3 and all(n.startswith("run_9_1_") for n in names)
    assert read_records(out.iterdir()) == events


def test_recorder_reconnects_when_the_dispatcher_restarts(cfg, run_cli, tmp_path):
    first = DispatcherProcess(log_path=tmp_path / "d1.log", redis_url="").start()
    out = tmp_path / "rec"
    recorder = start_recorder(run_cli, first.address, out)
    assert query(first.address, "EXIT") == "OK:EXIT"
    first.wait(5)
    second = DispatcherProcess(port=first.port, log_path=tmp_path / "d2.log", redis_url="").start()
    try:
        wait_for_clients(second.address, "writer", timeout=15)
        events = make_events(10, run=12)
        replay(run_cli, second.address, write_file(tmp_path / "in.zdab", events))
        stop_recorder(recorder)
        assert read_records(out.iterdir()) == events
    finally:
        second.stop()


def test_recorder_exits_on_quit_from_a_dispatcher_shutdown(disp, run_cli, tmp_path):
    recorder = start_recorder(run_cli, disp.address, tmp_path / "rec")
    assert query(disp.address, "SHUTDOWN") == "OK:SHUTDOWN"
    assert recorder.wait(10) == 0
    assert disp.wait(10) == 0


def events_to_endtape(analyzer) -> int:
    """As an analyzer: the events received up to ENDTAPE, which is answered with FINISHED."""
    events = 0
    while True:
        frame = analyzer.recv(10)
        if frame.tag == "RAWDATA":
            events += 1
        elif frame.text == "ENDTAPE":
            analyzer.finished()
            return events


def test_replay_answers_quit_by_ending_the_run_early(disp, run_cli, tmp_path):
    path = write_file(tmp_path / "slow.zdab", make_events(2000, run=77))
    with DispatchClient.connect(disp.address, "analyzer", timeout=10) as analyzer:
        proc = run_cli("replay", path, "--dispatcher", disp.address, "--rate", 500,
                       "--no-progress", name="replay")
        assert analyzer.wait_command("BEGINTAPE:77:1", 10)
        time.sleep(0.3)
        assert query(disp.address, "SHUTDOWN") == "OK:SHUTDOWN"
        events = events_to_endtape(analyzer)
        assert analyzer.wait_command("QUIT", 10)
    assert proc.wait(10) == 0
    assert 50 < events < 2000
    assert disp.wait(10) == 0
    assert "QUIT from the dispatcher" in Path(proc.log_path).read_text()


def test_replay_waits_for_an_analyzer_before_its_first_event_so_none_is_lost(disp, run_cli, tmp_path):
    """``minard up`` starts the replay with its analyzer: events sent to none would count as lost."""
    path = write_file(tmp_path / "wait.zdab", make_events(300, run=78))
    proc = run_cli("replay", path, "--dispatcher", disp.address, "--speed", "max", "--no-progress",
                   "--wait-analyzers", "1", name="replay")
    wait_for(lambda: "waiting for 1 analyzer(s)" in Path(proc.log_path).read_text(), 20, "the replay waiting")
    with DispatchClient.connect(disp.address, "control") as control:
        assert control.stats()["state"] == "NoTape"  # nothing sent while no analyzer listens
    with DispatchClient.connect(disp.address, "analyzer", timeout=10) as analyzer:
        assert analyzer.wait_command("BEGINTAPE:78:1", 10)
        events = events_to_endtape(analyzer)
    assert proc.wait(20) == 0, Path(proc.log_path).read_text()
    assert events == 300


def test_replay_at_a_fixed_rate_takes_the_expected_time(disp, run_cli, tmp_path):
    path = write_file(tmp_path / "in.zdab", make_events(200, run=3))
    t0 = time.monotonic()
    replay(run_cli, disp.address, path, extra=("--rate", 400))
    assert 0.45 < time.monotonic() - t0 < 5


def test_replay_paced_by_the_event_clock(disp, run_cli, tmp_path):
    # 100 events 10 ms apart on the 10 MHz clock: ~1 s of data.
    path = write_file(tmp_path / "in.zdab", make_events(100, run=4, clock_step=100_000))
    durations = {}
    for speed in ("1x", "10x"):
        t0 = time.monotonic()
        proc = run_cli("replay", path, "--dispatcher", disp.address, "--speed", speed,
                       "--no-progress", name="replay")
        assert proc.wait(30) == 0
        durations[speed] = time.monotonic() - t0
    assert durations["1x"] > 0.95
    assert durations["1x"] - durations["10x"] > 0.6


# --------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------

def test_pacer_follows_the_clock_scaled_by_speed_and_survives_jumps():
    pacer = Pacer(speed=2.0, rate=None)
    t0 = pacer.due(10_000_000)
    assert pacer.due(10_000_000 + 10_000_000) - t0 == pytest.approx(0.5)  # 1 s of data at 2x
    assert pacer.due(0) - t0 == pytest.approx(0.5)  # an orphan goes with its neighbour
    backwards = pacer.due(5)  # clock went back: no waiting, pacing restarts here
    assert backwards - t0 == pytest.approx(0.5)
    assert pacer.due(5 + 2_000_000) - t0 == pytest.approx(0.6)
    jump = pacer.due(5 + 2_000_000 + 10**10)  # 1000 s gap: not waited for
    assert jump - t0 == pytest.approx(0.6)
    rate = Pacer(speed=1.0, rate=100)
    r0 = rate.due(0)
    assert [round(rate.due(0) - r0, 6) for _ in range(3)] == [0.01, 0.02, 0.03]
    assert Pacer(None, None).due(123) <= time.monotonic()


def test_peek_reads_run_gtid_and_clock_from_the_record_header():
    record = pmt.encode_event(run=3510, evnum=1, gtid=0xDE95, trigger_word=5, clock10=(7 << 32) + 99)
    assert peek(record) == (3510, 0xDE95, (7 << 32) + 99)
    header = pmt.decode_header(record)
    assert peek(record) == (header["run"], header["gtid"], header["clock10"])


def test_peek_keeps_the_previous_values_for_a_record_too_short_to_read():
    assert peek(b"\x00" * 20, (1234, 99, 555)) == (1234, 99, 555)


def test_recorder_builds_file_names_from_integers_only(tmp_path):
    recorder = Recorder(tmp_path / "out", max_bytes=10**9)
    recorder.handle(Frame("CMD", b"BEGINTAPE:../../etc:1"))  # malformed: ignored
    recorder.handle(Frame("CMD", b"BEGINTAPE:00042:0003"))
    recorder.handle(Frame("RAWDATA", pmt.pack_dispatch(make_events(1, run=42)[0])))
    recorder.handle(Frame("RAWDATA", b"garbage"))  # a bad record is skipped, not fatal
    recorder.handle(Frame("CMD", b"ENDTAPE"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["run_42_3_0.zdab"]
    assert recorder.events == 1 and recorder.skipped == 1 and recorder.writer is None


def test_recorder_stores_other_records_as_banks_of_their_name(tmp_path):
    recorder = Recorder(tmp_path)
    recorder.handle(Frame("CMD", b"BEGINTAPE:8:1"))
    recorder.handle(Frame("RECHDR", pmt.pack_rechdr("RHDR", bytes(range(16)))))
    event = make_events(1, run=8)[0]
    recorder.handle(Frame("RAWDATA", pmt.pack_dispatch(event)))
    recorder.handle(Frame("CMD", b"ENDTAPE"))
    with zdab().ZdabReader(tmp_path / "run_8_1_0.zdab") as reader:
        banks = [(b.name, bytes(b.data)) for b in reader.banks() if b.name != "MAST"]
    assert banks == [("RHDR", bytes(range(16))), ("ZDAB", event)]
    assert recorder.banks == 1 and recorder.events == 1


def test_recorder_never_overwrites_an_existing_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_5_1_0.zdab").write_bytes(b"keep me")
    recorder = Recorder(out)
    recorder.handle(Frame("CMD", b"BEGINTAPE:5:1"))
    recorder.handle(Frame("RAWDATA", pmt.pack_dispatch(make_events(1, run=5)[0])))
    recorder.handle(Frame("CMD", b"ALLFINISHED"))
    assert (out / "run_5_1_0.zdab").read_bytes() == b"keep me"
    assert (out / "run_5_1_1.zdab").exists()


def test_send_command_prints_the_reply(disp):
    out = subprocess.run([sys.executable, "-m", "minard.cli", "send", "--dispatcher", disp.address,
                          "ANALYZERS?"], capture_output=True, text=True, cwd=ROOT, timeout=30, check=False)
    assert out.returncode == 0 and out.stdout == "ANALYZERS:\nEND\n"
    bad = subprocess.run([sys.executable, "-m", "minard.cli", "send", "--dispatcher", disp.address,
                          "NOPE"], capture_output=True, text=True, cwd=ROOT, timeout=30, check=False)
    assert bad.returncode == 1 and bad.stdout.startswith("ERROR:unknown command")
