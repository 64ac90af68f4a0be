"""``minard_dispatch pull``: the consumer pool of the dispatch stream, ZMQ into Redis.

The pool (:mod:`minard.pipeline.pool`, :mod:`minard.pipeline.consumer`)
PULLs the push's batches and hands them to workers that run
:class:`PullHandler`: decode batches in vectorized passes (the batches of one
second a few at a time, :func:`minard.formats.pmt.decode_buffer`), aggregate
(:mod:`minard.analysis.aggregate`) and, once a second, write everything
pending: the aggregates as one MULTI/EXEC per Redis Cluster hash slot
(:mod:`minard.store.slots`, all in one round trip), then the loss counters.
If Redis is unreachable (down, or a Sentinel failover under way) the
aggregates are held -- at most ``dispatch_retry_records`` records -- and sent
again at the next flush without applying any part twice
(:meth:`PullHandler.flush`); what cannot be held is counted lost by reason.
Nothing is silent.

Loss accounting (invariant received = processed + dropped + errors once
queues are empty):

* ``pull``: records received by the pool; processed = decoded and
  aggregated; errors = corrupt records or batches; dropped = records held
  by a worker that died before its flush (counted by the manager from the
  per-worker ``pool:...:flushed`` hash the workers write in their flush).
* ``redis``: records whose aggregates were to be written; processed = written
  (at once or by a retry); errors = given up, by reason: ``retry_full``
  (more held than ``dispatch_retry_records``), ``retry_at_exit`` (still held
  when the worker stopped), ``redis_error`` (Redis refused the transaction).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import os
import time
from collections import Counter

import click
import numpy as np
import redis as redis_py

from minard import config as config_mod
from minard import metrics
from minard.analysis.aggregate import Aggregator, SecondAgg, record_gtids, record_runs, segment_gaps
from minard.formats import wire
from minard.formats.pmt import decode_buffer, split_dispatch
from minard.pipeline.base import Handler
from minard.pipeline.consumer import (
    AccountedPool,
    PoolReporter,
    flushed_key,
    record_flushed,
    run_pool,
)
from minard.pipeline.pool import PoolManager, PoolSpec
from minard.store import runs, status
from minard.store import timeseries as ts
from minard.store.bursts import BurstMonitor
from minard.store.channels import ChannelWriter
from minard.store.runs import write_run
from minard.store.schema import NHIT_LEVELS
from minard.store.slots import SlotBatch, SlotWriter

log = logging.getLogger("minard.pipeline.dispatch_pull")

PULL_COMPONENT = "minard_dispatch_pull"
HANDLER = "minard.pipeline.dispatch_pull:PullHandler"

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


class Held:
    """A 'PMT ' message waiting to be decoded: its PmtEventRecords located once.

    ``offsets``/``lengths`` come from :func:`minard.formats.pmt.split_dispatch`
    over the wire batch's own record index, and are what the decoder and the
    GTID bookkeeping use (nothing walks the records again).
    """

    __slots__ = ("bad", "count", "lengths", "offsets", "payload", "prev_gtid", "prev_run", "t")

    def __init__(self, batch: wire.Batch, t: float):
        self.payload = batch.payload
        self.offsets, self.lengths, self.bad = split_dispatch(batch.payload, batch.offsets, batch.lengths)
        self.prev_gtid, self.prev_run = batch.meta.get("prev_gtid"), batch.meta.get("prev_run")  # typed by wire
        self.t = t
        self.count = len(batch)


def join_held(held: list[Held]) -> tuple:
    """(payload, offsets, lengths, bad, firsts) of held messages decoded as one.

    The payloads joined (a copy only when there are several) and the offsets
    moved along; ``firsts[k]`` is the index of message k's first PmtEventRecord.
    """
    if len(held) == 1:
        h = held[0]
        return h.payload, h.offsets, h.lengths, Counter(h.bad), [0]
    bases = np.cumsum([0] + [len(h.payload) for h in held[:-1]])
    offsets = np.concatenate([h.offsets + base for h, base in zip(held, bases.tolist())])
    lengths = np.concatenate([h.lengths for h in held])
    bad = sum((Counter(h.bad) for h in held), Counter())
    firsts = np.cumsum([0] + [len(h.offsets) for h in held[:-1]]).tolist()
    return b"".join(h.payload for h in held), offsets, lengths, bad, firsts


def batch_time(meta: dict) -> float:
    """The batch's send time from its meta (``sent``), or now if absent or not a finite number."""
    sent = meta.get("sent")
    if isinstance(sent, (int, float)) and not isinstance(sent, bool) and math.isfinite(sent) and sent > 0:
        return float(sent)
    return time.time()


