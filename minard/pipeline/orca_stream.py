"""``data_producer`` and ``data_consumer 5557|5558``: the ORCA stream into Redis.

Data path::

    ORCA (TCP 44666) --> data_producer --ZMQ PUSH/PULL (minard/1)--> data_consumer pools --> Redis
                                          5557 kind "cmos"    -> CMOS rates
                                          5558 kind "base"    -> base currents

**data_producer** connects to ORCA's Dispatcher, feeds the bytes to a fresh
:class:`minard.formats.orca.OrcaStreamParser` per connection (so a restarted ORCA's
new header, new data ids and byte order are read again; ids are never
hard-coded), and collects the XL3 CMOS-rate and base-current records into
batches (at most ``orca_batch_records`` records or ``orca_batch_ms`` ms).  Each
batch is one wire message (:mod:`minard.formats.wire`) whose meta carries the stream's
``byteorder``; a header record closes the pending batches first, so a batch
never mixes byte orders.  Sends never block: a batch refused at the explicit
SNDHWM is dropped and counted.  Other records are counted and skipped; garbage
and truncated records are survived by the parser and counted by reason.  When
ORCA goes away the producer reconnects with back-off, beating all the while.

**data_consumer** runs a consumer pool (:mod:`minard.pipeline.pool`) for one stream,
chosen by the port (that of ``zmq_cmos`` or ``zmq_base``) or ``--stream``:

* :class:`CmosHandler`: rates = Δcount/Δt per channel with
  :class:`minard.formats.orca.CmosRateState` (masked channels, bit-31 flags, resets,
  Δt outside (0, ``cmos_max_dt``] give no rate).  The state is SHARED through
  Redis, one key per crate (``orca:cmos:state:<crate>``), read and written in
  an optimistic ``WATCH``/``MULTI`` transaction per batch: any number of
  workers, and a restarted consumer, continue from the same baselines, and a
  batch whose crates changed meanwhile is simply recomputed.  Readings older
  than the stored baseline by less than ``cmos_max_dt`` (a batch overtaken by
  a later one in another worker, or a duplicate) are skipped (``stale``) so
  that the baseline never moves backwards.  A record with non-zero XL3 error
  flags counts as flagged.
* :class:`BaseHandler`: value − 127 per channel, skipping masked channels,
  busy channels (ORCA shows "BSY" instead of a value) and records with XL3
  error flags; busy flags are kept (a count series and a latest map).

Both flush once a second, in ONE ``MULTI/EXEC``, into the multi-resolution
per-channel series ``cmos`` / ``base`` (the layout of
:func:`minard.store.timeseries.add_values`, bucketed by the producer's send time like
the dispatch stream), plus the stage counters.  The series arrays are added to
whole, read under ``WATCH`` and written back (:class:`SeriesWriter`): ~10k
readings a second as per-channel ``BITFIELD`` operations cost most of a
worker's CPU.  Each also keeps a *latest map*: the value of every channel at its
most recent reading (NaN when that reading gave none), read by ``minard query``.
Crate/card average and maximum are derived at read time
(:func:`minard.store.timeseries.crate_card_stats`), as for occupancy: a worker sees
only part of a second, so a per-worker maximum could not be combined.
Keys are listed in ``docs/storage.md`` ("ORCA stream").

Loss accounting (``stats:<stage>``, received = processed + dropped + errors):

* ``orca_producer``: records framed by the parser plus parser errors;
  processed = CMOS/base records handed to ZMQ and other records skipped on
  purpose; dropped = refused at the high-water mark; errors = garbage,
  truncated or malformed input (``error_<reason>``).
* ``cmos`` / ``base``: records received by the pool (counted by the manager);
  processed/errors by the workers in their flush; dropped = records held by a
  worker that ended before flushing them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import signal
import socket
import time
from collections import Counter

import click
import numpy as np
import redis as redis_py
import zmq

from minard import config as config_mod
from minard import log as log_mod
from minard import metrics
from minard.formats import orca, wire
from minard.formats.detector import NCARDS, NCHANNELS, NCHANNELS_TOTAL
from minard.pipeline.consumer import (
    AccountedPool,
    PoolReporter,
    flushed_key,
    record_flushed,
    run_pool,
)
from minard.pipeline.consumer import redis_client as _redis_client
from minard.pipeline.pool import PoolManager, PoolSpec
from minard.pipeline.sockets import peers_changed
from minard.store import schema, status
from minard.store import timeseries as ts

log = logging.getLogger("minard.pipeline.orca_stream")

PRODUCER_COMPONENT = "data_producer"
STREAMS = ("cmos", "base")
CRATE_CHANNELS = NCARDS * NCHANNELS  # 512

#: Redis keys of the ORCA stream (docs/storage.md).
CMOS_STATE_KEY = schema.ORCA_CMOS_STATE.template
LATEST_KEY, LATEST_TIME_KEY = schema.ORCA_LATEST_KEY, schema.ORCA_LATEST_TIME_KEY
BUSY_KEY = schema.ORCA_BASE_BUSY
BASE_CRATE_TIME_KEY = schema.ORCA_BASE_CRATE_TIME
BUSY_SERIES = "base_busy"  # per-channel count series: busy readings per bucket
#: Optimistic transactions retried at most this often before a batch is given up.
MAX_RETRIES = 100
#: Seconds of series data a handler keeps while Redis is down.
KEEP_PENDING = 300


def consumer_component(stream: str) -> str:
    """Heartbeat name of a consumer pool (the program names of conf/programs.cfg)."""
    return f"data_consumer_{stream}"


# =================================================================== producer

class Producer:
    """ORCA TCP stream in, two ZMQ PUSH sockets out, everything counted."""

    def __init__(self, cfg, host: str, port: int, ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.address = (host, int(port))
        self.batch_records = int(cfg["orca_batch_records"])
        self.batch_seconds = float(cfg["orca_batch_ms"]) / 1000.0
        self.reconnect_max = float(cfg["orca_reconnect_max"])
        self.ctx = ctx or zmq.Context.instance()
        self.socks: dict[str, zmq.Socket] = {}
        self.monitors: dict[str, zmq.Socket] = {}
        self.peers = Counter()
        for stream in STREAMS:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, int(cfg["zmq_hwm"]))
            sock.setsockopt(zmq.LINGER, 2000)
            sock.bind(str(cfg[f"zmq_{stream}"]))
            self.socks[stream] = sock
            self.monitors[stream] = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.redis = _redis_client(cfg)
        self.producer = f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}"
        self.started = time.time()
        self.running = True
        self.connected = False
        self.parser: orca.OrcaStreamParser | None = None
        self.parser_seen = Counter()  # parser stats already counted
        self.byteorder = "little"
        self.ids = orca.XL3Ids(None, None)  # announced by the last header read
        self.run_number = None
        self.pending: dict[str, list[bytes]] = {s: [] for s in STREAMS}
        self.first_pending: float | None = None
        self.seq = 0
        self.totals = Counter()  # since start, for the heartbeat
        self.deltas = Counter()  # stats:orca_producer not yet in Redis
        self.next_beat = 0.0
        self.reporter = status.Reporter(self.redis, PRODUCER_COMPONENT, self.started)

    # -------------------------------------------------------- lifecycle
    def stop(self, *_args) -> None:
        """SIGTERM/SIGINT: hand on what is pending, beat a last time, exit."""
        self.running = False

    def run(self) -> None:
        """Connect (and reconnect) to ORCA until stopped."""
        try:
            while self.running:
                sock = self.connect()
                if sock is None:
                    break
                self.read_connection(sock)
        finally:
            self.send_pending()
            self.beat(final=True)
            for stream in STREAMS:
                self.socks[stream].disable_monitor()
                self.monitors[stream].close(0)
                self.socks[stream].close()

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
                    self._maybe_beat()
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
        try:
            while self.running:
                timeout = max(0.0, min(0.2, self.next_beat - time.monotonic()))
                if self.first_pending is not None:
                    timeout = min(timeout, max(0.0, self.first_pending + self.batch_seconds - time.monotonic()))
                ready, _, _ = select.select([sock], [], [], timeout)
                if ready:
                    data = sock.recv(1 << 16)
                    if not data:
                        log.warning("ORCA %s:%d closed the connection; reconnecting", *self.address)
                        break
                    self.on_records(self.parser.feed(data))
                self._maybe_send()
                self._maybe_beat()
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
            self.deltas["received"] += 1
            if rec.kind in self.pending:
                if rec.byteorder != self.byteorder:
                    self.send_pending()
                    self.byteorder = rec.byteorder
                self.pending[rec.kind].append(rec.raw)
                if self.first_pending is None:
                    self.first_pending = time.monotonic()
                if len(self.pending[rec.kind]) >= self.batch_records:
                    self.send_pending()
                continue
            self.deltas["processed"] += 1
            if rec.kind == "header":
                self.on_header(rec)
            else:
                self.deltas["skipped"] += 1
                self.totals["skipped"] += 1

    def on_header(self, rec: orca.Record) -> None:
        """A header record: close pending batches, note the new ids and run."""
        self.send_pending()
        self.byteorder = rec.byteorder
        self.deltas["headers"] += 1
        self.totals["headers"] += 1
        self.ids = ids = orca.xl3_data_ids(rec.header or {})
        control = (rec.header or {}).get("Run Control", {})
        self.run_number = control.get("RunNumber") if isinstance(control, dict) else None
        log.info("ORCA header: run %s, CMOS id %s, base id %s, %s-endian", self.run_number,
                 _hex(ids.cmos), _hex(ids.base), rec.byteorder)
        if ids.cmos is None or ids.base is None:
            log.warning("the header does not describe %s records: they will be skipped",
                        " and ".join(n for n, i in (("CMOS", ids.cmos), ("base", ids.base)) if i is None))

    def _on_error(self, err: orca.OrcaError) -> None:
        """Parser error callback: count it by reason (never raises)."""
        self.deltas.update({"received": 1, "errors": 1, f"error_{err.reason}": 1})
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
            self.deltas.update(received=delta["unknown"], processed=delta["unknown"],
                               skipped=delta["unknown"], skipped_unknown=delta["unknown"])
            self.totals["skipped"] += delta["unknown"]
        if delta["bytes_skipped"]:
            self.deltas["bytes_skipped"] += delta["bytes_skipped"]

    def _maybe_send(self) -> None:
        if self.first_pending is not None and time.monotonic() - self.first_pending >= self.batch_seconds:
            self.send_pending()

    def send_pending(self) -> None:
        """Send every pending record, one batch per stream; count what ZMQ refuses."""
        for stream, records in self.pending.items():
            if records:
                self.pending[stream] = []
                self._send(stream, records)
        self.first_pending = None

    def _send(self, stream: str, records: list[bytes]) -> None:
        meta = {"producer": self.producer, "seq": self.seq, "byteorder": self.byteorder,
                "orca": "{}:{}".format(*self.address), "data_id": getattr(self.ids, stream)}
        self.seq += 1
        n = len(records)
        try:
            self.socks[stream].send_multipart(wire.encode(stream, records, meta), zmq.NOBLOCK, copy=True)
        except zmq.Again:
            self.deltas.update(dropped=n, hwm=n, **{f"dropped_{stream}": n})
            self.totals["dropped"] += n
            if self.totals["drop_batches"] % 100 == 0:
                log.warning("ZMQ %s: no consumer or high-water mark reached; dropped %d records"
                            " (%d so far)", stream, n, self.totals["dropped"])
            self.totals["drop_batches"] += 1
            return
        self.deltas.update(processed=n, **{stream: n})
        self.totals[stream] += n

    # -------------------------------------------------------- reporting
    def count_peers(self) -> dict[str, int]:
        """Consumers connected to each PUSH socket (from the socket monitors)."""
        for stream, monitor in self.monitors.items():
            self.peers[stream] += peers_changed(monitor)
        return {f"consumers_{s}": self.peers[s] for s in STREAMS}

    def _maybe_beat(self) -> None:
        if time.monotonic() >= self.next_beat:
            self.beat()

    def beat(self, final: bool = False) -> None:
        """Heartbeat and counters to Redis; counters are kept while Redis is down."""
        self.next_beat = time.monotonic() + 1.0
        self._count_parser()
        ids = self.ids
        fields = {"orca": "{}:{}".format(*self.address), "connected": int(self.connected),
                  "cmos_id": _hex(ids.cmos), "base_id": _hex(ids.base), "byteorder": self.byteorder,
                  "run": "" if self.run_number is None else self.run_number, "hwm": int(self.cfg["zmq_hwm"]),
                  "zmq_cmos": str(self.cfg["zmq_cmos"]), "zmq_base": str(self.cfg["zmq_base"]),
                  **self.count_peers(), **self.totals}
        if final:
            fields["state"] = "stopped"
        self.reporter.write(fields, {"orca_producer": self.deltas})


def _hex(value: int | None) -> str:
    return "" if value is None else f"{value:#x}"


# =================================================================== per-channel series

#: Stored element types of the per-channel series (minard.store.timeseries): big-endian
#: int64 fixed-point sums, uint32 counts; their saturation limits (BITFIELD SAT).
_SERIES_TYPES = {"i64": (np.dtype(">i8"), -(1 << 63), (1 << 63) - 1), "u32": (np.dtype(">u4"), 0, (1 << 32) - 1)}


class SeriesWriter:
    """Adds per-channel series to Redis by read-modify-write of whole arrays.

    :func:`minard.store.timeseries.add_values` sends one ``BITFIELD INCRBY`` per
    channel reading and gets one reply integer back for each: with the whole
    detector read every second that is ~10k operations on each of 8 keys a
    second, which redis-py packs and parses in Python (~85 % of a consumer
    worker's CPU in the soak, by py-spy).  This writer adds a flush's readings
    into dense numpy arrays (one per key), and in the flush transaction
    WATCHes and reads the stored arrays (:meth:`read`, before ``MULTI``) and
    SETs their sums (:meth:`write`, inside it).  If another worker writes one
    of these keys meanwhile, ``EXEC`` fails and the flush is recomputed, so
    workers still combine exactly.  The stored layout is that of
    :mod:`minard.store.timeseries` (big-endian, as long as the highest channel with
    a nonzero entry, saturating like ``BITFIELD OVERFLOW SAT``): readers do
    not know the difference.
    """

    def __init__(self, levels=ts.CHANNEL_LEVELS):
        self.levels = levels
        self.deltas: dict[str, tuple[str, np.ndarray, int]] = {}  # key -> (type, int64 delta, ttl)
        self.merged: dict[str, bytes] = {}

    def __bool__(self) -> bool:
        return bool(self.deltas)

    def add_values(self, name: str, t: float, lcn: np.ndarray, values: np.ndarray) -> None:
        """Readings *values* of channels *lcn* at time *t* (``name:sum`` / ``name:n``, as add_values)."""
        fixed = np.rint(np.asarray(values, dtype=float) * ts.VALUE_SCALE).astype(np.int64)
        self._add(f"{name}:sum", "i64", t, lcn, fixed)
        self._add(f"{name}:n", "u32", t, lcn, 1)

    def add_counts(self, name: str, t: float, lcn: np.ndarray, counts) -> None:
        """Counts at channels *lcn* at time *t* (as :func:`minard.store.timeseries.add_counts`)."""
        self._add(name, "u32", t, lcn, counts)

    def _add(self, name: str, kind: str, t: float, lcn: np.ndarray, delta) -> None:
        for level in self.levels:
            key = ts.channel_key(level.step, ts.bucket(t, level.step), name)
            if key not in self.deltas:
                self.deltas[key] = (kind, np.zeros(NCHANNELS_TOTAL, dtype=np.int64), level.keep + level.step)
            np.add.at(self.deltas[key][1], lcn, delta)

    def read(self, pipe) -> None:
        """WATCH the keys and compute their new contents (call before ``MULTI``)."""
        keys = list(self.deltas)
        pipe.watch(*keys)
        self.merged = {key: self._merge(self.deltas[key], raw) for key, raw in zip(keys, pipe.mget(keys))}

    def write(self, pipe) -> None:
        """SET the merged arrays with their level's expiry (inside ``MULTI``)."""
        for key, blob in self.merged.items():
            if blob is not None:
                pipe.set(key, blob, ex=self.deltas[key][2])

    @staticmethod
    def _merge(entry: tuple[str, np.ndarray, int], raw: bytes | None) -> bytes | None:
        """The stored array plus the delta, saturated, as long as needed."""
        kind, delta, _ = entry
        nz = np.flatnonzero(delta)
        if not len(nz):
            return None  # nothing to add (e.g. only 0.0 readings in a sum)
        dtype, lo, hi = _SERIES_TYPES[kind]
        old = np.frombuffer(raw or b"", dtype=dtype)[:NCHANNELS_TOTAL].astype(np.int64)
        total = delta[:max(len(old), int(nz[-1]) + 1)].copy()
        head = total[:len(old)]
        head += old
        if kind == "i64":  # int64 wrap-around: the exact sum left the range
            part = delta[:len(old)]
            head[(old > 0) & (part > 0) & (head < 0)] = hi
            head[(old < 0) & (part < 0) & (head >= 0)] = lo
        else:
            np.clip(total, lo, hi, out=total)
        return total.astype(dtype).tobytes()

    def clear(self) -> None:
        self.deltas.clear()
        self.merged.clear()


# =================================================================== consumers: common

class _Handler:
    """What both stream handlers share: wire decoding, counters, flush bookkeeping."""

    stream = ""

    def __init__(self, cfg):
        self.cfg = cfg
        self.redis = _redis_client(cfg)
        self.max_payload = int(cfg.get("zmq_max_frame", wire.MAX_PAYLOAD))
        self.ttl = int(cfg.get("orca_state_ttl", 86400))
        self.flushed_key = str(cfg.get("orca_flushed_key") or "")
        self.close_retry = float(cfg.get("orca_close_retry", 3.0))
        self.counts = Counter()  # stats:<stream> deltas not yet in Redis
        self.unaccounted = 0  # records handled since the last successful flush
        self.failing = False

    def open(self, frames) -> tuple[wire.Batch, str, float] | None:
        """Decode a wire message; None (and counted) if it is not usable."""
        n = len(frames[3]) // 4 if len(frames) == 5 else 0
        self.unaccounted += n
        try:
            batch = wire.decode(frames, self.max_payload)
        except wire.WireError as exc:
            self.counts.update({"errors": n, f"wire_{exc.reason}": n})
            log.warning("bad batch of %d records: %s", n, exc)
            return None
        order = batch.meta.get("byteorder", "little")
        if batch.kind != self.stream or order not in ("little", "big"):
            reason = "wrong_kind" if batch.kind != self.stream else "bad_byteorder"
            self.counts.update({"errors": len(batch), reason: len(batch)})
            log.warning("batch of %d %s records refused: %s", len(batch), batch.kind, reason)
            return None
        sent = batch.meta.get("sent")
        t = float(sent) if isinstance(sent, (int, float)) and math.isfinite(sent) else time.time()
        return batch, order, t

    def count_decode_errors(self, errors) -> int:
        """Count records the decoder rejected, by reason; return how many."""
        for _, err in errors:
            self.counts.update({"errors": 1, err.reason: 1})
        return len(errors)

    def write_pending(self, pipe, now: float) -> None:
        """Add this handler's pending data to *pipe* (subclasses)."""
        raise NotImplementedError

    def clear_pending(self) -> None:
        raise NotImplementedError

    def has_pending(self) -> bool:
        raise NotImplementedError

    def trim_pending(self, now: float) -> None:
        """While Redis is down, keep at most KEEP_PENDING seconds of series data."""
        for store in self.pending_stores():
            for sec in [s for s in store if s < now - KEEP_PENDING]:
                del store[sec]
                self.counts["lost_seconds"] += 1

    def pending_stores(self) -> list[dict]:
        """The per-second dicts of pending series data (subclasses)."""
        return []

    def transaction(self, pipe) -> None:
        """Hook for handlers that WATCH keys before their flush transaction."""
        pipe.multi()

    def flush(self, now: float) -> bool:
        """Write pending data and counters in one MULTI/EXEC; False if Redis failed."""
        if not self.has_pending() and not self.counts and not self.unaccounted:
            return True
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                for _ in range(MAX_RETRIES):
                    try:
                        self.transaction(pipe)
                        self.write_pending(pipe, now)
                        status.count(pipe, self.stream, **self.counts)
                        record_flushed(pipe, self.flushed_key, self.unaccounted)
                        pipe.execute()
                        break
                    except redis_py.WatchError:  # another worker wrote a watched key: recompute
                        self.counts["flush_conflicts"] += 1
                        continue
                else:
                    raise redis_py.RedisError("flush transaction kept conflicting")
        except redis_py.RedisError as exc:
            if not self.failing:
                log.warning("Redis write failed (%s); keeping the data and retrying every second", exc)
            self.failing = True
            self.trim_pending(now)
            return False
        if self.failing:
            log.info("Redis is back: pending data written")
        self.failing = False
        self.clear_pending()
        metrics.add_stage(self.stream, self.counts)  # what stats:<stream> just gained
        self.counts.clear()
        self.unaccounted = 0
        return True

    def close(self) -> None:
        """Final flush, retried for a few seconds if Redis is down."""
        end = time.monotonic() + self.close_retry
        while not self.flush(time.time()) and time.monotonic() < end:
            time.sleep(0.2)


def _card_runs(cards: np.ndarray) -> list[tuple[int, int]]:
    """Runs ``(first, last)`` of consecutive card numbers in *cards* (sorted, unique)."""
    cards = np.unique(cards)
    if not len(cards):
        return []
    breaks = np.flatnonzero(np.diff(cards) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(cards) - 1]])
    return list(zip(cards[starts].tolist(), cards[ends].tolist()))


