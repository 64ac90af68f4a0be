"""``minard replay``: a data source that plays ZDAB files into the dispatcher.

For each run found in the data: ``BEGINTAPE:run:tape``, the events as
'PMT ' dispatch records, ``ENDTAPE``, then it waits for ``ALLFINISHED``.  A change of run number inside the data ends the tape and
begins a new one.  The dispatcher's ``QUIT`` (sent on SHUTDOWN) and SIGTERM
stop the sending; the run is then ended normally.

Pacing uses the events' own 10 MHz clock (``clock10`` x 100 ns, ZDAB_FORMAT.md
section 5), so a replay at ``--speed 1x`` reproduces the recorded rates;
``--rate N`` sends N events/s regardless of the clock; ``max`` does not wait.

Records are read in chunks of about ``CHUNK_BYTES`` and handled with numpy:
their run, GTID and clock are gathered in one pass, their due times computed
together, and each group of events that is due is sent as one ``RAWBATCH``
frame (docs/protocol.md; the dispatcher expands it into ``RAWDATA`` frames for
clients that want those).  ``--per-record`` sends ``RAWDATA`` frames itself,
as the DAQ does.  Nothing loops over records in Python but the reading.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Sequence

import click
import numpy as np

from minard import config as config_mod
from minard.dispatcher.client import (
    ConnectionClosed,
    DispatchClient,
    connect_with_retry,
    dispatcher_address,
)
from minard.formats.framing import expand_rawbatches, rawbatch_parts
from minard.formats.pmt import PMT_DISPATCH_HEADER, read_headers

log = logging.getLogger("minard.dispatcher.replay")

#: Records read and framed together (bytes, records): one RAWBATCH at full speed.
CHUNK_BYTES = 256 * 1024
CHUNK_RECORDS = 4096
#: A clock step larger than this (data seconds), or backwards, restarts the pacing.
MAX_CLOCK_GAP = 10.0
#: Events due within this many seconds are sent now rather than slept for.
EARLY = 0.002
_DISPATCH_HEADER = np.frombuffer(PMT_DISPATCH_HEADER, np.uint8)


def peek(record: bytes, previous: tuple[int | None, int, int] = (None, 0, 0)) -> tuple[int, int, int]:
    """(run, gtid, clock10) from a PmtEventRecord header (record words 1, 5, 6, 8).

    A record too short to hold them (a corrupt one) is still sent on, so that
    the consumers count it; it keeps the *previous* record's run and times.
    """
    run, gtid, clock = peek_many(record, np.zeros(1, np.int64), np.full(1, len(record), np.int64), previous)
    return (None if run[0] < 0 else int(run[0])), int(gtid[0]), int(clock[0])


def peek_many(data: bytes, offsets: np.ndarray, lengths: np.ndarray,
              previous: tuple[int | None, int, int] = (None, 0, 0)
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`peek` of every record ``data[offsets[i]:offsets[i]+lengths[i]]`` at once.

    Returns (run, gtid, clock10) as int64 arrays; a record too short to read
    takes the values of the record before it (run -1 stands for None).
    """
    n = len(lengths)
    head = read_headers(data, offsets, lengths, min_bytes=36)  # words 1, 5, 6, 8
    ok = head.complete
    run = head.run.astype(np.int64)
    gtid = head.gtid.astype(np.int64)
    clock = head.clock10
    if not ok.all():
        last = np.maximum.accumulate(np.where(ok, np.arange(n), -1))
        before = last < 0
        prev_run = -1 if previous[0] is None else previous[0]
        for arr, value in ((run, prev_run), (gtid, previous[1]), (clock, previous[2])):
            arr[:] = np.where(before, value, arr[np.maximum(last, 0)])
    return run, gtid, clock


