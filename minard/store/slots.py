"""Writes split by Redis Cluster hash slot, each slot one MULTI/EXEC, retried without applying twice.

A pull worker's once-a-second flush touches many keys: the time-series
buckets of every resolution, the run summaries, the run index.  Redis Cluster
runs a transaction only when all its keys are in one hash slot, so the flush
is collected in a :class:`SlotBatch` (it takes redis-py's command methods:
``hincrby``, ``expire``, ``eval``, ...) that files every command under the
slot of its key.  The hash tags of :mod:`minard.store.schema` put what must
change together in one slot (``{<step>:<bucket>}`` for a time bucket,
``{run:<run>}`` for a run's summary), so a flush is a handful of groups.
:class:`SlotWriter` sends every group as its own ``MULTI ... EXEC`` -- all of
them in ONE round trip on one connection (a Cluster client would send each
to its node instead).

**Retry without double-applying** (issue 18).  The data writes are increments
(HINCRBY, BITFIELD INCRBY, APPEND, an array add): a transaction that Redis
applied but whose reply was lost must not be sent again, and one that never
reached Redis should be.  Each group's transaction therefore also sets a
*flush mark* (``flush:{<tag>}:<writer>`` = the flush's sequence number, in
the group's own slot, schema ``FLUSH_MARK``).  A failed group is *held*:

* ``not_sent`` -- no connection could be made (the primary is down or being
  replaced): nothing reached Redis, it is sent again at the next flush;
* ``unknown`` -- the transaction was sent and the reply never came (the
  primary died or the link broke meanwhile): before anything is sent again,
  the marks of those groups are read; a group whose mark holds its sequence
  number was applied and is done, the others were not (a failover loses the
  data and its mark together, since one transaction replicates as a whole) and
  are sent again.

Reading the mark first rather than blindly resending is the choice that keeps
the increments exact; it costs one extra round trip, only after a failure.
The one case it cannot see is a transaction still travelling on the old TCP
connection to the *same* server after the retry (a cut link that comes back
while the kernel still retransmits): that needs the old connection to stay
open past the socket timeout, and a failover (the case this guards) never has
it.  What is held is bounded (*limit* records, ``dispatch_retry_records``,
and :data:`MAX_HELD_FLUSHES` flushes): beyond it, the oldest held flush is
given up and its records counted lost (``retry_full``); a group
Redis refused (an error reply inside ``EXEC``, e.g. out of memory) is not
retried and is counted lost (``redis_error``).

With *replicas* > 0 (``dispatch_wait_replicas``) the round trip ends with
``WAIT <replicas> 200``: a flush counts as written once a replica has it, so
a failover cannot drop a flush the worker already counted (a flush that no
replica acknowledged in time is counted in :attr:`SlotWriter.unreplicated`
and stays written: holding it would hold every later one while a replica is
missing).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field

import redis as redis_py
from redis.commands.core import CoreCommands
from redis.crc import key_slot

from minard.store import schema

log = logging.getLogger("minard.store.slots")

#: Seconds a flush mark lives: far longer than any retry waits.
MARK_TTL = 600
#: Flushes held at most (5 min of a worker's once-a-second flushes): bounds the memory
#: of an outage at low rates, where the record limit would take hours to reach.
MAX_HELD_FLUSHES = 300
#: Milliseconds a flush waits for its replicas (``WAIT``) before it is treated as unknown.
WAIT_MS = 200
#: Outcomes of one group's transaction.
OK, REFUSED, READONLY = "ok", "refused", "readonly"
#: Commands whose first key is not their first argument: name -> index of the key count.
_NUMKEYS_AT = {b"EVAL": 2, b"EVALSHA": 2}

_CONNECTION_ERRORS = (redis_py.ConnectionError, redis_py.TimeoutError, OSError)


def _bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def hash_tag(key) -> bytes:
    """The part of *key* Redis Cluster hashes: the first non-empty ``{...}``, else the whole key."""
    raw = _bytes(key)
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            return raw[start + 1:end]
    return raw


def first_key(args: tuple) -> bytes:
    """The first key of a command (its slot decides the command's group)."""
    name = _bytes(args[0]).upper()
    if name in _NUMKEYS_AT:
        at = _NUMKEYS_AT[name]
        if int(args[at]) < 1:
            raise ValueError(f"{name.decode()} without keys cannot be placed in a slot")
        return _bytes(args[at + 1])
    return _bytes(args[1])


@dataclass
class Group:
    """The commands of one hash slot in one flush (one transaction)."""

    slot: int
    tag: bytes
    commands: list[tuple] = field(default_factory=list)


class SlotBatch(CoreCommands):
    """Collects commands (redis-py's command methods) into one :class:`Group` per hash slot.

    Used where a redis-py pipeline would be: the writers of
    :mod:`minard.store.timeseries`, :mod:`minard.store.runs`,
    :mod:`minard.store.channels` and :mod:`minard.store.bursts` only queue
    commands.  Every command must name a key.
    """

    def __init__(self):
        self.groups: dict[int, Group] = {}

    def execute_command(self, *args, **options):
        key = first_key(args)
        slot = key_slot(key)
        group = self.groups.get(slot)
        if group is None:
            group = self.groups[slot] = Group(slot, hash_tag(key))
        group.commands.append(args)
        return self

    def __bool__(self) -> bool:
        return bool(self.groups)


@dataclass
class Held:
    """A flush whose groups are not all written yet: its records and what is left to send."""

    seq: int
    records: int
    groups: list[Group]
    by_run: dict[int, int] = field(default_factory=dict)  # its records per run (losses are counted per run)
    unknown: set[int] = field(default_factory=set)  # slots of groups sent without an answer
    refused: bool = False  # Redis refused one of its groups: counted lost, never retried


@dataclass
class Result:
    """What one :meth:`SlotWriter.write` settled: records written, lost by reason; what is held."""

    written: int = 0
    lost: dict[str, int] = field(default_factory=dict)
    lost_runs: dict[str, Counter] = field(default_factory=dict)  # reason -> {run: records}
    held_records: int = 0
    error: str = ""

    def lose(self, reason: str, held: Held) -> None:
        """Count the records of *held* lost under *reason* (in total and per run)."""
        if held.records:
            self.lost[reason] = self.lost.get(reason, 0) + held.records
        self.lost_runs.setdefault(reason, Counter()).update(held.by_run)


class SlotWriter:
    """Sends :class:`SlotBatch` flushes per slot group, holds what failed and retries it (module doc).

    *writer* names this writer in the flush marks (the stage counters'
    writer id, unique per process and client); *limit* bounds the records of
    the flushes held for a retry.
    """

    def __init__(self, redis, writer: str, limit: int, replicas: int = 0):
        self.redis, self.writer, self.limit, self.replicas = redis, writer, int(limit), int(replicas)
        self.held: list[Held] = []
        self.seq = itertools.count(1)
        self.retried = 0  # groups sent again after a failure
        self.resolved = 0  # groups sent without an answer and found applied by their mark
        self.unreplicated = 0  # flushes fewer than *replicas* replicas acknowledged in time
        self.replica_ok = True

    @property
    def held_records(self) -> int:
        return sum(h.records for h in self.held)

    def mark_key(self, tag: bytes) -> str:
        """The flush mark of this writer in the slot of *tag*."""
        return schema.FLUSH_MARK.key(tag=tag.decode(errors="replace"), writer=self.writer)

    def write(self, batch: SlotBatch | None, records: int, by_run: dict[int, int] | None = None) -> Result:
        """Send what is held, then *batch* (the aggregates of *records* records, *by_run* of them
        per run); settle what can be.

        Never raises for a Redis failure: what could not be written stays
        held (``Result.error`` says why) and is sent again at the next call.
        """
        self.held.append(Held(next(self.seq), records, list(batch.groups.values()) if batch else [],
                              dict(by_run or {})))
        result = Result()
        try:
            self._resolve_unknown()
            self._send()
        except _CONNECTION_ERRORS as exc:
            result.error = str(exc) or type(exc).__name__
        for held in [h for h in self.held if not h.groups]:
            self.held.remove(held)
            if held.refused:
                result.lose("redis_error", held)
            else:
                result.written += held.records
        while self.held and (self.held_records > self.limit or len(self.held) > MAX_HELD_FLUSHES):
            result.lose("retry_full", self.held.pop(0))
        result.held_records = self.held_records
        return result

    def give_up(self, reason: str) -> tuple[dict[str, int], Counter]:
        """Forget everything held (at exit): ``({reason: records}, {run: records})``."""
        result = Result()
        for held in self.held:
            result.lose(reason, held)
        self.held.clear()
        return result.lost, result.lost_runs.get(reason, Counter())

    # ------------------------------------------------------------ internals
    def _resolve_unknown(self) -> None:
        """Read the marks of groups sent without an answer: applied ones are done."""
        pending = [(held, g) for held in self.held for g in held.groups if g.slot in held.unknown]
        if not pending:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            for _, g in pending:
                pipe.get(self.mark_key(g.tag))
            marks = pipe.execute()
        for (held, g), mark in zip(pending, marks):
            held.unknown.discard(g.slot)
            if mark is not None and int(mark) >= held.seq:
                held.groups.remove(g)
                self.resolved += 1

    def _send(self) -> None:
        """Every held group as its own MULTI/EXEC with its mark, in one round trip."""
        newest = self.held[-1].seq
        todo = [(held, g) for held in self.held for g in held.groups]
        if not todo:
            return
        pool = self.redis.connection_pool
        conn = pool.get_connection()  # a failure here: nothing was sent
        try:
            commands = []
            for held, g in todo:
                commands.append(("MULTI",))
                commands.extend(g.commands)
                commands.append(("SET", self.mark_key(g.tag), held.seq, "EX", MARK_TTL))
                commands.append(("EXEC",))
                held.unknown.add(g.slot)  # from here on the outcome is unknown until its reply is read
                self.retried += held.seq != newest
            if self.replicas:
                commands.append(("WAIT", self.replicas, WAIT_MS))
            conn.send_packed_command(conn.pack_commands(commands))
            readonly = False
            for held, g in todo:
                outcome = self._read_group(conn, len(g.commands) + 1)
                held.unknown.discard(g.slot)
                if outcome == READONLY:  # queued writes refused, EXECABORT: nothing applied
                    readonly = True
                    continue
                held.groups.remove(g)
                if outcome == REFUSED:
                    held.refused = True
                    log.error("Redis refused a flush transaction (slot %d); its records are counted lost", g.slot)
            if readonly:  # a demoted primary: reconnect (through Sentinel) and send those again
                raise redis_py.ConnectionError("the server is a read-only replica")
            if self.replicas:
                self._wait(conn)
        except _CONNECTION_ERRORS:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def _wait(self, conn) -> None:
        """``WAIT``'s reply.  Fewer replicas than asked (none left after a failover, or one
        lagging): the flush stays written -- holding it would hold every later one too --
        and is counted in :attr:`unreplicated`, logged when it starts."""
        acked = int(conn.read_response())
        if acked >= self.replicas:
            self.replica_ok = True
            return
        self.unreplicated += 1
        if self.replica_ok:
            log.warning("only %d of %d replicas acknowledged a flush within %d ms", acked, self.replicas, WAIT_MS)
        self.replica_ok = False

    @staticmethod
    def _read_group(conn, queued: int) -> str:
        """Read the replies of one MULTI, *queued* commands and EXEC: OK, REFUSED or READONLY."""
        errors = []
        for _ in range(queued + 1):  # MULTI's OK, then QUEUED (or an error) per command
            try:
                conn.read_response(disable_decoding=True)
            except redis_py.ResponseError as exc:
                errors.append(exc)
        try:
            replies = conn.read_response(disable_decoding=True)
        except redis_py.ResponseError as exc:  # EXECABORT: nothing of the group was applied
            errors.append(exc)
            replies = []
        errors += [r for r in replies or [] if isinstance(r, redis_py.ResponseError)]
        if any(isinstance(e, redis_py.ReadOnlyError) for e in errors):
            return READONLY
        return REFUSED if errors or replies is None else OK
