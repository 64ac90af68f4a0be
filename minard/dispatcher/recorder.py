"""``minard record``: a write client that stores every event in ZDAB files.

One file per run, named from integers only::

    run_<run>_<tape>_<seq>.zdab      e.g. run_3510_1_0.zdab

``run`` and ``tape`` come from the dispatcher's ``BEGINTAPE:run:tape`` (or,
for events seen before any BEGINTAPE, from the event's own run number with
tape 0); ``seq`` counts the files of one run and tape, and grows when a file
exceeds ``--max-bytes`` or when a file of that name already exists (nothing is
ever overwritten).  Files are flushed, fsync'ed and closed at ENDTAPE (and at
ALLFINISHED, QUIT, SIGTERM or a lost connection).  ``RECHDR`` records are
stored as banks of their own name ('RUN ' as 'RHDR').

As a write client the recorder is lossless: the dispatcher slows the data
source down rather than drop events for it.  When the connection is lost
(dispatcher restart) it reconnects and carries on; QUIT (dispatcher SHUTDOWN)
and SIGTERM make it exit.
"""

from __future__ import annotations

import logging
import os
import signal
import struct
from pathlib import Path

import click

from minard import config as config_mod
from minard.dispatcher.client import (
    ConnectionClosed,
    DispatchClient,
    connect_with_retry,
    dispatcher_address,
)
from minard.formats.pmt import PMT_RECORD_ID, RecordError, record_name, unpack_dispatch
from minard.formats.zdab import ZdabWriter

log = logging.getLogger("minard.dispatcher.recorder")


class Recorder:
    """Turns the frames of a write-client connection into ZDAB files."""

    def __init__(self, out_dir: str | Path, max_bytes: int = config_mod.DEFAULTS["recorder_max_bytes"]):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.run: int | None = None
        self.tape = 0
        self.seq = 0
        self.writer = None
        self._fh = None
        self.path: Path | None = None
        self.file_bytes = 0
        self.events = 0
        self.banks = 0
        self.others = 0
        self.skipped = 0
        self.files: list[Path] = []
        self.quit = False

    # -- files ---------------------------------------------------------------
    def _open(self) -> None:
        """Open the next free ``run_<run>_<tape>_<seq>.zdab``."""
        while True:
            path = self.out_dir / f"run_{int(self.run)}_{int(self.tape)}_{int(self.seq)}.zdab"
            if not path.exists():
                break
            self.seq += 1
        self._fh = open(path, "xb")
        self.writer = ZdabWriter(self._fh)
        self.path, self.file_bytes = path, 0
        self.files.append(path)
        log.info("writing %s", path)

    def close_file(self, why: str = "") -> None:
        """Flush, fsync and close the current file (if any)."""
        if self.writer is None:
            return
        self.writer.close()  # end-of-run and end-of-ZEBRA blocks
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        log.info("closed %s (%d bytes of events)%s", self.path, self.file_bytes,
                 f" at {why}" if why else "")
        self.writer, self.path = None, None
        self.seq += 1

    def write(self, record: bytes) -> None:
        """Append one PmtEventRecord, opening or rotating the file as needed."""
        if self.run is None:
            self.run, self.tape, self.seq = struct.unpack_from(">I", record, 4)[0], 0, 0
        if self.writer is None:
            self._open()
        self.writer.write_event(record)
        self.events += 1
        self._written(len(record))

    def write_other(self, name: str, words: bytes) -> None:
        """Append a non-event bank (RECHDR: 'RUN ' is stored as 'RHDR', section 9)."""
        if self.writer is None:
            if self.run is None:
                self.others += 1  # no run known yet: nothing to name the file after
                return
            self._open()
        self.writer.write_bank("RHDR" if name == "RUN " else name, words)
        self.banks += 1
        self._written(len(words))

    def _written(self, nbytes: int) -> None:
        """Count bytes; rotate the file at max_bytes."""
        self.file_bytes += nbytes
        if self.file_bytes >= self.max_bytes:
            self.close_file("--max-bytes")

    # -- frames --------------------------------------------------------------
    def handle(self, frame) -> None:
        """Act on one frame from the dispatcher."""
        if frame.tag in ("RAWDATA", "RECHDR"):
            self._on_record(frame.payload)
        elif frame.tag == "CMD":
            self._on_command(frame.text)

    def _on_record(self, payload: bytes) -> None:
        """A dispatch record: 'PMT ' events as ZDAB banks, others under their name."""
        try:
            record_id, record = unpack_dispatch(payload)
            if record_id == PMT_RECORD_ID:
                self.write(record)
            else:
                self.write_other(record_name(record_id), record)
        except (RecordError, ValueError) as exc:
            self.skipped += 1
            log.warning("skipping a bad dispatch record: %s", exc)

    def _on_command(self, text: str) -> None:
        name, _, arg = text.partition(":")
        if name == "BEGINTAPE":
            self._begin(arg)
        elif name == "ENDTAPE":
            self.close_file("ENDTAPE")
            log.info("ENDTAPE run %s tape %s: %d events recorded so far", self.run, self.tape, self.events)
        elif name == "ALLFINISHED":
            self.close_file("ALLFINISHED")
            self.run = None
        elif name == "QUIT":
            self.close_file("QUIT")
            self.quit = True
        elif name == "ERROR":
            log.error("dispatcher: %s", text)

    def _begin(self, arg: str) -> None:
        """BEGINTAPE:run:tape -> the next events go to a new file of that run."""
        parts = arg.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            log.error("ignoring malformed BEGINTAPE:%r", arg[:40])
            return
        run, tape = int(parts[0]), int(parts[1])
        if (run, tape) != (self.run, self.tape) or self.writer is not None:
            self.close_file("BEGINTAPE")
            self.run, self.tape, self.seq = run, tape, 0
        log.info("BEGINTAPE run %d tape %d", run, tape)


