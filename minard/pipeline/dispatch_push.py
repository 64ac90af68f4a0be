"""``minard_dispatch push``: the dispatcher's events onto ZMQ, in counted batches.

Data path::

    dispatcher --TCP--> push --ZMQ PUSH/PULL (minard/1 batches)--> pull pool --> Redis

The push is an analyzer client of the dispatcher.  It collects the data
frames it receives into batches (at most ``dispatch_batch_records`` records
or ``dispatch_batch_ms`` milliseconds) and sends each as one wire message
(:mod:`minard.formats.wire`; kind ``pmt`` for 'PMT ' dispatch records, ``rechdr``
for the others) on a PUSH socket bound to ``zmq_dispatch`` (the socket, the
high-water-mark accounting, the heartbeat and the signals are
:class:`minard.pipeline.base.Producer`'s).  ENDTAPE is answered with FINISHED
once every record received has been handed to ZMQ.  When the dispatcher goes
away, or sends QUIT at its SHUTDOWN (then it waits for its analyzers to
disconnect, docs/protocol.md section 6), the push disconnects and reconnects
with back-off; its heartbeat names the dispatcher it reads.  Each batch's meta carries ``prev_gtid``, the GTID of the last
event before it, so that workers find GTID gaps across batches.

Counters: ``stats:push`` (received from the dispatcher; processed = handed
to ZMQ; dropped = refused at the high-water mark) and ``stats:dispatcher``
(events the dispatcher offered this push, from its STATS?; dropped = its
analyzer queue overflowed).
"""

from __future__ import annotations

import json
import logging
import select
import time
from collections import Counter

import click
import numpy as np