class PullHandler(Handler):
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

    stage = "pull"
    runs_of = staticmethod(wire.pmt_runs)

    def __init__(self, cfg, flushed_key: str = ""):
        super().__init__(cfg, "dispatch_close_retry", flushed_key)
        keep_freed_memory()  # this process is a worker: see the function
        self.channels = ChannelWriter(self.redis)
        self.agg = Aggregator()
        self.redis_counts = Counter()  # stats:redis deltas not yet in Redis
        self.redis_written = 0
        self.slots = SlotWriter(self.redis, status.writer_id(self.redis), int(cfg["dispatch_retry_records"]),
                                int(cfg["dispatch_wait_replicas"]))
        self.burst_windows: dict[int, tuple[int, int]] = {}  # burst windows written, not yet evaluated
        self.unreplicated = 0
        self.taken = 0  # records of the aggregates in the current flush
        self.first_batch = True  # no batch processed yet by this worker
        self.held: list[Held] = []  # 'PMT ' messages not decoded yet
        self.held_records = self.held_bytes = 0
        self.burst = BurstMonitor(self.redis, cfg)  # supernova burst search (minard.store.bursts)
        self.flush_now = 0.0

    @property
    def pull(self) -> Counter:
        """The ``stats:pull`` deltas not yet in Redis."""
        return self.counts

    def process(self, frames) -> None:
        """Decode one wire message and fold it into the pending aggregates (see the class)."""
        self._process(frames)
        if self.first_batch:
            self.first_batch = False
            self.flush(time.time())

    def rejected(self, n: int) -> None:
        """An invalid message's records still count as records of this second."""
        self.agg.second(time.time()).records += n
        self.agg.records += n

    def _process(self, frames) -> None:
        batch = self.open(frames)
        if batch is None:
            return
        t = batch_time(batch.meta)
        if batch.kind != "pmt":
            self.counts["processed"] += len(batch)
            self.counts[f"kind_{batch.kind}"] += len(batch)
            self.agg.second(t).records += len(batch)
            self.agg.records += len(batch)
            return
        if self.held and (int(t) != int(self.held[0].t) or self.held_records + len(batch) > HOLD_RECORDS
                          or self.held_bytes + len(batch.payload) > HOLD_BYTES):
            self.decode_held()
        self.held.append(Held(batch, t))
        self.held_records += len(batch)
        self.held_bytes += len(batch.payload)

    def decode_held(self) -> None:
        """Decode and aggregate the 'PMT ' messages held back, in one pass."""
        if not self.held:
            return
        held, self.held = self.held, []
        self.held_records = self.held_bytes = 0
        payload, offsets, lengths, bad, firsts = join_held(held)
        events = decode_buffer(payload, offsets, lengths)
        gaps = segment_gaps(record_gtids(events, payload, offsets, lengths), firsts,
                            [h.prev_gtid for h in held], record_runs(events, payload, offsets, lengths),
                            [h.prev_run for h in held])
        self.agg.add_batch(events, held[0].t, corrupt=bad, gaps=gaps)
        self.burst.add(events)
        nbad = sum(bad.values()) + len(events.errors)
        self.counts["processed"] += sum(h.count for h in held) - nbad
        if nbad:
            self.counts["errors"] += nbad
            self.counts.update(bad)
            self.counts.update(err.reason for _, err in events.errors)

    # -------------------------------------------------------- flush
    def has_pending(self) -> bool:
        return bool(self.held or self.agg or self.redis_counts or self.slots.held)

    def begin_flush(self, now: float) -> None:
        """Decode what is held, then take the pending aggregates for this flush."""
        self.decode_held()
        self.seconds, self.runs, self.taken = self.agg.take()
        self.flush_now = now

    def write_pending(self, pipe, now: float) -> None:
        """Time series, run summaries and burst candidates into *pipe* (a SlotBatch)."""
        for sec in self.seconds.values():
            write_second(pipe, sec, self.channels)
        for agg in self.runs.values():
            write_run(pipe, agg, now, self.channels)
        self.channels.add(pipe)
        self.burst.write(pipe)
        for run, (lo, hi) in self.burst.written.items():
            old = self.burst_windows.get(run)
            self.burst_windows[run] = (min(lo, old[0]), max(hi, old[1])) if old else (lo, hi)

    def flush(self, now: float) -> bool:
        """Write the aggregates per hash slot (minard.store.slots), then the counters.

        The data goes first, one MULTI/EXEC per slot group in one round trip
        (:class:`minard.store.slots.SlotWriter`); a flush that Redis did not
        take -- down, or a failover under way -- is held and sent again at
        the next flush (a group whose reply was lost only if its flush mark
        says it was not applied), so an outage of a few seconds loses nothing.
        Only when nothing is held are the counters written (``stats:pull``,
        ``stats:redis`` with the records written and lost by reason, and the
        pool's ``flushed`` hash), as absolute totals in a plain pipeline: the
        records of a held flush are then neither counted processed nor
        accounted, so a worker that dies holding them has them counted lost
        by its pool manager.  Returns True when everything is written.
        """
        if not self.has_pending() and not self.counts and not self.unaccounted and not self.run_drops:
            return True
        self.begin_flush(now)
        batch = SlotBatch()
        if self.seconds or self.runs:
            self.write_pending(batch, now)
        by_run = {run: agg.events + agg.orphans + agg.integrity.get("corrupt", 0) for run, agg in self.runs.items()}
        result = self.slots.write(batch, self.taken, by_run)
        for reason, lost_runs in result.lost_runs.items():  # counted against their runs too
            self.drop_runs(lost_runs, reason)
        if self.slots.unreplicated > self.unreplicated:  # flushes no replica acknowledged in time
            self.redis_counts["unreplicated_flushes"] += self.slots.unreplicated - self.unreplicated
            self.unreplicated = self.slots.unreplicated
        self.redis_counts.update({"received": result.written, "processed": result.written})
        for reason, n in result.lost.items():
            self.redis_counts.update({"received": n, "errors": n, reason: n})
            log.warning("%d records not stored (%s)", n, reason)
        if result.error:
            if not self.failing:
                log.warning("Redis write failed (%s); %d records held for a retry", result.error,
                            result.held_records)
            self.failing = True
        if self.slots.held:
            return False
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                status.count(pipe, self.stage, **self.counts)
                status.count(pipe, "redis", **self.redis_counts)
                runs.add_drops(pipe, self.run_drops)
                record_flushed(pipe, self.flushed_key, self.unaccounted, self.unaccounted_runs)
                pipe.execute()
        except redis_py.RedisError as exc:
            if not self.failing:
                log.warning("Redis write of the counters failed (%s); retrying every second", exc)
            self.failing = True
            return False
        if self.failing:
            log.info("Redis is back: held data and counters written (%d groups sent again, %d found applied)",
                     self.slots.retried, self.slots.resolved)
        self.failing = False
        metrics.add_stage(self.stage, self.counts)
        metrics.add_stage("redis", self.redis_counts)  # what stats:redis just gained
        self.redis_written += self.redis_counts["processed"]
        self.counts.clear()
        self.redis_counts.clear()
        self.unaccounted = 0
        self.unaccounted_runs.clear()
        self.run_drops = {}
        self.burst.written, self.burst_windows = self.burst_windows, {}
        self.burst.evaluate(self.flush_now)
        return True

    def close(self) -> None:
        """Final flush, retried for ``dispatch_close_retry`` s; what is still held is then lost.

        The lost records are counted (``retry_at_exit``) in one last attempt
        to write the counters; if Redis is still down that fails too, and the
        pool manager counts them from the ``flushed`` hash (``worker_lost``).
        """
        super().close()
        lost, lost_runs = self.slots.give_up("retry_at_exit")
        if lost:
            n = sum(lost.values())
            log.warning("%d records not stored (Redis unreachable at exit)", n)
            self.redis_counts.update({"received": n, "errors": n, **lost})
            self.drop_runs(lost_runs, "retry_at_exit")
            self.flush(time.time())