def _latest_writes(pipe, stream: str, values: np.ndarray, t: float, cards: np.ndarray, ttl: int) -> None:
    """SETRANGE the latest map of *stream* for whole *cards* (values: 9728 floats)."""
    key, tkey = LATEST_KEY.format(stream=stream), LATEST_TIME_KEY.format(stream=stream)
    stamp = np.full(NCHANNELS_TOTAL, t, dtype=">f8")
    for first, last in _card_runs(cards):
        lo, hi = first * NCHANNELS, (last + 1) * NCHANNELS
        pipe.setrange(key, lo * 8, values[lo:hi].astype(">f8").tobytes())
        pipe.setrange(tkey, lo * 8, stamp[lo:hi].tobytes())
    pipe.expire(key, ttl)
    pipe.expire(tkey, ttl)


# =================================================================== CMOS

def _subset(batch: orca.CmosBatch, rows: np.ndarray) -> orca.CmosBatch:
    """The records *rows* (positions in the per-record arrays) of a CmosBatch."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == len(batch.index):
        return batch
    keep_card = np.isin(batch.card_record, rows)
    keep_chan = np.repeat(keep_card, NCHANNELS)
    newpos = np.full(len(batch.index), -1, dtype=np.int64)
    newpos[rows] = np.arange(len(rows))
    return orca.CmosBatch(
        index=batch.index[rows], crate=batch.crate[rows], slot_mask=batch.slot_mask[rows],
        channel_masks=batch.channel_masks[rows], delay=batch.delay[rows],
        error_flags=batch.error_flags[rows], time_us=batch.time_us[rows],
        timestamp=batch.timestamp[rows], lcn=batch.lcn[keep_chan], count=batch.count[keep_chan],
        flagged=batch.flagged[keep_chan], masked=batch.masked[keep_chan],
        card=batch.card[keep_card], card_record=newpos[batch.card_record[keep_card]])


def card_rounds(batch: orca.CmosBatch) -> list[np.ndarray]:
    """Split the records into rounds in which no card repeats, in stream order.

    A batch usually holds each card once (one round).  When a card is read
    twice (a replay at full speed), its readings must be applied in order:
    round k holds each card's k-th reading, so a round is one whole-card
    vectorised update and its rates belong to known readings.
    """
    nrec = len(batch.index)
    if len(np.unique(batch.card)) == len(batch.card):
        return [np.arange(nrec)]
    bounds = np.searchsorted(batch.card_record, np.arange(nrec + 1))
    cards = batch.card.tolist()
    last: dict[int, int] = {}
    rnd = np.zeros(nrec, dtype=np.int64)
    for r in range(nrec):  # a loop over records (tens), not channels
        mine = cards[bounds[r]:bounds[r + 1]]
        k = 1 + max((last.get(c, -1) for c in mine), default=-1)
        rnd[r] = k
        for c in mine:
            last[c] = k
    return [np.flatnonzero(rnd == k) for k in range(int(rnd.max()) + 1)]


class CmosHandler(_Handler):
    """A CMOS pool worker: counts -> rates with baselines shared through Redis."""

    stream = "cmos"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.max_dt = float(cfg.get("cmos_max_dt", 10.0))
        self.max_dt_us = round(self.max_dt * 1e6)
        self.pending: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.writer = SeriesWriter()
        self.conflicts = 0

    def process(self, frames) -> None:
        """Decode a batch, update the shared state, keep the rates for the flush."""
        opened = self.open(frames)
        if opened is None:
            return
        batch, order, t = opened
        dec = orca.decode_cmos(batch.records(), order)
        nbad = self.count_decode_errors(dec.errors)
        good = len(batch) - nbad
        if not len(dec.index):
            return
        if dec.error_flags.any():  # an XL3 read error: none of its counts is valid
            dec.flagged = dec.flagged | np.repeat(dec.error_flags[dec.card_record] != 0, NCHANNELS)
            self.counts["xl3_error_flags"] += int((dec.error_flags != 0).sum())
        crates = np.unique(dec.crate).tolist()
        try:
            lcn, rate, stale = self.update_shared(dec, crates, t)
        except redis_py.RedisError as exc:
            self.counts.update(errors=good, redis=good)
            log.warning("CMOS state unavailable (%s): %d records not processed", exc, good)
            return
        self.counts.update(processed=good, rates=len(lcn))
        if stale:
            self.counts["stale"] += stale
        if len(lcn):
            self.pending.setdefault(int(t), []).append((lcn, rate))

    # -- the shared state --------------------------------------------------
    def update_shared(self, dec: orca.CmosBatch, crates: list[int], t: float):
        """Apply *dec* to the per-crate states in Redis, atomically (WATCH/MULTI).

        Returns ``(lcn, rate, stale records)``.  On a conflict (another worker
        changed one of these crates meanwhile) everything is recomputed from
        the new state, so the result is as if the batches had run in turn.
        """
        keys = [CMOS_STATE_KEY.format(crate=c) for c in crates]
        rounds = card_rounds(dec)
        with self.redis.pipeline(transaction=True) as pipe:
            for _ in range(MAX_RETRIES):
                try:
                    pipe.watch(*keys)
                    state = self.load_state(crates, pipe.mget(keys))
                    lcn, rate, latest, stale = self.apply(state, dec, rounds)
                    pipe.multi()
                    for crate, key in zip(crates, keys):
                        pipe.set(key, self.crate_state(state, crate), ex=self.ttl)
                    for values, cards in latest:
                        _latest_writes(pipe, "cmos", values, t, cards, self.ttl)
                    pipe.execute()
                    return lcn, rate, stale
                except redis_py.WatchError:
                    self.conflicts += 1
                    self.counts["state_conflicts"] += 1
        raise redis_py.RedisError(f"CMOS state of crates {crates} kept changing ({MAX_RETRIES} tries)")

    def load_state(self, crates: list[int], raws) -> orca.CmosRateState:
        """A whole-detector CmosRateState filled from the stored per-crate states."""
        state = orca.CmosRateState(self.max_dt)
        for crate, raw in zip(crates, raws):
            if raw is None:
                continue
            try:
                sub = orca.CmosRateState.from_bytes(raw)
            except orca.OrcaError as exc:
                log.warning("crate %d: stored CMOS state unreadable (%s); starting afresh", crate, exc)
                self.counts["bad_state"] += 1
                continue
            if sub.size != CRATE_CHANNELS:
                self.counts["bad_state"] += 1
                continue
            sl = slice(crate * CRATE_CHANNELS, (crate + 1) * CRATE_CHANNELS)
            state.last_count[sl] = sub.last_count
            state.last_time_us[sl] = sub.last_time_us
        return state

    def crate_state(self, state: orca.CmosRateState, crate: int) -> bytes:
        """The stored form of one crate's slice of *state*."""
        sub = orca.CmosRateState(self.max_dt, CRATE_CHANNELS)
        sl = slice(crate * CRATE_CHANNELS, (crate + 1) * CRATE_CHANNELS)
        sub.last_count = state.last_count[sl].copy()
        sub.last_time_us = state.last_time_us[sl].copy()
        return sub.to_bytes()

    def apply(self, state: orca.CmosRateState, dec: orca.CmosBatch, rounds: list[np.ndarray]):
        """Run the rounds through *state*; return rates, latest-map blocks, stale count."""
        lcns, rates, latest = [], [], []
        stale = 0
        for rows in rounds:
            sub = _subset(dec, rows)
            keep = self.fresh_records(state, sub)
            stale += len(sub.index) - len(keep)
            if not len(keep):
                continue
            sub = _subset(sub, keep)
            lcn, rate = state.update(sub)
            values = np.full(NCHANNELS_TOTAL, np.nan)
            values[lcn] = rate
            latest.append((values, sub.card))
            lcns.append(lcn)
            rates.append(rate)
        if not lcns:
            return np.zeros(0, np.int64), np.zeros(0), latest, stale
        return np.concatenate(lcns), np.concatenate(rates), latest, stale

    def fresh_records(self, state: orca.CmosRateState, sub: orca.CmosBatch) -> np.ndarray:
        """Rows of *sub* not older than the stored baseline of their cards.

        A reading at or before its card's baseline, by less than max_dt, came
        late (another worker already applied a later one) or twice: it is
        skipped so the baseline never moves back.  Much older readings are a
        new stream (ORCA restarted, a replay) and start new baselines.
        """
        last = state.last_time_us.reshape(-1, NCHANNELS)[sub.card].max(axis=1)
        t_card = sub.time_us[sub.card_record]
        behind = last - t_card
        old_card = (behind >= 0) & (behind < self.max_dt_us)
        if not old_card.any():
            return np.arange(len(sub.index))
        return np.setdiff1d(np.arange(len(sub.index)), sub.card_record[old_card])

    # -- the flush -------------------------------------------------------------
    def has_pending(self) -> bool:
        return bool(self.pending)

    def pending_stores(self) -> list[dict]:
        return [self.pending]

    def transaction(self, pipe) -> None:
        """Read the stored series arrays under WATCH (see :class:`SeriesWriter`);
        rebuilt from the pending rates at each try (they may have grown, or
        been trimmed, since a failed flush)."""
        self.writer.clear()
        for sec, parts in self.pending.items():
            self.writer.add_values("cmos", sec, np.concatenate([p[0] for p in parts]),
                                   np.concatenate([p[1] for p in parts]))
        if self.writer:
            self.writer.read(pipe)
        pipe.multi()

    def write_pending(self, pipe, now: float) -> None:
        """The rates of each second into the per-channel series ``cmos``."""
        self.writer.write(pipe)

    def clear_pending(self) -> None:
        self.pending.clear()
        self.writer.clear()


