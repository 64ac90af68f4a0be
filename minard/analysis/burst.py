"""Supernova burst search: sliding-window counts of high-nhit events (pure numpy).

A core-collapse supernova shows up as many more events than usual within
seconds.  The search keeps the events with ``nhit >= burst_nhit_threshold``
and, for each window length *w* (``burst_windows``), counts the selected
events in every window ``(t - w, t]`` that ends at a selected event.  Times
are the events' own 10 MHz clock (ZDAB_FORMAT.md §5, 100 ns ticks), never
wall time, so a replay at any speed finds the same bursts.

The count threshold *k* of a window comes from the measured background rate
λ and the accepted false-alarm rate: a window that ends at an event reaches
*k* from below when an event arrives while k-1 events lie within the last
*w*, so for a Poisson background the rate of such up-crossings is
``λ · P(Poisson(λw) = k-1)`` (each false excess starts with one);
:func:`threshold` picks the smallest *k* above the mean that keeps this
below the target.

Triggered windows that overlap are one excess; its extent (first and last
GTID) is the stretch of events that maximises ``events - ρ·duration``
(a maximal-segment search, vectorised with cumulative sums), where ρ lies
between the background rate and the burst's own rate, so background events
around a short intense burst are not counted into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: 10 MHz clock ticks per second (ZDAB_FORMAT.md §5).
TICKS = 10_000_000

#: Dtype of one selected event as stored between workers: clock, GTID, nhit.
EVENT_DTYPE = np.dtype([("clock10", "<u8"), ("gtid", "<u4"), ("nhit", "<u2")])


def parse_windows(text: str) -> tuple[float, ...]:
    """``burst_windows`` ("1,10") -> sorted window lengths in seconds; ValueError if bad."""
    try:
        values = sorted({float(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"burst_windows must be a comma list of seconds, got {text!r}") from None
    if not values or not all(math.isfinite(v) and 0 < v <= 3600 for v in values):
        raise ValueError(f"burst_windows must be seconds in (0, 3600], got {text!r}")
    return tuple(values)


def select(nhit: np.ndarray, clock10: np.ndarray, gtid: np.ndarray, orphan: np.ndarray,
           nhit_threshold: int) -> np.ndarray:
    """The events with ``nhit >= nhit_threshold`` (orphans have no clock) as EVENT_DTYPE."""
    keep = (np.asarray(nhit) >= nhit_threshold) & ~np.asarray(orphan).astype(bool)
    out = np.empty(int(np.count_nonzero(keep)), EVENT_DTYPE)
    out["clock10"] = np.asarray(clock10)[keep]
    out["gtid"] = np.asarray(gtid)[keep]
    out["nhit"] = np.minimum(np.asarray(nhit)[keep], 0xFFFF)
    return out


def ordered(events: np.ndarray) -> np.ndarray:
    """*events* sorted by clock (then GTID) with exact duplicates (one event stored twice) removed.

    Sorts the two integer columns with ``lexsort``: a structured-array sort is
    several times slower.
    """
    if len(events) < 2:
        return events
    events = events[np.lexsort((events["gtid"], events["clock10"]))]
    keep = np.ones(len(events), bool)
    keep[1:] = (events["clock10"][1:] != events["clock10"][:-1]) | (events["gtid"][1:] != events["gtid"][:-1])
    return events[keep]


def threshold(rate_hz: float, window_s: float, false_alarms_per_day: float) -> int:
    """Smallest count k in a window of *window_s* whose false-alarm rate is at most the target.

    Poisson background of *rate_hz*; see the module docstring for the formula.
    """
    far = max(float(false_alarms_per_day), 1e-12) / 86400.0
    if rate_hz <= 0:
        return 3
    mu = rate_hz * window_s
    ks = np.arange(max(3, int(mu) + 1), int(mu + 40 * math.sqrt(mu) + 60))
    ok = rate_hz * poisson_pmf(ks - 1, mu) <= far
    return int(ks[np.argmax(ok)]) if ok.any() else int(ks[-1])


def poisson_pmf(k: np.ndarray, mu: float) -> np.ndarray:
    """P(N = k) for N ~ Poisson(mu), computed in logs (ln k! as a cumulative sum of logs)."""
    k = np.asarray(k, dtype=np.int64)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, int(k.max()) + 1, dtype=np.float64)))])
    return np.exp(k * math.log(mu) - mu - log_fact[k])


def window_counts(t: np.ndarray, ends: np.ndarray, window_ticks: int) -> np.ndarray:
    """Selected events in ``(t[e] - w, t[e]]`` for every index e in *ends* (t sorted)."""
    te = t[ends]
    hi = np.searchsorted(t, te, side="right")
    lo = np.searchsorted(t, te - np.minimum(te, window_ticks), side="right")
    return hi - lo


@dataclass(frozen=True)
class Excess:
    """One stretch of events above the threshold (indices into the sorted events)."""

    first: int  # index of the first event of the excess
    last: int  # index of the last event (inclusive)
    window: float  # window length (s) that triggered
    peak: int  # largest window count
    threshold: int  # count threshold of that window


def _groups(starts: np.ndarray, ends: np.ndarray) -> list[tuple[int, int]]:
    """Merge intervals [starts[i], ends[i]] (sorted by start) into (lo, hi) index pairs."""
    reach = np.maximum.accumulate(ends)
    new = np.ones(len(starts), bool)
    new[1:] = starts[1:] > reach[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, len(starts) - 1)
    return [(int(starts[a]), int(reach[b])) for a, b in zip(first, last)]


def max_segment(t: np.ndarray, lo: int, hi: int, rho_per_tick: float) -> tuple[int, int]:
    """Indices (a, b) in [lo, hi] maximising (b - a + 1) - rho·(t[b] - t[a]) (vectorised)."""
    seg = t[lo:hi + 1].astype(np.float64)
    # Score of events [a..b] = (S[b] - S[a]) + 1 with S[i] = i - rho * t[i].
    s = np.arange(len(seg), dtype=np.float64) - rho_per_tick * (seg - seg[0])
    best_before = np.minimum.accumulate(s)
    where_min = _argmin_accumulate(s)
    b = int(np.argmax(s - best_before))
    a = int(where_min[b])
    return lo + a, lo + b


def _argmin_accumulate(s: np.ndarray) -> np.ndarray:
    """For each i, the index of the minimum of s[:i+1] (first one)."""
    running = np.minimum.accumulate(s)
    is_new = np.empty(len(s), bool)
    is_new[0] = True
    is_new[1:] = s[1:] < running[:-1]
    idx = np.where(is_new, np.arange(len(s)), 0)
    return np.maximum.accumulate(idx)


def find_excesses(t: np.ndarray, window_s: float, k: int, rate_hz: float,
                  end_from: int | None = None, end_to: int | None = None) -> list[Excess]:
    """Excesses of windows of *window_s* reaching *k* events, for windows ending at t >= end_from.

    *t* are sorted clock10 ticks of the selected events.  Only windows ending
    in ``[end_from, end_to]`` (ticks, default all) are evaluated: a caller that
    adds new events re-evaluates just the windows that contain them.
    """
    n = len(t)
    if n < k:
        return []
    t = np.asarray(t, dtype=np.int64)
    w = round(window_s * TICKS)
    e0 = 0 if end_from is None else int(np.searchsorted(t, end_from, side="left"))
    e1 = n if end_to is None else int(np.searchsorted(t, end_to, side="right"))
    ends = np.arange(max(e0, k - 1), e1)
    if not len(ends):
        return []
    counts = window_counts(t, ends, w)
    hit = counts >= k
    if not hit.any():
        return []
    trig_end = ends[hit]
    trig_start = np.searchsorted(t, t[trig_end] - np.minimum(t[trig_end], w), side="right")
    out = []
    for lo, hi in _groups(trig_start, trig_end):
        # Penalty rate: between the background and the stretch's own rate (>= 2x background).
        a, b = max_segment(t, lo, hi, 2.0 * rate_hz / TICKS)
        span = max(1, int(t[b] - t[a]))
        own = (b - a + 1) / span * TICKS
        rho = max(2.0 * rate_hz, math.sqrt(max(rate_hz, 1e-3) * own))
        a, b = max_segment(t, lo, hi, rho / TICKS)
        in_group = (trig_end >= lo) & (trig_end <= hi)
        out.append(Excess(a, b, window_s, int(counts[hit][in_group].max()), k))
    return out


def background_rate(per_second: np.ndarray) -> float:
    """Background rate (Hz) from counts per clock second, robust against a burst inside them.

    The mean of the seconds that are not far above the median (a burst second
    would otherwise raise the threshold that should find it).
    """
    c = np.asarray(per_second, dtype=np.float64)
    if not len(c):
        return 0.0
    med = float(np.median(c))
    keep = c <= med + 5.0 * math.sqrt(med + 1.0) + 2.0
    return float(c[keep].mean())


def nhit_histogram(nhit: np.ndarray, edges=(0, 20, 40, 60, 80, 100, 150, 200, 300, 500, 1000, 10000, 65536)):
    """Counts of *nhit* in the fixed bins *edges* (for the burst record)."""
    counts, _ = np.histogram(np.asarray(nhit), bins=np.asarray(edges))
    return {"edges": list(edges), "counts": counts.tolist()}
