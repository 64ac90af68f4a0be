"""Consumer pools: a manager that runs PULL workers the way a server pooler does.

The semantics follow the OpenROAD Server Pooler (shared/seeds/002): each pool
has a maximum number of workers (MaxSlaves) reserved from a global cap
(MaxTotalSlaves); a worker is recycled after TrxLimit records (0 = never); a
worker idle longer than Timeout is stopped and a new one is started when data
arrives; worker ids are never reused while the pool lives; every such event is
written to an event log in the seed's format::

    2026/11/23_09:20:01.123 CREATING: D1
                             ImageFile: minard.pipeline.dispatch_pull:PullHandler
                              ...

How data moves, and why: the manager PULLs batches from the producer and hands
one batch at a time to a worker that has asked for work (ROUTER/DEALER).  A
worker therefore never holds a queue of batches, so recycling or stopping it
loses nothing, and if it is killed the manager knows exactly which batch died
with it and counts those records as lost.  While no worker is free the manager
keeps a bounded queue; beyond that it stops reading, and ZMQ's high-water mark
pushes back on the producer, which counts what it could not send.

A worker runs a *handler*: an object with ``process(frames)`` (the raw wire
message; the handler decodes it and counts its own errors), ``flush(now)``
(called at least every ``flush_period``) and ``close()`` (final flush), built by
a factory ``module:callable`` that receives the configuration dict.
"""

from __future__ import annotations

import collections
import importlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import time
from dataclasses import dataclass, field

import zmq

from minard.formats import wire
from minard.pipeline import curve
from minard.store import status

log = logging.getLogger("minard.pipeline.pool")

#: Receive high-water mark of the manager's PULL socket (messages).
FRONT_HWM = 4
# Messages between manager and worker (first frame after the ROUTER identity).
READY, DONE, BYE, STOP, WORK = b"READY", b"DONE", b"BYE", b"STOP", b"WORK"


@dataclass
class PoolSpec:
    """What the seed calls a dispatcher's parameters."""

    name: str
    handler: str  # "module:callable" building the worker's handler (ImageFile)
    upstream: str  # ZMQ endpoint of the producer's PUSH socket
    max_workers: int = 2  # MaxSlaves
    trx_limit: int = 0  # ASOTrxLimit: records before a worker is recycled; 0 = never
    idle_timeout: float = 60.0  # ASOTimeOut in seconds
    flush_period: float = 1.0
    queue_limit: int = 64  # batches held by the manager before back-pressure
    hwm: int = 1000
    #: ``pool:...:flushed`` hash its workers count their flushed records in
    #: (minard.pipeline.consumer.record_flushed), given to each handler as
    #: ``flushed_key=``; empty for a pool without loss accounting.
    flushed_key: str = ""


class EventLog:
    """Appends pool events in the seed's ``yyyy/mo/dd_hh:mi:ss.fff EVENT: ...`` format."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = path
        self.lines: list[str] = []  # kept in memory too, for status and tests

    def write(self, event: str, ident: str, **fields) -> None:
        t = time.time()
        stamp = time.strftime("%Y/%m/%d_%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"
        head = f"{stamp} {event}: {ident}"
        # Field names are right-aligned under the event name, as in the seed.
        col = len(stamp) + 1 + len(event) + 1
        body = [f"{name:>{col}} {value}" for name, value in
                ((k + ":", v) for k, v in fields.items())]
        text = "\n".join([head, *body]) + "\n"
        self.lines.append(text)
        del self.lines[:-1000]
        log.info("%s", text.rstrip().replace("\n", ";"))
        if self.path:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(text)


class PoolManager:
    """The global cap on workers (MaxTotalSlaves) shared by the pools of a process."""

    def __init__(self, max_total: int):
        self.max_total = max_total
        self.reserved = 0
        self._next_pool = 1

    def reserve(self, spec: PoolSpec) -> int:
        """Reserve *spec.max_workers* slots; return the new pool's id (never reused)."""
        if self.reserved + spec.max_workers > self.max_total:
            raise ValueError(
                f"pool {spec.name}: MaxSlaves {spec.max_workers} exceeds what is left of "
                f"MaxTotalSlaves ({self.max_total - self.reserved} of {self.max_total})")
        self.reserved += spec.max_workers
        pool_id, self._next_pool = self._next_pool, self._next_pool + 1
        return pool_id