# =================================================================== base currents

class BaseHandler(_Handler):
    """A base-current pool worker: value − 127 per valid channel, busy flags kept."""

    stream = "base"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.series: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.busy: dict[int, list[np.ndarray]] = {}
        self.writer = SeriesWriter()
        #: crate -> (record time µs, arrival t, 512 values, 512 busy) of its newest reading
        self.latest: dict[int, tuple[int, float, np.ndarray, np.ndarray]] = {}

    def process(self, frames) -> None:
        """Decode a batch and keep values, busy flags and latest readings for the flush."""
        opened = self.open(frames)
        if opened is None:
            return
        batch, order, t = opened
        dec = orca.decode_base(batch.records(), order)
        nbad = self.count_decode_errors(dec.errors)
        self.counts["processed"] += len(batch) - nbad
        if not len(dec.index):
            return
        err = dec.error_flags[dec.record] != 0
        if err.any():
            self.counts["xl3_error_flags"] += int((dec.error_flags != 0).sum())
        valid = ~dec.masked & ~dec.busy & ~err
        value = np.where(valid, dec.current.astype(float), np.nan)
        sec = int(t)
        self.series.setdefault(sec, []).append((dec.lcn[valid], dec.current[valid]))
        busy = dec.busy & ~dec.masked
        if busy.any():
            self.busy.setdefault(sec, []).append(dec.lcn[busy])
            self.counts["busy"] += int(busy.sum())
        self.keep_latest(dec, value, busy, t)

    def keep_latest(self, dec: orca.BaseBatch, value: np.ndarray, busy: np.ndarray, t: float) -> None:
        """Remember each crate's newest reading as a whole 512-channel block.

        Slots absent from the record's slot mask are not polled: NaN.
        """
        newest = np.lexsort((np.arange(len(dec.crate)), dec.time_us, dec.crate))
        last_of_crate = newest[np.r_[dec.crate[newest][1:] != dec.crate[newest][:-1], True]]
        for r in last_of_crate.tolist():  # one per crate (at most 19)
            crate, t_us = int(dec.crate[r]), int(dec.time_us[r])
            held = self.latest.get(crate)
            if held is not None and held[0] > t_us:
                continue
            sel = dec.record == r
            local = dec.lcn[sel] - crate * CRATE_CHANNELS
            vals = np.full(CRATE_CHANNELS, np.nan)
            vals[local] = value[sel]
            flags = np.zeros(CRATE_CHANNELS, dtype=np.uint8)
            flags[local] = busy[sel]
            self.latest[crate] = (t_us, t, vals, flags)

    def has_pending(self) -> bool:
        return bool(self.series or self.busy or self.latest)

    def pending_stores(self) -> list[dict]:
        return [self.series, self.busy]

    def transaction(self, pipe) -> None:
        """WATCH the per-crate times of the latest map, so that only newer readings
        win, and read the stored series arrays (see :class:`SeriesWriter`)."""
        self.writer.clear()
        for sec, parts in self.series.items():
            self.writer.add_values("base", sec, np.concatenate([p[0] for p in parts]),
                                   np.concatenate([p[1] for p in parts]))
        for sec, parts in self.busy.items():
            self.writer.add_counts(BUSY_SERIES, sec, np.concatenate(parts), 1)
        self.newer = list(self.latest)
        if self.latest:
            pipe.watch(BASE_CRATE_TIME_KEY)
            stored = pipe.hmget(BASE_CRATE_TIME_KEY, [str(c) for c in self.latest])
            self.newer = [c for c, s in zip(self.latest, stored) if s is None or int(s) <= self.latest[c][0]]
        if self.writer:
            self.writer.read(pipe)
        pipe.multi()

    def write_pending(self, pipe, now: float) -> None:
        """Series ``base`` and ``base_busy`` per second; latest map of newer crates."""
        self.writer.write(pipe)
        if not self.newer:
            return
        values = np.full(NCHANNELS_TOTAL, np.nan)
        flags = np.zeros(NCHANNELS_TOTAL, dtype=np.uint8)
        times = {}
        for crate in self.newer:
            t_us, t, vals, busy = self.latest[crate]
            sl = slice(crate * CRATE_CHANNELS, (crate + 1) * CRATE_CHANNELS)
            values[sl], flags[sl] = vals, busy
            times[str(crate)] = t_us
            cards = np.arange(crate * NCARDS, (crate + 1) * NCARDS)
            _latest_writes(pipe, "base", values, t, cards, self.ttl)
            pipe.setrange(BUSY_KEY, sl.start, flags[sl].tobytes())
        pipe.expire(BUSY_KEY, self.ttl)
        pipe.hset(BASE_CRATE_TIME_KEY, mapping=times)
        pipe.expire(BASE_CRATE_TIME_KEY, self.ttl)

    def clear_pending(self) -> None:
        self.series.clear()
        self.busy.clear()
        self.latest.clear()
        self.writer.clear()


