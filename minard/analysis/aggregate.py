"""Per-second and per-run aggregation of decoded PMT events (pure: no I/O).

A pull worker decodes each batch with :func:`minard.formats.pmt.decode_buffer` and
hands the resulting :class:`~minard.formats.pmt.EventBatch` to :class:`Aggregator`,
which folds it into two kinds of additive state:

* :class:`SecondAgg`, one per wall-clock second, for the live time series.
  A batch is bucketed by the second in which the producer handed it on (the
  ``sent`` time of the wire batch, i.e. arrival in the monitoring system).
  Live rates are therefore rates *as seen by the monitoring*, like the
  original minard's per-second flush, and every worker puts the same batch in
  the same bucket.  The event clocks are not used for bucketing: a replay at
  full speed would otherwise pile days of data into "now", and a corrupt
  clock could scatter counts over the whole retention.
* :class:`RunAgg`, one per run number read from the events, for the run
  summaries.  These do not depend on time at all, so they are exact and
  reproducible: replaying a file gives the same summary at any speed.

Every field is a count or a sum (plus "latest" values), so aggregates from
any number of workers combine exactly by addition (:meth:`SecondAgg.merge`,
:meth:`RunAgg.merge`); Redis applies the same additions atomically.

Definitions (the tests compute the same numbers independently):

* An *event* is a decoded record that is not an orphan.  It counts once in
  ``TOTAL`` and once for every trigger bit set in its 27-bit trigger word.
* ``nhit`` is NPmtHit from the record header; ``qhs`` sums are over the
  decoded hits of the event.
* Orphans (all six MTC words zero) are counted apart and contribute neither to
  trigger counts nor to channel hits (occupancy = hits / events).
* GTID gaps: consecutive non-orphan events in stream order whose GTIDs
  (24 bits, wrapping) differ by more than one, after removing the GTIDs the
  hardware never issues (:func:`hardware_skipped`).  A difference of zero or
  of more than ``GAP_MAX`` is a *jump* (reset, duplicate or out of order)
  rather than a gap.  The producer passes the GTID and run of the last event
  before each batch (``prev_gtid``, ``prev_run``) so gaps across batch
  boundaries are found too.  Two consecutive records of *different runs* are
  neither a gap nor a jump: a new run starts a new GTID sequence for the
  books (a looping replay, or a run change, must not charge the distance
  between two runs' GTIDs to either run as lost events).
* Corrupt records are counted by ``RecordError.reason``; the rest of their
  batch is aggregated normally.

No per-hit or per-event Python loops: everything is numpy (bincount, masks,
reduceat).  Per-trigger sums go through the batch's few distinct trigger
words (:class:`WordGroups`), and the summaries a second and a run both need
(channel counts, trigger groups) are computed once per batch (:class:`Events`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from minard.formats import pmt
from minard.formats.detector import NCARDS, NCHANNELS, NCHANNELS_TOTAL, NCRATES
from minard.formats.pmt import MAX_NHIT, TRIGGER_NAMES

#: Trigger names of the time series and summaries: the 27 bits, then TOTAL.
NAMES: tuple[str, ...] = tuple(TRIGGER_NAMES) + ("TOTAL",)
NTRIG = len(TRIGGER_NAMES)
TOTAL = NTRIG  # index of TOTAL in per-trigger arrays
#: nhit distribution of the time series: bins of NHIT_BIN hits, the last bin
#: holds everything from NHIT_BIN * (NHIT_BINS - 1) up.
NHIT_BIN = 5
NHIT_BINS = 201
GTID_MOD = 1 << 24
#: A forward GTID step above this is a jump (reset/corruption), not missing events.
GAP_MAX = 100_000
_SHIFTS = np.arange(NTRIG, dtype=np.uint32)


def hardware_skipped(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """GTIDs the hardware never issues strictly between *lo* and *hi* (mod 2**24).

    The MTC/D never issues a GTID whose low 16 bits are zero (the rule
    minard.simulate.events documents and generates), so the 24-bit wrap goes
    0xFFFFFF -> 0x000001 and 0x00FFFF -> 0x010001: those steps of two are
    not missing events.  ``hi`` is reached from ``lo`` going forward.
    """
    lo = np.asarray(lo, np.int64)
    hi = np.asarray(hi, np.int64)
    hi = np.where(hi < lo, hi + GTID_MOD, hi)
    return np.maximum(0, (hi - 1) // 0x10000 - lo // 0x10000)


def gtid_gaps(gtids: np.ndarray, prev: int | None = None,
              runs: np.ndarray | None = None, prev_run: int | None = None) -> tuple[int, int, int]:
    """(gaps, missing GTIDs, jumps) along *gtids* in stream order.

    *prev* is the GTID of the event just before the first one (or None).
    *runs* (one per GTID) and *prev_run* are their run numbers (-1 or None:
    unknown): a step between two known, different runs counts as nothing.
    """
    g = np.asarray(gtids, np.int64)
    r = None if runs is None else np.asarray(runs, np.int64)
    if prev is not None:
        g = np.concatenate(([int(prev)], g))
        if r is not None:
            r = np.concatenate(([-1 if prev_run is None else int(prev_run)], r))
    if len(g) < 2:
        return 0, 0, 0
    lo, hi = g[:-1], g[1:]
    step = (hi - lo) % GTID_MOD
    if np.all(step == 1):  # the usual batch: consecutive GTIDs, nothing to count
        return 0, 0, 0
    missing = step - 1 - hardware_skipped(lo, hi)
    jump = (step == 0) | (step > GAP_MAX)
    if r is not None:
        same_run = (r[:-1] == r[1:]) | (r[:-1] < 0) | (r[1:] < 0)
        jump &= same_run
        missing = np.where(same_run, missing, 0)
    gap = ~jump & (missing > 0)
    return int(gap.sum()), int(missing[gap].sum()), int(jump.sum())


def stream_gtids(batch, payload=None, offsets=None, lengths=None) -> np.ndarray:
    """GTIDs of a batch's records in stream order, for GTID gap finding.

    Triggered events give their MTC GTID; an orphan (no MTC words) gives the
    GTID of its first hit, or nothing if it has none; a record the decoder
    rejected gives the GTID of its MTC word M3 when its header is complete
    (*payload*, *offsets*, *lengths* locate the PmtEventRecords), so a corrupt
    record is counted as corrupt, not also as a missing GTID.
    """
    out = record_gtids(batch, payload, offsets, lengths)
    return out[out >= 0]


def record_gtids(batch, payload=None, offsets=None, lengths=None) -> np.ndarray:
    """Per input record, its GTID as :func:`stream_gtids` takes it, or -1 if it has none."""
    orphan = batch.orphan.astype(bool)
    if not batch.errors and not orphan.any():  # the usual batch: the MTC GTIDs in order
        return batch.gtid.astype(np.int64)
    n = len(batch.gtid) + len(batch.errors)
    out = np.full(n, -1, np.int64)
    gtid = batch.gtid.astype(np.int64)
    if orphan.any():
        starts, counts = hit_extents(batch)
        gtid[orphan] = -1
        idx = np.flatnonzero(orphan & (counts > 0))
        gtid[idx] = batch.hit_gtid[starts[idx]]
    out[batch.valid_index] = gtid
    if payload is not None and batch.errors:
        rejected = np.array([i for i, _ in batch.errors], np.int64)
        out[rejected] = pmt.record_gtids(payload, np.asarray(offsets)[rejected],
                                         np.asarray(lengths)[rejected], orphans=False)
    return out


def record_runs(batch, payload=None, offsets=None, lengths=None) -> np.ndarray:
    """Per input record, its run number (-1 if unknown), aligned with :func:`record_gtids`."""
    if not batch.errors:  # the usual batch: every record decoded
        return batch.run.astype(np.int64)
    out = np.full(len(batch.gtid) + len(batch.errors), -1, np.int64)
    out[batch.valid_index] = batch.run
    if payload is not None:
        rejected = np.array([i for i, _ in batch.errors], np.int64)
        out[rejected] = pmt.record_runs(payload, np.asarray(offsets)[rejected], np.asarray(lengths)[rejected])
    return out


def segment_gaps(gtids: np.ndarray, firsts: list[int], prevs: list[int | None],
                 runs: np.ndarray | None = None, prev_runs: list[int | None] | None = None) -> tuple[int, int, int]:
    """(gaps, missing, jumps) of a batch made of several stream segments.

    *gtids* holds one GTID per record (-1: none, see :func:`record_gtids`);
    segment k starts at record ``firsts[k]`` and follows GTID ``prevs[k]``
    (None: unknown).  *runs* (per record, :func:`record_runs`) and
    *prev_runs* (per segment) keep gap finding within one run
    (:func:`gtid_gaps`).  Each segment is checked on its own, exactly as if it
    had been aggregated alone: consecutive segments of one worker need not
    be consecutive in the stream (other workers hold what lies between).
    """
    total = [0, 0, 0]
    for k, (first, prev) in enumerate(zip(firsts, prevs)):
        end = firsts[k + 1] if k + 1 < len(firsts) else len(gtids)
        seg = gtids[first:end]
        has = seg >= 0
        seg_runs = None if runs is None else runs[first:end][has]
        prev_run = None if prev_runs is None else prev_runs[k]
        for i, v in enumerate(gtid_gaps(seg[has], prev, seg_runs, prev_run)):
            total[i] += v
    return total[0], total[1], total[2]


def distinct(values: np.ndarray) -> list[int]:
    """The distinct values of *values* as sorted ints; cheap when they are all equal.

    A batch almost always holds one run and one sub-run: comparing with the
    first value costs one pass, a sort only happens when there are several.
    """
    if not len(values):
        return []
    first = values[0]
    if not np.any(values != first):
        return [int(first)]
    return np.unique(values).tolist()


def trigger_bits(trigger: np.ndarray) -> np.ndarray:
    """(n events, 27) matrix of 0/1: bit i of each event's trigger word."""
    return ((np.asarray(trigger, np.uint32)[:, None] >> _SHIFTS) & 1).astype(np.int64)


