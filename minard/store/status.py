"""Heartbeats and loss counters of pipeline processes, kept in Redis.

Every long-running pipeline process (producers, pools, dispatcher) calls
:func:`beat` about once a second with its counters.  The status page, the
pinger and the monitors read them back with :func:`components`.

Keys (see docs/storage.md):

* ``status:<component>`` hash: ``time`` (Unix s of the last beat), ``pid``,
  ``host``, ``started``, ``state`` and the component's own fields
  (e.g. ``dispatcher`` = ``host:port`` it reads, ``lag_seconds``).  It
  expires after ``ttl`` seconds, so a dead process disappears by itself.
* ``stats:<stage>`` hash of monotonically increasing counters per stage of the
  pipeline, with the invariant ``received = processed + dropped + errors``
  (plus what is still queued).  Each *writer* (one Redis client of one
  process, ``<host>:<pid>.<n>``; a pool worker ``<host>:<manager pid>/<pid>.<n>``)
  keeps its own **absolute** totals in the fields ``<counter>|<writer>``
  (:func:`count`), and readers sum them (:func:`stats`).  Writing a total
  instead of adding a delta makes a retried write harmless: a transaction
  whose reply timed out after Redis had applied it only writes the same
  total again (issue 18: increments retried after a cut link overcounted).
  When a pool worker ends, its fields are folded into the pool's
  ``<host>:<pid>/ended`` fields in one atomic transaction (:func:`fold`).
* ``components`` set: names of every component that ever beat.
* ``status:pool:<host>:<pid>`` hash: the heartbeat of one consumer pool
  (:func:`beat_pool`), indexed by the ``pipeline:pools`` zset; :func:`pools`
  lists every pool with its own counters, so pools on several hosts are
  visible separately.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping

import redis as redis_py

from minard import metrics
from minard.store import schema

log = logging.getLogger("minard.store.status")

STAGES = ("dispatcher", "push", "pull", "redis", "orca_producer", "cmos", "base")
COUNTERS = ("received", "processed", "dropped", "errors")


def beat(pipe, component: str, fields: Mapping[str, object] | None = None,
         started: float | None = None, ttl: int = 30) -> None:
    """Record that *component* is alive now, with its current *fields*."""
    mapping = {"time": time.time(), "pid": os.getpid(), "host": socket.gethostname(),
               "state": "running"}
    if started is not None:
        mapping["started"] = started
    for key, value in (fields or {}).items():
        mapping[key] = value if isinstance(value, (int, float, str, bytes)) else str(value)
    key = schema.STATUS.key(component=component)
    pipe.hset(key, mapping=mapping)
    pipe.expire(key, ttl)
    pipe.sadd(schema.COMPONENTS, component)


class _Writer:
    """One writer's identity and the absolute totals it has committed, per (key, field)."""

    def __init__(self, ident: str):
        self.id, self.pid = ident, os.getpid()
        self.committed: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()


_serial = itertools.count(1)
_pool_of_process: str | None = None  # "<host>:<manager pid>" in a pool worker (set_pool)
HOST = socket.gethostname()
#: Seconds a pool's heartbeat and index entry outlive its last beat (a dead pool stays listed).
POOL_KEEP = 86400


def set_pool(manager_pid: int) -> None:
    """Mark this process as a worker of the pool managed by *manager_pid* (on this host).

    Its writers are then named ``<host>:<manager pid>/<pid>.<n>``, so that
    :func:`pools` attributes their counters to the pool.
    """
    global _pool_of_process
    _pool_of_process = f"{HOST}:{manager_pid}"


def pool_id(pid: int | None = None) -> str:
    """The ``<host>:<pid>`` naming a pool manager (this process by default)."""
    return f"{HOST}:{os.getpid() if pid is None else pid}"


def _writer(client) -> _Writer:
    """The writer of *client* (a Redis client or pipeline): one per connection pool and process.

    The state hangs on the connection pool, so every client object is its own
    writer and a forked child (another pid) never reuses its parent's totals.
    """
    pool = client.connection_pool
    w = getattr(pool, "_minard_writer", None)
    if w is None or w.pid != os.getpid():
        prefix = f"{_pool_of_process}/{os.getpid()}" if _pool_of_process else pool_id()
        w = _Writer(f"{prefix}.{next(_serial)}")
        pool._minard_writer = w
    return w


def writer_id(client) -> str:
    """The writer name of *client* in ``stats:<stage>`` fields (also used by flush marks)."""
    return _writer(client).id


def _pending(pipe, writer: _Writer) -> dict | None:
    """The totals *pipe* will commit for *writer* when its ``execute`` succeeds.

    ``execute`` is wrapped once per pipeline: on success the totals become the
    writer's committed ones; on any failure they are forgotten, so the caller's
    kept deltas produce the same totals at the next attempt.  A plain client
    (no ``execute``) has already written: None, commit at once.
    """
    if not hasattr(pipe, "execute"):
        return None
    pending = pipe.__dict__.get("_minard_pending")
    if pending is None:
        pending = pipe._minard_pending = {}
        execute = pipe.execute

        def run(*args, **kwargs):
            batch = dict(pending)
            pending.clear()
            result = execute(*args, **kwargs)
            with writer.lock:
                writer.committed.update(batch)
            return result

        pipe.execute = run
    return pending


