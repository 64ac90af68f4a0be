"""The Redis side of a consumer pool: loss settlement, heartbeat, run loop.

Shared by ``minard_dispatch pull`` (:mod:`minard.pipeline.dispatch_pull`) and
``data_consumer`` (:mod:`minard.pipeline.orca_consumer`).  A :class:`minard.pipeline.pool.Pool`
knows how many records it handed each worker, but not how many of them a
worker managed to write to Redis before it ended.  So:

* each worker adds, in the same transaction as its data, the records it has
  accounted for to the hash ``pool:<name>:<host>:<pid>:flushed`` (field = the
  worker's pid; :func:`record_flushed`);
* when a worker ends, the manager (:class:`AccountedPool`) compares that with
  what it handed the worker and counts the difference as ``dropped`` and
  ``worker_lost`` of the pool's stage (``stats:<stage>``);
* once a second :class:`PoolReporter` writes that settlement, the stage's
  ``received`` counter, the heartbeat of the pool's component and the pool's
  own heartbeat (``status:pool:<host>:<pid>``) in one pipeline (not a
  transaction: the keys are in several Redis Cluster hash slots), keeping
  them until Redis is back if it is down; every counter is written as an
  absolute total per writer (:func:`minard.store.status.count`), so a retried
  report never counts twice;
* :func:`run_pool` runs a pool until SIGTERM/SIGINT and reports a last time.

Key and counter names are listed in ``docs/storage.md``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from collections import Counter

import redis as redis_py

from minard import metrics
from minard.pipeline.pool import Pool, PoolStats
from minard.store import connection, runs, schema, status

log = logging.getLogger("minard.pipeline.consumer")

#: Seconds a ``pool:...:flushed`` hash outlives its last write.
FLUSHED_TTL = 86400


def flushed_key(name: str) -> str:
    """This manager's ``pool:<name>:<host>:<pid>:flushed`` hash (unique per running pool)."""
    return schema.POOL_FLUSHED.key(name=name, host=socket.gethostname(), pid=os.getpid())


def record_flushed(pipe, key: str, n: int, by_run=None) -> None:
    """Worker side: add *n* records accounted for by this worker (its pid) to *key*.

    Called in the worker's flush after every data group is written (with the
    stage counters), so records are accounted only once their data is in
    Redis.  *by_run* ({run: records}) adds the same per run (fields
    ``<pid>:<run>``), so that the manager can count a dead worker's losses
    against their runs.  Nothing is written without a key (a handler run
    outside a pool) or without records.
    """
    if key and n:
        pid = os.getpid()
        status.add_total(pipe, key, str(pid), n)  # a total: a retried flush cannot add twice
        for run, k in (by_run or {}).items():
            status.add_total(pipe, key, f"{pid}:{run}", k)
        pipe.expire(key, FLUSHED_TTL)


class AccountedPool(Pool):
    """A Pool that also counts the records of workers that ended before flushing.

    *stage* is the ``stats:<stage>`` the losses are counted in; ``spec.flushed_key``
    the hash its workers write with :func:`record_flushed`.  When a worker ends
    for any reason, the records handed to it minus the records it accounted
    for were lost with it.
    """

    def __init__(self, spec, cfg, *, stage: str, runs_of=None, **kwargs):
        if not spec.flushed_key:
            raise ValueError(f"pool {spec.name}: loss accounting needs spec.flushed_key")
        super().__init__(spec, cfg, **kwargs)
        self.stage = stage
        #: ``frames -> {run: records}`` (the workers' handler's ``runs_of``): losses per run.
        self.runs_of = runs_of
        self.ended: list[tuple[int, int, Counter]] = []  # (pid, records handed, per run) to settle
        self.lost = 0

    def handed(self, w, frames) -> None:
        """Count the runs of a message handed to worker *w*."""
        if self.runs_of is not None:
            w.runs.update(self.runs_of(frames))

    def _reap(self, w, restart: bool) -> None:
        """Remember what an ending worker was handed, for :meth:`settle`."""
        self.ended.append((w.proc.pid, w.records + w.inflight, w.runs))
        super()._reap(w, restart)

    def settle(self, pipe, redis) -> int:
        """Count (in *pipe*) the records lost by ended workers; needs Redis readable.

        The records of each run the worker was handed minus those it
        flushed are added to the run's ``dropped:<stage>_worker_lost``.
        """
        key = self.spec.flushed_key
        lost = 0
        by_run: dict[int, Counter] = {}
        fields: dict[int, list[str]] = {}
        for pid, handed, handed_runs in self.ended:
            lost += max(0, handed - int(redis.hget(key, str(pid)) or 0))
            fields[pid] = [f"{pid}:{run}" for run in handed_runs]
            flushed = redis.hmget(key, fields[pid]) if fields[pid] else []
            for (run, n), done in zip(handed_runs.items(), flushed):
                if n > int(done or 0):
                    by_run.setdefault(run, Counter())[f"{self.stage}_worker_lost"] += n - int(done or 0)
        if lost:
            log.warning("%d records were lost with ended workers (counted as dropped)", lost)
            status.count(pipe, self.stage, dropped=lost, worker_lost=lost)
        runs.add_drops(pipe, by_run)
        # Last: a report cut short before these is retried with the same flushed values, so
        # the same absolute stage totals (the pipeline is not a transaction: its keys are in
        # several hash slots); only the per-run drops (HINCRBY) of such a report could be
        # added twice.
        for pid, fs in fields.items():
            pipe.hdel(key, str(pid), *fs)
        return lost