def write_second(pipe, sec: SecondAgg, channels: ChannelWriter) -> None:
    """Add one second's aggregate to the time series (see docs/storage.md).

    The per-channel and per-card hit arrays go into *channels*; the caller
    writes it (:meth:`ChannelWriter.add`) in the same transaction.
    """
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
        channels.add_counts("hits", t, None, sec.channel_hits)
        channels.add_counts("card_hits", t, None, sec.card_hits)
        crates = sec.crate_hits
        ts.add(pipe, "crate", t, {f"c{i}": int(crates[i]) for i in np.flatnonzero(crates).tolist()})


# =================================================================== the pool

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
    spec = dataclasses.replace(pool_spec(cfg), flushed_key=flushed_key("dispatch"))
    manager = PoolManager(int(cfg["dispatch_max_total_workers"]))
    pool = AccountedPool(spec, cfg, stage="pull", runs_of=wire.pmt_runs,
                         manager=manager, event_log=event_log_path(cfg))
    run_pool(pool, PoolReporter(pool, cfg, PULL_COMPONENT), "pull")


@click.command("pull")
@click.option("--workers", type=int, default=None, help="MaxSlaves [dispatch_workers].")
@click.option("--trx-limit", type=int, default=None, help="Recycle a worker after N records [dispatch_trx_limit].")
@config_mod.pass_config
def pull_cmd(cfg, workers, trx_limit):
    """Run the consumer pool: decode, aggregate and write to Redis once a second."""
    options = {"dispatch_workers": workers, "dispatch_trx_limit": trx_limit}
    run_pull(cfg.replace(**{k: v for k, v in options.items() if v is not None}))
