"""``minard replay``: a data source that plays ZDAB files into the dispatcher.

For each run found in the data: ``BEGINTAPE:run:tape``, the events as
``RAWDATA`` 'PMT ' dispatch records, ``ENDTAPE``, then it waits for
``ALLFINISHED``.  A change of run number inside the data ends the tape and
begins a new one.  The dispatcher's ``QUIT`` (sent on SHUTDOWN) and SIGTERM
stop the sending; the run is then ended normally.

Pacing uses the events' own 10 MHz clock (``clock10`` x 100 ns, ZDAB_FORMAT.md
section 5), so a replay at ``--speed 1x`` reproduces the recorded rates;
``--rate N`` sends N events/s regardless of the clock; ``max`` does not wait.
"""

from __future__ import annotations

import logging
import signal
import struct
import sys
import time
from collections.abc import Iterable, Iterator

import click

from . import config as config_mod
from . import log as log_mod
from .dispatch_client import ConnectionClosed, DispatchClient, connect_with_retry
from .framing import HEADER, tag_bytes
from .pmt import pack_dispatch

log = logging.getLogger("minard.replay")

#: Largest batch of events sent in one call (bytes).
BATCH_BYTES = 256 * 1024
#: A clock step larger than this (data seconds), or backwards, restarts the pacing.
MAX_CLOCK_GAP = 10.0
_WORD = struct.Struct(">I")
_RAWDATA = tag_bytes("RAWDATA")


def peek(record: bytes, previous: tuple[int | None, int, int] = (None, 0, 0)) -> tuple[int, int, int]:
    """(run, gtid, clock10) from a PmtEventRecord header (record words 1, 5, 6, 8).

    A record too short to hold them (a corrupt one) is still sent on, so that
    the consumers count it; it keeps the *previous* record's run and times.
    """
    if len(record) < 36:
        return previous
    run = _WORD.unpack_from(record, 4)[0]
    m0, m1 = struct.unpack_from(">II", record, 20)
    gtid = _WORD.unpack_from(record, 32)[0] & 0xFFFFFF
    return run, gtid, m0 | (m1 & 0x1FFFFF) << 32


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


def iter_files(paths: Iterable[str], loop: bool = False) -> Iterator[bytes]:
    """Every PmtEventRecord of *paths* in order; forever with *loop*."""
    from .zdab import read_events

    while True:
        for path in paths:
            yield from read_events(path)
        if not loop:
            return


def count_records(paths: Iterable[str]) -> int:
    """Number of events in *paths* (one reading pass, for the progress bar)."""
    return sum(1 for _ in iter_files(paths))


class Pacer:
    """When each event is due, from its clock (``speed``) or a fixed ``rate``."""

    def __init__(self, speed: float | None, rate: float | None):
        self.speed, self.rate = speed, rate
        self.reset()

    def reset(self) -> None:
        """Start timing again from the next event (new run)."""
        self.t0: float | None = None
        self.clock0 = 0
        self.last_offset = 0.0
        self.last_due: float | None = None
        self.count = 0

    def _anchor(self, t0: float, clock10: int) -> float:
        self.t0, self.clock0, self.last_offset, self.last_due = t0, clock10, 0.0, t0
        return t0

    def due(self, clock10: int) -> float:
        """Monotonic time at which the event with *clock10* should be sent."""
        now = time.monotonic()
        self.count += 1
        if self.rate:
            if self.t0 is None:
                self.t0 = now
            return self.t0 + (self.count - 1) / self.rate
        if self.speed is None:
            return now
        if clock10 == 0:  # an orphan has no time: send it with its neighbours
            return self.last_due if self.last_due is not None else now
        if self.t0 is None:
            return self._anchor(now, clock10)
        offset = (clock10 - self.clock0) * 1e-7
        if offset < self.last_offset or offset - self.last_offset > MAX_CLOCK_GAP:
            # The clock went backwards or jumped: continue from the previous event.
            return self._anchor(self.last_due, clock10)
        self.last_offset = offset
        self.last_due = self.t0 + offset / self.speed
        return self.last_due


