"""``data_producer``: the ORCA stream's CMOS rates and base currents onto ZMQ.

Data path::

    ORCA (TCP 44666) --> data_producer --ZMQ PUSH/PULL (minard/1)--> data_consumer pools --> Redis
                                          5557 kind "cmos"    -> CMOS rates
                                          5558 kind "base"    -> base currents

The producer connects to ORCA's Dispatcher, feeds the bytes to a fresh
:class:`minard.formats.orca.OrcaStreamParser` per connection (so a restarted
ORCA's new header, new data ids and byte order are read again; ids are never
hard-coded), and collects the XL3 CMOS-rate and base-current records into
batches (at most ``orca_batch_records`` records or ``orca_batch_ms`` ms).  Each
batch is one wire message (:mod:`minard.formats.wire`) whose meta carries the
stream's ``byteorder``; a header record closes the pending batches first, so a
batch never mixes byte orders.  The PUSH sockets, the high-water-mark
accounting, heartbeat and signals are :class:`minard.pipeline.base.Producer`'s.
Other records are counted and skipped; garbage and truncated records are
survived by the parser and counted by reason.  When ORCA goes away the
producer reconnects with back-off, beating all the while.

Counters (``stats:orca_producer``, received = processed + dropped + errors):
records framed by the parser plus parser errors; processed = CMOS/base
records handed to ZMQ and other records skipped on purpose; dropped =
refused at the high-water mark; errors = garbage, truncated or malformed
input (``error_<reason>``).  Per stream: ``received_<stream>`` (read),
``<stream>`` (handed to ZMQ) and ``dropped_<stream>``; with the consumer
pools' counters they say what became of each stream's records
(:func:`minard.store.status.orca_accounting`, ``minard stats --orca``).
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from collections import Counter

import click

from minard import config as config_mod
from minard import metrics
from minard.formats import orca, wire
from minard.pipeline.base import Producer

log = logging.getLogger("minard.pipeline.orca_producer")

PRODUCER_COMPONENT = "data_producer"
STREAMS = ("cmos", "base")
#: Seconds without bytes after which a record held for the parser's look-ahead
#: is handed on (ORCA went quiet: its last reading must not wait for the next).
QUIET_SECONDS = 0.02


def _hex(value: int | None) -> str:
    return "" if value is None else f"{value:#x}"


class OrcaProducer(Producer):
    """ORCA TCP stream in, two ZMQ PUSH sockets out, everything counted."""

    component = PRODUCER_COMPONENT
    stage = "orca_producer"

    def __init__(self, cfg, host: str, port: int, ctx=None):
        super().__init__(cfg, {s: str(cfg[f"zmq_{s}"]) for s in STREAMS}, ctx)
        self.address = (host, int(port))
        self.batch_records = int(cfg["orca_batch_records"])
        self.batch_seconds = float(cfg["orca_batch_ms"]) / 1000.0
        self.reconnect_max = float(cfg["orca_reconnect_max"])
        self.connected = False
        self.parser: orca.OrcaStreamParser | None = None
        self.parser_seen = Counter()  # parser stats already counted
        self.byteorder = "little"
        self.ids = orca.XL3Ids(None, None)  # of this connection's header (none before it arrives)
        self.announced = self.ids  # of the last header read on any connection (the heartbeat's)
        self.run_number = None
        self.pending: dict[str, list[bytes]] = {s: [] for s in STREAMS}

    @property
    def counts(self) -> Counter:
        """The ``stats:orca_producer`` deltas not yet in Redis."""
        return self.deltas[self.stage]

    # -------------------------------------------------------- upstream
    def read_upstream(self) -> bool:
        """Connect to ORCA (retrying) and read the connection to its end."""
        sock = self.connect()
        if sock is None:
            return False
        self.read_connection(sock)
        return True

    def connect(self) -> socket.socket | None:
        """Connect to ORCA, retrying with back-off (and beating) until stopped."""
        delay = 0.1
        while self.running:
            try:
                sock = socket.create_connection(self.address, timeout=2.0)
            except OSError as exc:
                if self.totals["connect_failures"] % 50 == 0:
                    log.warning("cannot connect to ORCA %s:%d (%s); retrying", *self.address, exc)
                self.totals["connect_failures"] += 1
                end = time.monotonic() + delay
                while self.running and time.monotonic() < end:
                    self.maybe_beat()
                    time.sleep(min(0.05, max(0.0, end - time.monotonic())))
                delay = min(delay * 2, self.reconnect_max)
                continue
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.settimeout(None)
            self.totals["connects"] += 1
            log.info("connected to ORCA %s:%d", *self.address)
            return sock
        return None

    def read_connection(self, sock: socket.socket) -> None:
        """Read one connection to its end with a new parser (new header, new ids)."""
        self.parser = orca.OrcaStreamParser(on_error=self._on_error)
        self.parser_seen = Counter()
        self.ids = orca.XL3Ids(None, None)  # until this connection's header arrives
        self.connected = True
        last_bytes, quiet_check = time.monotonic(), False  # release once per quiet spell
        try:
            while self.running:
                timeout = max(0.0, self.wait_limit(min(0.2, self.next_beat - time.monotonic())))
                if self.first_pending is not None:
                    timeout = min(timeout, max(0.0, self.first_pending + self.batch_seconds - time.monotonic()))
                if quiet_check:
                    timeout = min(timeout, max(0.0, last_bytes + QUIET_SECONDS - time.monotonic()))
                ready, _, _ = select.select([sock], [], [], timeout)
                if ready:
                    data = sock.recv(1 << 16)
                    if not data:
                        log.warning("ORCA %s:%d closed the connection; reconnecting", *self.address)
                        break
                    last_bytes = time.monotonic()
                    self.on_records(self.parser.feed(data))
                    quiet_check = self.parser.buffered > 0
                elif quiet_check and time.monotonic() - last_bytes >= QUIET_SECONDS:
                    quiet_check = False
                    self.on_records(self.parser.release())
                if self.batch_due(self.batch_seconds):
                    self.send_pending()
                self.maybe_beat()
        except OSError as exc:
            log.warning("lost ORCA %s:%d (%s); reconnecting", *self.address, exc)
        finally:
            self.on_records(self.parser.close())  # the last record, or a truncated tail
            self._count_parser()
            self.send_pending()
            self.connected = False
            sock.close()
            self.beat()

    # -------------------------------------------------------- data
    def on_records(self, records: list[orca.Record]) -> None:
        """Route parsed records: CMOS/base to pending batches, the rest counted."""
        for rec in records:
            self.counts["received"] += 1
            if rec.kind in self.pending:
                self.counts[f"received_{rec.kind}"] += 1  # where status.orca_accounting starts
                if rec.byteorder != self.byteorder:
                    self.send_pending()
                    self.byteorder = rec.byteorder
                self.pending[rec.kind].append(rec.raw)
                if self.first_pending is None:
                    self.first_pending = time.monotonic()
                if len(self.pending[rec.kind]) >= self.batch_records:
                    self.send_pending()
                continue
            self.counts["processed"] += 1
            if rec.kind == "header":
                self.on_header(rec)
            else:
                self.counts["skipped"] += 1
                self.totals["skipped"] += 1

    def on_header(self, rec: orca.Record) -> None:
        """A header record: close pending batches, note the new ids and run."""
        self.send_pending()
        self.byteorder = rec.byteorder
        self.counts["headers"] += 1
        self.totals["headers"] += 1
        self.ids = self.announced = ids = orca.xl3_data_ids(rec.header or {})
        control = (rec.header or {}).get("Run Control", {})
        self.run_number = control.get("RunNumber") if isinstance(control, dict) else None
        log.info("ORCA header: run %s, CMOS id %s, base id %s, %s-endian", self.run_number,
                 _hex(ids.cmos), _hex(ids.base), rec.byteorder)
        if ids.cmos is None or ids.base is None:
            log.warning("the header does not describe %s records: they will be skipped",
                        " and ".join(n for n, i in (("CMOS", ids.cmos), ("base", ids.base)) if i is None))

    def _on_error(self, err: orca.OrcaError) -> None:
        """Parser error callback: count it by reason (never raises)."""
        self.counts.update({"received": 1, "errors": 1, f"error_{err.reason}": 1})
        self.totals["errors"] += 1
        if self.totals["errors"] <= 10 or self.totals["errors"] % 1000 == 0:
            log.warning("ORCA stream: %s (%d errors so far)", err, self.totals["errors"])

    def _count_parser(self) -> None:
        """Count what the parser skipped itself (unknown ids, garbage bytes)."""
        if self.parser is None:
            return
        now = Counter(unknown=self.parser.stats.skipped_unknown, bytes_skipped=self.parser.stats.bytes_skipped)
        delta = now - self.parser_seen
        self.parser_seen = now
        if delta["unknown"]:
            self.counts.update(received=delta["unknown"], processed=delta["unknown"],
                               skipped=delta["unknown"], skipped_unknown=delta["unknown"])
            self.totals["skipped"] += delta["unknown"]
        if delta["bytes_skipped"]:
            self.counts["bytes_skipped"] += delta["bytes_skipped"]

    def send_pending(self) -> None:
        """Send every pending record, one batch per stream; count what ZMQ refuses."""
        for stream, records in self.pending.items():
            if records:
                self.pending[stream] = []
                meta = {"producer": self.producer, "seq": self.seq, "byteorder": self.byteorder,
                        "orca": "{}:{}".format(*self.address), "data_id": getattr(self.ids, stream)}
                self.push(stream, wire.encode(stream, records, meta), len(records))
        self.first_pending = None

    # -------------------------------------------------------- reporting
    def heartbeat_fields(self, final: bool) -> dict:
        """ORCA address, connection, data ids, byte order, run and consumers per stream.

        The ids are the last header's: a connection that closes before its header
        (ORCA stopping) does not blank what the crew last saw; ``connected`` says
        whether the link is up.
        """
        self._count_parser()
        ids = self.announced
        peers = self.count_peers()
        return {"orca": "{}:{}".format(*self.address), "connected": int(self.connected),
                "cmos_id": _hex(ids.cmos), "base_id": _hex(ids.base), "byteorder": self.byteorder,
                "run": "" if self.run_number is None else self.run_number,
                "zmq_cmos": str(self.cfg["zmq_cmos"]), "zmq_base": str(self.cfg["zmq_base"]),
                **{f"consumers_{s}": peers[s] for s in STREAMS}}


@click.command("data_producer", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default=None, help="ORCA host [orca_host].")
@click.option("--port", type=int, default=None, help="ORCA data port [orca_port, 44666].")
@config_mod.pass_config
def producer_cli(cfg, host, port):
    """Read CMOS-rate and base-current records from the ORCA stream and push
    them to ZMQ (zmq_cmos, zmq_base) in batches."""
    host = host or str(cfg["orca_host"])
    port = port or int(cfg["orca_port"])
    producer = OrcaProducer(cfg, host, port)
    metrics.serve(cfg, "data_producer", metrics.Snapshot("minard_producer", lambda: {
        "orca_connected": producer.connected, **{f"consumers_{k}": v for k, v in producer.peers.items()}}))
    producer.install_signals()
    log.info("data_producer: ORCA %s:%d -> cmos %s, base %s (SNDHWM %s, batches of %d records / %.0f ms)",
             host, port, cfg["zmq_cmos"], cfg["zmq_base"], cfg["zmq_hwm"], producer.batch_records,
             producer.batch_seconds * 1000)
    producer.run()
    log.info("data_producer stopped: %s", json.dumps(dict(producer.totals)))
