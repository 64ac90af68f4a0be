"""``data_consumer 5557|5558``: the consumer pools of the ORCA stream, ZMQ into Redis.

One pool (:mod:`minard.pipeline.pool`) per stream, chosen by the port (that
of ``zmq_cmos`` or ``zmq_base``) or ``--stream``; its workers run
:class:`minard.pipeline.orca_cmos.CmosHandler` (rates from counts, baselines
shared through Redis) or :class:`minard.pipeline.orca_base.BaseHandler`
(value − 127 per channel, busy flags).  Both derive from
:class:`OrcaHandler` and flush once a second, one ``MULTI/EXEC`` per Redis
Cluster hash slot (:class:`OrcaHandler`), into the multi-resolution per-channel series ``cmos`` / ``base`` (bucketed by the
producer's send time like the dispatch stream, written whole by
:class:`minard.store.channels.ChannelWriter`), plus the stage counters.  Each
also keeps a *latest map*: the value of every channel at its most recent
reading, read by ``minard query``.  Crate/card average and maximum are
derived at read time (:func:`minard.store.timeseries.crate_card_stats`): a
worker sees only part of a second, so a per-worker maximum could not be
combined.  Keys are listed in ``docs/storage.md`` ("ORCA stream").

Counters (``stats:cmos`` / ``stats:base``, received = processed + dropped +
errors): records received by the pool (counted by the manager);
processed/errors by the workers in their flush; dropped = records held by a
worker that ended before flushing them.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import click

from minard import config as config_mod
from minard.formats import wire
from minard.pipeline.base import Handler
from minard.pipeline.consumer import AccountedPool, PoolReporter, flushed_key, run_pool
from minard.pipeline.dispatch_pull import batch_time
from minard.pipeline.pool import PoolManager, PoolSpec
from minard.store import schema, status
from minard.store.channels import ChannelWriter
from minard.store.slots import MARK_TTL, hash_tag

log = logging.getLogger("minard.pipeline.orca_consumer")

STREAMS = ("cmos", "base")
#: Seconds of failures after which a handler gives up the series data it keeps (Redis down).
KEEP_PENDING = 300
HANDLERS = {"cmos": "minard.pipeline.orca_cmos:CmosHandler", "base": "minard.pipeline.orca_base:BaseHandler"}


def consumer_component(stream: str) -> str:
    """Heartbeat name of a consumer pool (the program names of conf/programs.cfg)."""
    return f"data_consumer_{stream}"


class OrcaHandler(Handler):
    """What both ORCA stream handlers share: the batch's kind and byte order, decode
    errors counted by reason, and the series written per hash slot, kept (up to
    KEEP_PENDING s of failures) while Redis is down.

    The per-second data of a subclass is folded into one
    :class:`~minard.store.channels.ChannelWriter` at each flush
    (:meth:`fold_pending`).  Its keys are written one hash slot at a time
    (a ``{<step>:<bucket>}`` tag: the levels' buckets of one resolution), each
    as WATCH, MGET, MULTI, SET, EXEC with a *flush mark*
    (``flush:{<tag>}:<writer>`` = this flush's number, as
    :mod:`minard.store.slots`).  A group written is dropped from the writer; a
    group whose transaction failed keeps a copy of what it sent, and before
    it is sent again its mark is read under the same WATCH: if Redis had
    applied it (the reply was lost), that copy is taken out of the pending
    deltas, so nothing is added twice; otherwise it is all sent again.
    """

    def __init__(self, cfg, flushed_key: str = ""):
        super().__init__(cfg, "orca_close_retry", flushed_key)
        self.ttl = int(cfg["orca_state_ttl"])
        self.writer = ChannelWriter()
        self.writer_id = status.writer_id(self.redis)
        self.seq = 0  # this worker's flush number (the value of its flush marks)
        self.sent: dict[int, tuple[int, dict]] = {}  # slot -> (flush number, deltas sent), outcome unknown
        self.group_keys: dict[int, list[str]] = {}
        self.held_seconds: set[int] = set()  # seconds of data folded into the writer, not yet written
        self.failing_since: float | None = None

    @property
    def stream(self) -> str:
        return self.stage

    def open_stream(self, frames) -> tuple[wire.Batch, str, float] | None:
        """Decode a wire message of this stream: (batch, byte order, time), or None (counted)."""
        batch = self.open(frames)
        if batch is None:
            return None
        order = batch.meta.get("byteorder", "little")
        if batch.kind != self.stream or order not in ("little", "big"):
            reason = "wrong_kind" if batch.kind != self.stream else "bad_byteorder"
            self.counts.update({"errors": len(batch), reason: len(batch)})
            log.warning("batch of %d %s records refused: %s", len(batch), batch.kind, reason)
            return None
        return batch, order, batch_time(batch.meta)

    def count_decode_errors(self, errors) -> int:
        """Count records the decoder rejected, by reason; return how many."""
        for _, err in errors:
            self.counts.update({"errors": 1, err.reason: 1})
        return len(errors)

    def pending_stores(self) -> list[dict]:
        """The per-second dicts of pending series data (subclasses)."""
        return []

    def fold_pending(self) -> None:
        """Add the per-second data of :meth:`pending_stores` to the writer, then clear them (subclasses)."""

    def begin_flush(self, now: float) -> None:
        for store in self.pending_stores():
            self.held_seconds.update(store)
        self.fold_pending()
        self.seq += 1

    def slot_groups(self) -> list:
        """The writer's keys by hash slot (one transaction each)."""
        self.group_keys = self.writer.slots()
        return sorted(self.group_keys)

    def mark_key(self, slot) -> str:
        """The flush mark of this worker in the slot of group *slot*."""
        tag = hash_tag(self.group_keys[slot][0]).decode(errors="replace")
        return schema.FLUSH_MARK.key(tag=tag, writer=self.writer_id)

    def prepare(self, pipe, group) -> None:
        """WATCH the group's keys and its mark; settle a transaction of unknown outcome; read; MULTI."""
        mark = self.mark_key(group)
        pipe.watch(mark)
        applied = pipe.get(mark)
        sent = self.sent.pop(group, None)
        if sent is not None and applied is not None and int(applied) >= sent[0]:
            self.writer.subtract(sent[1])  # Redis had it: the reply was lost
            self.counts["flush_found_applied"] += 1
        self.writer.read(pipe, self.group_keys[group])
        pipe.multi()

    def write_pending(self, pipe, group, now: float) -> None:
        """SET the group's merged arrays and its mark; remember what was sent until it is known."""
        self.writer.write(pipe)
        pipe.set(self.mark_key(group), self.seq, ex=MARK_TTL)
        self.sent[group] = (self.seq, self.writer.snapshot(self.group_keys[group]))

    def group_done(self, group) -> None:
        self.sent.pop(group, None)
        self.writer.drop(self.group_keys[group])

    def flush_done(self) -> None:
        self.failing_since = None
        self.held_seconds.clear()

    def flush_failed(self, now: float) -> None:
        """While Redis is down keep the data; after KEEP_PENDING s of failures count it lost."""
        if self.failing_since is None:
            self.failing_since = now
        if now - self.failing_since > KEEP_PENDING and self.held_seconds:
            self.counts["lost_seconds"] += len(self.held_seconds)
            log.warning("Redis down for %.0f s: %d seconds of series data given up",
                        now - self.failing_since, len(self.held_seconds))
            self.writer.clear()
            self.sent.clear()
            self.held_seconds.clear()


# =================================================================== the pool

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
    spec = dataclasses.replace(pool_spec(cfg, stream), flushed_key=flushed_key(f"orca:{stream}"))
    manager = PoolManager(int(cfg["orca_max_total_workers"]))
    pool = AccountedPool(spec, cfg, stage=stream,
                         manager=manager, event_log=event_log_path(cfg, stream))
    run_pool(pool, PoolReporter(pool, cfg, consumer_component(stream), {"stream": stream}), stream)


@click.command("data_consumer", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("port", required=False)
@click.option("--stream", type=click.Choice(STREAMS), default=None,
              help="Stream to consume (instead of PORT).")
@click.option("--workers", type=int, default=None, help="MaxSlaves [cmos_workers / base_workers].")
@config_mod.pass_config
def consumer_cli(cfg, port, stream, workers):
    """Consume one ORCA stream into Redis: PORT 5557 (zmq_cmos) gives CMOS
    rates, 5558 (zmq_base) base currents."""
    stream = stream_for(port, stream, cfg)
    if workers is not None:
        cfg = cfg.replace(**{f"{stream}_workers": workers})
    run_consumer(cfg, stream)