class PoolReporter:
    """A consumer pool's heartbeat and counters, as the pool's ``tick`` (about once a second).

    Writes, in one pipeline, the settlement of ended workers, the records
    received since the last report and the heartbeat *component* (the pool
    status plus *extra_fields*).  Not a transaction: its keys are in several
    Redis Cluster hash slots, and every write is absolute (counter totals,
    heartbeat fields), so a report retried after a partial write changes nothing.  While Redis is down nothing is lost: the
    next successful report writes the whole difference.
    """

    def __init__(self, pool: AccountedPool, cfg, component: str, extra_fields: dict | None = None):
        self.pool = pool
        self.component = component
        self.extra_fields = dict(extra_fields or {})
        self.redis = connection.redis(cfg, "pipeline")
        self.started = time.time()
        self.written_received = 0
        self.unfolded: list[int] = []  # pids of ended workers whose counters are not folded yet
        self.redis_ok = True
        self.last_status: dict = {}  # the latest pool status, read by the metrics thread

    def __call__(self, pool_status: dict, final: bool = False) -> None:
        """Report once; *final* marks the heartbeat ``stopped``.  Sets :attr:`redis_ok`."""
        spec = self.pool.spec
        self.last_status = pool_status
        fields = {**pool_status, **self.extra_fields, "upstream": spec.upstream,
                  "max_workers": spec.max_workers, "trx_limit": spec.trx_limit,
                  "records_lost_unflushed": self.pool.lost}
        if final:
            fields["state"] = "stopped"
        received = self.pool.stats.records_received
        ended = list(self.pool.ended)
        try:
            pipe = self.redis.pipeline(transaction=False)
            lost = self.pool.settle(pipe, self.redis) if ended else 0
            status.count(pipe, self.pool.stage, received=received - self.written_received)
            status.beat(pipe, self.component, fields, started=self.started)
            status.beat_pool(pipe, self.component, fields, started=self.started)
            pipe.execute()
        except redis_py.RedisError as exc:
            if self.redis_ok:
                log.warning("Redis unavailable (%s): pool counters kept until it is back", exc)
            self.redis_ok = False
            metrics.redis_write_failed(self.component)
            return
        self.redis_ok = True
        metrics.add_stage(self.pool.stage, {"received": received - self.written_received,
                                            "dropped": lost, "worker_lost": lost})
        self.written_received = received
        del self.pool.ended[:len(ended)]
        self.pool.lost += lost
        self.unfolded.extend(pid for pid, *_ in ended)
        self.fold_ended()

    def fold_ended(self) -> None:
        """Fold the counters of ended workers into the pool's ``/ended`` writer (see status.fold)."""
        pool = status.pool_id()
        try:
            while self.unfolded:
                status.fold(self.redis, f"{pool}/{self.unfolded[0]}", f"{pool}/ended")
                self.unfolded.pop(0)
        except redis_py.RedisError as exc:
            log.info("folding ended workers' counters postponed: %s", exc)


#: The supervisord program of each pool (its ``metrics_port_<program>``), by stage.
PROGRAMS = {"pull": "minard_dispatch_pull", "cmos": "data_consumer_cmos", "base": "data_consumer_base"}


def pool_metrics(pool: AccountedPool, reporter: PoolReporter) -> metrics.Snapshot:
    """The pool's accounting and state (``minard_pool_*``) from its latest status."""
    return metrics.Snapshot("minard_pool", lambda: reporter.last_status,
                            counters=PoolStats.__dataclass_fields__,
                            help={"lag_seconds": "Age in seconds of the oldest queued batch.",
                                  "queued_batches": "Batches held by the manager for a free worker.",
                                  "records_lost": "Records lost in workers that crashed or were killed."})


def run_pool(pool: AccountedPool, reporter: PoolReporter, label: str) -> None:
    """Run *pool* until SIGTERM/SIGINT; every worker flushes before exit.

    The final report is retried for about three seconds, so that a short
    Redis outage at shutdown does not lose the last counters.  *label* names
    the pool in the log.  With ``metrics_port_<program>`` set, ``/metrics``
    serves the pool's accounting and, through the library's multiprocess
    mode, the counters of its workers.
    """
    spec = pool.spec
    signal.signal(signal.SIGTERM, pool.request_stop)
    signal.signal(signal.SIGINT, pool.request_stop)
    log.info("%s pool: %d workers (max total %d), TrxLimit %d, idle %.0fs, from %s", label,
             spec.max_workers, pool.manager.max_total, spec.trx_limit, spec.idle_timeout, spec.upstream)
    program = PROGRAMS.get(label, label)
    shared = metrics.multiprocess_dir(pool.cfg, program) if metrics.port(pool.cfg, program) else None
    server = metrics.serve(pool.cfg, program, pool_metrics(pool, reporter), multiprocess=shared)
    try:
        pool.run(tick=reporter)
    finally:
        if server is not None:
            server.shutdown()
        metrics.remove_multiprocess_dir(shared)
        for _ in range(10):
            reporter(pool.status(), final=True)
            if reporter.redis_ok:
                break
            time.sleep(0.3)
        log.info("%s pool stopped: %s", label, json.dumps(pool.status()))