def add_total(pipe, key: str, field: str, delta: int) -> int:
    """Queue ``HSET key field <committed + delta>`` (an idempotent counter update); the total."""
    writer = _writer(pipe)
    pending = _pending(pipe, writer)
    with writer.lock:
        base = (pending or {}).get((key, field), writer.committed.get((key, field), 0))
        total = base + int(delta)
        if pending is None:
            writer.committed[(key, field)] = total
        else:
            pending[(key, field)] = total
    pipe.hset(key, field, total)
    return total


def count(pipe, stage: str, **deltas: int) -> None:
    """Add *deltas* (e.g. ``received=10, errors=1`` or any named reason) to a stage.

    Written as this writer's absolute totals (``<counter>|<writer>`` fields,
    see the module docstring), so retrying a transaction never counts twice.
    """
    key = schema.STATS.key(stage=stage)
    ident = _writer(pipe).id
    for name, delta in deltas.items():
        if delta:
            add_total(pipe, key, f"{name}|{ident}", delta)


def fold(redis, prefix: str, into: str) -> int:
    """Fold the totals of every ended writer named ``<prefix>.<n>`` into writer *into*.

    One WATCH/MULTI per stage key: the ended writer's fields are deleted in the
    same transaction as they are added to *into*, so a retried fold finds
    nothing left and adds nothing.  Keeps ``stats:<stage>`` from growing with
    every recycled pool worker.  Returns the number of fields folded.
    """
    keys = [k.decode() for k in redis.scan_iter(match=schema.STATS.pattern, count=1000)]
    folded = 0
    with redis.pipeline(transaction=True) as pipe:
        for key in keys:
            for _ in range(100):  # bounded: each retry means another writer just wrote
                try:
                    folded += _fold_key(pipe, key, prefix, into)
                    break
                except redis_py.WatchError:
                    continue
    return folded


def _fold_key(pipe, key: str, prefix: str, into: str) -> int:
    """One stage key of :func:`fold` (raises WatchError if the key changed meanwhile)."""
    pipe.watch(key)
    mine = {f.decode(): int(float(v)) for f, v in pipe.hgetall(key).items()
            if _split(f.decode())[1].rpartition(".")[0] == prefix}
    if not mine:
        pipe.unwatch()
        return 0
    pipe.multi()
    for field, value in mine.items():
        pipe.hincrby(key, f"{_split(field)[0]}|{into}", value)
    pipe.hdel(key, *mine)
    pipe.execute()
    return len(mine)


def beat_pool(pipe, component: str, fields: Mapping[str, object], started: float | None = None) -> None:
    """The heartbeat of this consumer pool (``status:pool:<host>:<pid>``), beside its component's."""
    ident = pool_id()
    now = time.time()
    mapping = {"time": now, "pid": os.getpid(), "host": HOST, "component": component, "state": "running"}
    if started is not None:
        mapping["started"] = started
    for key, value in fields.items():
        mapping[key] = value if isinstance(value, (int, float, str, bytes)) else str(value)
    key = schema.POOL_STATUS.key(pool=ident)
    pipe.hset(key, mapping=mapping)
    pipe.expire(key, POOL_KEEP)
    pipe.zadd(schema.POOLS, {ident: now})
    pipe.zremrangebyscore(schema.POOLS, "-inf", now - POOL_KEEP)


class Reporter:
    """A producer's heartbeat and its stage-counter deltas, written in one pipeline.

    Not a transaction (the keys are in several Redis Cluster hash slots): every
    write is absolute (counter totals, heartbeat fields), so a retry after a
    partial write changes nothing.

    The deltas are cleared only once written, so nothing is lost while Redis
    is down; the outage is logged when it starts and when it ends.  Written
    deltas are also counted in the process's Prometheus metrics
    (:func:`minard.metrics.add_stage`).
    """

    def __init__(self, redis, component: str, started: float | None = None):
        self.redis, self.component, self.started = redis, component, started
        self.ok = True

    def write(self, fields: Mapping[str, object], deltas: Mapping[str, Counter], also=None) -> bool:
        """Beat with *fields* and add *deltas* (stage -> Counter); False if Redis failed.

        *also*, if given, queues more writes (``also(pipe)``) in the same transaction.
        """
        try:
            pipe = self.redis.pipeline(transaction=False)  # absolute writes over several slots
            beat(pipe, self.component, fields, started=self.started)
            for stage, counts in deltas.items():
                count(pipe, stage, **counts)
            if also is not None:
                also(pipe)
            pipe.execute()
        except redis_py.RedisError as exc:
            if self.ok:
                log.warning("Redis unavailable (%s): counters kept until it is back", exc)
            self.ok = False
            metrics.redis_write_failed(self.component)
            return False
        if not self.ok:
            log.info("Redis is back; pending counters written")
        self.ok = True
        for stage, counts in deltas.items():
            metrics.add_stage(stage, counts)  # committed: Prometheus and Redis agree
            counts.clear()
        return True