def nhit_bin(nhit: np.ndarray) -> np.ndarray:
    """Time-series histogram bin of each nhit (last bin = overflow)."""
    return np.minimum(np.asarray(nhit, np.int64) // NHIT_BIN, NHIT_BINS - 1)


def nhit_bin_label(b: int) -> int:
    """Lowest nhit of bin *b* (used as the field name in Redis)."""
    return int(b) * NHIT_BIN


#: Above this many distinct trigger words in one batch (corrupt data), the nhit
#: histogram per trigger is built from (event, bit) pairs instead of per word.
MAX_WORD_GROUPS = 64


@dataclass
class WordGroups:
    """A batch's events grouped by distinct trigger word, with per-word sums.

    Every per-trigger quantity is a sum over the words that have that bit, so
    ``events @ bits`` gives the 27 trigger counts with a (k, 27) matrix
    where k is the number of distinct words (a handful in real data) instead
    of an (events, 27) one.
    """

    words: np.ndarray  # (k,) distinct trigger words
    inverse: np.ndarray  # (n,) group of each event
    bits: np.ndarray  # (k, 27) int64 0/1: bit i of each word
    events: np.ndarray  # (k,) int64 events per word
    nhit: np.ndarray  # (k,) int64 sum of NPmtHit per word
    qhs: np.ndarray  # (k,) int64 sum of QHS per word

    @classmethod
    def of(cls, trigger: np.ndarray, nhit: np.ndarray, qhs: np.ndarray) -> WordGroups:
        """Group events by trigger word; sums are exact (float64 bincount of < 2**53)."""
        words = np.unique(trigger)  # sorted, as searchsorted needs
        inverse = np.searchsorted(words, trigger) if len(words) > 1 else np.zeros(len(trigger), np.intp)
        k = len(words)
        return cls(words, inverse, trigger_bits(words), np.bincount(inverse, minlength=k),
                   np.bincount(inverse, weights=nhit, minlength=k).astype(np.int64),
                   np.bincount(inverse, weights=qhs, minlength=k).astype(np.int64))

    def per_trigger(self, per_word: np.ndarray) -> np.ndarray:
        """(27,) sums over the words with each trigger bit of a (k,) per-word array."""
        return per_word @ self.bits


@dataclass
class Events:
    """The per-event and per-hit arrays one aggregate needs (non-orphans only).

    The batch summaries both aggregates use (:attr:`channel_counts`,
    :attr:`words`, :attr:`nhit_hist`) are computed on first use and kept, so a
    batch that feeds a :class:`SecondAgg` and a :class:`RunAgg` computes them
    once.
    """

    trigger: np.ndarray
    nhit: np.ndarray
    qhs: np.ndarray  # per event: sum of qhs over its decoded hits
    gtid: np.ndarray
    lcn: np.ndarray  # hits of these events
    bad_hits: int = 0
    gtid_mismatch: int = 0

    @cached_property
    def channel_counts(self) -> np.ndarray:
        """Hits per channel (10240, int64): the costliest sum, done once per batch."""
        return np.bincount(self.lcn, minlength=NCHANNELS_TOTAL)

    @cached_property
    def words(self) -> WordGroups:
        """The events grouped by trigger word."""
        return WordGroups.of(self.trigger, self.nhit, self.qhs)

    @cached_property
    def nhit_hist(self) -> np.ndarray:
        """(28, NHIT_BINS) nhit distribution per trigger bit and TOTAL (last row)."""
        g, bins = self.words, nhit_bin(self.nhit)
        out = np.empty((NTRIG + 1, NHIT_BINS), np.int64)
        per_word = np.bincount(g.inverse * NHIT_BINS + bins, minlength=len(g.words) * NHIT_BINS)
        per_word = per_word.reshape(len(g.words), NHIT_BINS)
        out[TOTAL] = per_word.sum(axis=0)
        if len(g.words) <= MAX_WORD_GROUPS:
            out[:NTRIG] = g.bits.T @ per_word
        else:  # many distinct words: pair each event with each of its bits
            ev_idx, trig_idx = np.nonzero(g.bits[g.inverse])
            flat = np.bincount(trig_idx * NHIT_BINS + bins[ev_idx], minlength=NTRIG * NHIT_BINS)
            out[:NTRIG] = flat.reshape(NTRIG, NHIT_BINS)
        return out


def hit_extents(batch) -> tuple[np.ndarray, np.ndarray]:
    """(first hit index, hits kept) of each event; hits of an event are contiguous."""
    return batch.hit_starts, batch.hit_counts


def event_sums(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per event, the int64 sum of its contiguous run ``values[starts:starts+counts]``.

    One ``reduceat`` in uint32 (a 16-bit value times at most 10240 hits
    fits): a third of the memory traffic of a cumulative int64 sum.
    """
    out = np.zeros(len(counts), np.int64)
    if not len(values):
        return out
    acc = np.uint32 if values.dtype.itemsize <= 2 else np.int64
    if counts.all():
        out[:] = np.add.reduceat(values, starts, dtype=acc)
    else:  # reduceat gives values[start] for an empty run: skip those events
        rows = np.flatnonzero(counts)
        out[rows] = np.add.reduceat(values, starts[rows], dtype=acc)
    return out


def _mismatch(batch, keep: np.ndarray | None) -> int:
    """Hits whose GTID differs from their event's MTC GTID, over the kept events."""
    per_event = getattr(batch, "gtid_mismatch", None)
    if isinstance(per_event, np.ndarray) and len(per_event) == len(batch.gtid):
        return int(per_event.sum() if keep is None else per_event[keep].sum())
    return 0


def select(batch, mask: np.ndarray | None = None) -> Events:
    """The non-orphan events of *batch* (and their hits), restricted to *mask*."""
    keep = ~batch.orphan.astype(bool)
    if mask is not None:
        keep &= mask
    starts, counts = hit_extents(batch)
    qhs_ev = event_sums(batch.qhs, starts, counts)
    if keep.all():
        return Events(batch.trigger, batch.nhit, qhs_ev, batch.gtid, batch.lcn,
                      int(batch.bad_hits.sum()), _mismatch(batch, None))
    hit_keep = np.repeat(keep, counts)
    return Events(batch.trigger[keep], batch.nhit[keep], qhs_ev[keep], batch.gtid[keep],
                  batch.lcn[hit_keep], int(batch.bad_hits[keep].sum()), _mismatch(batch, keep))


@dataclass
class SecondAgg:
    """Additive aggregate of one second (or any interval) of the live stream."""

    t: int
    counts: np.ndarray = field(default_factory=lambda: np.zeros(NTRIG + 1, np.int64))
    nhit_sum: np.ndarray = field(default_factory=lambda: np.zeros(NTRIG + 1, np.int64))
    qhs_sum: np.ndarray = field(default_factory=lambda: np.zeros(NTRIG + 1, np.int64))
    nhit_hist: np.ndarray = field(default_factory=lambda: np.zeros((NTRIG + 1, NHIT_BINS), np.int64))
    channel_hits: np.ndarray = field(default_factory=lambda: np.zeros(NCHANNELS_TOTAL, np.int64))
    records: int = 0  # records received (good + corrupt)
    orphans: int = 0
    hits: int = 0
    bad_hits: int = 0
    gtid_mismatch: int = 0
    gtid_gaps: int = 0
    gtid_missing: int = 0
    gtid_jumps: int = 0
    corrupt: Counter = field(default_factory=Counter)
    last: tuple[int, int, int] | None = None  # (run, subrun, gtid) of the latest event

    @property
    def events(self) -> int:
        return int(self.counts[TOTAL])

    @property
    def crate_hits(self) -> np.ndarray:
        """Hits per crate (19)."""
        return self.channel_hits.reshape(NCRATES, -1).sum(axis=1)

    @property
    def card_hits(self) -> np.ndarray:
        """Hits per card (19*16, index crate*16 + card)."""
        return self.channel_hits.reshape(NCRATES * NCARDS, NCHANNELS).sum(axis=1)

    def add_events(self, ev: Events) -> None:
        """Fold the non-orphan events *ev* into this second."""
        if not len(ev.nhit):
            return
        g = ev.words
        self.counts[:NTRIG] += g.per_trigger(g.events)
        self.counts[TOTAL] += len(ev.nhit)
        self.nhit_sum[:NTRIG] += g.per_trigger(g.nhit)
        self.nhit_sum[TOTAL] += int(g.nhit.sum())
        self.qhs_sum[:NTRIG] += g.per_trigger(g.qhs)
        self.qhs_sum[TOTAL] += int(g.qhs.sum())
        self.nhit_hist += ev.nhit_hist
        self.channel_hits += ev.channel_counts
        self.hits += len(ev.lcn)
        self.bad_hits += ev.bad_hits
        self.gtid_mismatch += ev.gtid_mismatch

    def merge(self, other: SecondAgg) -> None:
        """Add *other* (another worker's aggregate of the same second) into this one."""
        for name in ("counts", "nhit_sum", "qhs_sum", "nhit_hist", "channel_hits"):
            getattr(self, name).__iadd__(getattr(other, name))
        for name in ("records", "orphans", "hits", "bad_hits", "gtid_mismatch",
                     "gtid_gaps", "gtid_missing", "gtid_jumps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.corrupt.update(other.corrupt)
        self.last = other.last or self.last

    def scalar_fields(self) -> dict[str, int]:
        """The nonzero counters of the ``stream`` and ``trig`` series, by field name."""
        out = {f"{NAMES[i]}": int(c) for i, c in enumerate(self.counts) if c}
        out.update({f"{NAMES[i]}:nhit": int(c) for i, c in enumerate(self.nhit_sum) if c})
        out.update({f"{NAMES[i]}:qhs": int(c) for i, c in enumerate(self.qhs_sum) if c})
        return out

    def stream_fields(self) -> dict[str, int]:
        """Nonzero stream-health counters (records, orphans, gaps, corrupt records...)."""
        out = {"records": self.records, "events": self.events, "orphans": self.orphans,
               "hits": self.hits, "bad_hits": self.bad_hits, "gtid_mismatch": self.gtid_mismatch,
               "gtid_gaps": self.gtid_gaps, "gtid_missing": self.gtid_missing,
               "gtid_jumps": self.gtid_jumps, "corrupt": sum(self.corrupt.values())}
        out.update({f"corrupt:{k}": v for k, v in self.corrupt.items()})
        return {k: int(v) for k, v in out.items() if v}

    def nhit_fields(self) -> dict[str, int]:
        """Nonzero nhit histogram bins as ``<trigger>:<lowest nhit of bin>``."""
        trig, b = np.nonzero(self.nhit_hist)
        return {f"{NAMES[t]}:{nhit_bin_label(k)}": int(self.nhit_hist[t, k])
                for t, k in zip(trig.tolist(), b.tolist())}


@dataclass
class RunAgg:
    """Additive summary of one run: exact, independent of time and of workers."""

    run: int
    events: int = 0
    orphans: int = 0
    hits: int = 0
    triggers: np.ndarray = field(default_factory=lambda: np.zeros(NTRIG, np.int64))
    nhit_counts: np.ndarray = field(default_factory=lambda: np.zeros(MAX_NHIT + 1, np.int64))
    channel_hits: np.ndarray = field(default_factory=lambda: np.zeros(NCHANNELS_TOTAL, np.int64))
    subruns: set = field(default_factory=set)
    start: float | None = None  # arrival time of the first record seen
    end: float | None = None  # arrival time of the last record seen
    #: For the data-quality checks (docs/dq.md): the nhit distribution per
    #: trigger in the time series' bins (shared with SecondAgg, computed once
    #: per batch) and the run's integrity counters.
    nhit_hist: np.ndarray = field(default_factory=lambda: np.zeros((NTRIG + 1, NHIT_BINS), np.int64))
    integrity: Counter = field(default_factory=Counter)
    clock_first: int | None = None  # lowest / highest 10 MHz clock of the run's events
    clock_last: int | None = None

    def add_clocks(self, clocks: np.ndarray) -> None:
        """Fold the 10 MHz clocks of some of the run's events (the run's live time span)."""
        if len(clocks):
            lo, hi = int(clocks.min()), int(clocks.max())
            self.clock_first = lo if self.clock_first is None else min(self.clock_first, lo)
            self.clock_last = hi if self.clock_last is None else max(self.clock_last, hi)

    def add_events(self, ev: Events, subruns, t: float, orphans: int = 0) -> None:
        """Fold *ev* (events of this run), their *subruns* and arrival time *t*."""
        self.events += len(ev.nhit)
        self.orphans += orphans
        self.hits += len(ev.lcn)
        if len(ev.nhit):
            self.triggers += ev.words.per_trigger(ev.words.events)
            np.add.at(self.nhit_counts, np.minimum(ev.nhit, MAX_NHIT), 1)
            self.channel_hits += ev.channel_counts
            self.nhit_hist += ev.nhit_hist
            if ev.bad_hits:
                self.integrity["bad_hits"] += int(ev.bad_hits)
            if ev.gtid_mismatch:
                self.integrity["gtid_mismatch"] += int(ev.gtid_mismatch)
        self.subruns.update(distinct(subruns))
        self.start = t if self.start is None else min(self.start, t)
        self.end = t if self.end is None else max(self.end, t)

    def merge(self, other: RunAgg) -> None:
        """Add another aggregate of the same run."""
        self.events += other.events
        self.orphans += other.orphans
        self.hits += other.hits
        self.triggers += other.triggers
        self.nhit_counts += other.nhit_counts
        self.channel_hits += other.channel_hits
        self.nhit_hist += other.nhit_hist
        self.integrity.update(other.integrity)
        self.add_clocks(np.array([c for c in (other.clock_first, other.clock_last) if c is not None], np.int64))
        self.subruns |= other.subruns
        for t in (other.start, other.end):
            if t is not None:
                self.start = t if self.start is None else min(self.start, t)
                self.end = t if self.end is None else max(self.end, t)

    def as_dict(self) -> dict:
        """The summary in the JSON shape of ``minard runs show`` (see minard.store.runs)."""
        nz = np.flatnonzero(self.nhit_counts)
        ch = np.flatnonzero(self.channel_hits)
        return {
            "run": self.run, "events": self.events, "orphans": self.orphans, "hits": self.hits,
            "triggers": {n: int(c) for n, c in zip(TRIGGER_NAMES, self.triggers)},
            "nhit_histogram": {str(i): int(self.nhit_counts[i]) for i in nz.tolist()},
            "channel_hits": {str(i): int(self.channel_hits[i]) for i in ch.tolist()},
            "start": self.start, "end": self.end, "subruns": sorted(self.subruns),
        }


class Aggregator:
    """Pending aggregates of one worker between two flushes."""

    def __init__(self):
        self.seconds: dict[int, SecondAgg] = {}
        self.runs: dict[int, RunAgg] = {}
        self.records = 0  # records folded in since the last take()

    def second(self, t: float) -> SecondAgg:
        """The aggregate of the second holding *t* (created on demand)."""
        s = int(t)
        agg = self.seconds.get(s)
        if agg is None:
            agg = self.seconds[s] = SecondAgg(s)
        return agg

    def run(self, run: int) -> RunAgg:
        agg = self.runs.get(run)
        if agg is None:
            agg = self.runs[run] = RunAgg(run)
        return agg

    def add_batch(self, batch, t: float, prev_gtid: int | None = None,
                  corrupt: Counter | None = None, gtids: np.ndarray | None = None,
                  gaps: tuple[int, int, int] | None = None, prev_run: int | None = None,
                  runs: np.ndarray | None = None) -> None:
        """Fold one decoded batch that arrived at time *t*.

        *corrupt* counts records rejected before decoding (e.g. a bad dispatch
        header); ``batch.errors`` adds the decoder's rejections.  *gtids* is
        the stream's GTID sequence for gap finding (default
        :func:`stream_gtids` of the batch without the rejected records) and
        *runs* their runs; *prev_gtid*/*prev_run* the event before the batch;
        *gaps*, if given, are the batch's (gaps, missing, jumps) already
        found (:func:`segment_gaps`).
        """
        sec = self.second(t)
        nrec = len(batch.gtid)
        if corrupt or batch.errors:
            bad = Counter(corrupt or {})
            bad.update(err.reason for _, err in batch.errors)
            nrec += sum(bad.values())
            sec.corrupt.update(bad)
        sec.records += nrec
        self.records += nrec
        if not len(batch.gtid):
            return
        orphan = batch.orphan.astype(bool)
        norphan = int(np.count_nonzero(orphan))
        sec.orphans += norphan
        ev = select(batch)
        sec.add_events(ev)
        if gaps is None:
            if gtids is None:
                gtids, every = record_gtids(batch), record_runs(batch)
                runs = every[gtids >= 0]
                gtids = gtids[gtids >= 0]
            gaps = gtid_gaps(gtids, prev_gtid, runs, prev_run)
        gaps, missing, jumps = gaps
        sec.gtid_gaps += gaps
        sec.gtid_missing += missing
        sec.gtid_jumps += jumps
        i = len(batch.gtid) - 1
        sec.last = (int(batch.run[i]), int(batch.subrun[i]), int(batch.gtid[i]))
        runs = distinct(batch.run)
        # Losses found in the batch go to its last run (a batch spans two runs only at a change).
        self.run(int(batch.run[i])).integrity.update(
            {k: v for k, v in (("gtid_gaps", gaps), ("gtid_missing", missing), ("gtid_jumps", jumps),
                               ("corrupt", sum((corrupt or {}).values()) + len(batch.errors))) if v})
        clocks = getattr(batch, "clock10", None)
        if clocks is not None and len(clocks) != len(orphan):  # a batch without MTC headers
            clocks = None
        if len(runs) == 1:
            self.run(runs[0]).add_events(ev, batch.subrun, t, norphan)
            if clocks is not None:
                self.run(runs[0]).add_clocks(clocks[~orphan])
            return
        for r in runs:
            mask = batch.run == r
            self.run(int(r)).add_events(select(batch, mask), batch.subrun[mask], t,
                                        int((orphan & mask).sum()))
            if clocks is not None:
                self.run(int(r)).add_clocks(clocks[mask & ~orphan])

    def take(self) -> tuple[dict[int, SecondAgg], dict[int, RunAgg], int]:
        """Hand over everything pending (for a flush) and start afresh."""
        out = (self.seconds, self.runs, self.records)
        self.seconds, self.runs, self.records = {}, {}, 0
        return out

    def __bool__(self) -> bool:
        return bool(self.seconds or self.runs)
