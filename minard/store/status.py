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
  (plus what is still queued).  Counters are added with HINCRBY, so several
  processes of one stage combine.
* ``components`` set: names of every component that ever beat.
"""

from __future__ import annotations

import logging
import os
import socket
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


def count(pipe, stage: str, **deltas: int) -> None:
    """Add *deltas* (e.g. ``received=10, errors=1`` or any named reason) to a stage."""
    for name, delta in deltas.items():
        if delta:
            pipe.hincrby(schema.STATS.key(stage=stage), name, int(delta))


class Reporter:
    """A producer's heartbeat and its stage-counter deltas, written in one transaction.

    The deltas are cleared only once written, so nothing is lost while Redis
    is down; the outage is logged when it starts and when it ends.  Written
    deltas are also counted in the process's Prometheus metrics
    (:func:`minard.metrics.add_stage`).
    """

    def __init__(self, redis, component: str, started: float | None = None):
        self.redis, self.component, self.started = redis, component, started
        self.ok = True

    def write(self, fields: Mapping[str, object], deltas: Mapping[str, Counter]) -> bool:
        """Beat with *fields* and add *deltas* (stage -> Counter); False if Redis failed."""
        try:
            pipe = self.redis.pipeline(transaction=True)
            beat(pipe, self.component, fields, started=self.started)
            for stage, counts in deltas.items():
                count(pipe, stage, **counts)
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


def stats(redis) -> dict[str, dict[str, int]]:
    """Every stage's counters as ints."""
    out = {}
    for stage in sorted({*STAGES, *(k.decode().split(":", 1)[1] for k in redis.scan_iter(match=schema.STATS.pattern, count=1000))}):
        raw = redis.hgetall(schema.STATS.key(stage=stage))
        if raw:
            out[stage] = {k.decode(): int(float(v)) for k, v in raw.items()}
    return out


def components(redis, now: float | None = None) -> dict[str, dict[str, str]]:
    """Last heartbeat of every known component; ``alive`` says whether it is current."""
    now = time.time() if now is None else now
    out = {}
    for raw_name in sorted(redis.smembers(schema.COMPONENTS)):
        name = raw_name.decode()
        fields = {k.decode(): v.decode() for k, v in redis.hgetall(schema.STATUS.key(component=name)).items()}
        fields["alive"] = bool(fields) and now - float(fields.get("time", 0)) < 10
        out[name] = fields
    return out