@dataclass
class _Worker:
    wid: int
    proc: mp.Process
    started: float
    records: int = 0
    busy_since: float | None = None
    inflight: int = 0  # records of the batch it holds
    runs: collections.Counter = field(default_factory=collections.Counter)  # records handed per run
    idle_since: float = field(default_factory=time.monotonic)
    ready: bool = False
    stopping: bool = False


@dataclass
class PoolStats:
    """Counters with the invariant received = processed + lost + queued + inflight."""

    batches_received: int = 0
    records_received: int = 0
    records_processed: int = 0
    records_lost: int = 0  # in a worker that crashed or was killed
    workers_started: int = 0
    workers_recycled: int = 0
    workers_idle_stopped: int = 0
    workers_crashed: int = 0


_record_count = wire.record_count  # records of a message, without decoding it


class Pool:
    """One pool of workers fed from one upstream PULL socket."""

    def __init__(self, spec: PoolSpec, cfg: dict, manager: PoolManager | None = None,
                 event_log: str | os.PathLike | None = None, ctx: zmq.Context | None = None):
        self.spec = spec
        self.cfg = dict(cfg)
        self.manager = manager or PoolManager(spec.max_workers)
        self.pool_id = self.manager.reserve(spec)
        self.events = EventLog(event_log)
        self.stats = PoolStats()
        self.workers: dict[int, _Worker] = {}
        self.queue: collections.deque[list[bytes]] = collections.deque()
        self._next_wid = 1
        self._ctx = ctx or zmq.Context.instance()
        self._running = False
        self._mp = mp.get_context("spawn")
        self.backend_endpoint = f"ipc://{_runtime_dir(cfg)}/pool-{os.getpid()}-{self.pool_id}.sock"
        self.events.write(
            "CREATING", f"D{self.pool_id}", ImageFile=spec.handler, CmdFlags=spec.name,
            ASOLocation=f"{socket.gethostname()} {spec.upstream}", MaxSlaves=spec.max_workers,
            ASOTrxLimit=spec.trx_limit, Timeout=spec.idle_timeout)

    # ------------------------------------------------------------ lifecycle
    def run(self, stop_after: float | None = None, tick=None) -> None:
        """Serve until :meth:`request_stop` (or *stop_after* seconds), then drain and stop.

        *tick*, if given, is called about once a second with :meth:`status` (the
        caller publishes it as the pool's heartbeat).
        """
        self.front = self._ctx.socket(zmq.PULL)
        # The manager's own queue (queue_limit) is the buffer; a long ZMQ receive
        # queue on top of it held up to ~1 GB of batches in the manager.
        self.front.setsockopt(zmq.RCVHWM, FRONT_HWM)
        curve.secure_client(self.front, self.cfg)
        self.front.connect(self.spec.upstream)
        self.back = self._ctx.socket(zmq.ROUTER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.bind(self.backend_endpoint)
        self._running = True
        deadline = None if stop_after is None else time.monotonic() + stop_after
        next_tick = time.monotonic()
        try:
            while self._running and (deadline is None or time.monotonic() < deadline):
                self.step(0.1)
                if tick is not None and time.monotonic() >= next_tick:
                    tick(self.status())
                    next_tick = time.monotonic() + 1.0
        finally:
            self.shutdown()

    def request_stop(self, *_args) -> None:
        """Signal handler: finish the current step, then drain and stop."""
        self._running = False

    def step(self, timeout: float) -> None:
        """One turn of the loop: read upstream, talk to workers, supervise them."""
        poller = zmq.Poller()
        if len(self.queue) < self.spec.queue_limit:
            poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        events = dict(poller.poll(timeout * 1000))
        if self.front in events:
            self._read_upstream()
        if self.back in events:
            self._read_workers()
        self._supervise()
        self._dispatch()

    def shutdown(self, drain_timeout: float = 10.0) -> None:
        """Hand out what is queued, stop every worker (each flushes), close sockets."""
        end = time.monotonic() + drain_timeout
        while (self.queue or any(w.inflight for w in self.workers.values())) and time.monotonic() < end:
            if self.back.poll(100):
                self._read_workers()
            self._supervise()
            self._dispatch()
        for w in list(self.workers.values()):
            self._stop_worker(w, "SHUTDOWN")
        end = time.monotonic() + drain_timeout
        while self.workers and time.monotonic() < end:
            if self.back.poll(100):
                self._read_workers()
            self._supervise(restart=False)
        for w in list(self.workers.values()):
            w.proc.kill()
            w.proc.join(2)
            self.workers.pop(w.wid, None)
        self.front.close(0)
        self.back.close(0)
        try:
            os.unlink(self.backend_endpoint[len("ipc://"):])
        except OSError:
            pass

    # ------------------------------------------------------------ data path
    def _read_upstream(self) -> None:
        while len(self.queue) < self.spec.queue_limit:
            try:
                # copied into bytes: a zero-copy zmq.Frame would keep libzmq's whole
                # receive buffer alive while queued (about 1 GB at 64 queued batches)
                frames = self.front.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self.stats.batches_received += 1
            self.stats.records_received += _record_count(frames)
            self.queue.append(frames)

    def _read_workers(self) -> None:
        while True:
            try:
                ident, kind, *rest = self.back.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            w = self.workers.get(int(ident))
            if w is None:
                continue
            if kind == DONE:
                n = int(rest[0])
                self.stats.records_processed += n
                w.records += n
                w.inflight = 0
                w.busy_since = None
                w.idle_since = time.monotonic()
            elif kind == READY:
                w.ready = True
                w.idle_since = time.monotonic()
                if w.stopping:
                    # ROUTER drops messages to a peer that has not connected yet,
                    # so a STOP sent while this worker was starting never arrived.
                    self.back.send_multipart([ident, STOP])
            elif kind == BYE:
                w.stopping = True

    def _dispatch(self) -> None:
        """Give queued batches to ready workers; start workers if all are busy."""
        while self.queue:
            w = next((w for w in self.workers.values()
                      if w.ready and not w.inflight and not w.stopping), None)
            if w is None:
                if self._live_count() < self.spec.max_workers and not self._starting():
                    self._start_worker("STARTING")
                return
            frames = self.queue.popleft()
            w.inflight = _record_count(frames)
            self.handed(w, frames)
            w.busy_since = time.monotonic()
            w.ready = False
            self.back.send_multipart([str(w.wid).encode(), WORK, *frames])

    def handed(self, w: _Worker, frames) -> None:
        """Hook: message *frames* is being handed to worker *w* (loss accounting)."""

    def _live_count(self) -> int:
        return sum(1 for w in self.workers.values() if not w.stopping)

    def _starting(self) -> bool:
        """A worker started but not yet ready: wait for it before starting more."""
        return any(not w.ready and not w.inflight and not w.stopping and w.records == 0
                   for w in self.workers.values())

    # ------------------------------------------------------------ supervision
    def _supervise(self, restart: bool = True) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if not w.proc.is_alive():
                self._reap(w, restart)
            elif (w.ready and not w.inflight and not w.stopping
                  and now - w.idle_since > self.spec.idle_timeout):
                self.stats.workers_idle_stopped += 1
                self._stop_worker(w, "IDLE STOP")

    def _reap(self, w: _Worker, restart: bool) -> None:
        w.proc.join(0)
        self.workers.pop(w.wid, None)
        code = w.proc.exitcode
        if code == 0 and w.stopping:
            return
        if code == 3:  # the worker reached TrxLimit and flushed
            self.stats.workers_recycled += 1
            self.events.write("RECYCLING", f"D{self.pool_id} S{w.wid}", Records=w.records,
                              ASOTrxLimit=self.spec.trx_limit)
            if restart and (self.queue or self._live_count() == 0):
                self._start_worker("RESTARTING")
            return
        self.stats.workers_crashed += 1
        self.stats.records_lost += w.inflight
        self.events.write("CRASHED", f"D{self.pool_id} S{w.wid}", ExitCode=code,
                          RecordsLost=w.inflight)
        if restart:
            self._start_worker("RESTARTING")

    def _start_worker(self, event: str) -> _Worker:
        wid, self._next_wid = self._next_wid, self._next_wid + 1
        proc = self._mp.Process(
            target=worker_main, name=f"{self.spec.name}-S{wid}", daemon=True,
            args=(self.spec.handler, self.cfg, self.backend_endpoint, wid,
                  self.spec.trx_limit, self.spec.flush_period, os.getpid(), self.spec.flushed_key))
        proc.start()
        w = _Worker(wid, proc, time.time())
        self.workers[wid] = w
        self.stats.workers_started += 1
        self.events.write(event, f"D{self.pool_id} S{wid}", Pid=proc.pid)
        return w

    def _stop_worker(self, w: _Worker, event: str) -> None:
        if not w.stopping:
            w.stopping = True
            self.back.send_multipart([str(w.wid).encode(), STOP])
            self.events.write(event, f"D{self.pool_id} S{w.wid}", Records=w.records)

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        """Counters, queue depth and lag, for the heartbeat and the site."""
        lag = 0.0
        if self.queue:
            try:  # decode checks the meta: sent is a finite positive number if present
                lag = max(0.0, time.time() - float(wire.decode(self.queue[0]).meta.get("sent", time.time())))
            except wire.WireError:
                lag = 0.0
        return {
            **self.stats.__dict__,
            "queued_batches": len(self.queue),
            "inflight_records": sum(w.inflight for w in self.workers.values()),
            "workers": len(self.workers),
            "lag_seconds": round(lag, 3),
        }


def _runtime_dir(cfg: dict) -> str:
    """Directory for the pool's ipc sockets (short path: unix sockets have a limit)."""
    path = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return path


# ---------------------------------------------------------------- worker side

def _process(handler, frames, n: int) -> None:
    """Run the handler on one message; an exception costs the message, never the worker.

    Handlers count bad input by reason themselves; anything they did not
    foresee is logged and its *n* records counted as ``errors``/``handler_error``.
    """
    try:
        handler.process(frames)
    except Exception:  # no input may kill a worker
        log.exception("handler failed on a message of %d records (counted as errors)", n)
        counts = getattr(handler, "counts", None)
        if counts is not None:
            counts.update(errors=n, handler_error=n)
        failed = getattr(handler, "failed_message", None)
        if failed is not None:
            failed(frames)


def load_handler(spec: str, cfg: dict, flushed_key: str = ""):
    """Build a handler from ``module:callable`` (a fixed name from our code, never input).

    A pool with loss accounting passes its *flushed_key* to the handler.
    """
    module, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    return factory(cfg, flushed_key=flushed_key) if flushed_key else factory(cfg)


def worker_main(handler_spec: str, cfg: dict, endpoint: str, wid: int,
                trx_limit: int, flush_period: float, manager_pid: int | None = None,
                flushed_key: str = "") -> None:
    """A worker process: ask for a batch, process it, flush every *flush_period*.

    If the manager dies (kill -9), the worker notices that its parent changed,
    flushes what it holds and exits rather than living on as an orphan.
    """
    from minard import log as minard_log

    minard_log.setup(cfg["log_level"])
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the manager decides when we stop
    if manager_pid is not None:
        status.set_pool(manager_pid)  # this worker's counters belong to its pool (status.pools)
    handler = load_handler(handler_spec, cfg, flushed_key)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, str(wid).encode())
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(endpoint)
    sock.send(READY)
    done = 0
    code = 0
    next_flush = time.monotonic() + flush_period
    try:
        while True:
            if sock.poll(max(1, int((next_flush - time.monotonic()) * 1000))):
                kind, *frames = sock.recv_multipart()
                if kind == STOP:
                    break
                n = _record_count(frames)  # every record handed over is accounted for
                _process(handler, frames, n)
                done += n
                sock.send_multipart([DONE, str(n).encode()])
                if trx_limit and done >= trx_limit:
                    code = 3
                    break
                sock.send(READY)
            if time.monotonic() >= next_flush:
                handler.flush(time.time())
                next_flush = time.monotonic() + flush_period
                if manager_pid is not None and os.getppid() != manager_pid:
                    log.error("worker S%d: the pool manager (pid %d) is gone; exiting", wid, manager_pid)
                    break
    except KeyboardInterrupt:
        pass
    finally:
        handler.close()
        sock.send(BYE)
        sock.close()
        ctx.term()
    raise SystemExit(code)
