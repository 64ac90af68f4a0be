"""Synthetic dashboard data written straight into Redis (tests, benchmark, screenshots).

:func:`write_seconds` goes through the real consumer path: synthetic events are
folded by :class:`minard.analysis.aggregate.SecondAgg` / ``RunAgg`` and written by
:func:`minard.pipeline.dispatch_pull.write_second` and :func:`minard.store.runs.write_run`,
so the keys and fields are exactly the pipeline's.  CMOS rates and base
currents are written with :func:`minard.store.channels.add_values` under the names
the Detector page reads (``data.CHANNEL_SOURCES``).

:func:`write_day` fills a whole day quickly for the benchmark: it writes every
resolution level's buckets directly (one HSET/SET per bucket) instead of
adding each second to every level.
"""

from __future__ import annotations

import numpy as np

from minard.analysis.aggregate import (
    NAMES,
    NHIT_BIN,
    NHIT_BINS,
    NTRIG,
    TOTAL,
    Events,
    RunAgg,
    SecondAgg,
)
from minard.formats.detector import NCHANNELS_TOTAL
from minard.pipeline.dispatch_pull import write_second
from minard.store import channels, schema
from minard.store import timeseries as ts
from minard.store.channels import ChannelWriter
from minard.store.runs import write_run
from minard.store.schema import NHIT_LEVELS
from minard.web.data import CHANNEL_SOURCES

#: Trigger words of the synthetic events and how often they occur.
WORDS = np.array([1 << 0, 1 << 1, (1 << 0) | (1 << 1), 1 << 3, 1 << 12, 1 << 26, (1 << 0) | (1 << 2)], np.uint32)
WORD_P = np.array([0.45, 0.25, 0.12, 0.1, 0.04, 0.02, 0.02])
HOT_CHANNEL = 3 * 512 + 4 * 32 + 5
DEAD_CHANNEL = 7 * 512 + 2 * 32 + 9