# =================================================================== pool

HANDLERS = {"cmos": "minard.pipeline.orca_stream:CmosHandler", "base": "minard.pipeline.orca_stream:BaseHandler"}


def pool_spec(cfg, stream: str) -> PoolSpec:
    """The parameters of one stream's pool from the configuration."""
    return PoolSpec(name=f"orca_{stream}", handler=HANDLERS[stream], upstream=str(cfg[f"zmq_{stream}"]),
                    max_workers=int(cfg[f"{stream}_workers"]), trx_limit=int(cfg["orca_trx_limit"]),
                    idle_timeout=float(cfg["orca_idle_timeout"]), flush_period=1.0,
                    hwm=int(cfg["zmq_hwm"]))


def event_log_path(cfg, stream: str) -> str:
    """The pool event log: ``orca_event_log`` or ``var_dir/orca_<stream>_pool.log``."""
    path = str(cfg.get("orca_event_log") or "")
    if not path:
        var = cfg.path("var_dir") if hasattr(cfg, "path") else cfg["var_dir"]
        path = os.path.join(str(var), f"orca_{stream}_pool.log")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def stream_for(port: str | None, stream: str | None, cfg) -> str:
    """The stream a consumer serves: ``--stream``, or the one whose ZMQ port is *port*."""
    if stream:
        return stream
    if port is None:
        raise click.UsageError("give the ZMQ port (e.g. 5557 or 5558) or --stream cmos|base")
    for name in STREAMS:
        if str(cfg[f"zmq_{name}"]).rsplit(":", 1)[-1] == str(port):
            return name
    ports = ", ".join(f"{str(cfg[f'zmq_{n}']).rsplit(':', 1)[-1]} ({n})" for n in STREAMS)
    raise click.UsageError(f"port {port} is neither zmq_cmos nor zmq_base: {ports}")


