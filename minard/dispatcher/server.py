"""The event dispatcher: one data source fanned out to analyzers and write clients.

One asyncio process.  Clients connect over TCP, say who they are with a
``HELLO`` frame (``source``, ``analyzer``, ``writer`` or ``control``), then
exchange frames (:mod:`minard.formats.framing`).  The run flow and the command set are
those of the original dispatcher; ``docs/protocol.md`` is the reference.

Flow control, the one rule that shapes this module: the monitoring must never
slow the DAQ.  Every analyzer has a bounded queue (``dispatcher_analyzer_queue``
events); when it is full, new events for *that* analyzer are dropped and
counted.  Write clients are lossless: when one holds more than
``dispatcher_writer_queue`` events the server stops reading from the source
(TCP back-pressure) until it catches up.

Data frames are never decoded here: runs of consecutive ``RAWDATA``/``RECHDR``
frames are forwarded as the bytes that arrived, so one socket read becomes one
write per client.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
import secrets
import signal
import threading
import time
from collections import Counter, deque
from pathlib import Path

import click

from minard import config as config_mod
from minard import metrics
from minard.dispatcher.journal import AccountingJournal, merge
from minard.formats import handshake
from minard.formats.framing import (
    AUTH,
    CMD,
    DATA_TAGS_RAW,
    HELLO,
    RAWBATCH,
    Batch,
    Frame,
    FrameDecoder,
    FrameError,
    RawBatchError,
    TruncatedFrame,
    command_frame,
    encode_frame,
    expand_rawbatches,
    rawbatch_count,
)
from minard.store import runs as runs_store
from minard.store import schema

log = logging.getLogger("minard.dispatcher.server")

ROLES = ("source", "analyzer", "writer", "control")
#: HELLO options (``role:name:option,...``): ``batch`` = send me RAWBATCH frames as they come.
HELLO_OPTIONS = frozenset({"batch"})
#: The transport's own buffer per client before it reports "paused" (bytes);
#: beyond it events wait in the client's counted queue.
TRANSPORT_HIGH_WATER = 256 * 1024
#: Free buffer offered to each socket read (bytes).
READ_SIZE = 256 * 1024
#: A source or control client with this many reply bytes unread stops being
#: read until it catches up (a client flooding commands cannot eat memory).
REPLY_BACKLOG = 8 * 1024 * 1024
_NAME_SAFE = re.compile(r"[^A-Za-z0-9_.\-]")
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")
_RESERVED_KEYS = frozenset({"run", "tape", "spill", "spills"})
#: Read buffer of a connection that has not authenticated yet (bytes): a
#: crowd of idle connections costs kilobytes each, not the 256 KiB of READ_SIZE.
HANDSHAKE_READ = 1024
#: Seconds between sweeps for handshake/idle timeouts and revoked keys.
SWEEP_PERIOD = 0.5


def parse_grants(cfg) -> dict[str, frozenset[str] | None]:
    """Commands each role may send (``dispatcher_<role>_commands``); None = all."""
    out = {}
    for role in ROLES:
        items = {c.strip() for c in str(cfg[f"dispatcher_{role}_commands"]).split(",") if c.strip()}
        out[role] = None if "*" in items else frozenset(items)
    return out


def parse_programs(cfg) -> dict[str, frozenset[str] | None]:
    """Programs allowed to take each role (``dispatcher_<role>_programs``); None = any."""
    out = {}
    for role in ROLES:
        items = {c.strip() for c in str(cfg[f"dispatcher_{role}_programs"]).split(",") if c.strip()}
        out[role] = None if "*" in items else frozenset(items)
    return out


def parse_hosts(cfg) -> dict[str, list | None]:
    """Networks each role may connect from (``dispatcher_<role>_hosts``); None = anywhere.

    A malformed entry is a configuration error at start, not a silent "any".
    """
    out = {}
    for role in ROLES:
        items = [h.strip() for h in str(cfg[f"dispatcher_{role}_hosts"]).split(",") if h.strip()]
        try:
            out[role] = [ipaddress.ip_network(h, strict=False) for h in items] or None
        except ValueError as exc:
            raise ValueError(f"config dispatcher_{role}_hosts: {exc}") from None
    return out


def host_allowed(networks: list | None, host: str) -> bool:
    """True if *host* (an IP address string) is inside one of *networks* (None = any)."""
    if networks is None:
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if getattr(addr, "ipv4_mapped", None):
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)


class CommandError(Exception):
    """A command was malformed or not allowed; its text is the ERROR reply."""


# --------------------------------------------------------------------------
# Scaler record (pure)
# --------------------------------------------------------------------------

def parse_scaler_data(text: str) -> dict[str, int | float]:
    """Parse ``key=value,key=value`` (numbers only) into a dict.

    Raises CommandError with a readable reason on any malformed item.
    """
    values: dict[str, int | float] = {}
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise CommandError("scaler data must be key=value[,key=value...]")
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not _KEY_RE.fullmatch(key):
            raise CommandError(f"bad scaler item {item[:40]!r} (want key=number)")
        if key in values:
            raise CommandError(f"scaler key {key!r} given twice")
        values[key] = _parse_number(key, raw)
    return values


def _parse_number(key: str, raw: str) -> int | float:
    """An int if *raw* is one, else a finite float; CommandError otherwise."""
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        value = float(raw)
    except ValueError:
        raise CommandError(f"scaler {key}: {raw[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise CommandError(f"scaler {key}: {raw!r} is not finite")
    return value


class ScalerRecord:
    """The scaler record of one run: summed values and the spills already added."""

    def __init__(self, run: int | None = None, tape: int | None = None):
        self.run, self.tape = run, tape
        self.values: dict[str, int | float] = {}
        self.spills: set[int] = set()

    def add_sum(self, data: str) -> None:
        """SCALERSUM: add every value to the record."""
        values = parse_scaler_data(data)
        bad = _RESERVED_KEYS & values.keys()
        if bad:
            raise CommandError(f"scaler key {min(bad)!r} is reserved")
        self._add(values)

    def add_spill(self, data: str) -> bool:
        """SCALERREC: add the values once per ``spill``; False if already added."""
        values = parse_scaler_data(data)
        spill = values.pop("spill", None)
        if not isinstance(spill, int) or spill < 0:
            raise CommandError("SCALERREC data needs spill=N (a non-negative integer)")
        bad = _RESERVED_KEYS & values.keys()
        if bad:
            raise CommandError(f"scaler key {min(bad)!r} is reserved")
        if spill in self.spills:
            return False
        self.spills.add(spill)
        self._add(values)
        return True

    def _add(self, values: dict[str, int | float]) -> None:
        for key, value in values.items():
            self.values[key] = self.values.get(key, 0) + value

    def as_dict(self) -> dict:
        """Run, tape, number of spills and the values (sorted by key)."""
        return {"run": self.run, "tape": self.tape, "spills": len(self.spills),
                **dict(sorted(self.values.items()))}

    def as_text(self) -> str:
        """The record in the ``key=value,...`` syntax of SCALERSUM."""
        return ",".join(f"{k}={'' if v is None else v}" for k, v in self.as_dict().items())


# --------------------------------------------------------------------------
# One connection
# --------------------------------------------------------------------------

class Client(asyncio.BufferedProtocol):
    """One TCP connection: its decoder, its counted output queue and counters.

    A buffered protocol: the transport reads straight into the decoder's buffer.
    """

    def __init__(self, server: Dispatcher, conn_id: int):
        self.server = server
        self.conn_id = conn_id
        self.role: str | None = None
        self.name = ""
        self.batch = False  # takes RAWBATCH frames (HELLO option "batch")
        self.fd = -1
        self.peer = ("?", 0)
        self.transport: asyncio.Transport | None = None
        # Until the handshake succeeds a connection may only send small frames
        # into a small buffer (docs/protocol.md section 2.1).
        self.decoder = FrameDecoder(
            handshake.MAX_HANDSHAKE_FRAME if server.auth else server.max_frame,
            batch_tags=DATA_TAGS_RAW, initial_buffer=HANDSHAKE_READ)
        self.authenticated = not server.auth
        self.challenge: dict | None = None  # the pending AUTH challenge
        self.key_id: str | None = None  # StoredKey of the program key it proved
        self.last_input = self.connected_mono = time.monotonic()
        self.queue: deque[tuple[bytes, int]] = deque()
        self.queued_events = 0
        self.queued_bytes = 0
        self.write_paused = False
        self.closed = False
        self.holds: set[str] = set()
        self._processing = False
        self.events_sent = self.events_dropped = self.bytes_sent = 0
        self.events_received = self.bytes_received = 0
        self.warned_data = False
        self.broken = False
        self.connected_at = time.time()

    # -- asyncio callbacks -------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER)
        self.server.register(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.writable(READ_SIZE if self.role else HANDSHAKE_READ)

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        self.last_input = time.monotonic()
        self.decoder.commit(nbytes)
        self.process()

    def eof_received(self):
        try:
            self.decoder.check_eof()
        except TruncatedFrame as exc:
            log.warning("%s: %s", self.label, exc)
        return False

    def connection_lost(self, exc):
        self.closed = True
        self.server.unregister(self, exc)

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        self.flush()
        if not self.queue:
            self.release("replies")
        self.server.writer_progress(self)

    # -- input -------------------------------------------------------------
    def process(self, final: bool = False) -> None:
        """Handle every complete frame received, unless input is on hold.

        *final* (the connection is gone) ignores holds and the closed flag.
        """
        if self._processing:
            return
        self._processing = True
        try:
            while not self.broken and (final or not (self.holds or self.closed)):
                try:
                    item = self.decoder.next_item()
                except FrameError as exc:
                    self.server.protocol_error(self, exc)
                    return
                if item is None:
                    return
                if isinstance(item, Batch):
                    self.server.on_data(self, item)
                else:
                    self.server.on_frame(self, item)
        finally:
            self._processing = False

    def hold(self, reason: str) -> None:
        """Stop reading and processing this client's input (back-pressure, ENDTAPE)."""
        if not self.holds and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.holds.add(reason)

    def release(self, reason: str) -> None:
        """Undo :meth:`hold`; buffered frames are processed on the next loop turn."""
        if reason not in self.holds:
            return
        self.holds.discard(reason)
        if not self.holds and not self.closed:
            self.transport.resume_reading()
            asyncio.get_running_loop().call_soon(self.process)

    # -- output ------------------------------------------------------------
    def send(self, raw: bytes, count: int = 0, limit: int | None = None) -> bool:
        """Queue *raw* (holding *count* events); with a *limit*, drop when full."""
        if self.closed:
            return False
        if limit is not None and count and self.queued_events + count > limit:
            self.events_dropped += count
            return False
        if not self.write_paused and not self.queue:
            self.transport.write(raw)
            self.events_sent += count
            self.bytes_sent += len(raw)
        else:
            self.queue.append((raw, count))
            self.queued_events += count
            self.queued_bytes += len(raw)
        return True

    def send_cmd(self, text: str) -> None:
        """Queue a CMD frame (commands are never dropped)."""
        self.send(command_frame(text))

    def flush(self) -> None:
        """Hand queued chunks to the transport until it reports full again."""
        queue = self.queue
        while queue and not self.write_paused and not self.closed:
            raw, count = queue.popleft()
            self.queued_events -= count
            self.queued_bytes -= len(raw)
            self.events_sent += count
            self.bytes_sent += len(raw)
            self.transport.write(raw)

    def close(self, reason: str = "") -> None:
        """Close the connection after flushing what the transport holds."""
        if reason:
            log.info("closing %s: %s", self.label, reason)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- reporting ---------------------------------------------------------
    @property
    def label(self) -> str:
        """``role[name]#socket host:port`` for log lines."""
        name = f"[{self.name}]" if self.name else ""
        return f"{self.role or 'client'}{name}#{self.fd} {self.peer[0]}:{self.peer[1]}"

    def as_dict(self) -> dict:
        """Counters and queue state, for STATS? and DUMP."""
        return {
            "socket": self.fd, "role": self.role, "name": self.name, "batch": self.batch,
            "peer": f"{self.peer[0]}:{self.peer[1]}",
            "events_sent": self.events_sent, "events_dropped": self.events_dropped,
            "bytes_sent": self.bytes_sent, "events_received": self.events_received,
            "bytes_received": self.bytes_received, "queued_events": self.queued_events,
            "queued_bytes": self.queued_bytes, "write_paused": self.write_paused,
            "input_held": sorted(self.holds),
        }


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------

