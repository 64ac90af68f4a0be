"""The one writer of per-channel arrays in Redis (occupancy, CMOS rates, base currents, run channels).

A per-channel array is a binary string of big-endian ``u32`` counts or ``i64``
fixed-point sums indexed by channel (layout in :mod:`minard.store.timeseries`
and docs/storage.md).  Every writer of such arrays — the dispatch pull
workers (hits per channel and card, a run's channel counts), the ORCA
consumers (CMOS rates, base currents, busy flags) and the test data — goes
through :class:`ChannelWriter`: deltas are collected per key as dense numpy
arrays and written in one of two ways that combine exactly across workers:

* :meth:`ChannelWriter.add` — atomic adds that read nothing: one
  ``BITFIELD ... OVERFLOW SAT INCRBY`` per key for sparse arrays (few nonzero
  entries), and for dense ``u32`` arrays ONE script call (:data:`ADD_U32_LUA`)
  that adds the same array to every key sharing it and its hash slot (one
  call per level of a series, since each level's bucket has its own tag).  Used by the dispatch pull, whose arrays are counts.
* :meth:`ChannelWriter.read` then :meth:`ChannelWriter.write` — optimistic
  read-modify-write: the stored arrays are read under ``WATCH`` before
  ``MULTI`` and their sums ``SET`` inside it; a concurrent writer makes
  ``EXEC`` fail and the caller recomputes.  Used by the ORCA consumers,
  whose ~10k ``i64`` readings a second as per-channel ``BITFIELD``
  operations cost most of a worker's CPU (and Lua numbers are doubles, so a
  script cannot add int64 exactly).

Both saturate like ``BITFIELD OVERFLOW SAT``; readers do not know which way
an array was written.
"""

from __future__ import annotations

import numpy as np
from redis.crc import key_slot

from minard.formats.detector import NCHANNELS, NCHANNELS_TOTAL
from minard.store import timeseries as ts
from minard.store.schema import ORCA_LATEST_KEY, ORCA_LATEST_TIME_KEY
from minard.store.slots import SlotBatch

#: Adds an array of big-endian uint32 (ARGV[1]) to the array stored at each of
#: KEYS, saturating at 2**32-1, in 1024-entry chunks: one command for all the
#: levels of a series instead of one BITFIELD operation per channel and level
#: when most channels have hits.  A key that does not exist yet is simply set
#: to the array.
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
#: Stored element types: big-endian dtype and saturation limits (BITFIELD SAT).
TYPES = {"i64": (np.dtype(">i8"), -(1 << 63), (1 << 63) - 1), "u32": (np.dtype(">u4"), 0, (1 << 32) - 1)}


def _by_slot(keys: list[str]) -> list[list[str]]:
    """*keys* split by Redis Cluster hash slot: one script call may only touch one slot."""
    out: dict[int, list[str]] = {}
    for key in keys:
        out.setdefault(key_slot(key.encode()), []).append(key)
    return list(out.values())


def bitfield_incr(pipe, key: str, kind: str, lcn: np.ndarray, delta: np.ndarray) -> None:
    """Atomically add *delta* to entries *lcn* of the array at *key* (one BITFIELD command)."""
    lcn = np.asarray(lcn, dtype=np.int64)
    delta = np.asarray(delta, dtype=np.int64)
    keep = delta != 0
    if not keep.any():
        return
    ops = np.empty((int(keep.sum()), 4), dtype=object)
    ops[:, 0] = "INCRBY"
    ops[:, 1] = kind
    ops[:, 2] = np.char.add("#", lcn[keep].astype(str))
    ops[:, 3] = delta[keep]
    pipe.execute_command("BITFIELD", key, "OVERFLOW", "SAT", *ops.ravel().tolist())


class _Delta:
    """One key's pending delta: element type, dense int64 array, expiry; *shared* while
    the array object is the caller's (the same for every level of one add)."""

    __slots__ = ("array", "kind", "shared", "ttl")

    def __init__(self, kind: str, array: np.ndarray, ttl: int, shared: bool):
        self.kind, self.array, self.ttl, self.shared = kind, array, ttl, shared