from minard import config as config_mod
from minard import metrics
from minard.dispatcher.client import (
    ConnectionClosed,
    DispatchClient,
    connect_with_retry,
    dispatcher_address,
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
from minard.formats.pmt import GENERIC_HEADER, record_gtids, record_runs
from minard.pipeline.base import Producer

log = logging.getLogger("minard.pipeline.dispatch_push")

PUSH_COMPONENT = "minard_dispatch_push"
_RAWDATA = tag_bytes("RAWDATA")
_RECHDR = tag_bytes("RECHDR")


class DispatcherQuit(Exception):
    """The dispatcher sent QUIT: it is shutting down and waits for its analyzers to
    disconnect (docs/protocol.md section 6), so the push leaves and reconnects."""


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


def last_position(lengths: bytes, payload) -> tuple[int, int] | None:
    """(GTID, run) of the last 'PMT ' dispatch record of a batch that has a GTID, or None.

    Read with the one PMT header reader (:func:`minard.formats.pmt.record_gtids`
    and :func:`~minard.formats.pmt.record_runs`): the last record first
    (almost always enough), the whole batch otherwise.
    """
    sizes = np.frombuffer(lengths, ">u4").astype(np.int64)
    if not len(sizes):
        return None
    offsets = np.cumsum(sizes) - sizes + GENERIC_HEADER.size
    body = sizes - GENERIC_HEADER.size
    last, gtid = len(sizes) - 1, int(record_gtids(payload, offsets[-1:], body[-1:])[0])
    if gtid < 0:
        gtids = record_gtids(payload, offsets, body)
        found = np.flatnonzero(gtids >= 0)
        if not len(found):
            return None
        last = int(found[-1])
        gtid = int(gtids[last])
    return gtid, int(record_runs(payload, offsets[last:last + 1], body[last:last + 1])[0])


class Pusher(Producer):
    """The push process: dispatcher analyzer in, ZMQ PUSH out, counted."""

    component = PUSH_COMPONENT
    stage = "push"
    runs_of = staticmethod(wire.pmt_runs)

    def __init__(self, cfg, address: str, ctx=None):
        super().__init__(cfg, {"dispatch": str(cfg["zmq_dispatch"])}, ctx)
        self.address = address
        self.batch_records = int(cfg["dispatch_batch_records"])
        self.batch_seconds = float(cfg["dispatch_batch_ms"]) / 1000.0
        self.stats_interval = float(cfg["dispatch_stats_interval"])
        self.client: DispatchClient | None = None
        self.pending = {"pmt": Pending(), "rechdr": Pending()}
        self.last_position: tuple[int, int] | None = None  # (GTID, run) of the last event sent
        self.deltas["dispatcher"] = Counter()
        self.disp_seen = (None, 0, 0)  # (socket, events_sent, events_dropped) last read
        self.next_stats = 0.0

    # -------------------------------------------------------- upstream
    def read_upstream(self) -> bool:
        """Connect to the dispatcher (retrying, beating) and serve the connection."""
        try:
            self.client = connect_with_retry(
                self.address, "analyzer", "minard_dispatch_push", retry_for=None,
                should_stop=self._waiting, timeout=5.0, batch=True, cfg=self.cfg)
        except ConnectionClosed:
            return False
        log.info("reading dispatcher %s (socket %s)", self.address, self.client.socket_number)
        self.disp_seen = (self.client.socket_number, 0, 0)
        try:
            self.serve(self.client)
        except DispatcherQuit:
            log.info("dispatcher %s sent QUIT (shutting down): disconnecting; reconnecting", self.address)
        except (ConnectionClosed, OSError) as exc:
            log.warning("lost dispatcher %s: %s; reconnecting", self.address, exc)
        finally:
            self.send_pending()
            self.client.close()
            self.client = None
        self.beat()
        return True

    def _waiting(self) -> bool:
        """While reconnecting: keep beating (connected=0); True once stopped."""
        self.maybe_beat()
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
            ready, _, _ = select.select([client.sock], [], [], max(0.0, self.wait_limit(min(wait, 1.0))))
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
            if self.batch_due(self.batch_seconds):
                self.send_pending()
            self.maybe_beat()

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
        elif text == "QUIT":
            raise DispatcherQuit
        elif text.startswith(("BEGINTAPE", "ALLFINISHED")):
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
            meta["prev_gtid"], meta["prev_run"] = self.last_position or (None, None)
            self.last_position = last_position(lengths, payload) or self.last_position
        self.push("dispatch", wire.encode_packed(kind, lengths, payload, meta), n)

    # -------------------------------------------------------- reporting
    def poll_dispatcher(self, force: bool = False) -> None:
        """Count the dispatcher's sends and drops for our connection (STATS?)."""
        now = time.monotonic()
        if self.client is None or (not force and now < self.next_stats):
            return
        self.next_stats = now + self.stats_interval
        try:
            reply = query(self.address, "STATS?", timeout=2.0, cfg=self.cfg)
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

    def heartbeat_fields(self, final: bool) -> dict:
        """The dispatcher read, its socket, the ZMQ endpoint and the consumers connected."""
        if not final:
            self.poll_dispatcher()
        return {"dispatcher": self.address, "connected": int(self.client is not None),
                "dispatcher_socket": getattr(self.client, "socket_number", ""),
                "zmq": str(self.cfg["zmq_dispatch"]), "consumers": self.count_peers()["dispatch"]}


@click.command("push")
@click.option("--host", default=None, metavar="HOST[:PORT]",
              help="Dispatcher to read [dispatcher_host:dispatcher_port].")
@config_mod.pass_config
def push_cmd(cfg, host):
    """Read events from the dispatcher and push them to ZMQ (zmq_dispatch) in batches."""
    address = dispatcher_address(cfg, host)
    pusher = Pusher(cfg, address)
    metrics.serve(cfg, "minard_dispatch_push", metrics.Snapshot("minard_push", lambda: {
        "dispatcher_connected": pusher.client is not None, "consumers": pusher.peers["dispatch"]}))
    pusher.install_signals()
    log.info("push: dispatcher %s -> %s (SNDHWM %s, batches of %d records / %.0f ms)",
             address, cfg["zmq_dispatch"], cfg["zmq_hwm"], pusher.batch_records,
             pusher.batch_seconds * 1000)
    pusher.run()
    log.info("push stopped: %s", json.dumps(dict(pusher.totals)))