def _events(rng, n: int, mean_nhit: float, gtid0: int) -> Events:
    """*n* synthetic events: trigger words, Poisson nhit, hits on random channels."""
    nhit = rng.poisson(mean_nhit, n).astype(np.int64)
    lcn = rng.integers(0, NCHANNELS_TOTAL, int(nhit.sum()))
    lcn[lcn == DEAD_CHANNEL] = DEAD_CHANNEL + 1
    extra = np.full(max(1, n // 3), HOT_CHANNEL)
    qhs = rng.integers(300, 900, n).astype(np.int64) * nhit // 10
    word = WORDS[rng.choice(len(WORDS), n, p=WORD_P)]
    gtid = (gtid0 + np.arange(n)) % (1 << 24)
    return Events(word, nhit, qhs, gtid, np.concatenate((lcn, extra)))


def write_seconds(redis, t0: float, seconds: int, rate: float = 50.0, mean_nhit: float = 40.0,
                  run: int = 1000, subrun_every: int = 0, run_every: int = 0, seed: int = 1,
                  orca: bool = True) -> dict:
    """Write *seconds* seconds of data from *t0* through the consumer's writers.

    A new subrun starts every *subrun_every* seconds and a new run every
    *run_every* seconds (0 = never).  Returns the totals written:
    ``events`` per trigger name, ``runs`` (run -> RunAgg).
    """
    rng = np.random.default_rng(seed)
    totals = {"counts": np.zeros(NTRIG + 1, np.int64), "runs": {}, "hits": np.zeros(NCHANNELS_TOTAL, np.int64)}
    gtid, subrun = 1000, 0
    pipe = redis.pipeline(transaction=False)
    counter = ChannelWriter(redis)
    orca_buf = OrcaBuffer()
    for i in range(seconds):
        t = int(t0) + i
        if run_every and i and i % run_every == 0:
            run, subrun = run + 1, 0
        elif subrun_every and i and i % subrun_every == 0:
            subrun += 1
        n = int(rng.poisson(rate))
        ev = _events(rng, n, mean_nhit, gtid)
        gtid += n
        sec = SecondAgg(t)
        sec.records = n
        sec.add_events(ev)
        sec.last = (run, subrun, int(gtid - 1) % (1 << 24))
        write_second(pipe, sec, counter)
        counter.add(pipe)
        totals["runs"].setdefault(run, RunAgg(run)).add_events(ev, np.array([subrun]), float(t))
        totals["counts"] += sec.counts
        totals["hits"] += sec.channel_hits
        if orca and i % 10 == 0:
            orca_buf.add(t, rng)
        if i % 50 == 49:
            pipe.execute()
    for agg in totals["runs"].values():
        write_run(pipe, agg, now=float(t0 + seconds))
    pipe.execute()
    orca_buf.flush(redis)
    return totals


def orca_values(rng) -> tuple[np.ndarray, np.ndarray]:
    """CMOS rates (Hz) and base currents (value - 127) for every channel, with one hot channel."""
    cmos = rng.normal(1500.0, 150.0, NCHANNELS_TOTAL).clip(0)
    cmos[HOT_CHANNEL] = 25000.0
    base = rng.normal(3.0, 1.0, NCHANNELS_TOTAL).round()
    base[HOT_CHANNEL] = 60.0
    return cmos, base


def write_orca(pipe, t: float, rng) -> None:
    """One reading of every channel's CMOS rate and base current at *t* (dead channel absent).

    Goes through :func:`minard.store.channels.add_values`, the consumers' writer.
    """
    cmos, base = orca_values(rng)
    lcn = np.delete(np.arange(NCHANNELS_TOTAL), DEAD_CHANNEL)
    channels.add_values(pipe, CHANNEL_SOURCES["cmos"][0], t, lcn, cmos[lcn])
    channels.add_values(pipe, CHANNEL_SOURCES["base"][0], t, lcn, base[lcn])


class OrcaBuffer:
    """Readings accumulated per bucket and added to Redis as whole arrays (fast test data).

    Produces the same keys and contents as :func:`write_orca` called for each
    reading, with a few commands per bucket instead of one per channel.
    """

    def __init__(self):
        self.acc: dict[str, list[np.ndarray]] = {}

    def add(self, t: float, rng) -> None:
        cmos, base = orca_values(rng)
        ok = np.ones(NCHANNELS_TOTAL, np.int64)
        ok[DEAD_CHANNEL] = 0
        for quantity, vals in (("cmos", cmos), ("base", base)):
            name = CHANNEL_SOURCES[quantity][0]
            fixed = np.rint(vals * ts.VALUE_SCALE).astype(np.int64) * ok
            for level in ts.CHANNEL_LEVELS:
                b = ts.bucket(t, level.step)
                for suffix, delta in (("sum", fixed), ("n", ok)):
                    key = ts.channel_key(level.step, b, f"{name}:{suffix}")
                    entry = self.acc.setdefault(key, [np.zeros(NCHANNELS_TOTAL, np.int64), level])
                    entry[0] += delta

    def flush(self, redis) -> None:
        """Add the accumulated arrays to what Redis holds (read, add, write)."""
        keys = list(self.acc)
        old = redis.mget(keys) if keys else []
        pipe = redis.pipeline(transaction=False)
        for key, raw in zip(keys, old):
            arr, level = self.acc[key]
            dtype = ">i8" if key.endswith(":sum") else ">u4"
            total = ts._array(raw, dtype) + arr
            pipe.set(key, total.astype(dtype).tobytes(), ex=level.keep + level.step)
        pipe.execute()
        self.acc.clear()


# ------------------------------------------------------------------ a whole day, fast

def _fields_for(counts: np.ndarray, nhit_sum: np.ndarray, qhs_sum: np.ndarray) -> dict:
    out = {}
    for i, name in enumerate(NAMES):
        if counts[i]:
            out[name] = int(counts[i])
            out[f"{name}:nhit"] = int(nhit_sum[i])
            out[f"{name}:qhs"] = int(qhs_sum[i])
    return out


def write_day(redis, end: float, days: float = 1.0, rate: float = 300.0, mean_nhit: float = 40.0,
              seed: int = 2, run_seconds: int = 3600) -> dict:
    """Fill every resolution level with *days* of 1 s data ending at *end* (fast path).

    Per second: Poisson event counts per trigger type with average nhit and
    charge, a run every *run_seconds*; per channel: hit counts, CMOS rates and
    base currents.  Each level's buckets are computed with numpy and written
    with one command per bucket, honouring each level's retention.
    """
    rng = np.random.default_rng(seed)
    n = int(days * 86400)
    t = (int(end) - n + 1 + np.arange(n)).astype(np.int64)
    share = np.zeros(NTRIG + 1)
    for w, p in zip(WORDS, WORD_P):
        for b in range(NTRIG):
            if int(w) >> b & 1:
                share[b] += p
    share[TOTAL] = 1.0
    events = rng.poisson(rate, n)
    counts = np.rint(events[:, None] * share[None, :]).astype(np.int64)
    nhit_sum = counts * mean_nhit
    qhs_sum = nhit_sum * 60
    runs = 1000 + (t - t[0]) // run_seconds
    written = {"seconds": n, "keys": 0}
    pipe = redis.pipeline(transaction=False)
    for level in ts.SCALAR_LEVELS:
        keep = t >= end - level.keep
        b = t[keep] // level.step
        for bi in np.unique(b):
            sel = np.flatnonzero(keep)[b == bi]
            f = _fields_for(counts[sel].sum(0), nhit_sum[sel].sum(0), qhs_sum[sel].sum(0))
            key = ts.scalar_key(level.step, int(bi), "trig")
            pipe.hset(key, mapping=f)
            pipe.expire(key, level.keep + level.step)
            skey = ts.scalar_key(level.step, int(bi), "stream")
            last = sel[-1]
            pipe.hset(skey, mapping={"run": int(runs[last]), "subrun": 0, "gtid": int(events[:last + 1].sum()) % (1 << 24),
                                     "records": int(events[sel].sum()), "events": int(events[sel].sum())})
            pipe.expire(skey, level.keep + level.step)
            written["keys"] += 2
        pipe.execute()
    for r in np.unique(runs):
        pipe.zadd(schema.RUNS_START, {str(int(r)): float(t[runs == r][0])})
        pipe.zadd(schema.RUNS_END, {str(int(r)): float(t[runs == r][-1])})
        pipe.hset(schema.RUN.key(run=int(r)), mapping={"events": int(events[runs == r].sum())})
    pipe.execute()
    _write_channel_day(redis, t, events, mean_nhit, end, rng, written)
    _write_nhit_day(redis, t, events, mean_nhit, end, written)
    return written


def _write_channel_day(redis, t, events, mean_nhit, end, rng, written) -> None:
    """Per-channel arrays (hits, CMOS, base) and ``occ`` events for every channel level."""
    p = np.full(NCHANNELS_TOTAL, 1.0 / NCHANNELS_TOTAL)
    p[DEAD_CHANNEL] = 0
    p[HOT_CHANNEL] *= 20
    p /= p.sum()
    cmos, base = orca_values(rng)
    for level in ts.CHANNEL_LEVELS:
        keep = t >= end - level.keep
        b = t[keep] // level.step
        pipe = redis.pipeline(transaction=False)
        for i, bi in enumerate(np.unique(b)):
            sel = np.flatnonzero(keep)[b == bi]
            nev = int(events[sel].sum())
            hits = rng.poisson(p * nev * mean_nhit).astype(">u4")
            pipe.set(ts.channel_key(level.step, int(bi), "hits"), hits.tobytes(), ex=level.keep + level.step)
            nread = max(1, len(sel) // 10)
            for name, vals in ((CHANNEL_SOURCES["cmos"][0], cmos), (CHANNEL_SOURCES["base"][0], base)):
                ok = np.ones(NCHANNELS_TOTAL, bool)
                ok[DEAD_CHANNEL] = False
                s = (np.rint(vals * ts.VALUE_SCALE).astype(np.int64) * nread * ok).astype(">i8")
                c = (np.full(NCHANNELS_TOTAL, nread) * ok).astype(">u4")
                pipe.set(ts.channel_key(level.step, int(bi), f"{name}:sum"), s.tobytes(), ex=level.keep + level.step)
                pipe.set(ts.channel_key(level.step, int(bi), f"{name}:n"), c.tobytes(), ex=level.keep + level.step)
            key = ts.scalar_key(level.step, int(bi), "occ")
            pipe.hset(key, "events", nev)
            pipe.expire(key, level.keep + level.step)
            written["keys"] += 6
            if i % 20 == 19:
                pipe.execute()
        pipe.execute()


def _write_nhit_day(redis, t, events, mean_nhit, end, written) -> None:
    """nhit histograms (TOTAL only) for the nhit levels."""
    edges = np.arange(NHIT_BINS) * NHIT_BIN
    shape = np.exp(-0.5 * ((edges - mean_nhit) / np.sqrt(mean_nhit)) ** 2)
    shape /= shape.sum()
    for level in NHIT_LEVELS:
        keep = t >= end - level.keep
        b = t[keep] // level.step
        pipe = redis.pipeline(transaction=False)
        for bi in np.unique(b):
            nev = int(events[np.flatnonzero(keep)[b == bi]].sum())
            h = np.rint(shape * nev).astype(np.int64)
            key = ts.scalar_key(level.step, int(bi), "nhit")
            pipe.hset(key, mapping={f"TOTAL:{int(e)}": int(c) for e, c in zip(edges, h) if c})
            pipe.expire(key, level.keep + level.step)
            written["keys"] += 1
        pipe.execute()
