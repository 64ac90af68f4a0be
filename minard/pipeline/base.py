"""What every producer and every consumer handler of the data plane shares.

* :class:`Producer` — a process that reads an upstream (the dispatcher, ORCA)
  and PUSHes wire batches (:mod:`minard.formats.wire`) on one or more bound
  ZMQ sockets: the sockets with an explicit SNDHWM and a monitor counting
  connected consumers, sends that never block (a batch ZMQ refuses waits in
  a bounded backlog until a consumer takes it; beyond the bound it is counted
  as ``dropped``), CURVE security (:mod:`minard.pipeline.curve`), the heartbeat and the
  stage counters through :class:`minard.store.status.Reporter` once a second,
  SIGTERM/SIGINT that hand on what is pending and beat a last time, and the
  run loop that reconnects to the upstream until stopped.  Subclasses
  (:mod:`minard.pipeline.dispatch_push`, :mod:`minard.pipeline.orca_producer`)
  say how to read one upstream connection and what goes in the heartbeat.
* :class:`Handler` — what a consumer-pool worker runs for each batch
  (:mod:`minard.pipeline.pool`): *open* a wire message (decode it, counting a
  bad one by reason), *process* it (subclasses), *flush* everything pending as
  one Redis transaction per hash-slot group (retried when a WATCHed key
  changed), then the stage counters and the records accounted for, and *close*
  with a final flush retried for a few seconds while Redis is down.  Subclasses
  (:mod:`minard.pipeline.dispatch_pull`, :mod:`minard.pipeline.orca_cmos`,
  :mod:`minard.pipeline.orca_base`) add their decoding and their writes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections import Counter, deque

import redis as redis_py
import zmq

from minard import metrics
from minard.formats import wire
from minard.pipeline import curve
from minard.pipeline.consumer import record_flushed
from minard.pipeline.sockets import peers_changed
from minard.store import connection, runs, status

log = logging.getLogger("minard.pipeline.base")

#: Optimistic flush transactions retried at most this often.
MAX_RETRIES = 100


class Producer:
    """Upstream in, ZMQ PUSH sockets out, everything counted (see the module).

    *endpoints* maps a socket name to the endpoint it binds.  Subclasses set
    :attr:`component` (heartbeat name) and :attr:`stage` (``stats:<stage>``),
    and implement :meth:`read_upstream` (one connection, until it ends or the
    producer stops; False when stopped before connecting), :meth:`send_pending`
    and :meth:`heartbeat_fields`.
    """

    component = ""
    stage = ""
    #: ``frames -> {run: records}`` of a message (e.g. :func:`minard.formats.wire.pmt_runs`),
    #: so that a dropped message is counted against its runs; None: not per run.
    runs_of = None

    def __init__(self, cfg, endpoints: dict[str, str], ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.socks: dict[str, zmq.Socket] = {}
        self.monitors: dict[str, zmq.Socket] = {}
        self.peers = Counter()  # consumers connected to each PUSH socket
        for name, endpoint in endpoints.items():
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, int(cfg["zmq_hwm"]))
            sock.setsockopt(zmq.LINGER, 2000)
            curve.secure_server(sock, cfg, self.ctx)
            sock.bind(str(endpoint))
            self.socks[name] = sock
            self.monitors[name] = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.redis = connection.redis(cfg, "pipeline")
        self.producer = f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}"
        self.started = time.time()
        self.running = True
        self.first_pending: float | None = None  # monotonic time of the oldest pending record
        self.seq = 0
        self.totals = Counter()  # since start, for the heartbeat
        self.deltas: dict[str, Counter] = {self.stage: Counter()}  # stage counters not yet in Redis
        self.run_drops: dict[int, Counter] = {}  # run -> dropped records by reason, not yet in Redis
        self.next_beat = 0.0
        self.backlogs: dict[str, deque] = {name: deque() for name in endpoints}  # (frames, n) ZMQ refused
        self.backlog_records = 0
        self.backlog_limit = int(cfg["zmq_backlog_records"])
        self.reporter = status.Reporter(self.redis, self.component, self.started)

    # -------------------------------------------------------- lifecycle
    def install_signals(self) -> None:
        """SIGTERM and SIGINT stop the producer (it flushes and beats a last time)."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def stop(self, *_args) -> None:
        """Stop after the current step: hand on what is pending, beat a last time, exit."""
        self.running = False

    def run(self) -> None:
        """Read (and reconnect to) the upstream until stopped; then flush, beat, close."""
        try:
            while self.running:
                if not self.read_upstream():
                    break
        finally:
            self.send_pending()
            self.drain_backlogs()
            self.beat(final=True)
            self.close()

    def read_upstream(self) -> bool:
        """Connect to the upstream and read it until it ends (subclasses)."""
        raise NotImplementedError

    def send_pending(self) -> None:
        """Send every pending record (subclasses)."""
        raise NotImplementedError

    def drain_backlogs(self, seconds: float = 2.0) -> None:
        """At shutdown: give connected consumers *seconds* to take the backlogs; count the rest."""
        end = time.monotonic() + seconds
        while self.backlog_records and time.monotonic() < end:
            self.send_backlogs()
            if self.backlog_records:
                time.sleep(0.02)
        self.drop_backlogs()

    def close(self) -> None:
        """Close the monitors and sockets (pending messages linger up to 2 s)."""
        for name, sock in self.socks.items():
            sock.disable_monitor()
            self.monitors[name].close(0)
            sock.close()
        curve.stop_authenticator(self.ctx)

    # -------------------------------------------------------- sending
    def batch_due(self, seconds: float) -> bool:
        """True when the oldest pending record has waited *seconds*."""
        return self.first_pending is not None and time.monotonic() - self.first_pending >= seconds

    def push(self, name: str, frames: list, n: int) -> bool:
        """Hand one wire message of *n* records to socket *name* without blocking.

        A message ZMQ refuses (no consumer connected yet, or the high-water
        mark reached) waits in the socket's backlog, behind older ones, until a
        consumer takes it (:meth:`send_backlogs`, every loop turn); the backlogs
        hold at most ``zmq_backlog_records`` records, and a message beyond that
        is dropped and counted (``dropped``, ``hwm``, ``backlog_full``, and
        ``dropped_<name>`` when the producer has several sockets).  Returns
        False only for a dropped message.
        """
        self.seq += 1
        if not self.backlogs[name] and self._try_send(name, frames, n):
            return True
        if self.backlog_records + n > self.backlog_limit:
            self._drop(name, n, "backlog_full", frames)
            return False
        self.backlogs[name].append((frames, n))
        self.backlog_records += n
        self.totals["backlogged"] += n
        self.send_backlogs()
        return True

    def _try_send(self, name: str, frames: list, n: int) -> bool:
        """One non-blocking send; count it when ZMQ took it."""
        try:
            # Copied into ZMQ: a zero-copy send is released by pyzmq's garbage-collector
            # thread, which needs the GIL, and under load the released batches piled up
            # (GBs of RSS); the copy costs ~0.1 us per event.
            self.socks[name].send_multipart(frames, zmq.NOBLOCK, copy=True)
        except zmq.Again:
            return False
        self.deltas[self.stage]["processed"] += n
        self.totals["sent"] += n
        self.totals["batches"] += 1
        if len(self.socks) > 1:
            self.deltas[self.stage][name] += n
            self.totals[name] += n
        return True

    def _drop(self, name: str, n: int, reason: str, frames) -> None:
        """Count *n* records (the message *frames*) that will never be sent, under *reason*.

        With :attr:`runs_of`, they are also counted against their runs
        (``dropped:<stage>_<reason>``, written with the next beat).
        """
        if self.runs_of is not None:
            for run, k in self.runs_of(frames).items():
                self.run_drops.setdefault(run, Counter())[f"{self.stage}_{reason}"] += k
        counts = {"dropped": n, "hwm": n, reason: n}
        if len(self.socks) > 1:
            counts[f"dropped_{name}"] = n
        self.deltas[self.stage].update(counts)
        self.totals["dropped"] += n
        if self.totals["dropped"] == n or self.totals["drop_batches"] % 100 == 0:
            log.warning("ZMQ %s: %s; dropped a batch of %d records (%d dropped so far)",
                        name, reason, n, self.totals["dropped"])
        self.totals["drop_batches"] += 1

    def send_backlogs(self) -> None:
        """Send what waits in the backlogs, oldest first, while ZMQ takes it."""
        for name, queue in self.backlogs.items():
            while queue and self._try_send(name, *queue[0]):
                self.backlog_records -= queue.popleft()[1]

    def drop_backlogs(self, reason: str = "backlog_at_exit") -> None:
        """Count what is still in the backlogs as dropped (at shutdown) and forget it."""
        for name, queue in self.backlogs.items():
            while queue:
                frames, n = queue.popleft()
                self._drop(name, n, reason, frames)
        self.backlog_records = 0

    # -------------------------------------------------------- reporting
    def count_peers(self) -> dict[str, int]:
        """Consumers connected to each PUSH socket (from the socket monitors)."""
        for name, monitor in self.monitors.items():
            self.peers[name] += peers_changed(monitor)
        return dict(self.peers)

    def wait_limit(self, wait: float) -> float:
        """*wait* shortened to 20 ms while records wait in a backlog."""
        return min(wait, 0.02) if self.backlog_records else wait

    def maybe_beat(self) -> None:
        """Send what waits in the backlogs; beat if a second has passed since the last beat."""
        if self.backlog_records:
            self.send_backlogs()
        if time.monotonic() >= self.next_beat:
            self.beat()

    def heartbeat_fields(self, final: bool) -> dict:
        """This producer's own heartbeat fields (subclasses); *final* at the last beat."""
        return {}

    def beat(self, final: bool = False) -> None:
        """Heartbeat and counters to Redis; counters are kept while Redis is down."""
        self.next_beat = time.monotonic() + 1.0
        fields = {"hwm": int(self.cfg["zmq_hwm"]), "backlog_records": self.backlog_records,
                  **self.heartbeat_fields(final), **self.totals}
        if final:
            fields["state"] = "stopped"
        drops = self.run_drops
        if self.reporter.write(fields, self.deltas, also=(lambda pipe: runs.add_drops(pipe, drops)) if drops else None):
            self.run_drops = {}


