"""The pure burst search (minard/analysis/burst.py): thresholds, window counts, excess extent."""

from __future__ import annotations

import numpy as np
import pytest

from minard.analysis import burst as ana


def test_poisson_pmf_matches_scipy():
    from scipy.stats import poisson

    k = np.array([0, 1, 5, 100, 160, 250, 400])
    assert np.allclose(ana.poisson_pmf(k, 160.0), poisson.pmf(k, 160.0), rtol=1e-9, atol=0)


def test_parse_windows():
    assert ana.parse_windows("10, 1") == (1.0, 10.0)
    for bad in ("", "x", "0", "-1", "5000", "nan"):
        with pytest.raises(ValueError):
            ana.parse_windows(bad)


def test_window_counts_and_a_short_burst_gives_exactly_its_events():
    rng = np.random.default_rng(1)
    lam = 160.0
    bg = np.cumsum(rng.exponential(1 / lam, 20000))
    bg = bg[bg < 100]
    burst = 50 + np.cumsum(rng.exponential(1 / 160e3, 1600))
    t = (np.sort(np.concatenate([bg, burst])) * ana.TICKS).astype(np.int64)
    assert ana.window_counts(t, np.array([len(t) - 1]), 100 * ana.TICKS)[0] == len(t)
    for w in (1.0, 10.0):
        (ex,) = ana.find_excesses(t, w, ana.threshold(lam, w, 0.01), lam)
        assert (t[ex.first], t[ex.last]) == (int(burst[0] * ana.TICKS), int(burst[-1] * ana.TICKS))


def test_threshold_keeps_the_measured_false_alarm_rate_below_the_target():
    """Poisson background 20 Hz for 10^5 s: excesses per day stay at or below the target."""
    rng = np.random.default_rng(3)
    lam, span = 20.0, 1e5
    t = (np.cumsum(rng.exponential(1 / lam, int(lam * span))) * ana.TICKS).astype(np.int64)
    for target in (100.0, 1000.0):
        for w in (1.0, 10.0):
            k = ana.threshold(lam, w, target)
            measured = len(ana.find_excesses(t, w, k, lam)) / span * 86400
            assert 0 < measured <= target, (w, target, measured)
            assert measured > target / 20  # the bound is not absurdly loose either