class Replayer:
    """Send records to the dispatcher as its data source, run by run."""

    def __init__(self, client: DispatchClient, run: int | None = None, tape: int = 1,
                 speed: float | None = None, rate: float | None = None,
                 finish_timeout: float = 60.0, progress=None):
        self.client = client
        self.run_override, self.tape = run, tape
        self.pacer = Pacer(speed, rate)
        self.finish_timeout = finish_timeout
        self.progress = progress
        self.quit = False
        self.run: int | None = None
        self.gtid = 0
        self._clock10 = 0
        self.sent = 0
        self.runs: list[int] = []
        self._parts: list[bytes] = []
        self._size = 0
        self._batch_events = 0

    # -- sending -------------------------------------------------------------
    def _add(self, record: bytes) -> None:
        """Frame one record into the pending batch (RAWDATA, 'PMT ' dispatch record)."""
        payload = pack_dispatch(record)
        self._parts.append(HEADER.pack(_RAWDATA, len(payload)))
        self._parts.append(payload)
        self._size += len(payload) + 12
        self._batch_events += 1

    def flush(self) -> None:
        """Send the pending batch in one call, then look for QUIT."""
        if self._parts:
            self.client.send_raw(b"".join(self._parts))
            self.sent += self._batch_events
            if self.progress is not None:
                self.progress.update(self._batch_events)
                self.progress.set_postfix(run=self.run, gtid=self.gtid, refresh=False)
            self._parts, self._size, self._batch_events = [], 0, 0
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
        """Wait for *due*, sending what is pending first and watching for QUIT."""
        self.flush()
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
        self.flush()
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

    def play(self, records: Iterable[bytes]) -> bool:
        """Send every record, with BEGINTAPE/ENDTAPE around each run; True if clean."""
        ok = True
        for record in records:
            if self.quit:
                break
            run, self.gtid, clock10 = peek(record, (self.run, self.gtid, self._clock10))
            self._clock10 = clock10
            if self.run_override is not None:
                run = self.run_override
            if run != self.run:
                if self.run is not None:
                    ok = self.end() and ok
                    if self.quit:
                        break
                self.begin(run)
            due = self.pacer.due(clock10)
            if due - time.monotonic() > 0.002:
                self._sleep_until(due)
                if self.quit:
                    break
            self._add(record)
            if self._size >= BATCH_BYTES:
                self.flush()
        if self.run is not None:
            ok = self.end() and ok
        return ok


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
def replay_cmd(files, address, run, tape, speed, rate, loop, timeout, progress):
    """Send ZDAB FILES to a dispatcher as its data source.

    BEGINTAPE with the run number found in the data (or --run), the events,
    ENDTAPE, then wait for ALLFINISHED; a new BEGINTAPE whenever the run
    number changes.  QUIT from the dispatcher or SIGTERM ends the run early.
    """
    cfg = config_mod.load()
    log_mod.setup(cfg["log_level"])
    factor = parse_speed(speed)
    address = address or f"{cfg['dispatcher_host']}:{cfg['dispatcher_port']}"
    finish_timeout = timeout if timeout is not None else float(cfg["dispatcher_finished_timeout"]) + 30
    if progress is None:
        progress = sys.stderr.isatty()
    total = count_records(files) if progress and not loop else None
    bar = _progress_bar(total, progress)
    try:
        client = connect_with_retry(address, "source", "replay", retry_for=10.0)
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from None
    replayer = Replayer(client, run, tape, factor, rate, finish_timeout, bar)
    previous = _stop_on_signals(replayer)
    try:
        ok = replayer.play(iter_files(files, loop))
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


def _stop_on_signals(replayer: Replayer) -> dict:
    """SIGTERM/SIGINT act like QUIT (the run is still ended with ENDTAPE)."""
    def stop(signum, frame):
        log.info("%s: stopping", signal.Signals(signum).name)
        replayer.quit = True

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
