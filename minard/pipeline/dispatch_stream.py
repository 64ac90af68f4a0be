"""``minard_dispatch push`` and ``minard_dispatch pull``: the dispatch stream into Redis.

Data path::

    dispatcher --TCP--> push --ZMQ PUSH/PULL (minard/1 batches)--> pull pool --> Redis

**push** is an analyzer client of the dispatcher.  It collects the data
frames it receives into batches (at most ``dispatch_batch_records`` records
or ``dispatch_batch_ms`` milliseconds) and sends each as one wire message
(:mod:`minard.formats.wire`; kind ``pmt`` for 'PMT ' dispatch records, ``rechdr`` for
the others) on a PUSH socket bound to ``zmq_dispatch`` with an explicit
SNDHWM.  Sends never block: a batch that meets the high-water mark is dropped
and counted (``stats:push`` ``dropped`` and ``hwm``).  ENDTAPE is answered with
FINISHED once every record received has been handed to ZMQ.  When the
dispatcher goes away the push reconnects with back-off; its heartbeat names
the dispatcher it reads.  Each batch's meta carries ``prev_gtid``, the GTID
of the last event before it, so that workers find GTID gaps across batches.

**pull** runs a consumer pool (:mod:`minard.pipeline.pool`) whose workers run
:class:`PullHandler`: decode batches in vectorized passes (the batches of
one second a few at a time, :func:`minard.formats.pmt.decode_buffer`), aggregate
(:mod:`minard.analysis.aggregate`) and, once a second, write everything pending in
ONE Redis transaction: time series, run summaries and the loss counters.
If Redis is unreachable the aggregates of that flush are dropped and their
records counted as ``stats:redis`` errors once Redis is back; nothing is
silent.

Loss accounting (``stats:<stage>``, invariant received = processed + dropped +
errors once queues are empty):

* ``dispatcher``: events the dispatcher offered this push (from STATS?);
  dropped = its analyzer queue overflowed.
* ``push``: records received from the dispatcher; processed = handed to ZMQ;
  dropped = refused at the high-water mark.
* ``pull``: records received by the pool; processed = decoded and
  aggregated; errors = corrupt records or batches; dropped = records held
  by a worker that died before its flush (counted by the manager from the
  per-worker ``pool:...:flushed`` hash the workers write in their flush).
* ``redis``: records whose aggregates were to be written; errors = the write
  failed (Redis down).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import signal
import socket
import struct
import time
from collections import Counter

import click
import numpy as np
import redis as redis_py
import zmq

from minard import config as config_mod
from minard import log as log_mod
from minard import metrics
from minard.analysis.aggregate import Aggregator, SecondAgg, record_gtids, segment_gaps
from minard.dispatcher.client import (
    ConnectionClosed,
    DispatchClient,
    connect_with_retry,
    query,
)
from minard.formats import wire
from minard.formats.framing import (
    HEADER,
    HEADER_SIZE,
    RAWBATCH_RAW,
    RawBatchError,
    split_rawbatch,
    tag_bytes,
)
from minard.formats.pmt import GENERIC_HEADER, PMT_RECORD_ID, decode_buffer
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
from minard.store import status
from minard.store import timeseries as ts
from minard.store.bursts import BurstMonitor
from minard.store.runs import write_run
from minard.store.schema import NHIT_LEVELS

log = logging.getLogger("minard.pipeline.dispatch_stream")

PUSH_COMPONENT = "minard_dispatch_push"
PULL_COMPONENT = "minard_dispatch_pull"
HANDLER = "minard.pipeline.dispatch_stream:PullHandler"
_RAWDATA = tag_bytes("RAWDATA")
_RECHDR = tag_bytes("RECHDR")
_WORD = struct.Struct(">I")


#: Adds an array of big-endian uint32 (ARGV[1]) to the array stored at each of
#: KEYS, saturating at 2**32-1, in 1024-entry chunks: one command for all the
#: levels of a series instead of one BITFIELD operation per channel and level
#: when most channels have hits.  A key that does not exist yet is simply set
#: to the array.  The stored layout is that of minard.store.timeseries (readers do
#: not know the difference).
ADD_U32_LUA = r"""
local add = ARGV[1]
local n = #add / 4
for k = 1, #KEYS do
  local cur = redis.call('GET', KEYS[k]) or ''
  if #cur == 0 then
    redis.call('SET', KEYS[k], add)
  else
    local out = {}
    local i = 0
    while i < n do
      local m = math.min(1024, n - i)
      local fmt = '>' .. string.rep('I4', m)
      local a = {struct.unpack(fmt, add, i * 4 + 1)}
      if #cur >= (i + m) * 4 then
        local c = {struct.unpack(fmt, cur, i * 4 + 1)}
        for j = 1, m do
          local v = a[j] + c[j]
          if v > 4294967295 then v = 4294967295 end
          a[j] = v
        end
      else
        for j = 1, m do
          local pos = (i + j - 1) * 4
          if #cur >= pos + 4 then
            local v = a[j] + struct.unpack('>I4', cur, pos + 1)
            if v > 4294967295 then v = 4294967295 end
            a[j] = v
          end
        end
      end
      out[#out + 1] = struct.pack(fmt, unpack(a, 1, m))
      i = i + m
    end
    redis.call('SET', KEYS[k], table.concat(out) .. string.sub(cur, #add + 1))
  end
end
return #KEYS
"""
#: Arrays with more nonzero entries than this go through ADD_U32_LUA.
SPARSE_MAX = 256


class CountWriter:
    """Adds per-channel (or per-card) count arrays to Redis, exactly and cheaply.

    Sparse arrays use ``BITFIELD INCRBY`` per nonzero entry (as
    :func:`minard.store.timeseries.add_counts`); dense ones one script call with the
    whole array as a binary string, for every level at once.  Both are atomic,
    so workers combine exactly.
    """

    def __init__(self, redis):
        self.script = redis.register_script(ADD_U32_LUA)

    def add(self, pipe, key: str, counts: np.ndarray, ttl: int) -> None:
        """Add *counts* (indexed by channel) to the array at *key*; set its expiry."""
        self.add_many(pipe, [(key, ttl)], counts)

    def add_many(self, pipe, keys: list[tuple[str, int]], counts: np.ndarray) -> None:
        """Add *counts* to the array at each ``(key, ttl)`` of *keys* and set its expiry."""
        nz = np.flatnonzero(counts)
        if not len(nz):
            return
        if len(nz) <= SPARSE_MAX:
            for key, _ in keys:
                ts._bitfield_incr(pipe, key, "u32", nz, counts[nz])
        else:
            blob = np.minimum(counts[:nz[-1] + 1], 0xFFFFFFFF).astype(">u4").tobytes()
            self.script(keys=[key for key, _ in keys], args=[blob], client=pipe)
        for key, ttl in keys:
            pipe.expire(key, ttl)

    def add_levels(self, pipe, name: str, t: float, counts: np.ndarray,
                   levels=ts.CHANNEL_LEVELS) -> None:
        """Add *counts* to the per-channel series *name* at every level (time *t*)."""
        keys = [(ts.channel_key(level.step, ts.bucket(t, level.step), name), level.keep + level.step)
                for level in levels]
        self.add_many(pipe, keys, counts)


# =================================================================== push

def record_gtid(view: memoryview) -> int | None:
    """GTID of a 'PMT ' dispatch record as :func:`minard.analysis.aggregate.stream_gtids` sees it.

    The MTC GTID (word M3); for an orphan (MTC words zero) the GTID of its
    first hit; None if there is neither.
    """
    base = GENERIC_HEADER.size
    if len(view) < base + 44:
        return None
    head = bytes(view[base: base + 56])
    if any(head[20:44]):
        return _WORD.unpack_from(head, 32)[0] & 0xFFFFFF
    if len(head) < 56 or not _WORD.unpack_from(head, 12)[0] & 0xFFFF:
        return None
    h0, _, h2 = struct.unpack_from(">III", head, 44)
    return (h0 & 0xFFFF) | (h2 >> 12 & 0xF) << 16 | (h2 >> 28 & 0xF) << 20


class Pending:
    """Records of one kind waiting to be sent, as (lengths, payload) pieces in order.

    A RAWBATCH frame is one piece as it arrived (no copy, no loop over its
    records); consecutive RAWDATA/RECHDR frames become one piece each time
    data arrives.  :meth:`take` joins pieces into one wire batch.
    """

    def __init__(self):
        self.pieces: list[tuple[np.ndarray, memoryview]] = []  # (uint32 BE lengths, records)
        self.count = 0

    def add_packed(self, lengths, records) -> None:
        """Add records given as their uint32 BE lengths and their bytes back to back."""
        lengths = np.frombuffer(lengths, ">u4")
        if len(lengths):
            self.pieces.append((lengths, memoryview(records)))
            self.count += len(lengths)

    def add_records(self, records: list) -> None:
        """Add separate records (buffers)."""
        if records:
            self.add_packed(np.fromiter(map(len, records), ">u4", len(records)).tobytes(),
                            b"".join(records))

    def take(self, limit: int) -> tuple[bytes, bytes, int]:
        """Up to *limit* records from the front: (lengths frame, payload, count).

        A single whole piece is returned as it is (no copy).
        """
        if self.pieces and len(self.pieces[0][0]) <= limit and (
                len(self.pieces) == 1 or len(self.pieces[0][0]) + len(self.pieces[1][0]) > limit):
            piece_lengths, records = self.pieces.pop(0)
            self.count -= len(piece_lengths)
            return piece_lengths.tobytes(), records, len(piece_lengths)
        lengths, payloads, n = [], [], 0
        while self.pieces and n < limit:
            piece_lengths, records = self.pieces[0]
            k = min(len(piece_lengths), limit - n)
            if k == len(piece_lengths):
                self.pieces.pop(0)
                cut = len(records)
            else:
                cut = int(piece_lengths[:k].sum(dtype=np.int64))
                self.pieces[0] = (piece_lengths[k:], records[cut:])
            lengths.append(piece_lengths[:k].tobytes())
            payloads.append(records[:cut])
            n += k
        self.count -= n
        return b"".join(lengths), b"".join(payloads), n


def last_gtid(lengths: bytes, payload) -> int | None:
    """GTID of the last record of a batch that has one (:func:`record_gtid`), or None."""
    view = memoryview(payload)
    end = len(view)
    for i in range(len(lengths) // 4 - 1, -1, -1):  # usually one turn: the last record
        size = _WORD.unpack_from(lengths, 4 * i)[0]
        gtid = record_gtid(view[end - size:end])
        if gtid is not None:
            return gtid
        end -= size
    return None


class Pusher:
    """The push process: dispatcher analyzer in, ZMQ PUSH out, counted."""

    def __init__(self, cfg, address: str, ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.address = address
        self.batch_records = int(cfg["dispatch_batch_records"])
        self.batch_seconds = float(cfg["dispatch_batch_ms"]) / 1000.0
        self.stats_interval = float(cfg["dispatch_stats_interval"])
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, int(cfg["zmq_hwm"]))
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.bind(str(cfg["zmq_dispatch"]))
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.peers = 0  # consumers connected to the PUSH socket
        self.redis = _redis_client(cfg)
        self.producer = f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}"
        self.started = time.time()
        self.running = True
        self.client: DispatchClient | None = None
        self.pending = {"pmt": Pending(), "rechdr": Pending()}
        self.first_pending: float | None = None
        self.last_gtid: int | None = None
        self.seq = 0
        self.totals = Counter()  # since start, for the heartbeat
        self.deltas = {"push": Counter(), "dispatcher": Counter()}  # not yet in Redis
        self.disp_seen = (None, 0, 0)  # (socket, events_sent, events_dropped) last read
        self.next_beat = 0.0
        self.next_stats = 0.0
        self.reporter = status.Reporter(self.redis, PUSH_COMPONENT, self.started)

    # -------------------------------------------------------- lifecycle
    def stop(self, *_args) -> None:
        """SIGTERM: hand on what is pending, beat a last time, exit."""
        self.running = False

    def run(self) -> None:
        """Connect (and reconnect) to the dispatcher until stopped."""
        try:
            while self.running:
                try:
                    self.client = connect_with_retry(
                        self.address, "analyzer", "minard_dispatch_push", retry_for=None,
                        should_stop=self._waiting, timeout=5.0, batch=True)
                except ConnectionClosed:
                    break
                log.info("reading dispatcher %s (socket %s)", self.address, self.client.socket_number)
                self.disp_seen = (self.client.socket_number, 0, 0)
                try:
                    self.serve(self.client)
                except (ConnectionClosed, OSError) as exc:
                    log.warning("lost dispatcher %s: %s; reconnecting", self.address, exc)
                finally:
                    self.send_pending()
                    self.client.close()
                    self.client = None
                self.beat()
        finally:
            self.send_pending()
            self.beat(final=True)
            self.sock.disable_monitor()
            self.monitor.close(0)
            self.sock.close()

    def _waiting(self) -> bool:
        """While reconnecting: keep beating (connected=0); True once stopped."""
        if time.monotonic() >= self.next_beat:
            self.beat()
        return not self.running

    def serve(self, client: DispatchClient) -> None:
        """Read frames until the connection closes or we are stopped."""
        decoder = client.decoder
        decoder.batch_tags = frozenset({_RAWDATA, _RECHDR, RAWBATCH_RAW})
        while client.backlog:
            self.on_frame(client.backlog.popleft())
        while self.running:
            now = time.monotonic()
            wait = self.next_beat - now
            if self.first_pending is not None:
                wait = min(wait, self.first_pending + self.batch_seconds - now)
            ready, _, _ = select.select([client.sock], [], [], max(0.0, min(wait, 1.0)))
            if ready:
                n = client.sock.recv_into(decoder.writable(1 << 20))  # straight into the decoder
                if not n:
                    raise ConnectionClosed("dispatcher closed the connection")
                decoder.commit(n)
                while (item := decoder.next_item()) is not None:
                    if hasattr(item, "raw"):
                        self.on_data(item.raw)
                    else:
                        self.on_frame(item)
            now = time.monotonic()
            if self.first_pending is not None and now - self.first_pending >= self.batch_seconds:
                self.send_pending()
            if now >= self.next_beat:
                self.beat()

    # -------------------------------------------------------- data
    def on_data(self, raw: bytes) -> None:
        """Add consecutive data frames to the pending records (no copy of RAWBATCHes)."""
        view = memoryview(raw)
        pos, size, unpack = 0, len(raw), HEADER.unpack_from
        pmt, other = [], []  # single-record frames since the last RAWBATCH
        n = 0
        while pos < size:
            tag, length = unpack(raw, pos)
            start = pos + HEADER_SIZE
            body = view[start:start + length]
            pos = start + length
            if tag != RAWBATCH_RAW:
                (pmt if tag == _RAWDATA else other).append(body)
                n += 1
                continue
            self.pending["pmt"].add_records(pmt)  # keep the stream order
            pmt = []
            try:
                lengths, records, count = split_rawbatch(body)
            except RawBatchError as exc:  # the dispatcher checks them; never expected
                self.deltas["push"].update(received=1, errors=1)
                log.error("bad RAWBATCH from the dispatcher: %s", exc)
                continue
            self.pending["pmt"].add_packed(lengths, records)
            n += count
        self.pending["pmt"].add_records(pmt)
        self.pending["rechdr"].add_records(other)
        self.deltas["push"]["received"] += n
        self.totals["received"] += n
        if self.first_pending is None:
            self.first_pending = time.monotonic()
        if any(p.count >= self.batch_records for p in self.pending.values()):
            self.send_pending()

    def on_frame(self, frame) -> None:
        """A command from the dispatcher (data frames come through on_data)."""
        if frame.tag in ("RAWDATA", "RECHDR", "RAWBATCH"):
            self.on_data(HEADER.pack(tag_bytes(frame.tag), len(frame.payload)) + frame.payload)
            return
        text = frame.text
        if text.startswith("ENDTAPE"):
            self.send_pending()
            self.poll_dispatcher(force=True)
            self.client.send_command("FINISHED")
            self.totals["endtapes"] += 1
            log.info("ENDTAPE: %d records handed on so far; FINISHED sent", self.totals["sent"])
        elif text.startswith(("BEGINTAPE", "ALLFINISHED", "QUIT")):
            log.info("dispatcher: %s", text[:80])
        else:
            log.debug("dispatcher command %r", text[:80])

    def send_pending(self) -> None:
        """Send what is pending in batches of dispatch_batch_records; count what ZMQ refuses."""
        for kind, pending in self.pending.items():
            while pending.count:
                self._send(kind, *pending.take(self.batch_records))
        self.first_pending = None

    def _send(self, kind: str, lengths: bytes, payload: bytes, n: int) -> None:
        meta = {"producer": self.producer, "seq": self.seq, "dispatcher": self.address}
        if kind == "pmt":
            meta["prev_gtid"] = self.last_gtid
            gtid = last_gtid(lengths, payload)
            if gtid is not None:
                self.last_gtid = gtid
        self.seq += 1
        frames = wire.encode_packed(kind, lengths, payload, meta)
        try:
            # Copied into ZMQ: a zero-copy send is released by pyzmq's garbage-collector
            # thread, which needs the GIL, and under load the released batches piled up
            # (GBs of RSS); the copy costs ~0.1 us per event.
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=True)
        except zmq.Again:
            self.deltas["push"].update(dropped=n, hwm=n)
            self.totals["dropped"] += n
            if self.totals["dropped"] == n or self.totals["drop_batches"] % 100 == 0:
                log.warning("ZMQ high-water mark reached: dropped a batch of %d records"
                            " (%d dropped so far)", n, self.totals["dropped"])
            self.totals["drop_batches"] += 1
            return
        self.deltas["push"]["processed"] += n
        self.totals["sent"] += n
        self.totals["batches"] += 1

    # -------------------------------------------------------- reporting
    def poll_dispatcher(self, force: bool = False) -> None:
        """Count the dispatcher's sends and drops for our connection (STATS?)."""
        now = time.monotonic()
        if self.client is None or (not force and now < self.next_stats):
            return
        self.next_stats = now + self.stats_interval
        try:
            reply = query(self.address, "STATS?", timeout=2.0)
            data = json.loads(reply.partition(":")[2])
        except (OSError, TimeoutError, ValueError, ConnectionClosed) as exc:
            log.debug("STATS? failed: %s", exc)
            return
        mine = next((c for c in data.get("clients", [])
                     if c.get("socket") == self.client.socket_number and c.get("role") == "analyzer"), None)
        if mine is None:
            return
        sock, sent0, dropped0 = self.disp_seen
        sent, dropped = int(mine.get("events_sent", 0)), int(mine.get("events_dropped", 0))
        d_sent, d_dropped = max(0, sent - sent0), max(0, dropped - dropped0)
        self.disp_seen = (sock, sent, dropped)
        self.deltas["dispatcher"].update(received=d_sent + d_dropped, processed=d_sent,
                                         dropped=d_dropped)
        self.totals["dispatcher_dropped"] += d_dropped

    def count_peers(self) -> int:
        """Consumers connected to the PUSH socket (from the socket monitor)."""
        self.peers += peers_changed(self.monitor)
        return self.peers

    def beat(self, final: bool = False) -> None:
        """Heartbeat and counters to Redis; kept for the next beat if Redis is down."""
        self.next_beat = time.monotonic() + 1.0
        if not final:
            self.poll_dispatcher()
        fields = {"dispatcher": self.address, "connected": int(self.client is not None),
                  "dispatcher_socket": getattr(self.client, "socket_number", ""),
                  "zmq": str(self.cfg["zmq_dispatch"]), "hwm": int(self.cfg["zmq_hwm"]),
                  "consumers": self.count_peers(),
                  **{k: v for k, v in self.totals.items()}}
        if final:
            fields["state"] = "stopped"
        self.reporter.write(fields, self.deltas)


# =================================================================== pull: worker

def record_ids(payload, starts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The big-endian 32-bit word at each byte offset *starts* of *payload* (where *valid*).

    One gather of whole words when every offset is word-aligned (records
    are whole words, so this is the rule); a byte gather otherwise.  Entries
    that are not *valid* (records too short to hold a word) are 0.
    """
    out = np.zeros(len(starts), np.uint32)
    if not valid.any():
        return out
    if not np.any(starts & 3):
        words = np.frombuffer(payload, ">u4", count=len(payload) // 4)
        if valid.all():
            return words[starts >> 2]
        out[valid] = words[starts[valid] >> 2]
        return out
    data = np.frombuffer(payload, np.uint8)
    ids = data[starts[valid][:, None] + np.arange(4)].astype(np.uint32)
    out[valid] = ids[:, 0] << 24 | ids[:, 1] << 16 | ids[:, 2] << 8 | ids[:, 3]
    return out


def split_dispatch(batch: wire.Batch) -> tuple[np.ndarray, np.ndarray, Counter]:
    """Offsets and lengths of the PmtEventRecords inside 'PMT ' dispatch records.

    Vectorized check of the 12-byte generic header (record id 'PMT '); records
    failing it are left out and counted here by reason (``truncated``: shorter
    than the generic header, ``bad_header``: another record id).
    """
    offsets = batch.offsets + GENERIC_HEADER.size
    lengths = batch.lengths - GENERIC_HEADER.size
    bad = Counter()
    short = lengths < 0
    wrong = ~short & (record_ids(batch.payload, batch.offsets, ~short) != PMT_RECORD_ID)
    if not (short.any() or wrong.any()):
        return offsets, lengths, bad
    if wrong.any():
        bad["bad_header"] += int(wrong.sum())
    if short.any():
        bad["truncated"] += int(short.sum())
    keep = ~(short | wrong)
    return offsets[keep], lengths[keep], bad


#: A worker decodes up to this many records (and bytes) of one second together:
#: numpy's fixed cost per call weighs on 1000-record batches at low nhit, and
#: several batches in one decode and one aggregation cost about a quarter less
#: at nhit 40.  The byte limit keeps the arrays of a pass in cache (merging
#: batches at nhit 300 is slower).
HOLD_RECORDS = 8192
HOLD_BYTES = 4 << 20


#: glibc mallopt parameters: allocations below this come from the heap, and
#: freed heap memory is kept up to M_TRIM_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(limit: int = 256 << 20) -> bool:
    """Make glibc malloc reuse freed memory rather than hand it back to the system.

    A worker allocates the same few MB of arrays for every batch.  With
    glibc's defaults a large array is a fresh ``mmap`` each time (or heap
    memory trimmed and grown again), and touching it costs a page fault per
    4 kB, which at low nhit costs as much as the decoding.  Arrays below
    *limit* then come from the heap, and up to twice that is kept when
    freed, so a worker's memory stays at its high-water mark (tens of MB).
    False where mallopt is not available (not glibc): nothing changes.
    """
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit) and libc.mallopt(_M_TRIM_THRESHOLD, 2 * limit))
    except (OSError, AttributeError):
        return False


def join_dispatch(batches: list[wire.Batch]) -> tuple:
    """(payload, offsets, lengths, bad, firsts) of 'PMT ' messages decoded as one.

    :func:`split_dispatch` of each, the payloads joined (a copy only when
    there are several) and the offsets moved along; ``firsts[k]`` is the
    index of message k's first PmtEventRecord.
    """
    parts = [split_dispatch(batch) for batch in batches]
    if len(parts) == 1:
        offsets, lengths, bad = parts[0]
        return batches[0].payload, offsets, lengths, bad, [0]
    bases = np.cumsum([0] + [len(batch.payload) for batch in batches[:-1]])
    offsets = np.concatenate([o + base for (o, _, _), base in zip(parts, bases.tolist())])
    lengths = np.concatenate([n for _, n, _ in parts])
    bad = sum((b for _, _, b in parts), Counter())
    firsts = np.cumsum([0] + [len(o) for o, _, _ in parts[:-1]]).tolist()
    return b"".join(batch.payload for batch in batches), offsets, lengths, bad, firsts


class PullHandler:
    """A pool worker's handler: decode, aggregate, flush to Redis once a second.

    'PMT ' messages of the same second are held back (at most
    ``HOLD_RECORDS`` records, ``HOLD_BYTES`` bytes) and decoded and
    aggregated together; everything held is decoded before each flush, so
    holding delays nothing that Redis would show.  Each message keeps its own
    ``prev_gtid`` for GTID gap finding (:func:`minard.analysis.aggregate.segment_gaps`).

    A new worker also writes right after its first batch: the pool starts a
    worker when data arrives (at start and after an idle stop), and waiting
    for its first one-second tick would add the worker's start-up time to
    the delay before that data is visible in Redis.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        keep_freed_memory()  # this process is a worker: see the function
        self.redis = _redis_client(cfg)
        self.counts = CountWriter(self.redis)
        self.max_payload = int(cfg.get("zmq_max_frame", wire.MAX_PAYLOAD))
        self.flushed_key = str(cfg.get("dispatch_flushed_key") or "")
        self.close_retry = float(cfg.get("dispatch_close_retry", 3.0))
        self.agg = Aggregator()
        self.pull = Counter()  # stats:pull deltas not yet in Redis
        self.redis_failed = 0  # records whose aggregates could not be written
        self.redis_written = 0
        self.unaccounted = 0  # records handled since the last successful flush
        self.failing = False
        self.first_batch = True  # no batch processed yet by this worker
        self.held: list[tuple[wire.Batch, float]] = []  # 'PMT ' messages not decoded yet, and their time
        self.held_records = self.held_bytes = 0
        self.burst = BurstMonitor(self.redis, cfg)  # supernova burst search (minard.store.bursts)

    def process(self, frames) -> None:
        """Decode one wire message and fold it into the pending aggregates (see the class)."""
        self._process(frames)
        if self.first_batch:
            self.first_batch = False
            self.flush(time.time())

    def _process(self, frames) -> None:
        """Decode one wire message and fold it into the pending aggregates."""
        n = len(frames[3]) // 4 if len(frames) == 5 else 0
        self.unaccounted += n
        try:
            batch = wire.decode(frames, self.max_payload)
        except wire.WireError as exc:
            self.pull.update({"errors": n, f"wire_{exc.reason}": n})
            log.warning("bad batch of %d records: %s", n, exc)
            self.agg.second(time.time()).records += n
            self.agg.records += n
            return
        t = float(batch.meta.get("sent") or time.time())
        if batch.kind != "pmt":
            self.pull["processed"] += len(batch)
            self.pull[f"kind_{batch.kind}"] += len(batch)
            self.agg.second(t).records += len(batch)
            self.agg.records += len(batch)
            return
        if self.held and (int(t) != int(self.held[0][1]) or self.held_records + len(batch) > HOLD_RECORDS
                          or self.held_bytes + len(batch.payload) > HOLD_BYTES):
            self.decode_held()
        self.held.append((batch, t))
        self.held_records += len(batch)
        self.held_bytes += len(batch.payload)

    def decode_held(self) -> None:
        """Decode and aggregate the 'PMT ' messages held back, in one pass."""
        if not self.held:
            return
        held, self.held = self.held, []
        self.held_records = self.held_bytes = 0
        payload, offsets, lengths, bad, firsts = join_dispatch([batch for batch, _ in held])
        events = decode_buffer(payload, offsets, lengths)
        prevs = [batch.meta.get("prev_gtid") for batch, _ in held]
        gaps = segment_gaps(record_gtids(events, payload, offsets, lengths), firsts,
                            [p if isinstance(p, int) else None for p in prevs])
        self.agg.add_batch(events, held[0][1], corrupt=bad, gaps=gaps)
        self.burst.add(events)
        nbad = sum(bad.values()) + len(events.errors)
        self.pull["processed"] += sum(len(batch) for batch, _ in held) - nbad
        if nbad:
            self.pull["errors"] += nbad
            self.pull.update(bad)
            self.pull.update(err.reason for _, err in events.errors)

    def flush(self, now: float) -> bool:
        """Write everything pending in one Redis transaction; False if Redis failed."""
        self.decode_held()
        if not self.unaccounted and not self.agg and not self.redis_failed and not self.pull:
            return True
        seconds, runs, records = self.agg.take()
        try:
            pipe = self.redis.pipeline(transaction=True)
            for sec in seconds.values():
                write_second(pipe, sec, self.counts)
            for agg in runs.values():
                write_run(pipe, agg, now, self.counts.add)
            status.count(pipe, "pull", **self.pull)
            status.count(pipe, "redis", received=records + self.redis_failed,
                         processed=records, errors=self.redis_failed)
            record_flushed(pipe, self.flushed_key, self.unaccounted)
            self.burst.write(pipe)
            pipe.execute()
        except redis_py.RedisError as exc:
            self.redis_failed += records
            if not self.failing:
                log.warning("Redis write failed (%s): %d records not stored; retrying every second",
                            exc, records)
            self.failing = True
            return False
        if self.failing:
            log.info("Redis is back: %d records could not be stored during the outage",
                     self.redis_failed)
        self.failing = False
        self.burst.evaluate(now)
        self.redis_written += records
        metrics.add_stage("pull", self.pull)  # what stats:pull and stats:redis just gained
        metrics.add_stage("redis", {"received": records + self.redis_failed, "processed": records,
                                    "errors": self.redis_failed})
        self.pull.clear()
        self.redis_failed = 0
        self.unaccounted = 0
        return True

    def close(self) -> None:
        """Final flush, retried for a few seconds if Redis is down."""
        end = time.monotonic() + self.close_retry
        while not self.flush(time.time()) and time.monotonic() < end:
            time.sleep(0.2)


def write_second(pipe, sec: SecondAgg, counts: CountWriter) -> None:
    """Add one second's aggregate to the time series (see docs/storage.md)."""
    t = sec.t
    trig = sec.scalar_fields()
    if trig:
        ts.add(pipe, "trig", t, trig)
    stream = sec.stream_fields()
    if stream:
        ts.add(pipe, "stream", t, stream)
    if sec.last is not None:
        run, subrun, gtid = sec.last
        ts.put(pipe, "stream", t, {"run": run, "subrun": subrun, "gtid": gtid})
    nhit = sec.nhit_fields()
    if nhit:
        ts.add(pipe, "nhit", t, nhit, levels=NHIT_LEVELS)
    if sec.events:
        ts.add(pipe, "occ", t, {"events": sec.events}, levels=ts.CHANNEL_LEVELS)
    if sec.hits:
        counts.add_levels(pipe, "hits", t, sec.channel_hits)
        counts.add_levels(pipe, "card_hits", t, sec.card_hits)
        crates = sec.crate_hits
        ts.add(pipe, "crate", t, {f"c{i}": int(crates[i]) for i in np.flatnonzero(crates).tolist()})


# =================================================================== pull: pool

def pool_spec(cfg) -> PoolSpec:
    """The pull pool's parameters from the configuration."""
    return PoolSpec(name="dispatch", handler=HANDLER, upstream=str(cfg["zmq_dispatch"]),
                    max_workers=int(cfg["dispatch_workers"]), trx_limit=int(cfg["dispatch_trx_limit"]),
                    idle_timeout=float(cfg["dispatch_idle_timeout"]), flush_period=1.0,
                    hwm=int(cfg["zmq_hwm"]))


def event_log_path(cfg) -> str:
    """The pool event log: ``dispatch_event_log`` or ``var_dir/dispatch_pool.log``."""
    path = str(cfg.get("dispatch_event_log") or "")
    if not path:
        var = cfg.path("var_dir") if hasattr(cfg, "path") else cfg["var_dir"]
        path = os.path.join(str(var), "dispatch_pool.log")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def run_pull(cfg) -> None:
    """Run the pull pool (stage ``pull``) until SIGTERM/SIGINT; see :func:`minard.pipeline.consumer.run_pool`."""
    cfg = dict(cfg) if not hasattr(cfg, "path") else cfg
    cfg["dispatch_flushed_key"] = flushed_key("dispatch")
    manager = PoolManager(int(cfg["dispatch_max_total_workers"]))
    pool = AccountedPool(pool_spec(cfg), cfg, stage="pull", flushed_option="dispatch_flushed_key",
                         manager=manager, event_log=event_log_path(cfg))
    run_pool(pool, PoolReporter(pool, cfg, PULL_COMPONENT), "pull")


# =================================================================== CLI

@click.group("minard_dispatch", context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """The dispatch-stream monitoring: push (dispatcher -> ZMQ) and pull (ZMQ -> Redis)."""


def _load(config_path, log_level):
    cfg = config_mod.load(path=config_path)
    log_mod.setup(log_level or cfg["log_level"])
    return cfg


@cli.command("push")
@click.option("--host", default=None, metavar="HOST[:PORT]",
              help="Dispatcher to read [dispatcher_host:dispatcher_port].")
@click.option("--config", "config_path", default=None, help="Configuration file.")
@click.option("--log-level", default=None, help="DEBUG, INFO, ... [log_level].")
def push_cmd(host, config_path, log_level):
    """Read events from the dispatcher and push them to ZMQ (zmq_dispatch) in batches."""
    cfg = _load(config_path, log_level)
    address = host or str(cfg["dispatcher_host"])
    if ":" not in address:
        address = f"{address}:{cfg['dispatcher_port']}"
    pusher = Pusher(cfg, address)
    metrics.serve(cfg, "minard_dispatch_push", metrics.Snapshot("minard_push", lambda: {
        "dispatcher_connected": pusher.client is not None, "consumers": pusher.peers}))
    signal.signal(signal.SIGTERM, pusher.stop)
    signal.signal(signal.SIGINT, pusher.stop)
    log.info("push: dispatcher %s -> %s (SNDHWM %s, batches of %d records / %.0f ms)",
             address, cfg["zmq_dispatch"], cfg["zmq_hwm"], pusher.batch_records,
             pusher.batch_seconds * 1000)
    pusher.run()
    log.info("push stopped: %s", json.dumps(dict(pusher.totals)))


@cli.command("pull")
@click.option("--workers", type=int, default=None, help="MaxSlaves [dispatch_workers].")
@click.option("--trx-limit", type=int, default=None, help="Recycle a worker after N records [dispatch_trx_limit].")
@click.option("--config", "config_path", default=None, help="Configuration file.")
@click.option("--log-level", default=None, help="DEBUG, INFO, ... [log_level].")
def pull_cmd(workers, trx_limit, config_path, log_level):
    """Run the consumer pool: decode, aggregate and write to Redis once a second."""
    cfg = _load(config_path, log_level)
    if workers is not None:
        cfg["dispatch_workers"] = workers
    if trx_limit is not None:
        cfg["dispatch_trx_limit"] = trx_limit
    run_pull(cfg)


@click.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--config", "config_path", default=None, help="Configuration file.")
def stats_cmd(as_json, config_path):
    """Print the loss counters of every pipeline stage (stats:<stage> in Redis)."""
    cfg = config_mod.load(path=config_path)
    client = _redis_client(cfg)
    try:
        data = status.stats(client)
    except redis_py.RedisError as exc:
        raise click.ClickException(f"Redis {config_mod.redact(cfg['redis_url'])}: {exc}") from None
    if as_json:
        click.echo(json.dumps(data))
        return
    for stage, counters in data.items():
        main = " ".join(f"{k}={counters.get(k, 0)}" for k in status.COUNTERS)
        extra = " ".join(f"{k}={v}" for k, v in sorted(counters.items()) if k not in status.COUNTERS)
        click.echo(f"{stage:<14} {main} {extra}".rstrip())
