"""``minard orca-replay``: a recorded ORCA stream served the way ORCA's Dispatcher does."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from minard.formats import orca
from minard.pipeline.orca_replay import OrcaReplay, parse_speed
from minard.simulate.orca import write_stream
from minard.testing import free_port

pytestmark = pytest.mark.timeout(60)
BIN = Path(sys.executable).parent


def connect(port, timeout=10.0):
    """Connect once the server listens (a probe would count as a client)."""
    end = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)


def read_all(sock, limit=None):
    """Bytes until the server closes (or *limit* bytes); (data, seconds from first byte)."""
    data = bytearray()
    first = None
    while limit is None or len(data) < limit:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        first = first or time.monotonic()
        data += chunk
    sock.close()
    return bytes(data), (time.monotonic() - first) if first else 0.0


def start(path, **options):
    replay = OrcaReplay(path, port=0, progress=False, **options)
    thread = threading.Thread(target=replay.serve, daemon=True)
    thread.start()
    return replay, thread


@pytest.fixture
def recorded(tmp_path):
    """A 1 s stream of 3 crates with garbage, sub-runs every 0.5 s and new ids at each."""
    path = tmp_path / "run.orca"
    sim = write_stream(path, 11, 1.0, progress=False, cmos_id=9 << 18, base_id=12 << 18, poll_period=0.1,
                       crates=3, garbage=3, subrun_period=0.5, new_ids_on_subrun=True)
    return path, sim


def test_parse_speed_accepts_factors_and_max():
    assert parse_speed("max") is None and parse_speed("1x") == 1.0 and parse_speed("2.5X") == 2.5
    for bad in ("0x", "-1x", "fast"):
        with pytest.raises(ValueError):
            parse_speed(bad)


def test_a_client_receives_the_file_verbatim_garbage_included(recorded):
    path, sim = recorded
    replay, thread = start(path, speed=None, wait=True)
    data, _ = read_all(connect(replay.port))
    thread.join(10)
    assert data == path.read_bytes() and sim.garbage_offsets
    assert replay.sent_bytes == len(data)


def test_a_client_connecting_mid_stream_gets_the_current_header_then_live_records(recorded):
    path, sim = recorded
    replay, thread = start(path, speed=1.0, wait=True)
    first = connect(replay.port)
    got = {}
    reader = threading.Thread(target=lambda: got.update(a=read_all(first)[0]))
    reader.start()
    time.sleep(0.75)  # into the second sub-run
    late, _ = read_all(connect(replay.port))
    reader.join(10)
    thread.join(10)
    full = path.read_bytes()
    assert got["a"] == full
    records = list(orca.iter_records([late]))
    assert records[0].kind == "header"
    assert orca.xl3_data_ids(records[0].header) == sim.subruns[1][1]  # the header current at connection
    rest = late[len(records[0].raw):]
    assert full.endswith(rest) and len(rest) < len(full) // 2
    cmos = [r for r in records if r.kind == "cmos"]
    assert cmos and all(r.data_id == sim.subruns[1][1].cmos for r in cmos)


def test_records_are_paced_by_their_timestamps(tmp_path):
    path = tmp_path / "paced.orca"
    write_stream(path, 2, 1.2, progress=False, poll_period=0.2, crates=2, counter_reset=False)
    span = 1.0 + 0.1  # six polls 0.2 s apart, the second crate 0.1 s after the first
    timings = {}
    for speed in (1.0, 2.0, None):
        replay, thread = start(path, speed=speed, wait=True)
        data, seconds = read_all(connect(replay.port))
        thread.join(10)
        assert data == path.read_bytes()
        timings[speed] = seconds
    assert span * 0.9 <= timings[1.0] <= span + 0.5
    assert span / 2 * 0.9 <= timings[2.0] <= span / 2 + 0.4
    assert timings[None] < 0.3


def test_the_command_loops_shows_progress_and_stops_on_sigterm(recorded):
    path, _ = recorded
    size = path.stat().st_size
    port = free_port()
    proc = subprocess.Popen([str(BIN / "minard"), "orca-replay", str(path), "--port", str(port), "--speed", "max",
                             "--loop", "--wait"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        data, _ = read_all(connect(port), limit=2 * size + 100)
        assert data[:2 * size] == path.read_bytes() * 2  # the file again, header first, at its end
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    text = err.decode()
    assert "run.orca" in text and "B/s" in text and "replay finished" in text