class ChannelWriter:
    """Collects per-channel deltas per key and writes them (see the module)."""

    def __init__(self, redis=None, levels=ts.CHANNEL_LEVELS):
        self.levels = levels
        self.script = redis.register_script(ADD_U32_LUA) if redis is not None else None
        self.deltas: dict[str, _Delta] = {}
        self.merged: dict[str, bytes | None] = {}

    def __bool__(self) -> bool:
        return bool(self.deltas)

    # ------------------------------------------------------------ collecting
    def add_counts(self, name: str, t: float, lcn, counts) -> None:
        """Counts of series *name* at time *t*, at every level: at channels *lcn*, or,
        with *lcn* None, *counts* is the whole array (indexed by channel or card; kept
        by reference until written, so the caller must not change it meanwhile)."""
        self._add_levels(name, "u32", t, lcn, counts)

    def add_values(self, name: str, t: float, lcn: np.ndarray, values: np.ndarray) -> None:
        """Readings *values* of channels *lcn* at time *t*: ``name:sum`` (fixed point) and ``name:n``."""
        fixed = np.rint(np.asarray(values, dtype=float) * ts.VALUE_SCALE).astype(np.int64)
        self._add_levels(f"{name}:sum", "i64", t, lcn, fixed)
        self._add_levels(f"{name}:n", "u32", t, lcn, 1)

    def add_array(self, key: str, counts: np.ndarray, ttl: int, kind: str = "u32") -> None:
        """A whole array of counts added to one *key* (e.g. a run's channel counts)."""
        self._add(key, kind, ttl, None, np.asarray(counts, np.int64))

    def _add_levels(self, name: str, kind: str, t: float, lcn, delta) -> None:
        dense = None if lcn is not None else np.asarray(delta, np.int64)
        for level in self.levels:
            key = ts.channel_key(level.step, ts.bucket(t, level.step), name)
            self._add(key, kind, level.keep + level.step, lcn, dense if dense is not None else delta)

    def _add(self, key: str, kind: str, ttl: int, lcn, delta) -> None:
        entry = self.deltas.get(key)
        if entry is None and lcn is None:  # keep the caller's array: levels share it
            self.deltas[key] = _Delta(kind, delta, ttl, shared=True)
            return
        if lcn is not None:
            lcn = np.asarray(lcn, np.int64)
        size = len(delta) if lcn is None else max(NCHANNELS_TOTAL, int(lcn.max()) + 1 if len(lcn) else 0)
        if entry is None:
            entry = self.deltas[key] = _Delta(kind, np.zeros(size, np.int64), ttl, shared=False)
        if entry.shared or len(entry.array) < size:
            grown = np.zeros(max(size, len(entry.array)), np.int64)
            grown[:len(entry.array)] = entry.array
            entry.array, entry.shared = grown, False
        if lcn is None:
            entry.array[:len(delta)] += delta
        else:
            np.add.at(entry.array, lcn, delta)

    def clear(self) -> None:
        """Forget everything collected (after a write, or to rebuild before a retry)."""
        self.deltas.clear()
        self.merged.clear()

    # ------------------------------------------------------------ atomic adds
    def add(self, pipe) -> None:
        """Add every collected delta in *pipe* with atomic commands, set expiries, clear."""
        groups: dict[int, tuple[_Delta, list[tuple[str, int]]]] = {}
        for key, entry in self.deltas.items():
            groups.setdefault(id(entry.array), (entry, []))[1].append((key, entry.ttl))
        for entry, keys in groups.values():
            counts = entry.array
            nz = np.flatnonzero(counts)
            if not len(nz):
                continue
            if entry.kind == "u32" and self.script is not None and len(nz) > SPARSE_MAX:
                blob = np.minimum(counts[:nz[-1] + 1], 0xFFFFFFFF).astype(">u4").tobytes()
                for same_slot in _by_slot([key for key, _ in keys]):
                    if isinstance(pipe, SlotBatch):  # EVAL: the script travels with its transaction
                        pipe.eval(ADD_U32_LUA, len(same_slot), *same_slot, blob)
                    else:
                        self.script(keys=same_slot, args=[blob], client=pipe)
            else:
                for key, _ in keys:
                    bitfield_incr(pipe, key, entry.kind, nz, counts[nz])
            for key, ttl in keys:
                pipe.expire(key, ttl)
        self.clear()

    # ------------------------------------------------------------ read-modify-write
    def read(self, pipe, keys: list[str] | None = None) -> None:
        """WATCH *keys* (default: all) and compute their new contents (call before ``MULTI``)."""
        keys = list(self.deltas) if keys is None else [k for k in keys if k in self.deltas]
        if not keys:
            self.merged = {}
            return
        pipe.watch(*keys)
        self.merged = {key: self._merge(self.deltas[key], raw) for key, raw in zip(keys, pipe.mget(keys))}

    def write(self, pipe) -> None:
        """SET the merged arrays with their expiry (inside ``MULTI``; after :meth:`read`)."""
        for key, blob in self.merged.items():
            if blob is not None:
                pipe.set(key, blob, ex=self.deltas[key].ttl)

    # ------------------------------------------------------------ retries
    def slots(self) -> dict[int, list[str]]:
        """The collected keys by Redis Cluster hash slot (each slot: one transaction)."""
        out: dict[int, list[str]] = {}
        for key in self.deltas:
            out.setdefault(key_slot(key.encode()), []).append(key)
        return out

    def snapshot(self, keys: list[str]) -> dict[str, np.ndarray]:
        """Copies of the deltas of *keys*, as sent in a transaction whose outcome may be unknown."""
        return {key: self.deltas[key].array.copy() for key in keys if key in self.deltas}

    def subtract(self, sent: dict[str, np.ndarray]) -> None:
        """Take deltas that Redis turned out to have applied (a :meth:`snapshot`) out of the pending ones."""
        for key, array in sent.items():
            entry = self.deltas.get(key)
            if entry is None:
                continue
            rest = entry.array.copy()
            rest[:len(array)] -= array
            if not rest.any():
                del self.deltas[key]
            else:
                entry.array, entry.shared = rest, False

    def drop(self, keys: list[str]) -> None:
        """Forget the deltas of *keys* (written)."""
        for key in keys:
            self.deltas.pop(key, None)
            self.merged.pop(key, None)

    @staticmethod
    def _merge(entry: _Delta, raw: bytes | None) -> bytes | None:
        """The stored array plus the delta, saturated, as long as needed (None: nothing to add)."""
        delta = entry.array
        nz = np.flatnonzero(delta)
        if not len(nz):
            return None  # e.g. only 0.0 readings in a sum
        dtype, lo, hi = TYPES[entry.kind]
        old = np.frombuffer(raw or b"", dtype=dtype).astype(np.int64)
        n = max(len(old), int(nz[-1]) + 1)
        part = np.zeros(n, np.int64)
        part[:min(n, len(delta))] = delta[:n]
        total = part.copy()
        head = total[:len(old)]
        head += old
        if entry.kind == "i64":  # int64 wrap-around: the exact sum left the range
            mine = part[:len(old)]
            head[(old > 0) & (mine > 0) & (head < 0)] = hi
            head[(old < 0) & (mine < 0) & (head >= 0)] = lo
        else:
            np.clip(total, lo, hi, out=total)
        return total.astype(dtype).tobytes()