class Dispatcher:
    """Server state: clients by role, run state, scalers, counters."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.max_frame = int(cfg["dispatcher_max_frame"])
        self.analyzer_limit = int(cfg["dispatcher_analyzer_queue"])
        self.writer_limit = int(cfg["dispatcher_writer_queue"])
        self.finished_timeout = float(cfg["dispatcher_finished_timeout"])
        self.shutdown_wait = float(cfg["dispatcher_shutdown_wait"])
        self.accounting_dir = Path(cfg.path("dispatcher_accounting_dir")
                                   if hasattr(cfg, "path") else cfg["dispatcher_accounting_dir"])
        self.redis_url = str(cfg.get("redis_url") or "")
        self._redis = None
        self.auth = bool(cfg.get("dispatcher_auth", True))
        self.grants = parse_grants(cfg)
        self.programs = parse_programs(cfg)
        self.hosts = parse_hosts(cfg)
        self.max_connections = int(cfg["dispatcher_max_connections"])
        self.handshake_timeout = float(cfg["dispatcher_handshake_timeout"])
        self.idle_timeout = float(cfg["dispatcher_idle_timeout"])
        self.keys = self._key_store(cfg) if self.auth else None
        # Per-run event accounting (docs/storage.md {run:<run>}:acct): deltas not yet in Redis,
        # also kept in a journal file that survives kill -9 (minard.dispatcher.journal).
        self.acct: dict[int, Counter] = {}
        self.accounting_period = float(cfg["dispatcher_accounting_period"])
        self.interval_length = max(1, int(cfg["dispatcher_accounting_interval"]))
        self._interval_end = 0.0
        self._interval_names: dict[str, str] = {}
        self.journal = (AccountingJournal(self.accounting_dir, config_mod.redact(self.redis_url))
                        if self.redis_url else None)
        self._flush_lock = asyncio.Lock()
        first = str(cfg["dispatcher_analyzer_programs"]).split(",")[0].strip()
        #: The analyzer program whose deliveries are accounted (None: every analyzer).
        self.monitor_program = None if first in ("", "*") else first
        self.unaccounted_delay = float(cfg["dispatcher_unaccounted_delay"])
        self._fake_salt_key = secrets.token_bytes(32)
        self.clients: dict[int, Client] = {}
        self.analyzers: list[Client] = []
        self.writers: list[Client] = []
        self.source: Client | None = None
        self.state = "NoTape"
        self.run: int | None = None
        self.tape: int | None = None
        self.scalers = ScalerRecord()
        self.shutting_down = False
        self._awaiting: set[Client] = set()
        self._deferred: list[tuple[Client, str]] = []
        self._finished = asyncio.Event()
        self._notape = asyncio.Event()
        self._notape.set()
        self._tasks: set[asyncio.Task] = set()
        self._conn_ids = 0
        self.server: asyncio.base_events.Server | None = None
        self.done = asyncio.Event()
        self.started = time.time()
        self.counters = dict.fromkeys((
            "received_events", "received_bytes", "dropped_events", "rejected_events",
            "finished_timeouts", "redis_failures", "protocol_errors",
            "backpressure_pauses", "runs_ended", "connections", "malformed_batches",
            "auth_failures", "handshake_timeouts", "idle_timeouts", "connections_refused",
            "commands_refused", "hosts_refused", "keys_revoked", "journal_failures"), 0)
        self.handlers = {
            "ACCTREC": self.cmd_acctrec, "ANALYZERS?": self.cmd_analyzers,
            "BEGINTAPE": self.cmd_begintape, "BROADCAST": self.cmd_broadcast,
            "DIR?": self.cmd_dir, "DROP": self.cmd_drop, "DUMP": self.cmd_dump,
            "ENDTAPE": self.cmd_endtape, "EXIT": self.cmd_exit,
            "FINISHED": self.cmd_finished, "QUIT": self.cmd_quit,
            "SCALERREC": self.cmd_scalerrec, "SCALERS?": self.cmd_scalers,
            "SCALERSUM": self.cmd_scalersum, "SHUTDOWN": self.cmd_shutdown,
            "STATS?": self.cmd_stats,
        }

    @staticmethod
    def _key_store(cfg):
        """The key store of ``dispatcher_keys_file`` (default ``keys_file``)."""
        from minard.ops.keys import KeyStore

        path = str(cfg.get("dispatcher_keys_file") or "")
        if path:
            return KeyStore(config_mod.Config(cfg).path("dispatcher_keys_file"))
        return KeyStore.from_config(cfg)

    # -- lifecycle ---------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Listen on *host*:*port* (0 = any free port); return the bound port."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._new_client, host, port, reuse_address=True)
        bound = self.server.sockets[0].getsockname()[1]
        log.info("dispatcher listening on %s:%d (analyzer queue %d, writer queue %d,"
                 " FINISHED timeout %.1fs, at most %d connections, handshake timeout %.1fs)",
                 host, bound, self.analyzer_limit, self.writer_limit, self.finished_timeout,
                 self.max_connections, self.handshake_timeout)
        if self.auth:
            log.info("authentication on: program keys from %s", self.keys.path)
        else:
            log.warning("dispatcher_auth is off: any client that reaches port %d may claim any"
                        " role, including EXIT and SHUTDOWN (test benches only)", bound)
        self.spawn(self._sweep())
        if self.redis_url:
            self._open_journal()
            self.spawn(self._account_loop())
        return bound

    async def _sweep(self) -> None:
        """Close connections past their handshake or idle timeout, and those whose key was revoked."""
        stamp = None
        while not self.done.is_set():
            await asyncio.sleep(SWEEP_PERIOD)
            now = time.monotonic()
            for client in list(self.clients.values()):
                if client.closed or client.broken:
                    continue
                if not client.authenticated and now - client.connected_mono > self.handshake_timeout:
                    self.counters["handshake_timeouts"] += 1
                    self.refuse(client, f"handshake timeout ({self.handshake_timeout:g}s):"
                                " send HELLO and AUTH first", counter=None)
                elif (client.role == "control" and self.idle_timeout > 0
                      and now - client.last_input > self.idle_timeout):
                    self.counters["idle_timeouts"] += 1
                    client.send_cmd(f"ERROR:idle for more than {self.idle_timeout:g}s: closing")
                    client.close("idle timeout")
            if self.keys is not None:
                new_stamp = self.keys._file_stamp()
                if new_stamp != stamp:
                    stamp = new_stamp
                    self._drop_revoked()

    def _drop_revoked(self) -> None:
        """The key file changed: close connections whose program key is gone or replaced."""
        for client in list(self.clients.values()):
            if client.key_id is None or client.closed:
                continue
            record = self.keys.dispatch_record(client.name)
            if record is None or record.get("stored_key") != client.key_id:
                self.counters["keys_revoked"] += 1
                log.warning("%s: its program key was revoked or replaced: closing", client.label)
                client.send_cmd("ERROR:AUTH: key revoked")
                client.close()

    def _new_client(self) -> Client:
        self._conn_ids += 1
        return Client(self, self._conn_ids)

    def spawn(self, coro) -> asyncio.Task:
        """Run *coro* as a task that is kept alive and whose errors are logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal task failed", exc_info=task.exception())

    def register(self, client: Client) -> None:
        """A connection was accepted (or refused at once beyond ``dispatcher_max_connections``)."""
        client.connected_mono = time.monotonic()
        if len(self.clients) >= self.max_connections:
            self.counters["connections_refused"] += 1
            log.warning("connection from %s:%d refused: %d connections open (dispatcher_max_connections)",
                        *client.peer, len(self.clients))
            client.send_cmd("ERROR:too many connections")
            client.broken = True
            client.transport.close()
            return
        self.clients[client.conn_id] = client
        self.counters["connections"] += 1
        log.debug("connection from %s:%d on socket %d", *client.peer, client.fd)
        if self.shutting_down:
            client.send_cmd("ERROR:dispatcher is shutting down")
            client.close()

    def unregister(self, client: Client, exc) -> None:
        """A connection closed: forget it and repair the run flow."""
        self.clients.pop(client.conn_id, None)
        acct = self._run_acct() if client in self.analyzers and self._monitoring(client) else None
        if acct is not None and client.queued_events:
            # Accepted for delivery, never handed over: counted as lost with the analyzer.
            acct["dispatched"] -= client.queued_events
            acct["dropped:analyzer_lost"] += client.queued_events
            acct[self._in_interval("dropped:analyzer_lost")] += client.queued_events
            self._journal_pending()
        for group in (self.analyzers, self.writers):
            if client in group:
                group.remove(client)
        # Control connections (monitors, `minard send`) come and go every few
        # seconds; only data clients are worth an INFO line.
        level = logging.DEBUG if client.role in (None, "control") else logging.INFO
        log.log(level, "%s disconnected%s (sent %d events, dropped %d)", client.label,
                f": {exc}" if exc else "", client.events_sent, client.events_dropped)
        if client in self._awaiting:
            self._awaiting.discard(client)
            if not self._awaiting:
                self._finished.set()
        if client is self.source:
            self._source_lost(client)
        if client.role == "writer":
            self.writer_progress(client)

    def _source_lost(self, client: Client) -> None:
        """The data source went away: a tape in progress ends as if by ENDTAPE."""
        if client.holds == {"backpressure"}:
            client.holds.clear()
            client.process(final=True)  # what was read before the close still counts
        self.source = None
        if self.state == "Tape":
            log.warning("data source %s disconnected in the middle of run %s:"
                        " ending the tape as if it had sent ENDTAPE", client.label, self.run)
            self._begin_ending("source disconnected")

    # -- data path ---------------------------------------------------------
    def on_data(self, client: Client, batch: Batch) -> None:
        """Fan one batch of data frames out to every analyzer and write client."""
        if not client.authenticated:
            self.refuse(client, "authenticate first: HELLO role:program, then AUTH")
            return
        if client is not self.source:
            if client.role == "source" and self.source is None and not self.shutting_down:
                self.source = client
                log.info("%s is the data source (data before any BEGINTAPE)", client.label)
            else:
                self._reject_data(client, batch.count)
                return
        client.events_received += batch.count
        counters = self.counters
        counters["received_events"] += batch.count
        counters["received_bytes"] += len(batch.raw)
        raw, count, limit = batch.raw, batch.count, self.analyzer_limit
        expanded = None  # RAWDATA form, made once for the clients that need it
        acct = self._run_acct()
        if acct is not None:
            acct["source_events"] += count
            acct[self._in_interval("source_events")] += count
        monitored = False
        for analyzer in self.analyzers:
            if batch.packed and not analyzer.batch:
                expanded = expanded or expand_rawbatches(raw)
                sent = analyzer.send(expanded, count, limit)
            else:
                sent = analyzer.send(raw, count, limit)
            if not sent:
                counters["dropped_events"] += count
            if acct is None:
                continue
            if sent:
                acct[self._in_interval(f"sent:{analyzer.name or analyzer.role}")] += count
            if self._monitoring(analyzer):
                monitored = True
                acct["dispatched" if sent else "dropped:dispatcher_queue"] += count
                if not sent:
                    acct[self._in_interval("dropped:dispatcher_queue")] += count
        if acct is not None and not monitored:
            acct["dropped:no_analyzer"] += count
            acct[self._in_interval("dropped:no_analyzer")] += count
        if acct is not None:
            self._journal_pending()
        backlog = False
        for writer in self.writers:
            if batch.packed and not writer.batch:
                expanded = expanded or expand_rawbatches(raw)
                writer.send(expanded, count)
            else:
                writer.send(raw, count)
            if writer.queued_events > self.writer_limit:
                backlog = True
        if backlog and "backpressure" not in client.holds:
            counters["backpressure_pauses"] += 1
            client.hold("backpressure")

    def _run_acct(self) -> Counter | None:
        """The pending accounting deltas of the open run, or None outside a run."""
        if self.state == "NoTape" or self.run is None:
            return None
        acct = self.acct.get(self.run)
        if acct is None:
            acct = self.acct[self.run] = Counter()
        return acct

    def _in_interval(self, field: str) -> str:
        """The accounting delta name of *field* in the current interval (runs.interval_field).

        Per batch, so the names are made once per interval.  An interval's
        ``sent:<analyzer>`` counts events handed to the analyzer's queue; those it
        never took are ``dropped:analyzer_lost`` of the interval the loss was seen in.
        """
        now = time.time()
        if now >= self._interval_end:
            start = int(now // self.interval_length) * self.interval_length
            self._interval_start, self._interval_end = start, start + self.interval_length
            self._interval_names = {}
        name = self._interval_names.get(field)
        if name is None:
            name = self._interval_names[field] = runs_store.interval_field(
                self._interval_start, self.interval_length, field)
        return name

    def _monitoring(self, client: Client) -> bool:
        """True if *client* is the monitoring analyzer whose deliveries are accounted."""
        return self.monitor_program is None or client.name == self.monitor_program

    def _open_journal(self) -> None:
        """Read back what a killed predecessor had not written to Redis (see the journal)."""
        try:
            merge(self.acct, self.journal.open())
            self.journal.write(self.acct)
        except OSError as exc:
            log.error("accounting journal %s unusable (%s): a kill -9 would lose up to %.1f s"
                      " of the runs' accounting", self.journal.path, exc, self.accounting_period)
            self.journal = None

    def _journal_pending(self) -> None:
        """Write the pending accounting to the journal (one small pwrite)."""
        if self.journal is not None:
            try:
                self.journal.write(self.acct)
            except OSError as exc:
                self.counters["journal_failures"] += 1
                if self.counters["journal_failures"] == 1:
                    log.error("cannot write the accounting journal %s: %s", self.journal.path, exc)

    async def _account_loop(self) -> None:
        """Write the accounting deltas to Redis at once (what the journal recovered),
        then every ``dispatcher_accounting_period`` seconds."""
        while not self.done.is_set():
            await self.flush_accounting()
            await asyncio.sleep(self.accounting_period)

    async def flush_accounting(self) -> bool:
        """Add the pending per-run deltas to Redis; kept for the next try if Redis is down.

        One write at a time.  With the journal, a failed write stays
        *unconfirmed* (it may have been applied) and the next write settles
        it by its epoch (:mod:`minard.dispatcher.journal`).
        """
        async with self._flush_lock:
            pending = {run: c for run, c in self.acct.items() if c}
            journal = self.journal
            if not self.redis_url or not (pending or (journal is not None and journal.unconfirmed)):
                return True
            self.acct = {run: c for run, c in self.acct.items() if not c}
            epoch, earlier = 0, []
            if journal is not None:
                epoch, _, earlier = journal.begin(pending)
                self._journal_pending()
            try:
                await asyncio.to_thread(self._store_accounting, pending, epoch, earlier)
            except Exception as exc:  # noqa: BLE001 - redis down, bad URL...: keep the counts
                if journal is None:
                    merge(self.acct, pending)
                self.counters["redis_failures"] += 1
                log.warning("cannot store the event accounting in Redis (%s): %s; kept for the next try",
                            config_mod.redact(self.redis_url), exc)
                return False
            if journal is not None:
                journal.confirmed()
                self._journal_pending()
            return True

    def _store_accounting(self, pending: dict[int, Counter], epoch: int = 0, earlier=()) -> None:
        """HINCRBY every delta into {run:<run>}:acct, one transaction per run (in a thread).

        A run's keys share one Redis Cluster hash slot (``{run:<run>}``), several
        runs do not, so each run is its own transaction, which also raises this
        journal's epoch in the run's ``{run:<run>}:epochs`` to *epoch*.  The
        counts of *earlier* unconfirmed writes are added again for each run whose
        stored epoch is below theirs (a write may have reached some runs only).
        """

        redis = self._redis_client()
        targets = sorted(set(pending) | {run for _, runs in earlier for run in runs})
        applied = dict.fromkeys(targets, 0)
        if earlier and targets:
            with redis.pipeline(transaction=False) as pipe:
                for run in targets:
                    pipe.zscore(runs_store.run_key(run, runs_store.EPOCHS), self.journal.ident)
                applied = {run: int(score or 0) for run, score in zip(targets, pipe.execute())}
        for run in targets:
            counts = Counter(pending.get(run, {}))
            for e, runs in earlier:
                if e > applied[run] and run in runs:
                    counts.update(runs[run])
            pipe = redis.pipeline(transaction=True)
            runs_store.add_accounting(pipe, run, counts)
            if epoch:
                key = runs_store.run_key(run, runs_store.EPOCHS)
                pipe.zadd(key, {self.journal.ident: epoch}, gt=True)
                pipe.expire(key, runs_store.RUN_KEEP)
            pipe.execute()

    def _redis_client(self):
        """The dispatcher's Redis client (role ``pipeline``, created on first use)."""
        if self._redis is None:
            from minard.store import connection

            self._redis = connection.redis(self.cfg, "pipeline")
        return self._redis

    async def _check_unaccounted(self, run: int) -> None:
        """Some time after a run ended, raise an alarm if events of it are unaccounted.

        Not if the same run number is being taken again by then (a looping
        replay): its newest events are still on their way to Redis, so the
        run is checked at its next end instead of alarming on events in flight.
        """
        await asyncio.sleep(self.unaccounted_delay)
        if self.state != "NoTape" and self.run == run:
            log.info("run %s is being taken again: its accounting is checked when it ends", run)
            return
        await self.flush_accounting()
        try:
            await asyncio.to_thread(self._alarm_unaccounted, run)
        except Exception as exc:  # noqa: BLE001 - redis down: the numbers stay in runs show
            log.warning("cannot check the accounting of run %s: %s", run, exc)

    def _alarm_unaccounted(self, run: int) -> None:
        """Raise a warning alarm if run *run* has unaccounted events (in a thread)."""
        from minard.store import alarms

        r = self._redis_client()
        summary = runs_store.get_run(r, run)
        if not summary or not summary.get("unaccounted"):
            return
        message = (f"run {run}: {summary['unaccounted']} events unaccounted (received"
                   f" {summary['source_events']}, stored {summary['events']}, counted lost"
                   f" {summary['dropped']})")
        log.warning("%s", message)
        alarms.raise_alarm(r, "warning", message, source="dispatcher", program="dispatcher",
                           key=f"unaccounted:{run}")

    def _reject_data(self, client: Client, count: int) -> None:
        """Data from anyone but the data source is dropped (one ERROR per client)."""
        self.counters["rejected_events"] += count
        if not client.warned_data:
            client.warned_data = True
            why = ("another client is the data source" if client.role == "source"
                   else f"a {client.role or 'unidentified'} client may not send data")
            client.send_cmd(f"ERROR:data rejected: {why}")
            log.warning("%s sent data: rejected (%s)", client.label, why)

    def writer_progress(self, client: Client) -> None:
        """A write client drained or left: resume the source if no writer lags."""
        source = self.source
        if source is None or "backpressure" not in source.holds:
            return
        low = self.writer_limit // 2
        if all(w.queued_events <= low for w in self.writers):
            source.release("backpressure")

    # -- frames and commands -------------------------------------------------
    def on_frame(self, client: Client, frame: Frame) -> None:
        """Handle one non-data frame (HELLO or CMD; anything else is an error)."""
        if frame.tag == HELLO:
            self.on_hello(client, frame.text)
        elif frame.tag == AUTH and client.challenge is not None:
            self.on_auth(client, frame.text)
        elif not client.authenticated:
            self.refuse(client, "authenticate first: HELLO role:program, then AUTH")
        elif frame.tag == CMD:
            if client.role is None:  # auth off: a quick script without HELLO is a control client
                if not host_allowed(self.hosts["control"], client.peer[0]):
                    self.refuse(client, f"role control may not connect from {client.peer[0]}",
                                counter="hosts_refused")
                    return
                self._set_role(client, "control", "")
            self.on_command(client, frame.text)
        elif frame.tag == RAWBATCH:  # only a malformed one comes here (FrameDecoder.next_item)
            self._reject_rawbatch(client, frame.payload)
        else:
            client.send_cmd(f"ERROR:unknown frame tag {frame.tag!r}")

    def _reject_rawbatch(self, client: Client, payload: bytes) -> None:
        """A RAWBATCH whose lengths do not add up: dropped whole, counted, ERROR reply."""
        try:
            rawbatch_count(payload, 0, len(payload))
            reason = "not expected here"
        except RawBatchError as exc:
            reason = str(exc)
        self.counters["malformed_batches"] += 1
        client.send_cmd(f"ERROR:RAWBATCH rejected: {reason}")
        log.warning("%s: RAWBATCH of %d bytes rejected: %s", client.label, len(payload), reason)

    def on_hello(self, client: Client, text: str) -> None:
        """``HELLO role[:name[:options]]``: the client says what it is (once).

        With authentication on, *name* is the program whose key the client
        holds; the server answers with an AUTH challenge (:meth:`on_auth`).
        """
        role, _, rest = text.strip().partition(":")
        name, _, options = rest.partition(":")
        if client.role is not None or client.challenge is not None:
            client.send_cmd(f"ERROR:HELLO: already identified as {client.role or 'pending AUTH'}")
            return
        if role not in ROLES:
            self.protocol_error(client, f"HELLO: unknown role {role[:20]!r}"
                                f" (want one of {', '.join(ROLES)})")
            return
        wanted = {o.strip() for o in options.split(",") if o.strip()}
        if wanted - HELLO_OPTIONS:
            self.protocol_error(client, f"HELLO: unknown option {min(wanted - HELLO_OPTIONS)[:20]!r}"
                                f" (known: {', '.join(sorted(HELLO_OPTIONS))})")
            return
        if not host_allowed(self.hosts[role], client.peer[0]):
            self.refuse(client, f"role {role} may not connect from {client.peer[0]}",
                        counter="hosts_refused")
            return
        name = _NAME_SAFE.sub("_", name)[:64]
        if not self.auth:
            self._welcome(client, role, name, "batch" in wanted, "")
            return
        record = self.keys.dispatch_record(name) if name else None
        nonce = handshake.new_nonce()
        client.challenge = {"hello": text.strip(), "role": role, "name": name,
                            "batch": "batch" in wanted, "nonce": nonce,
                            "record": record or self._decoy_record(name)}
        client.send(encode_frame(AUTH, handshake.challenge(nonce, client.challenge["record"])))

    def _decoy_record(self, name: str) -> dict:
        """A record for an unknown program: a stable salt, so probing reveals no names."""
        salt = hmac.new(self._fake_salt_key, name.encode(), hashlib.sha256).digest()[:16]
        return {"salt": salt.hex(), **handshake.SCRYPT, "stored_key": "", "server_key": ""}

    def on_auth(self, client: Client, text: str) -> None:
        """The AUTH response: accept if it proves the key and the program may take the role."""
        pending, client.challenge = client.challenge, None
        role, name = pending["role"], pending["name"]
        signature = handshake.verify(pending["record"], pending["hello"], pending["nonce"], text)
        if signature is None:
            self.refuse(client, "authentication failed")
            return
        allowed = self.programs[role]
        if allowed is not None and name not in allowed:
            self.refuse(client, f"program {name} may not connect as {role}")
            return
        client.key_id = pending["record"]["stored_key"]
        self._welcome(client, role, name, pending["batch"], ":" + signature.hex())

    def _welcome(self, client: Client, role: str, name: str, batch: bool, suffix: str) -> None:
        """The client is who it says: give it its role and the full frame limit."""
        client.authenticated = True
        client.decoder.max_frame = self.max_frame
        client.batch = batch
        self._set_role(client, role, name)
        client.send_cmd(f"OK:HELLO:{client.fd}{suffix}")
        if role in ("analyzer", "writer") and self.state == "Tape":
            client.send_cmd(f"BEGINTAPE:{self.run}:{self.tape}")

    def refuse(self, client: Client, reason: str, counter: str | None = "auth_failures") -> None:
        """One ``ERROR:AUTH`` frame, then the connection is closed; nothing more is read."""
        if client.broken:
            return
        if counter:
            self.counters[counter] += 1
        log.warning("%s refused: %s", client.label, reason)
        client.send_cmd(f"ERROR:AUTH: {reason}")
        client.broken = True
        if client.transport is not None:
            client.transport.close()

    def _set_role(self, client: Client, role: str, name: str) -> None:
        client.role, client.name = role, name
        if role == "analyzer":
            self.analyzers.append(client)
        elif role == "writer":
            self.writers.append(client)
        log.log(logging.DEBUG if role == "control" else logging.INFO, "%s identified", client.label)

    def on_command(self, client: Client, text: str) -> None:
        """Run one text command; errors become an ERROR reply, never a disconnect."""
        text = text.strip()
        name, _, arg = text.partition(":")
        handler = self.handlers.get(name)
        try:
            if handler is None:
                raise CommandError(f"unknown command {name[:40]!r} (DIR? lists the commands)")
            allowed = self.grants.get(client.role)
            if allowed is not None and name not in allowed:
                self.counters["commands_refused"] += 1
                log.warning("%s: %s refused (not granted to role %s)", client.label, name, client.role)
                raise CommandError(f"not allowed for a {client.role} client")
            reply = handler(client, arg)
        except CommandError as exc:
            reply = f"ERROR:{name[:40]}: {exc}" if handler else f"ERROR:{exc}"
        if reply is not None:
            client.send_cmd(reply)
        if client.queued_bytes > REPLY_BACKLOG and client.role in ("control", "source"):
            client.hold("replies")

    def protocol_error(self, client: Client, exc) -> None:
        """Unreadable input: tell the client and close its connection only."""
        self.counters["protocol_errors"] += 1
        log.warning("%s: protocol error: %s; closing the connection", client.label, exc)
        client.send_cmd(f"ERROR:protocol: {exc}")
        client.broken = True  # nothing more from this client is processed
        if client.transport is not None:
            client.transport.close()

    # -- command handlers (return the reply text, or None) -------------------
    def _require_role(self, client: Client, *roles: str) -> None:
        if client.role not in roles:
            article = "an" if roles[0][0] in "aeiou" else "a"
            raise CommandError(f"only {article} {' or '.join(roles)} client may send this")

    def cmd_begintape(self, client: Client, arg: str) -> str | None:
        """BEGINTAPE:run:tape from the data source starts a run."""
        self._require_role(client, "source")
        run, tape = _parse_ints(arg, 2, "BEGINTAPE:runNo:tapeNo")
        if self.source is not None and self.source is not client:
            log.warning("%s sent BEGINTAPE:%s but %s is the data source: ignored,"
                        " disconnecting it", client.label, arg, self.source.label)
            client.send_cmd("ERROR:BEGINTAPE: the dispatcher already has a data source")
            client.close()
            return None
        if self.shutting_down:
            raise CommandError("the dispatcher is shutting down")
        if self.state == "Ending":
            # The previous run is still ending: run this BEGINTAPE after ALLFINISHED.
            client.hold("ending")
            self._deferred.append((client, f"BEGINTAPE:{arg}"))
            return None
        if self.state != "NoTape":
            raise CommandError(f"run {self.run} is still open ({self.state}): send ENDTAPE first")
        self.source = client
        self.state, self.run, self.tape = "Tape", run, tape
        self._notape.clear()
        self.scalers = ScalerRecord(run, tape)
        log.info("BEGINTAPE run %d tape %d from %s", run, tape, client.label)
        for target in self.analyzers + self.writers:
            target.send_cmd(f"BEGINTAPE:{run}:{tape}")
        return "OK:BEGINTAPE"

    def cmd_endtape(self, client: Client, arg: str) -> str | None:
        """ENDTAPE from the data source: finish the run (see _end_tape)."""
        self._require_role(client, "source")
        if client is not self.source or self.state != "Tape":
            raise CommandError("no tape is open from this source")
        client.send_cmd("OK:ENDTAPE")
        # Frames after ENDTAPE wait until ALLFINISHED has gone out.
        client.hold("ending")
        self._begin_ending("ENDTAPE")
        return None

    def cmd_finished(self, client: Client, arg: str) -> str:
        """FINISHED from an analyzer, answering ENDTAPE."""
        self._require_role(client, "analyzer")
        if client in self._awaiting:
            self._awaiting.discard(client)
            if not self._awaiting:
                self._finished.set()
        return "OK:FINISHED"

    def cmd_acctrec(self, client: Client, arg: str) -> str:
        """ACCTREC:data is appended as one line to Accounting.dat."""
        if not arg.strip():
            raise CommandError("ACCTREC needs data")
        data = "".join(c if c.isprintable() else " " for c in arg)
        line = (f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime())}Z\t"
                f"run={self.run if self.run is not None else '-'}\t"
                f"{client.role}:{client.name or '-'}#{client.fd}\t{data}\n")
        try:
            self.accounting_dir.mkdir(parents=True, exist_ok=True)
            with open(self.accounting_dir / "Accounting.dat", "a", encoding="utf-8") as fh:
                fh.write(line)
        except OSError as exc:
            log.error("cannot append to Accounting.dat: %s", exc)
            raise CommandError(f"cannot write Accounting.dat: {exc.strerror}") from None
        return "OK:ACCTREC"

    def cmd_broadcast(self, client: Client, arg: str) -> str:
        """BROADCAST:to:command sends *command* as a CMD frame to the *to* group."""
        to, sep, command = arg.partition(":")
        if not sep or not command.strip():
            raise CommandError("usage BROADCAST:to:command, to = analyzers|writers|source|all|<socket>")
        targets = self._targets(to.strip().lower())
        for target in targets:
            target.send_cmd(command)
        log.info("BROADCAST %r to %s (%d clients) from %s", command, to, len(targets), client.label)
        return f"OK:BROADCAST:{len(targets)}"

    def _targets(self, to: str) -> list[Client]:
        """The clients named by a BROADCAST destination."""
        if to == "analyzers":
            return list(self.analyzers)
        if to == "writers":
            return list(self.writers)
        if to == "source":
            return [self.source] if self.source else []
        if to == "all":
            return ([self.source] if self.source else []) + self.analyzers + self.writers
        if to.isdigit():
            found = [c for c in self.clients.values() if c.fd == int(to)]
            if not found:
                raise CommandError(f"no client on socket {to}")
            return found
        raise CommandError(f"unknown destination {to[:20]!r} (analyzers|writers|source|all|<socket>)")

    def cmd_scalers(self, client: Client, arg: str) -> str:
        """SCALERS? replies with the current scaler record."""
        return "SCALERS:" + self.scalers.as_text()

    def cmd_scalersum(self, client: Client, arg: str) -> str:
        """SCALERSUM:key=value,... adds to the current scaler record."""
        self.scalers.add_sum(arg)
        return "OK:SCALERSUM"

    def cmd_scalerrec(self, client: Client, arg: str) -> str:
        """SCALERREC:spill=N,key=value,... adds once per spill."""
        added = self.scalers.add_spill(arg)
        return "OK:SCALERREC:added" if added else "OK:SCALERREC:duplicate"

    def cmd_analyzers(self, client: Client, arg: str) -> str:
        """ANALYZERS? in the seed's format: seq socket tcp/host:port events."""
        lines = ["ANALYZERS:"]
        for seq, a in enumerate(self.analyzers, 1):
            lines.append(f"{seq} {a.fd} tcp/{a.peer[0]}:{a.peer[1]} {a.events_sent}")
        lines.append("END")
        return "\n".join(lines)

    def cmd_drop(self, client: Client, arg: str) -> str:
        """DROP:isocket closes the connection of the client on that socket."""
        (fd,) = _parse_ints(arg, 1, "DROP:isocket")
        found = [c for c in self.clients.values() if c.fd == fd]
        if not found:
            raise CommandError(f"no client on socket {fd}")
        for target in found:
            target.close(f"DROP from {client.label}")
        return f"OK:DROP:{fd}"

    def cmd_dump(self, client: Client, arg: str) -> str:
        """DUMP writes the state, every client and every queue into the log."""
        for line in self.dump_lines():
            log.info("DUMP %s", line)
        return "OK:DUMP"

    def dump_lines(self) -> list[str]:
        """Human-readable state for DUMP."""
        lines = [(f"state={self.state_name} run={self.run} tape={self.tape}"
                  f" source={self.source.label if self.source else None}"
                  f" awaiting_finished={[c.fd for c in self._awaiting]}"),
                 "counters " + " ".join(f"{k}={v}" for k, v in self.counters.items()),
                 "scalers " + self.scalers.as_text()]
        for c in self.clients.values():
            lines.append(f"client {c.label} " + " ".join(
                f"{k}={v}" for k, v in c.as_dict().items() if k not in ("socket", "role", "name", "peer")))
        return lines

    def cmd_stats(self, client: Client, arg: str) -> str:
        """STATS? replies ``STATS:`` and one line of JSON."""
        return "STATS:" + json.dumps(self.stats(), separators=(",", ":"))

    def stats(self) -> dict:
        """Global counters and the per-client counters."""
        return {"state": self.state_name, "run": self.run, "tape": self.tape,
                "uptime": round(time.time() - self.started, 3),
                "source": self.source.fd if self.source else None,
                **self.counters, "scalers": self.scalers.as_dict(),
                "clients": [c.as_dict() for c in self.clients.values()]}

    @property
    def state_name(self) -> str:
        """NoTape, Tape, Ending, or ShuttingDown once SHUTDOWN was received."""
        return "ShuttingDown" if self.shutting_down else self.state

    def cmd_shutdown(self, client: Client, arg: str) -> str:
        """SHUTDOWN: graceful stop (see shutdown())."""
        log.info("SHUTDOWN from %s", client.label)
        self.spawn(self.shutdown())
        return "OK:SHUTDOWN"

    def cmd_exit(self, client: Client, arg: str) -> str | None:
        """EXIT: stop at once, without ending the run."""
        log.warning("EXIT from %s: terminating immediately (state %s)", client.label, self.state)
        client.send_cmd("OK:EXIT")
        self.exit_now()
        return None

    def cmd_dir(self, client: Client, arg: str) -> str:
        """DIR? lists the commands."""
        return "DIR:" + " ".join(sorted(self.handlers))

    def cmd_quit(self, client: Client, arg: str) -> str | None:
        """QUIT from a client: the server closes that client's connection."""
        client.send_cmd("OK:QUIT")
        client.close("client sent QUIT")
        return None

    # -- end of a run --------------------------------------------------------
    def _begin_ending(self, cause: str) -> None:
        """Switch to Ending and run the ENDTAPE sequence in a task."""
        self.state = "Ending"
        self.spawn(self._end_tape(cause))

    async def _end_tape(self, cause: str) -> None:
        """ENDTAPE -> FINISHED from each analyzer -> ALLFINISHED -> scalers -> NoTape.

        Every event read before ENDTAPE is already in the clients' queues, and
        ENDTAPE/ALLFINISHED are queued after them, so nothing is overtaken.
        """
        run, tape = self.run, self.tape
        log.info("ending run %s tape %s (%s): ENDTAPE to %d analyzers and %d writers",
                 run, tape, cause, len(self.analyzers), len(self.writers))
        self._awaiting = set(self.analyzers)
        self._finished = asyncio.Event()
        if not self._awaiting:
            self._finished.set()
        for target in self.analyzers + self.writers:
            target.send_cmd("ENDTAPE")
        try:
            await asyncio.wait_for(self._finished.wait(), self.finished_timeout)
        except TimeoutError:
            for silent in list(self._awaiting):
                self.counters["finished_timeouts"] += 1
                log.warning("%s sent no FINISHED within %.1fs: presumed dead, dropping it",
                            silent.label, self.finished_timeout)
                silent.close()
                if silent in self.analyzers:
                    self.analyzers.remove(silent)
        self._awaiting = set()
        targets = ([self.source] if self.source else []) + self.analyzers + self.writers
        for target in targets:
            target.send_cmd("ALLFINISHED")
        log.info("ALLFINISHED run %s sent to %d clients", run, len(targets))
        await self._flush_scalers(self.scalers)
        if self.redis_url and run is not None:
            await self.flush_accounting()
            self.spawn(self._check_unaccounted(run))
        self.counters["runs_ended"] += 1
        self.state, self.scalers = "NoTape", ScalerRecord()
        self._notape.set()
        deferred, self._deferred = self._deferred, []
        for client, text in deferred:
            if not client.closed:
                self.on_command(client, text)
        for client in [self.source, *(c for c, _ in deferred)]:
            if client is not None:
                client.release("ending")

    async def _flush_scalers(self, record: ScalerRecord) -> None:
        """Write the run's scaler record to the log and to Redis (if reachable)."""
        data = record.as_dict()
        log.info("scaler record run %s: %s", record.run, json.dumps(data))
        if not self.redis_url:
            return
        try:
            await asyncio.to_thread(self._store_scalers, data)
        except Exception as exc:  # redis down, bad URL...: keep serving
            self.counters["redis_failures"] += 1
            log.error("cannot store the scaler record of run %s in Redis (%s): %s;"
                      " it is kept in the log above", record.run, config_mod.redact(self.redis_url), exc)

    def _store_scalers(self, data: dict) -> None:
        """HSET dispatcher:scalers:<run> and index the run (runs in a thread)."""
        fields = {k: ("" if v is None else v) for k, v in data.items()}
        fields["ended"] = time.time()
        client = self._redis_client()
        key = schema.DISPATCHER_SCALERS.key(run=data["run"])
        pipe = client.pipeline()  # one key: one Redis Cluster hash slot
        pipe.delete(key)
        pipe.hset(key, mapping=fields)
        pipe.execute()
        client.zadd(schema.DISPATCHER_SCALER_RUNS, {str(data["run"]): int(data["run"])})  # idempotent

    # -- shutdown ----------------------------------------------------------
    async def shutdown(self) -> None:
        """SHUTDOWN: QUIT the source, let the run end, QUIT the rest, wait, exit."""
        if self.shutting_down:
            return
        self.shutting_down = True
        if self.server is not None:
            self.server.close()
        if self.state != "NoTape":
            await self._end_run_for_shutdown()
            targets = self.analyzers + self.writers
            for target in targets:
                target.send_cmd("QUIT")
            log.info("shutdown: QUIT sent to %d clients, waiting up to %.1fs",
                     len(targets), self.shutdown_wait)
            await self._wait_for(lambda: not (self.analyzers or self.writers), self.shutdown_wait)
        else:
            for target in self.analyzers + self.writers:
                target.send_cmd("QUIT")
            log.info("shutdown: no run in progress, exiting")
        await self._close_all()
        self.done.set()

    async def _end_run_for_shutdown(self) -> None:
        """Ask the source to QUIT; end the tape ourselves if it does not."""
        if self.source is not None and self.state == "Tape":
            log.info("shutdown: run %s in progress, sending QUIT to the data source", self.run)
            self.source.send_cmd("QUIT")
            await self._wait_for(lambda: self.state != "Tape", self.finished_timeout)
        if self.state == "Tape":
            log.warning("shutdown: the data source did not end run %s; ending it", self.run)
            self._begin_ending("shutdown")
        await self._notape.wait()

    async def _wait_for(self, predicate, timeout: float) -> bool:
        """Poll *predicate* every 20 ms until true or *timeout*; return it."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def _close_all(self) -> None:
        """Close every connection and wait (briefly) for the buffers to flush."""
        for client in list(self.clients.values()):
            client.close()
        await self._wait_for(lambda: not self.clients, 2.0)

    def exit_now(self) -> None:
        """EXIT: close everything without waiting and stop."""
        self.shutting_down = True
        if self.server is not None:
            self.server.close()
        for client in list(self.clients.values()):
            client.close()
        self.done.set()


def _parse_ints(arg: str, n: int, usage: str) -> list[int]:
    """*n* colon-separated non-negative integers, or CommandError(usage)."""
    parts = arg.split(":")
    if len(parts) != n or not all(p.strip().isdigit() for p in parts):
        raise CommandError(f"usage {usage} (non-negative integers)")
    return [int(p) for p in parts]


# --------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------

async def serve(cfg, host: str, port: int, ready=None) -> int:
    """Run a dispatcher until SHUTDOWN/EXIT/SIGTERM; return the exit code.

    *ready*, if given, is called with the bound port once listening.
    """
    dispatcher = Dispatcher(cfg)
    bound = await dispatcher.start(host, port)
    exporter = metrics.serve(cfg, "dispatcher", dispatcher_metrics(dispatcher))
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, dispatcher, sig)
    if ready is not None:
        ready(bound, dispatcher)
    await dispatcher.done.wait()
    await dispatcher.flush_accounting()
    if dispatcher.journal is not None:
        dispatcher.journal.close()
    if exporter is not None:
        exporter.shutdown()
    log.info("dispatcher exiting: %s", json.dumps(
        {k: v for k, v in dispatcher.stats().items() if k not in ("clients", "scalers")}))
    return 0


#: Per-client counters of the dispatcher exported to Prometheus (all are totals).
CLIENT_COUNTERS = ("events_sent", "events_dropped", "bytes_sent", "events_received", "bytes_received")


def dispatcher_metrics(dispatcher: Dispatcher) -> metrics.Snapshot:
    """``minard_dispatcher_*``: the server's counters (STATS?) and each client's, read at scrape time.

    Runs in the metrics thread: it copies the containers the event loop
    changes (a copy of a dict is atomic) and reads plain attributes only.
    """
    def read() -> dict:
        counters = dict(dispatcher.counters)
        clients = list(dispatcher.clients.values())
        out: dict[str, object] = {k: v for k, v in counters.items() if isinstance(v, (int, float))}
        out["clients"] = {role: sum(1 for c in clients if (c.role or "none") == role)
                          for role in {c.role or "none" for c in clients}}
        out["run"] = dispatcher.run if dispatcher.run is not None else -1
        for name in (*CLIENT_COUNTERS, "queued_events", "queued_bytes"):
            out[f"client_{name}"] = {f"{c.role or 'client'}:{c.name or ''}#{c.fd}": getattr(c, name, 0)
                                     for c in clients}
        return out

    return metrics.Snapshot(
        "minard_dispatcher", read, counters=(*dispatcher.counters, *(f"client_{n}" for n in CLIENT_COUNTERS)),
        labels={"clients": "role", **{f"client_{n}": "client" for n in (*CLIENT_COUNTERS, "queued_events",
                                                                         "queued_bytes")}},
        help={"clients": "Connected clients by role.", "run": "The run in progress (-1: none).",
              "received_events": "Events received from the data source."})


def _on_signal(dispatcher: Dispatcher, sig) -> None:
    """SIGTERM/SIGINT behave like SHUTDOWN; a second one exits at once."""
    if dispatcher.shutting_down:
        log.warning("%s again: exiting now", signal.Signals(sig).name)
        dispatcher.exit_now()
    else:
        log.info("%s: shutting down as for SHUTDOWN", signal.Signals(sig).name)
        dispatcher.spawn(dispatcher.shutdown())


@click.command("dispatcher")
@click.option("--host", default=None, help="Address to listen on [dispatcher_host].")
@click.option("--port", type=int, default=None, help="TCP port [dispatcher_port]; 0 = any.")
@config_mod.pass_config
def dispatcher_cmd(cfg, host, port):
    """Run the event dispatcher: one data source to analyzers and write clients.

    Protocol, commands and flow control: docs/protocol.md.  SIGTERM behaves
    like the SHUTDOWN command.
    """
    host = host or str(cfg["dispatcher_host"])
    port = int(cfg["dispatcher_port"]) if port is None else port
    try:
        code = asyncio.run(serve(cfg, host, port))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
    raise SystemExit(code)
