"""Benchmark of the dispatcher: events/s from one source to analyzers and a writer.

Scenarios, all on loopback in the same run and with the same bytes:

* ``socket pair``: the framed events sent over one plain TCP connection to one
  receiver (the baseline: what the kernel and the receiving loop can do);
* ``1 analyzer``: source -> dispatcher -> 1 analyzer;
* ``N analyzers + writer``: source -> dispatcher -> N analyzers and 1 write client.

Receivers are separate processes that walk the frame headers (the same code in
every scenario).  The rate is the events delivered to the slowest receiver /
(time from the first byte sent to the last receiver seeing ENDTAPE); an
analyzer that cannot keep up loses events by design (counted, printed).  Each scenario runs ``--repeat`` times; the best
is kept.  Run: ``.venv/bin/python bench/dispatcher.py [--events N]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minard.formats import framing, pmt
from minard.testing import export_dispatcher_keys, free_port
from minard.testing.dispatcher import DispatcherProcess

RAW = framing.tag_bytes("RAWDATA")
CMD = framing.tag_bytes("CMD")
ENDTAPE = framing.command_frame("ENDTAPE")


def make_stream(n_events: int, nhit: int, seed: int = 1) -> tuple[bytes, int]:
    """*n_events* RAWDATA frames of events with Poisson(nhit) hits; (bytes, n)."""
    rng = np.random.default_rng(seed)
    templates = []
    for k in range(64):
        n = int(rng.poisson(nhit))
        hits = {"crate": rng.integers(0, 19, n), "card": rng.integers(0, 16, n),
                "channel": rng.integers(0, 32, n), "qhs": rng.integers(0, 4096, n)}
        templates.append(pmt.pack_dispatch(pmt.encode_event(
            run=1, evnum=k, gtid=k, trigger_word=1, hits=hits)))
    payloads = [templates[i % 64] for i in range(n_events)]
    return framing.encode_frames("RAWDATA", payloads), n_events


def receiver(address: tuple[str, int], role: str | None, results) -> None:
    """Count RAWDATA frames until ENDTAPE; report (count, bytes, wall time)."""
    if role:  # authenticate (HELLO + AUTH), then read the socket raw
        from minard.dispatcher.client import DispatchClient

        sock = DispatchClient.connect(address, role, rcvbuf=4 << 20).sock
    else:
        sock = socket.create_connection(address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    buf, count, nbytes, unpack = bytearray(), 0, 0, framing.HEADER.unpack_from
    done = False
    while not done:
        data = sock.recv(1 << 20)
        if not data:
            break
        nbytes += len(data)
        buf += data
        pos, size = 0, len(buf)
        while pos + 12 <= size:
            tag, length = unpack(buf, pos)
            end = pos + 12 + length
            if end > size:
                break
            if tag == RAW:
                count += 1
            elif tag == CMD and buf[pos + 12:end] == b"ENDTAPE":
                done = True
                break
            pos = end
        del buf[:pos]
    results.put((count, nbytes, time.time()))
    if role == "analyzer":
        sock.sendall(framing.command_frame("FINISHED"))
    time.sleep(0.2)
    sock.close()


def start_receivers(address, roles, results) -> list[mp.Process]:
    procs = [mp.Process(target=receiver, args=(address, role, results)) for role in roles]
    for p in procs:
        p.start()
    return procs


def collect(results, procs, n_events: int, t0: float) -> float:
    """Wait for every receiver; return the events/s delivered to the slowest one.

    An analyzer that could not keep up lost events (by design); its count,
    not the number sent, is what it was delivered.
    """
    reports = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(10)
    counts = [r[0] for r in reports]
    if any(c != n_events for c in counts):
        print(f"    (receivers got {counts} of {n_events} events)")
    return min(counts) / (max(r[2] for r in reports) - t0)


def send_all(sock: socket.socket, stream: bytes) -> float:
    """Send *stream* + ENDTAPE in 1 MiB pieces; return the start time."""
    view = memoryview(stream)
    t0 = time.time()
    for i in range(0, len(view), 1 << 20):
        sock.sendall(view[i:i + (1 << 20)])
    sock.sendall(ENDTAPE)
    return t0


def bench_socket_pair(stream: bytes, n: int) -> float:
    """Baseline: one plain TCP connection from sender to one receiver."""
    results = mp.Queue()
    with socket.create_server(("127.0.0.1", 0)) as server:
        procs = start_receivers(server.getsockname(), [None], results)
        conn, _ = server.accept()
        with conn:
            t0 = send_all(conn, stream)
            return collect(results, procs, n, t0)


def bench_plain_fanout(stream: bytes, n: int, receivers: int) -> float:
    """Reference: the sender itself writes every piece to *receivers* plain sockets."""
    results = mp.Queue()
    with socket.create_server(("127.0.0.1", 0)) as server:
        procs = start_receivers(server.getsockname(), [None] * receivers, results)
        conns = [server.accept()[0] for _ in procs]
        view = memoryview(stream)
        t0 = time.time()
        for i in range(0, len(view), 1 << 20):
            for conn in conns:
                conn.sendall(view[i:i + (1 << 20)])
        for conn in conns:
            conn.sendall(ENDTAPE)
        rate = collect(results, procs, n, t0)
        for conn in conns:
            conn.close()
        return rate


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by process *pid* (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_dispatcher(address: str, stream: bytes, n: int, roles: list[str], run: int) -> tuple[float, dict]:
    """source -> dispatcher -> receivers with *roles*; return (rate, dispatcher stats)."""
    from minard.dispatcher.client import DispatchClient

    host, port = address.split(":")
    results = mp.Queue()
    control = DispatchClient.connect(address, "control", "bench")
    procs = start_receivers((host, int(port)), roles, results)
    while len(control.stats()["clients"]) < len(roles) + 1:
        time.sleep(0.01)
    source = DispatchClient.connect(address, "source", "bench")
    source.command(f"BEGINTAPE:{run}:1", check=True)
    t0 = send_all(source.sock, stream)
    rate = collect(results, procs, n, t0)
    source.wait_command("ALLFINISHED", 30)
    stats = control.stats()
    source.close()
    control.close()
    return rate, stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per scenario (default 200000)")
    parser.add_argument("--nhit", type=float, default=40, help="mean hits per event (default 40)")
    parser.add_argument("--analyzers", type=int, default=4, help="analyzers in the fan-out scenario (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario, best kept (default 3)")
    parser.add_argument("--analyzer-queue", type=int, default=20000,
                        help="dispatcher_analyzer_queue (default 20000, the configuration default)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args(argv)

    stream, n = make_stream(args.events, args.nhit)
    print(f"{n} events, {len(stream) / n:.0f} bytes/event framed, {len(stream) / 1e6:.1f} MB per run")
    import tempfile

    export_dispatcher_keys(tempfile.mkdtemp(prefix="bench-dispatcher-keys-"))
    disp = DispatcherProcess(port=free_port(), redis_url="", log_level="WARNING",
                             dispatcher_analyzer_queue=args.analyzer_queue,
                             dispatcher_writer_queue=2000).start()
    fanout = args.analyzers + 1
    rows = []  # (label, rate, reference label, dispatcher CPU us/event)
    try:
        base = max(bench_socket_pair(stream, n) for _ in range(args.repeat))
        plain = max(bench_plain_fanout(stream, n, fanout) for _ in range(args.repeat))
        rows += [("socket pair", base, None, None), (f"plain fan-out x{fanout}", plain, None, None)]
        drops = {}
        for label, roles, ref in (
                ("1 analyzer", ["analyzer"], base),
                (f"{args.analyzers} analyzers + writer",
                 ["analyzer"] * args.analyzers + ["writer"], plain)):
            best, cpu = 0.0, []
            for i in range(args.repeat):
                before = cpu_seconds(disp.proc.pid)
                rate, stats = bench_dispatcher(disp.address, stream, n, roles, run=100 + i)
                cpu.append((cpu_seconds(disp.proc.pid) - before) / n * 1e6)
                best = max(best, rate)
            rows.append((label, best, ref, min(cpu)))
            drops[label] = stats["dropped_events"]
    finally:
        disp.stop()
    per_event = len(stream) / n
    print(f"{os.cpu_count()} CPUs; receivers are separate processes on the same machine")
    print(f"{'scenario':<26}{'events/s':>12}{'MB/s':>8}{'vs pair':>9}{'vs plain fan-out':>18}"
          f"{'dispatcher CPU':>16}")
    for label, rate, ref, cpu in rows:
        vs_plain = f"{rate / ref:.0%}" if ref is plain else ""
        cpu_txt = f"{cpu:.1f} us/ev" if cpu is not None else ""
        print(f"{label:<26}{rate:>12,.0f}{rate * per_event / 1e6:>8.0f}{rate / base:>9.0%}"
              f"{vs_plain:>18}{cpu_txt:>16}")
    print(f"events dropped by the dispatcher (cumulative): {drops}")
    if args.json:
        print(json.dumps({"events": n, "bytes_per_event": per_event, "cpus": os.cpu_count(),
                          "rates": {r[0]: r[1] for r in rows},
                          "dispatcher_cpu_us_per_event": {r[0]: r[3] for r in rows if r[3]},
                          "dropped": drops}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