class Handler:
    """A consumer-pool worker's handler: open / process / flush-with-retry / close.

    Subclasses set :attr:`stage` (``stats:<stage>``) and implement
    :meth:`process`, :meth:`has_pending`, :meth:`slot_groups` and
    :meth:`write_pending`; they may override :meth:`prepare` (WATCH and read
    before ``MULTI``), :meth:`begin_flush`, :meth:`group_done`,
    :meth:`flush_failed` and :meth:`flush_done`.
    *close_option* names the configuration key of the final flush's retry
    time; *flushed_key* is the pool's ``flushed`` hash (``PoolSpec.flushed_key``,
    empty outside a pool with loss accounting).
    """

    stage = ""
    #: ``frames -> {run: records}`` of a message (:func:`minard.formats.wire.pmt_runs`) for a
    #: handler whose records belong to runs: its losses and flushed records are counted per run.
    runs_of = None

    def __init__(self, cfg, close_option: str, flushed_key: str = ""):
        self.cfg = cfg
        self.redis = connection.redis(cfg, "pipeline")
        self.max_payload = int(cfg["zmq_max_frame"])
        self.flushed_key = flushed_key
        self.close_retry = float(cfg[close_option])
        self.counts = Counter()  # stats:<stage> deltas not yet in Redis
        self.unaccounted = 0  # records handled since the last successful flush
        self.unaccounted_runs = Counter()  # the same per run (with runs_of)
        self.run_drops: dict[int, Counter] = {}  # run -> records lost by reason, not yet in Redis
        self.failing = False

    # -------------------------------------------------------- per batch
    def open(self, frames) -> wire.Batch | None:
        """Decode a wire message; None (and its records counted by reason) if invalid."""
        n = wire.record_count(frames)
        self.unaccounted += n
        runs_of = self.runs_of
        self.batch_runs = runs_of(frames) if runs_of is not None else {}
        self.unaccounted_runs.update(self.batch_runs)
        try:
            return wire.decode(frames, self.max_payload)
        except wire.WireError as exc:
            self.counts.update({"errors": n, f"wire_{exc.reason}": n, "bad_batches": 1})
            self.drop_runs(self.batch_runs, "bad_batch")
            if self.counts["bad_batches"] <= 10 or self.counts["bad_batches"] % 1000 == 0:
                log.warning("bad batch of %d records: %s", n, exc)
            self.rejected(n)
            return None

    def rejected(self, n: int) -> None:
        """Hook: *n* records of an invalid message were counted as errors."""

    def drop_runs(self, by_run, reason: str) -> None:
        """Count records *by_run* ({run: n}) lost under *reason* against their runs
        (``dropped:<stage>_<reason>``, written with the next flush)."""
        for run, k in by_run.items():
            self.run_drops.setdefault(run, Counter())[f"{self.stage}_{reason}"] += k

    def failed_message(self, frames) -> None:
        """A message whose processing raised: its records are lost, counted per run."""
        if self.runs_of is not None:
            self.drop_runs(self.runs_of(frames), "handler_error")

    def process(self, frames) -> None:
        """Decode one wire message and keep what it gives for the flush (subclasses)."""
        raise NotImplementedError

    # -------------------------------------------------------- flush
    def has_pending(self) -> bool:
        """Data waiting for the flush (subclasses)."""
        raise NotImplementedError

    def begin_flush(self, now: float) -> None:
        """Hook called once before the flush's transactions."""

    def slot_groups(self) -> list:
        """The groups of this flush, each written in its own transaction (subclasses).

        Each group's keys are in one Redis Cluster hash slot (docs/storage.md,
        "Redis Cluster"), so a transaction never spans slots.
        """
        return []

    def prepare(self, pipe, group) -> None:
        """WATCH and read what *group*'s writes depend on, then ``MULTI`` (the default only MULTIs)."""
        pipe.multi()

    def write_pending(self, pipe, group, now: float) -> None:
        """Queue the writes of *group* in *pipe* (inside ``MULTI``; subclasses)."""
        raise NotImplementedError

    def group_done(self, group) -> None:
        """Hook: *group* was written; forget its data (a later failure must not send it again)."""

    def flush_failed(self, now: float) -> None:
        """Hook: the flush failed (Redis down); decide what to keep."""

    def flush_done(self) -> None:
        """Hook: the flush was written; forget what it wrote."""

    def flush(self, now: float) -> bool:
        """Write pending data per slot group, then the counters and accounted records.

        Each group is one WATCH/MULTI/EXEC; a WATCHed key changed by another
        worker makes ``EXEC`` fail and the group is rebuilt (:meth:`prepare`)
        and tried again.  A group written is forgotten at once
        (:meth:`group_done`), so a failure later in the flush sends only the
        rest again.  The counters (absolute totals, :func:`minard.store.status.count`)
        and the pool's ``flushed`` hash follow in a plain pipeline once every
        group is written.  Returns False if Redis failed; the data is then
        kept or counted as the subclass decides (:meth:`flush_failed`).
        """
        if not self.has_pending() and not self.counts and not self.unaccounted and not self.run_drops:
            return True
        self.begin_flush(now)
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                for group in self.slot_groups():
                    self._write_group(pipe, group, now)
                    self.group_done(group)
            with self.redis.pipeline(transaction=False) as pipe:
                status.count(pipe, self.stage, **self.counts)
                runs.add_drops(pipe, self.run_drops)
                record_flushed(pipe, self.flushed_key, self.unaccounted, self.unaccounted_runs)
                pipe.execute()
        except redis_py.RedisError as exc:
            if not self.failing:
                log.warning("Redis write failed (%s); retrying every second", exc)
            self.failing = True
            self.flush_failed(now)
            return False
        if self.failing:
            log.info("Redis is back: pending data written")
        self.failing = False
        self.flush_done()
        metrics.add_stage(self.stage, self.counts)  # what stats:<stage> just gained
        self.counts.clear()
        self.unaccounted = 0
        self.unaccounted_runs.clear()
        self.run_drops = {}
        return True

    def _write_group(self, pipe, group, now: float) -> None:
        """One group's optimistic transaction, rebuilt while another worker gets in between."""
        for _ in range(MAX_RETRIES):
            try:
                self.prepare(pipe, group)
                self.write_pending(pipe, group, now)
                pipe.execute()
                return
            except redis_py.WatchError:  # another worker wrote a watched key: recompute
                self.counts["flush_conflicts"] += 1
        raise redis_py.RedisError("flush transaction kept conflicting")

    def close(self) -> None:
        """Final flush, retried for a few seconds (*close_option*) if Redis is down."""
        end = time.monotonic() + self.close_retry
        while not self.flush(time.time()) and time.monotonic() < end:
            time.sleep(0.2)