#: The ORCA streams whose records :func:`orca_accounting` follows.
ORCA_STREAMS = ("cmos", "base")


def orca_accounting(counters: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """What became of each ORCA stream's records, from the stage counters (*counters* = :func:`stats`).

    The ORCA stream carries no sequence numbers, so minard's account of a
    stream starts at ``data_producer``: ``received`` = records of the stream
    it read (``received_<stream>``); ``stored`` = records the consumer pool
    wrote to Redis (its ``processed``); ``dropped`` = records counted lost on
    the way (the producer's ``dropped_<stream>``, the pool's ``dropped`` and
    ``errors``); ``unaccounted`` = ``received`` - ``stored`` - ``dropped``
    (never negative): records that no counter saw lost (held by a producer or
    a pool manager killed with them, or in a ZMQ queue).  Meaningful once the
    stream is idle (records in flight are not stored yet).
    """
    out = {}
    producer = counters.get("orca_producer", {})
    for stream in ORCA_STREAMS:
        pool = counters.get(stream, {})
        received = producer.get(f"received_{stream}", 0)
        stored = pool.get("processed", 0)
        dropped = producer.get(f"dropped_{stream}", 0) + pool.get("dropped", 0) + pool.get("errors", 0)
        out[stream] = {"received": received, "stored": stored, "dropped": dropped,
                       "unaccounted": max(0, received - stored - dropped)}
    return out


def _split(field: str) -> tuple[str, str]:
    """``(counter, writer)`` of a ``stats:<stage>`` field (``""`` for a field without a writer)."""
    name, _, writer = field.partition("|")
    return name, writer


def by_writer(redis) -> dict[str, dict[str, dict[str, int]]]:
    """Every stage's counters per writer: ``{stage: {writer: {counter: n}}}``."""
    names = {*STAGES, *(k.decode().split(":", 1)[1] for k in redis.scan_iter(match=schema.STATS.pattern, count=1000))}
    stages = sorted(names)
    with redis.pipeline(transaction=False) as pipe:
        for stage in stages:
            pipe.hgetall(schema.STATS.key(stage=stage))
        raws = pipe.execute()
    out: dict[str, dict[str, dict[str, int]]] = {}
    for stage, raw in zip(stages, raws):
        for field, value in raw.items():
            name, writer = _split(field.decode())
            per = out.setdefault(stage, {}).setdefault(writer, {})
            per[name] = per.get(name, 0) + int(float(value))
    return out


def stats(redis) -> dict[str, dict[str, int]]:
    """Every stage's counters as ints, summed over its writers."""
    out = {}
    for stage, writers in by_writer(redis).items():
        total: Counter = Counter()
        for counts in writers.values():
            total.update(counts)
        out[stage] = dict(total)
    return out


def _pool_of(writer: str) -> str:
    """The pool ``<host>:<pid>`` a writer belongs to (a manager's or a worker's writer)."""
    head = writer.split("/", 1)[0]
    return head if "/" in writer else head.rpartition(".")[0]


def pools(redis, now: float | None = None) -> dict[str, dict]:
    """Every consumer pool seen in the last day, by ``<host>:<pid>``: heartbeat and own counters.

    ``alive`` says whether it beat in the last 10 s; ``counters`` holds
    ``{stage: {counter: n}}`` written by the pool manager and its workers
    (their writer names start with the pool's, see the module docstring).
    """
    now = time.time() if now is None else now
    idents = [m.decode() for m in redis.zrangebyscore(schema.POOLS, now - POOL_KEEP, "+inf")]
    with redis.pipeline(transaction=False) as pipe:
        for ident in idents:
            pipe.hgetall(schema.POOL_STATUS.key(pool=ident))
        beats = pipe.execute()
    mine: dict[str, dict[str, Counter]] = {ident: {} for ident in idents}
    for stage, writers in by_writer(redis).items():
        for writer, counts in writers.items():
            pool = mine.get(_pool_of(writer))
            if pool is not None:
                pool.setdefault(stage, Counter()).update(counts)
    out = {}
    for ident, raw in zip(idents, beats):
        fields: dict = {k.decode(): v.decode() for k, v in raw.items()}
        fields["alive"] = bool(fields) and now - float(fields.get("time", 0)) < 10
        fields["counters"] = {stage: dict(c) for stage, c in sorted(mine[ident].items())}
        out[ident] = fields
    return out


def components(redis, now: float | None = None) -> dict[str, dict[str, str]]:
    """Last heartbeat of every known component; ``alive`` says whether it is current."""
    now = time.time() if now is None else now
    names = [raw.decode() for raw in sorted(redis.smembers(schema.COMPONENTS))]
    pipe = redis.pipeline(transaction=False)  # every heartbeat in one round trip
    for name in names:
        pipe.hgetall(schema.STATUS.key(component=name))
    out = {}
    for name, raw in zip(names, pipe.execute() if names else []):
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        fields["alive"] = bool(fields) and now - float(fields.get("time", 0)) < 10
        out[name] = fields
    return out
