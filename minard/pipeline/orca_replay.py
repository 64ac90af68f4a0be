"""``minard orca-replay FILE``: serve a recorded ORCA stream the way ORCA does.

ORCA's Dispatcher object is a TCP server (default port 44666) that writes the
records to every connected client, back to back, with no extra framing; a
client connecting mid-run first gets the current header record, then the live
records (ORCA_FORMAT.md §1).  This server does the same with a file:

* the file's bytes are sent **verbatim** (garbage, unknown records and all),
  cut only at record boundaries found by :class:`minard.formats.orca.OrcaStreamParser`;
* a client that connects gets the last header record read so far, then the
  stream from the next record boundary on;
* CMOS-rate and base-current records are paced by their timestamps
  (``--speed 1x``, ``2x``, ... or ``max``); other records go out at once.
  A timestamp that goes backwards or jumps by more than ``MAX_GAP`` seconds
  restarts the clock (sub-run headers, ``--loop``);
* a client that does not keep up loses whole chunks of records, never part of
  one (ORCA drops records for blocked clients), counted in the log.

Single-threaded: one ``select`` loop accepts clients, drains their buffers
and waits for the next record's time.  SIGTERM/SIGINT stop it cleanly.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from pathlib import Path

import click

from minard import config as config_mod
from minard.formats import orca

log = logging.getLogger("minard.pipeline.orca_replay")

#: A gap in record time longer than this (in file seconds) is not waited for.
MAX_GAP = 60.0
#: Bytes buffered per client before it starts losing chunks.
MAX_CLIENT_BUFFER = 8 << 20


def parse_speed(text: str) -> float | None:
    """``"max"`` -> None (no pacing); ``"1x"``, ``"2.5x"``, ``"10"`` -> the factor."""
    text = str(text).strip().lower()
    if text == "max":
        return None
    try:
        factor = float(text.removesuffix("x"))
    except ValueError:
        raise ValueError(f"speed must be 'max' or a factor like '1x', not {text!r}") from None
    if not factor > 0:
        raise ValueError("speed factor must be positive")
    return factor


class _Client:
    """One connected client and the bytes it still has to receive."""

    def __init__(self, sock: socket.socket, addr):
        self.sock = sock
        self.addr = addr
        self.buf = bytearray()
        self.dropped = 0

    def push(self, data: bytes, limit: int) -> None:
        """Queue *data* (whole records) unless the client is too far behind."""
        if len(self.buf) + len(data) > limit:
            self.dropped += len(data)
            return
        self.buf += data

    def drain(self) -> bool:
        """Send what the socket takes now; False if the client is gone."""
        while self.buf:
            try:
                n = self.sock.send(self.buf)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            del self.buf[:n]
        return True


class OrcaReplay:
    """Serve *path* on ``host:port``; see the module docstring."""

    def __init__(self, path, host: str = config_mod.DEFAULTS["orca_host"],
                 port: int = config_mod.DEFAULTS["orca_port"], speed: float | None = 1.0,
                 loop: bool = False, wait: bool = False, progress: bool = True,
                 max_client_buffer: int = MAX_CLIENT_BUFFER):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self.speed = speed
        self.loop = loop
        self.wait = wait
        self.progress = progress
        self.max_client_buffer = max_client_buffer
        self.listener = socket.create_server((host, port), reuse_port=False)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.clients: list[_Client] = []
        self.header: bytes | None = None
        self.running = True
        self.sent_bytes = 0
        self.passes = 0
        self._clock: tuple[float, int] | None = None  # (wall time, record µs) of the pacing origin
        self._last_us: int | None = None

    def stop(self, *_args) -> None:
        """SIGTERM/SIGINT: stop after the current chunk."""
        self.running = False

    # ------------------------------------------------------------ main loop
    def serve(self) -> None:
        """Replay the file (repeatedly with loop), then close every client."""
        from tqdm import tqdm

        log.info("serving %s (%d bytes) on port %d at %s%s", self.path, self.size, self.port,
                 "full speed" if self.speed is None else f"{self.speed:g}x", ", looping" if self.loop else "")
        try:
            if self.wait:
                while self.running and not self.clients:
                    self.poll(0.1)
            with tqdm(total=self.size, unit="B", unit_scale=True, disable=not self.progress,
                      desc=self.path.name) as bar:
                while self.running:
                    bar.reset()
                    self.play_once(bar)
                    self.passes += 1
                    if not self.loop:
                        break
            self.finish()
        finally:
            self.close()

    def play_once(self, bar) -> None:
        """One pass over the file, cut at record boundaries and paced."""
        self._clock = None
        self._last_us = None
        sent_upto = 0
        with open(self.path, "rb") as fh:
            for rec in orca.read_file(self.path):
                if not self.running:
                    return
                end = rec.offset + len(rec.raw)
                if rec.kind == "header":
                    self.header = rec.raw
                self.pace(rec)
                chunk = fh.read(end - sent_upto)
                sent_upto = end
                self.broadcast(chunk)
                bar.update(len(chunk))
            rest = fh.read()  # a truncated tail is served as it is too
            if rest:
                self.broadcast(rest)
                bar.update(len(rest))

    def pace(self, rec: orca.Record) -> None:
        """Wait (serving clients) until the record's time at the chosen speed."""
        if self.speed is None or rec.kind not in ("cmos", "base"):
            self.poll(0)
            return
        try:
            t_us = orca.parse_timestamp_us(rec.raw[-orca.TIMESTAMP_BYTES:])
        except orca.OrcaError:
            self.poll(0)
            return
        last = self._last_us
        if self._clock is None or last is None or t_us < last or t_us - last > MAX_GAP * 1e6:
            self._clock = (time.monotonic(), t_us)
        self._last_us = t_us
        wall0, t0 = self._clock
        target = wall0 + (t_us - t0) / 1e6 / self.speed
        while self.running:
            left = target - time.monotonic()
            if left <= 0:
                break
            self.poll(min(left, 0.1))
        self.poll(0)

    def broadcast(self, chunk: bytes) -> None:
        """Queue *chunk* for every client and send what can be sent now."""
        if not chunk:
            return
        self.sent_bytes += len(chunk)
        for client in self.clients:
            client.push(chunk, self.max_client_buffer)
        self.poll(0)

    def poll(self, timeout: float) -> None:
        """Accept new clients and drain client buffers, waiting up to *timeout*."""
        writers = [c.sock for c in self.clients if c.buf]
        readers = [self.listener] + [c.sock for c in self.clients]
        try:
            readable, writable, _ = select.select(readers, writers, [], timeout)
        except InterruptedError:
            return
        if self.listener in readable:
            self.accept()
        gone = []
        for client in self.clients:
            closed = client.sock in readable and not self._read_ok(client)
            if closed or (client.sock in writable and not client.drain()):
                gone.append(client)
        for client in gone:
            self.drop(client, "disconnected")

    def _read_ok(self, client: _Client) -> bool:
        """Clients send nothing; reading tells whether the peer closed."""
        try:
            return bool(client.sock.recv(4096))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False

    def accept(self) -> None:
        """A new client gets the current header first, as ORCA does."""
        while True:
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            client = _Client(sock, addr)
            if self.header is not None:
                client.push(self.header, self.max_client_buffer)
            self.clients.append(client)
            log.info("client %s:%d connected (%d clients)", *addr[:2], len(self.clients))

    def drop(self, client: _Client, why: str) -> None:
        """Forget a client, logging what it lost."""
        if client in self.clients:
            self.clients.remove(client)
        client.sock.close()
        log.info("client %s:%d %s%s", *client.addr[:2], why,
                 f" ({client.dropped} bytes lost: it did not keep up)" if client.dropped else "")

    def finish(self, timeout: float = 5.0) -> None:
        """Let clients receive what is buffered (at most *timeout* seconds)."""
        end = time.monotonic() + timeout
        while self.running and any(c.buf for c in self.clients) and time.monotonic() < end:
            self.poll(0.1)

    def close(self) -> None:
        for client in list(self.clients):
            self.drop(client, "closed: end of replay")
        self.listener.close()
        log.info("replay finished: %d bytes sent, %d passes", self.sent_bytes, self.passes)


@click.command("orca-replay", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--host", default=None, help="Address to listen on [orca_host].")
@click.option("--port", type=int, default=None, help="TCP port [orca_port, ORCA's default 44666].")
@click.option("--speed", default="1x", show_default=True, help="'1x', '2x', ... (by record timestamps) or 'max'.")
@click.option("--loop", is_flag=True, help="Start again at the end of the file.")
@click.option("--wait", is_flag=True, help="Hold the stream until the first client connects.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_mod.pass_config
def orca_replay_cmd(cfg, file, host, port, speed, loop, wait, quiet):
    """Serve a recorded ORCA stream FILE to clients the way ORCA's Dispatcher
    does: header first, records paced by their timestamps."""
    host = host or str(cfg["orca_host"])
    port = int(cfg["orca_port"]) if port is None else port
    try:
        factor = parse_speed(speed)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--speed") from None
    try:
        replay = OrcaReplay(file, host, port, factor, loop=loop, wait=wait, progress=not quiet)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
    signal.signal(signal.SIGTERM, replay.stop)
    signal.signal(signal.SIGINT, replay.stop)
    log.info("orca-replay pid %d", os.getpid())
    replay.serve()