def run_consumer(cfg, stream: str) -> None:
    """Run one stream's pool (stage *stream*) until SIGTERM/SIGINT; see :func:`minard.pipeline.consumer.run_pool`."""
    cfg["orca_flushed_key"] = flushed_key(f"orca:{stream}")
    manager = PoolManager(int(cfg["orca_max_total_workers"]))
    pool = AccountedPool(pool_spec(cfg, stream), cfg, stage=stream, flushed_option="orca_flushed_key",
                         manager=manager, event_log=event_log_path(cfg, stream))
    run_pool(pool, PoolReporter(pool, cfg, consumer_component(stream), {"stream": stream}), stream)


# =================================================================== CLI

def _load(config_path, log_level):
    cfg = config_mod.load(path=config_path)
    log_mod.setup(log_level or cfg["log_level"])
    return cfg


@click.command("data_producer", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default=None, help="ORCA host [orca_host].")
@click.option("--port", type=int, default=None, help="ORCA data port [orca_port, 44666].")
@click.option("--config", "config_path", default=None, help="Configuration file.")
@click.option("--log-level", default=None, help="DEBUG, INFO, ... [log_level].")
def producer_cli(host, port, config_path, log_level):
    """Read CMOS-rate and base-current records from the ORCA stream and push
    them to ZMQ (zmq_cmos, zmq_base) in batches."""
    cfg = _load(config_path, log_level)
    host = host or str(cfg["orca_host"])
    port = port or int(cfg["orca_port"])
    producer = Producer(cfg, host, port)
    metrics.serve(cfg, "data_producer", metrics.Snapshot("minard_producer", lambda: {
        "orca_connected": producer.connected, **{f"consumers_{k}": v for k, v in producer.peers.items()}}))
    signal.signal(signal.SIGTERM, producer.stop)
    signal.signal(signal.SIGINT, producer.stop)
    log.info("data_producer: ORCA %s:%d -> cmos %s, base %s (SNDHWM %s, batches of %d records / %.0f ms)",
             host, port, cfg["zmq_cmos"], cfg["zmq_base"], cfg["zmq_hwm"], producer.batch_records,
             producer.batch_seconds * 1000)
    producer.run()
    log.info("data_producer stopped: %s", json.dumps(dict(producer.totals)))


@click.command("data_consumer", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("port", required=False)
@click.option("--stream", type=click.Choice(STREAMS), default=None,
              help="Stream to consume (instead of PORT).")
@click.option("--workers", type=int, default=None, help="MaxSlaves [cmos_workers / base_workers].")
@click.option("--config", "config_path", default=None, help="Configuration file.")
@click.option("--log-level", default=None, help="DEBUG, INFO, ... [log_level].")
def consumer_cli(port, stream, workers, config_path, log_level):
    """Consume one ORCA stream into Redis: PORT 5557 (zmq_cmos) gives CMOS
    rates, 5558 (zmq_base) base currents."""
    cfg = _load(config_path, log_level)
    stream = stream_for(port, stream, cfg)
    if workers is not None:
        cfg[f"{stream}_workers"] = workers
    run_consumer(cfg, stream)