def add_counts(pipe, name: str, t: float, lcn: np.ndarray, counts: np.ndarray,
               levels=ts.CHANNEL_LEVELS) -> None:
    """Add per-channel *counts* (e.g. hits) at channels *lcn* for time *t*, atomically."""
    writer = ChannelWriter(levels=levels)
    writer.add_counts(name, t, lcn, counts)
    writer.add(pipe)


def add_values(pipe, name: str, t: float, lcn: np.ndarray, values: np.ndarray,
               levels=ts.CHANNEL_LEVELS) -> None:
    """Record per-channel readings (e.g. CMOS rates) so that buckets average them, atomically."""
    writer = ChannelWriter(levels=levels)
    writer.add_values(name, t, lcn, values)
    writer.add(pipe)


def card_runs(cards: np.ndarray) -> list[tuple[int, int]]:
    """Runs ``(first, last)`` of consecutive card numbers in *cards* (sorted, unique)."""
    cards = np.unique(cards)
    if not len(cards):
        return []
    breaks = np.flatnonzero(np.diff(cards) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(cards) - 1]])
    return list(zip(cards[starts].tolist(), cards[ends].tolist()))


def write_latest(pipe, stream: str, values: np.ndarray, t: float, cards: np.ndarray, ttl: int) -> None:
    """SETRANGE the latest map of *stream* for whole *cards*: values (float64 per channel) and time *t*.

    The latest map (``ORCA_LATEST_KEY``/``ORCA_LATEST_TIME_KEY``, docs/storage.md)
    holds each channel's value at its most recent reading, read by ``minard query``.
    """
    key, tkey = ORCA_LATEST_KEY.format(stream=stream), ORCA_LATEST_TIME_KEY.format(stream=stream)
    stamp = np.full(len(values), t, dtype=">f8")
    for first, last in card_runs(cards):
        lo, hi = first * NCHANNELS, (last + 1) * NCHANNELS
        pipe.setrange(key, lo * 8, values[lo:hi].astype(">f8").tobytes())
        pipe.setrange(tkey, lo * 8, stamp[lo:hi].tobytes())
    pipe.expire(key, ttl)
    pipe.expire(tkey, ttl)



def write_latest_valid(pipe, stream: str, values: np.ndarray, t: float, ttl: int) -> None:
    """SETRANGE the latest map of *stream* where *values* (float64 per channel) is finite.

    Channels without a value keep their stored value and time (the CMOS map
    holds each channel's last valid rate and when it arrived); one SETRANGE per
    run of consecutive channels with a value, stamped *t*.
    """
    idx = np.flatnonzero(np.isfinite(values))
    if not len(idx):
        return
    key, tkey = ORCA_LATEST_KEY.format(stream=stream), ORCA_LATEST_TIME_KEY.format(stream=stream)
    breaks = np.flatnonzero(np.diff(idx) != 1)
    firsts, lasts = idx[np.r_[0, breaks + 1]], idx[np.r_[breaks, len(idx) - 1]]
    stamp = np.full(len(values), t, dtype=">f8").tobytes()
    blob = values.astype(">f8").tobytes()
    for lo, hi in zip(firsts.tolist(), (lasts + 1).tolist()):
        pipe.setrange(key, lo * 8, blob[lo * 8:hi * 8])
        pipe.setrange(tkey, lo * 8, stamp[lo * 8:hi * 8])
    pipe.expire(key, ttl)
    pipe.expire(tkey, ttl)