def record_loop(recorder: Recorder, address, name: str = "recorder",
                should_stop=lambda: False, poll: float = 0.5, cfg=None) -> None:
    """Receive frames into *recorder* until QUIT or *should_stop*; reconnect on loss.

    *cfg* names the writer's credential (``dispatcher_credentials_file``).
    """
    while not (recorder.quit or should_stop()):
        try:
            client = connect_with_retry(address, "writer", name, retry_for=None,
                                        should_stop=should_stop, cfg=cfg)
        except ConnectionClosed:
            break
        log.info("connected to dispatcher %s:%d as socket %d", client.host, client.port,
                 client.socket_number)
        try:
            _receive(recorder, client, should_stop, poll)
        except ConnectionClosed as exc:
            recorder.close_file("lost connection")
            log.warning("%s; reconnecting", exc)
        finally:
            client.close()
    recorder.close_file("exit")


def _receive(recorder: Recorder, client: DispatchClient, should_stop, poll: float) -> None:
    """Handle frames until QUIT or a stop request (then what has arrived so far)."""
    while not (recorder.quit or should_stop()):
        frame = client.recv(poll)
        if frame is not None:
            recorder.handle(frame)
    if not recorder.quit:
        for frame in client.poll():
            recorder.handle(frame)


@click.command("record")
@click.option("--dispatcher", "address", default=None, metavar="HOST:PORT",
              help="Dispatcher address [dispatcher_host:dispatcher_port].")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the ZDAB files (created if missing).")
@click.option("--max-bytes", type=click.IntRange(min=1), default=None,
              help="Start a new file after this many bytes of events"
                   " [recorder_max_bytes].")
@click.option("--name", default="recorder", show_default=True,
              help="Client name shown by the dispatcher.")
@config_mod.pass_config
def record_cmd(cfg, address, out_dir, max_bytes, name):
    """Write every event received from a dispatcher to ZDAB files, one per run.

    Files are run_<run>_<tape>_<seq>.zdab, fsync'ed and closed at ENDTAPE.
    Reconnects if the dispatcher restarts; exits on QUIT or SIGTERM.
    """
    address = dispatcher_address(cfg, address)
    if max_bytes is None:
        max_bytes = cfg["recorder_max_bytes"]
    recorder = Recorder(out_dir, max_bytes)
    stop = {"flag": False}

    def on_signal(signum, frame):
        log.info("%s: closing files and exiting", signal.Signals(signum).name)
        stop["flag"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    record_loop(recorder, address, name, should_stop=lambda: stop["flag"], cfg=cfg)
    log.info("recorded %d events into %d files", recorder.events, len(recorder.files))