def parse_speed(text: str) -> float | None:
    """``1x``, ``10x``, ``0.5x`` -> factor; ``max`` -> None (no pacing)."""
    text = text.strip().lower()
    if text == "max":
        return None
    try:
        factor = float(text.removesuffix("x"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: use 1x, 10x, 0.5x or max") from None
    if not factor > 0:
        raise click.BadParameter("speed must be positive")
    return factor


def iter_files(paths: Iterable[str]) -> Iterator[bytes]:
    """Every PmtEventRecord of *paths* in order."""
    from minard.formats.zdab import read_events

    for path in paths:
        yield from read_events(path)


def count_records(paths: Iterable[str]) -> int:
    """Number of events in *paths* (one reading pass, for the progress bar)."""
    return sum(1 for _ in iter_files(paths))


def iter_chunks(paths: Sequence[str], loop: bool = False, cache_bytes: int = 0) -> Iterator[Chunk]:
    """The records of *paths* as Chunks of about CHUNK_BYTES; forever with *loop*.

    With *loop*, files totalling at most *cache_bytes* are read, parsed and
    framed once, and later passes come from memory (like tcpreplay's
    --preload-pcap): parsing ZDAB, not sending, is what limits a looping replay.
    """
    keep = loop and sum(os.path.getsize(p) for p in paths) <= cache_bytes
    cached: list[Chunk] = []
    while True:
        if cached:
            yield from cached
        else:
            records, produced = iter_files(paths), False
            while batch := take_chunk(records):
                chunk, produced = Chunk(batch), True
                if keep:
                    cached.append(chunk)
                yield chunk
            if not produced:
                return  # no events at all: nothing to loop over
        if not loop:
            return


def take_chunk(records: Iterator[bytes]) -> list[bytes]:
    """The next records, up to about CHUNK_BYTES (empty at the end)."""
    chunk, size = [], 0
    for record in records:
        chunk.append(record)
        size += len(record)
        if size >= CHUNK_BYTES or len(chunk) >= CHUNK_RECORDS:
            break
    return chunk


class Chunk:
    """Records read together, framed once as 'PMT ' dispatch records back to back.

    ``records`` is what a RAWBATCH of all of them carries after its lengths
    (the 12-byte generic header inserted before every record with numpy);
    ``header_fields`` gives each record's (run, gtid, clock10).
    """

    def __init__(self, records: list[bytes]):
        data = b"".join(records)
        lengths = np.fromiter(map(len, records), np.int64, len(records))
        offsets = np.cumsum(lengths) - lengths
        self._fields = peek_many(data, offsets, lengths)
        # a record too short to read takes its fields from the one before it,
        # which for the first records depends on what was sent before this chunk
        self._short = None if (lengths >= 36).all() else (data, offsets, lengths)
        h = len(_DISPATCH_HEADER)
        at = np.repeat(offsets, h)
        self.records = np.insert(np.frombuffer(data, np.uint8), at, np.tile(_DISPATCH_HEADER, len(lengths)))
        self.lengths = (lengths + h).astype(">u4")
        self.offsets = offsets + h * np.arange(len(lengths))

    def __len__(self) -> int:
        return len(self.lengths)

    def header_fields(self, previous: tuple[int | None, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(run, gtid, clock10) of every record, given those of the record sent before."""
        if self._short is None:
            return self._fields
        return peek_many(*self._short, previous)

    def rawbatch(self, i: int, j: int) -> list:
        """Records i..j-1 as the buffers of one RAWBATCH frame (no copy of the records)."""
        lo = int(self.offsets[i])
        hi = int(self.offsets[j - 1]) + int(self.lengths[j - 1])
        return rawbatch_parts(self.lengths[i:j], memoryview(self.records)[lo:hi])


class Pacer:
    """When each event is due, from its clock (``speed``) or a fixed ``rate``.

    Due times are computed for many events at once: the clock steps between
    consecutive timed events, divided by the speed, added up.  A step
    backwards or larger than MAX_CLOCK_GAP counts as zero (pacing continues
    from the previous event); an orphan (clock 0) goes with the event before.
    """

    def __init__(self, speed: float | None, rate: float | None):
        self.speed, self.rate = speed, rate
        self.reset()

    def reset(self) -> None:
        """Start timing again from the next event (new run)."""
        self.t0: float | None = None
        self.last_clock: int | None = None
        self.last_due: float | None = None
        self.count = 0

    def due(self, clock10: int) -> float:
        """Monotonic time at which the event with *clock10* should be sent."""
        return float(self.due_many(np.array([clock10], np.int64))[0])

    def due_many(self, clock10: np.ndarray) -> np.ndarray:
        """Monotonic due times of consecutive events with clocks *clock10* (non-decreasing)."""
        now = time.monotonic()
        n = len(clock10)
        first = self.count
        self.count += n
        if self.rate:
            if self.t0 is None:
                self.t0 = now
            return self.t0 + np.arange(first, first + n) / self.rate
        if self.speed is None:
            return np.full(n, now)
        timed = clock10 != 0
        base = self.last_due if self.last_due is not None else now
        if not timed.any():
            return np.full(n, base)
        clocks = clock10[timed]
        prev = np.concatenate(([clocks[0] if self.last_clock is None else self.last_clock], clocks[:-1]))
        step = (clocks - prev) * 1e-7
        step[(step < 0) | (step > MAX_CLOCK_GAP)] = 0.0
        due = base + np.cumsum(step) / self.speed
        # every event takes the due time of the last timed event at or before it
        index = np.cumsum(timed) - 1
        self.last_clock, self.last_due = int(clocks[-1]), float(due[-1])
        return np.where(index >= 0, due[np.maximum(index, 0)], base)


class Replayer:
    """Send records to the dispatcher as its data source, run by run."""

    def __init__(self, client: DispatchClient, run: int | None = None, tape: int = 1,
                 speed: float | None = None, rate: float | None = None,
                 finish_timeout: float = 60.0, progress=None, per_record: bool = False):
        self.client = client
        self.run_override, self.tape = run, tape
        self.pacer = Pacer(speed, rate)
        self.finish_timeout = finish_timeout
        self.progress = progress
        self.per_record = per_record
        self.quit = False
        self.run: int | None = None
        self.gtid = 0
        self.last: tuple[int | None, int, int] = (None, 0, 0)  # the data's (run, gtid, clock10)
        self.sent = 0
        self.runs: list[int] = []

    # -- sending -------------------------------------------------------------
    def send(self, chunk: Chunk, gtids: np.ndarray, i: int, j: int) -> None:
        """Send records i..j-1 of *chunk* in one call, then look for QUIT."""
        parts = chunk.rawbatch(i, j)
        if self.per_record:
            self.client.send_raw(expand_rawbatches(b"".join(parts)))
        else:
            self.client.send_parts(parts)
        self.sent += j - i
        self.gtid = int(gtids[j - 1])
        if self.progress is not None:
            self.progress.update(j - i)
            self.progress.set_postfix(run=self.run, gtid=self.gtid, refresh=False)
        self.check_commands()

    def check_commands(self) -> None:
        """Handle what the dispatcher sent (QUIT; ERROR replies are logged)."""
        for frame in self.client.poll():
            self._on_command(frame.text if frame.tag == "CMD" else "")

    def _on_command(self, text: str) -> None:
        if text == "QUIT":
            log.info("QUIT from the dispatcher: stopping after %d events", self.sent)
            self.quit = True
        elif text.startswith("ERROR:"):
            log.error("dispatcher: %s", text)

    def _sleep_until(self, due: float) -> None:
        """Wait for *due*, watching for QUIT."""
        while not self.quit:
            left = due - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))
            self.check_commands()

    # -- run flow ------------------------------------------------------------
    def begin(self, run: int) -> None:
        """BEGINTAPE for *run*."""
        self.client.send_command(f"BEGINTAPE:{run}:{self.tape}")
        self.run = run
        self.runs.append(run)
        self.pacer.reset()
        log.info("BEGINTAPE run %d tape %d", run, self.tape)

    def end(self) -> bool:
        """ENDTAPE, then wait for ALLFINISHED; False on timeout."""
        self.client.send_command("ENDTAPE")
        log.info("ENDTAPE run %s after %d events; waiting for ALLFINISHED", self.run, self.sent)
        deadline = time.monotonic() + self.finish_timeout
        while True:
            frame = self.client.recv(max(0.0, deadline - time.monotonic()))
            if frame is None:
                log.error("no ALLFINISHED within %.0fs", self.finish_timeout)
                return False
            text = frame.text if frame.tag == "CMD" else ""
            if text == "ALLFINISHED":
                log.info("ALLFINISHED run %s", self.run)
                self.run = None
                return True
            self._on_command(text)

    def play(self, chunks: Iterable[Chunk]) -> bool:
        """Send every record of *chunks* (see iter_chunks), with BEGINTAPE/ENDTAPE
        around each run; True if every run ended cleanly."""
        ok = True
        for chunk in chunks:
            if self.quit:
                break
            fields = chunk.header_fields(self.last)
            run, gtid, clock = (int(a[-1]) for a in fields)
            self.last = (None if run < 0 else run, gtid, clock)
            ok = self._play_chunk(chunk, *fields) and ok
        if self.run is not None:
            ok = self.end() and ok
        return ok

    def _play_chunk(self, chunk: Chunk, runs: np.ndarray, gtids: np.ndarray, clocks: np.ndarray) -> bool:
        """Send one chunk, run by run; False if a run did not end cleanly."""
        ok = True
        if self.run_override is not None:
            runs = np.full(len(chunk), self.run_override)
        bounds = [0, *(np.flatnonzero(runs[1:] != runs[:-1]) + 1).tolist(), len(chunk)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            run = int(runs[a])
            if run >= 0 and run != self.run:
                if self.run is not None:
                    ok = self.end() and ok
                    if self.quit:
                        return ok
                self.begin(run)
            self._send_paced(chunk, gtids, clocks, a, b)
            if self.quit:
                break
        return ok

    def _send_paced(self, chunk: Chunk, gtids: np.ndarray, clocks: np.ndarray, a: int, b: int) -> None:
        """Send records a..b-1 of *chunk*, each group as soon as it is due."""
        due = self.pacer.due_many(clocks[a:b])
        i = a
        while i < b and not self.quit:
            j = a + int(np.searchsorted(due, time.monotonic() + EARLY, side="right"))
            if j <= i:
                self._sleep_until(float(due[i - a]))
                continue
            self.send(chunk, gtids, i, min(j, b))
            i = j


def _progress_bar(total: int | None, enabled: bool):
    """A tqdm bar on stderr (records, %, run, GTID); None when disabled."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="ev", unit_scale=True, dynamic_ncols=True, desc="replay")


@click.command("replay")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--dispatcher", "address", default=None, metavar="HOST:PORT",
              help="Dispatcher address [dispatcher_host:dispatcher_port].")
@click.option("--run", type=click.IntRange(0), default=None,
              help="Run number for BEGINTAPE [the run number in the data].")
@click.option("--tape", type=click.IntRange(0), default=1, show_default=True,
              help="Tape number for BEGINTAPE.")
@click.option("--speed", default="1x", show_default=True,
              help="Pacing by the events' 10 MHz clock: 1x, 10x, 0.5x... or max.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Send this many events per second instead (ignores --speed).")
@click.option("--loop", is_flag=True, help="Start again at the first file after the last.")
@click.option("--timeout", type=float, default=None,
              help="Seconds to wait for ALLFINISHED [dispatcher_finished_timeout + 30].")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar [shown when stderr is a terminal].")
@click.option("--per-record", is_flag=True,
              help="One RAWDATA frame per event, as the DAQ sends them [one RAWBATCH per group].")
@click.option("--wait-analyzers", type=click.IntRange(0), default=0, show_default=True,
              help="Before the first event, wait until the dispatcher has this many analyzers (up to 60 s): "
                   "a stack started all at once would otherwise send its first events to none, and the "
                   "dispatcher counts those as lost.")
@click.option("--cache-mb", type=click.IntRange(0), default=256, show_default=True,
              help="With --loop, keep files up to this size in memory after the first pass.")
@config_mod.pass_config
def replay_cmd(cfg, files, address, run, tape, speed, rate, loop, timeout, progress, per_record, wait_analyzers,
               cache_mb):
    """Send ZDAB FILES to a dispatcher as its data source.

    BEGINTAPE with the run number found in the data (or --run), the events,
    ENDTAPE, then wait for ALLFINISHED; a new BEGINTAPE whenever the run
    number changes.  QUIT from the dispatcher or SIGTERM ends the run early.
    """
    factor = parse_speed(speed)
    address = dispatcher_address(cfg, address)
    finish_timeout = timeout if timeout is not None else float(cfg["dispatcher_finished_timeout"]) + 30
    if progress is None:
        progress = sys.stderr.isatty()
    total = count_records(files) if progress and not loop else None
    bar = _progress_bar(total, progress)
    try:
        client = connect_with_retry(address, "source", "replay", retry_for=10.0, cfg=cfg)
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from None
    replayer = Replayer(client, run, tape, factor, rate, finish_timeout, bar, per_record)
    previous = _stop_on_signals(replayer)
    try:
        if wait_analyzers:
            await_analyzers(client, wait_analyzers, ANALYZERS_WAIT, lambda: replayer.quit)
        ok = replayer.play(iter_chunks(files, loop, cache_mb << 20))
    except (ConnectionClosed, ConnectionError) as exc:
        raise click.ClickException(f"lost the dispatcher after {replayer.sent} events: {exc}") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if bar is not None:
            bar.close()
        client.close()
    log.info("replayed %d events in runs %s", replayer.sent, replayer.runs)
    if not ok:
        raise SystemExit(1)


#: Seconds ``--wait-analyzers`` waits before playing anyway (the dispatcher counts what no analyzer gets).
ANALYZERS_WAIT = 60.0


def await_analyzers(client, wanted: int, timeout: float, stopped=lambda: False) -> int:
    """Ask the dispatcher (``ANALYZERS?``, docs/protocol.md) until it lists *wanted* analyzers;
    returns how many it lists.  After *timeout* s, or once *stopped()*, it gives up (logged)."""
    end = time.monotonic() + timeout
    logged = False
    while True:
        have = sum(1 for line in client.command("ANALYZERS?").splitlines()[1:] if line.strip() not in ("", "END"))
        if have >= wanted or stopped():
            return have
        if time.monotonic() >= end:
            log.warning("%d of %d analyzers after %g s: playing anyway", have, wanted, timeout)
            return have
        if not logged:
            log.info("waiting for %d analyzer(s) before the first event (%d connected)", wanted, have)
            logged = True
        time.sleep(0.1)  # polling the dispatcher's list; bounded by *timeout*


def _stop_on_signals(replayer: Replayer) -> dict:
    """SIGTERM/SIGINT act like QUIT (the run is still ended with ENDTAPE)."""
    def stop(signum, frame):
        log.info("%s: stopping", signal.Signals(signum).name)
        replayer.quit = True

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
