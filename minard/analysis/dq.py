"""Data-quality checks: a run's stored aggregates judged against a reference run (pure: no I/O).

Every check returns a :class:`Result` with a state of :data:`STATES`
(``good``, ``too_few``, ``warning``, ``error``), the measured ``value``, the
``expected`` value (from the reference) and the ``threshold`` it was judged
by, plus a ``detail`` object.  A run's status is the worst of its checks
(:func:`worst`, in the order of :data:`STATES`).  The checks and their
thresholds come from ``conf/dq.cfg`` (:func:`load_config`); docs/dq.md
describes each one.

The statistics, shared by all checks: two counts ``n`` (run) and ``m``
(reference) with exposures ``a`` and ``b`` (events or seconds) are compared
by the conditional binomial test: if both come from the same rate, ``n`` is
binomial with ``n + m`` trials and probability ``a / (a + b)``.  A check
flags a difference only when it is both *large* (outside its ratio band) and
*significant* (beyond ``z`` standard deviations, one-sided), and it says
``too_few`` when no difference at its warning threshold could reach that
significance with the events at hand, and none was found.
"""

from __future__ import annotations

import configparser
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from minard.analysis.aggregate import NAMES, NHIT_BIN
from minard.formats.detector import NCARDS, NCHANNELS, NCHANNELS_TOTAL, NCRATES

STATES = ("good", "too_few", "warning", "error")
_RANK = {s: i for i, s in enumerate(STATES)}
#: Checks in report order; ``trigger_rate`` expands to ``trigger_rate:<NAME>``.
CHECKS = ("trigger_rate", "nhit_distribution", "occupancy_hot", "occupancy_dead", "dead_card",
          "dead_crate", "cmos_outliers", "base_outliers", "integrity")
#: The run type of runs that have none (simulated runs) in ``run_types``.
NO_TYPE = "none"
#: The channel-status flags (docs/dq.md).
FLAGS = ("screamer", "hot", "dead", "bad_cable", "no_n100", "no_n20", "no_esum",
         "bad_calibration", "bad_base_current", "masked")


def worst(states) -> str:
    """The worst of *states* (``good`` for none)."""
    return max(states, key=_RANK.__getitem__, default="good")


def z_of(p) -> np.ndarray | float:
    """One-sided significance in standard deviations of the probability *p*."""
    return stats.norm.isf(np.clip(p, 1e-300, 1.0))


@dataclass
class Result:
    """One check's outcome, in the JSON shape of ``minard dq --json``."""

    name: str
    status: str
    value: float | int | None = None
    expected: float | int | None = None
    threshold: dict = field(default_factory=dict)
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "value": _clean(self.value),
                "expected": _clean(self.expected), "threshold": _safe(self.threshold), "detail": _safe(self.detail)}


def _clean(x):
    """A JSON-safe number: numpy scalars to Python, NaN/inf to None."""
    if x is None:
        return None
    x = float(x) if not isinstance(x, (int, np.integer)) else int(x)
    return x if isinstance(x, int) or math.isfinite(x) else None


def _safe(obj):
    """*obj* with every number JSON-safe (numpy to Python, NaN/inf to None), recursively."""
    if isinstance(obj, dict):
        return {str(k): _safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, float, np.integer, np.floating)):
        return _clean(obj)
    return obj


@dataclass
class RunData:
    """What the checks read of one run (all from stored aggregates).

    ``triggers``: name -> events (the 27 names); ``nhit_hist``: name ->
    (201,) events per 5-hit bin, as the ``nhit`` series; ``channel_hits``:
    (10240,) hits; ``duration``: seconds between the first and last event's
    arrival; ``integrity``: counters (``gtid_missing``, ``gtid_gaps``,
    ``gtid_jumps``, ``corrupt``, ``bad_hits``, ``gtid_mismatch``, ``orphans``,
    and ``dropped``/``unaccounted`` when the data plane accounted the run);
    ``cmos`` / ``base``: (10240,) mean reading over the run, NaN where none.
    """

    run: int
    events: int = 0
    duration: float = 0.0
    run_type: str = ""
    triggers: dict = field(default_factory=dict)
    nhit_hist: dict = field(default_factory=dict)
    channel_hits: np.ndarray = field(default_factory=lambda: np.zeros(NCHANNELS_TOTAL, np.int64))
    integrity: dict = field(default_factory=dict)
    cmos: np.ndarray = field(default_factory=lambda: np.full(NCHANNELS_TOTAL, np.nan))
    base: np.ndarray = field(default_factory=lambda: np.full(NCHANNELS_TOTAL, np.nan))


# --------------------------------------------------------------- configuration

DEFAULTS = {
    "trigger_rate": {"triggers": "*", "warning": "0.8 1.25", "error": "0.5 2.0", "z": "5",
                     "min_duration": "10"},
    "nhit_distribution": {"trigger": "100L", "d_warning": "0.05", "d_error": "0.15",
                          "p_warning": "1e-4", "p_error": "1e-7", "min_bin_events": "10"},
    "occupancy": {"z": "5", "hot_ratio": "3", "dead_ratio": "0.1"},
    "occupancy_hot": {"warning": "1", "error": "20"},
    "occupancy_dead": {"warning": "1", "error": "50"},
    "dead_card": {"warning": "1", "error": "2"},
    "dead_crate": {"warning": "1", "error": "1"},
    "cmos_outliers": {"screamer_hz": "20000", "warning": "1", "error": "10"},
    "base_outliers": {"max_deviation": "40", "warning": "1", "error": "10"},
    "integrity": {"lost_warning": "1e-4", "lost_error": "1e-2", "orphans_warning": "0.01",
                  "orphans_error": "0.1", "jumps_warning": "1", "bad_hits_warning": "1e-3"},
}


class Config:
    """The parsed ``conf/dq.cfg``: per check, its options and the run types it applies to."""

    def __init__(self, parser: configparser.ConfigParser):
        self.parser = parser

    def get(self, section: str, key: str) -> str:
        if self.parser.has_option(section, key):
            return self.parser.get(section, key)
        return DEFAULTS[section][key]

    def num(self, section: str, key: str) -> float:
        return float(self.get(section, key))

    def pair(self, section: str, key: str) -> tuple[float, float]:
        lo, hi = (float(x) for x in self.get(section, key).split())
        return lo, hi

    def applies(self, check: str, run_type: str) -> bool:
        """True if *check* is enabled for runs of *run_type* (``""`` = no type)."""
        section = check if self.parser.has_section(check) else None
        if section is None:
            return True
        if not self.parser.getboolean(section, "enabled", fallback=True):
            return False
        types = self.parser.get(section, "run_types", fallback="*").split()
        return "*" in types or (run_type or NO_TYPE) in types


def load_config(text: str | None = None, path=None) -> Config:
    """Parse ``conf/dq.cfg`` from *text* or *path* (defaults for anything missing).

    Raises ValueError on an unknown section or a malformed value, so a typo
    is found when the file is loaded, not in the middle of a run.
    """
    parser = configparser.ConfigParser(inline_comment_prefixes=("#", ";"))
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    elif text:
        parser.read_string(text)
    cfg = Config(parser)
    for section in parser.sections():
        if section not in DEFAULTS:
            raise ValueError(f"dq.cfg: unknown section [{section}]")
        for key in parser[section]:
            if key in ("run_types", "enabled", "triggers", "trigger"):
                continue
            if key not in DEFAULTS[section]:
                raise ValueError(f"dq.cfg: unknown option {key} in [{section}]")
            try:
                [float(x) for x in cfg.get(section, key).split()]
            except ValueError:
                raise ValueError(f"dq.cfg: [{section}] {key} is not a number") from None
    return cfg


# ----------------------------------------------------------------- statistics

def excess_z(n, m, a: float, b: float):
    """(z of n above, z of n below) what *m* at exposure *b* predicts at exposure *a*.

    Conditional binomial test, vectorized over arrays *n*, *m*.
    """
    n = np.asarray(n, np.int64)
    m = np.asarray(m, np.int64)
    q = a / (a + b)
    total = n + m
    up = stats.binom.sf(n - 1, total, q)
    down = stats.binom.cdf(n, total, q)
    return z_of(up), z_of(down)


def _count_status(count: int, cfg: Config, section: str) -> str | None:
    """``error``/``warning`` if *count* reaches that threshold of *section*, else None."""
    if count >= cfg.num(section, "error"):
        return "error"
    if count >= cfg.num(section, "warning"):
        return "warning"
    return None


# ----------------------------------------------------------------- the checks

def trigger_rates(run: RunData, ref: RunData, cfg: Config) -> list[Result]:
    """``trigger_rate:<NAME>``: each trigger's rate (Hz) against the reference's.

    Checked: the names in ``triggers`` (``*`` = every trigger with events in
    either run).  A rate is flagged when the ratio leaves the warning/error
    band and differs from 1 by more than ``z`` sigma.
    """
    names = cfg.get("trigger_rate", "triggers").split()
    if "*" in names:
        names = [n for n in NAMES[:-1] if run.triggers.get(n, 0) or ref.triggers.get(n, 0)]
    warn, err = cfg.pair("trigger_rate", "warning"), cfg.pair("trigger_rate", "error")
    z, min_dur = cfg.num("trigger_rate", "z"), cfg.num("trigger_rate", "min_duration")
    threshold = {"warning": list(warn), "error": list(err), "z": z}
    out = []
    for name in names:
        n, m = int(run.triggers.get(name, 0)), int(ref.triggers.get(name, 0))
        if min(run.duration, ref.duration) < min_dur:
            out.append(Result(f"trigger_rate:{name}", "too_few", None, None, threshold,
                              {"reason": f"run or reference shorter than {min_dur:g} s",
                               "duration": run.duration, "reference_duration": ref.duration}))
            continue
        rate, ref_rate = n / run.duration, m / ref.duration
        ratio = rate / ref_rate if ref_rate else (math.inf if rate else 1.0)
        z_up, z_down = excess_z(n, m, run.duration, ref.duration)
        significant = max(float(z_up), float(z_down)) >= z
        status = "good"
        if significant and not err[0] <= ratio <= err[1]:
            status = "error"
        elif significant and not warn[0] <= ratio <= warn[1]:
            status = "warning"
        else:
            # Could a change to the warning band's edge be seen at z sigma?
            expect = max(m * run.duration / ref.duration, 1e-9)
            sigma = math.sqrt(1 / expect + 1 / max(m, 1e-9))
            if z * sigma > min(abs(math.log(warn[0])), math.log(warn[1])):
                status = "too_few"
        out.append(Result(f"trigger_rate:{name}", status, rate, ref_rate, threshold,
                          {"ratio": _clean(ratio), "z": _clean(max(float(z_up), float(z_down))),
                           "events": n, "reference_events": m, "duration": run.duration,
                           "reference_duration": ref.duration}))
    return out


def _merged(a: np.ndarray, b: np.ndarray, min_count: float) -> tuple[np.ndarray, np.ndarray]:
    """Merge neighbouring bins until every merged bin holds >= *min_count* events of a + b."""
    total = a + b
    keep = total > 0
    a, b, total = a[keep], b[keep], total[keep]
    if not len(total):
        return a, b
    group = np.floor_divide(np.cumsum(total) - 1, max(min_count, 1)).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ma, mb = np.add.reduceat(a, starts), np.add.reduceat(b, starts)
    if len(ma) > 1 and ma[-1] + mb[-1] < min_count:  # a short last group joins the one before
        ma[-2] += ma[-1]
        mb[-2] += mb[-1]
        ma, mb = ma[:-1], mb[:-1]
    return ma, mb


def nhit_distribution(run: RunData, ref: RunData, cfg: Config) -> Result:
    """``nhit_distribution``: the run's normalized nhit histogram against the reference's.

    χ² test of homogeneity on the 2 x k table (bins merged to hold at least
    ``min_bin_events``) for significance, and the Kolmogorov distance D of
    the two cumulative distributions for size: flagged when both pass.
    """
    c = "nhit_distribution"
    trig = cfg.get(c, "trigger")
    a = np.asarray(run.nhit_hist.get(trig, np.zeros(1)), np.float64)
    b = np.asarray(ref.nhit_hist.get(trig, np.zeros(1)), np.float64)
    width = max(len(a), len(b))
    a, b = np.pad(a, (0, width - len(a))), np.pad(b, (0, width - len(b)))
    na, nb = a.sum(), b.sum()
    dw, de = cfg.num(c, "d_warning"), cfg.num(c, "d_error")
    pw, pe = cfg.num(c, "p_warning"), cfg.num(c, "p_error")
    threshold = {"warning": dw, "error": de, "p_warning": pw, "p_error": pe}
    detail = {"trigger": trig, "events": int(na), "reference_events": int(nb)}
    if na == 0 or nb == 0:
        return Result(c, "too_few", None, None, threshold, {**detail, "reason": f"no {trig} events"})
    d = float(np.abs(np.cumsum(a) / na - np.cumsum(b) / nb).max())
    ma, mb = _merged(a, b, cfg.num(c, "min_bin_events"))
    if len(ma) > 1:
        chi2, p, ndf, _ = stats.chi2_contingency(np.vstack([ma, mb]), correction=False)
    else:
        chi2, p, ndf = 0.0, 1.0, 0
    detail.update({"p_value": float(p), "chi2": float(chi2), "ndf": int(ndf),
                   "mean": float((a * (np.arange(width) * NHIT_BIN + NHIT_BIN / 2)).sum() / na),
                   "reference_mean": float((b * (np.arange(width) * NHIT_BIN + NHIT_BIN / 2)).sum() / nb)})
    if p < pe and d > de:
        status = "error"
    elif p < pw and d > dw:
        status = "warning"
    else:
        # Smallest D the KS test could see at p_warning with these sample sizes.
        d_crit = math.sqrt(-math.log(pw / 2) / 2) * math.sqrt((na + nb) / (na * nb))
        detail["d_resolvable"] = d_crit
        status = "too_few" if d_crit > dw else "good"
    return Result(c, status, d, 0.0, threshold, detail)


def _decidable(n2_typical: float, a: float, b: float, ratio: float, z: float, hot: bool) -> bool:
    """Could a typical unit with reference count *n2_typical* be found hot (dead) at *ratio*?"""
    if n2_typical <= 0:
        return False
    expect = n2_typical * a / b
    n = math.ceil(ratio * expect) if hot else math.floor(ratio * expect)
    up, down = excess_z(n, round(n2_typical), a, b)
    return float(up if hot else down) >= z


def occupancy(run: RunData, ref: RunData, cfg: Config, flagged=frozenset()) -> list[Result]:
    """``occupancy_hot``, ``occupancy_dead``, ``dead_card``, ``dead_crate``.

    Hits per channel (card, crate) against the reference scaled by the ratio
    of events.  Hot: at least ``hot_ratio`` times the expected hits at ``z``
    sigma; dead: at most ``dead_ratio`` times at ``z`` sigma.  Channels of a
    dead card and cards of a dead crate are reported once, at the highest
    level.  Channels in *flagged* (the channel-status database) are listed
    under ``known`` and do not count.
    """
    names = ("occupancy_hot", "occupancy_dead", "dead_card", "dead_crate")
    z, hot_r = cfg.num("occupancy", "z"), cfg.num("occupancy", "hot_ratio")
    dead_r = cfg.num("occupancy", "dead_ratio")
    a, b = float(run.events), float(ref.events)
    if a <= 0 or b <= 0:
        return [Result(n, "too_few", None, None, {}, {"reason": "no events in the run or its reference",
                                                     "channels": [], "cards": [], "crates": []}) for n in names]
    n1 = np.asarray(run.channel_hits, np.int64)
    n2 = np.asarray(ref.channel_hits, np.int64)
    flagged_mask = _flag_mask(flagged)

    def units(x1, x2, hot):
        up, down = excess_z(x1, x2, a, b)
        expect = x2 * a / b
        if hot:
            return (up >= z) & (x1 >= hot_r * expect)
        return (down >= z) & (x1 <= dead_r * expect)

    def typical(x2):
        live = x2[x2 > 0]
        return float(np.median(live)) if len(live) else 0.0

    crate1, crate2 = n1.reshape(NCRATES, -1).sum(1), n2.reshape(NCRATES, -1).sum(1)
    card1, card2 = n1.reshape(NCRATES * NCARDS, NCHANNELS).sum(1), n2.reshape(NCRATES * NCARDS, NCHANNELS).sum(1)
    dead_crates = np.flatnonzero(units(crate1, crate2, False))
    dead_cards = units(card1, card2, False)
    dead_cards[(dead_crates[:, None] * NCARDS + np.arange(NCARDS)).ravel()] = False
    in_dead_card = np.repeat(dead_cards | np.isin(np.arange(NCRATES * NCARDS) // NCARDS, dead_crates), NCHANNELS)
    hot = units(n1, n2, True)
    dead = units(n1, n2, False) & ~in_dead_card
    card_flagged = flagged_mask.reshape(-1, NCHANNELS).all(1)

    def result(name, known, unit_key, items, typical2, hot_kind, ratio):
        count = len(items)
        threshold = {"warning": cfg.num(name, "warning"), "error": cfg.num(name, "error"), "z": z,
                     "ratio": ratio}
        detail = {unit_key: items, "known": known, "events": int(a), "reference_events": int(b)}
        status = _count_status(count, cfg, name)
        if status is None:
            ok = _decidable(typical2, a, b, ratio, z, hot_kind)
            detail["decidable"] = ok
            status = "good" if ok else "too_few"
        return Result(name, status, count, 0, threshold, detail)

    typ_ch, typ_card, typ_crate = (typical(x) for x in (n2, card2, crate2))
    out = [
        result("occupancy_hot", np.flatnonzero(hot & flagged_mask).tolist(), "channels",
               np.flatnonzero(hot & ~flagged_mask).tolist(), typ_ch, True, hot_r),
        result("occupancy_dead", np.flatnonzero(dead & flagged_mask).tolist(), "channels",
               np.flatnonzero(dead & ~flagged_mask).tolist(), typ_ch, False, dead_r),
        result("dead_card",
               [{"crate": int(i // NCARDS), "card": int(i % NCARDS)} for i in np.flatnonzero(dead_cards & card_flagged)],
               "cards", [{"crate": int(i // NCARDS), "card": int(i % NCARDS)}
                         for i in np.flatnonzero(dead_cards & ~card_flagged)], typ_card, False, dead_r),
        result("dead_crate", [], "crates", dead_crates.tolist(), typ_crate, False, dead_r),
    ]
    return out


def _outliers(name: str, values: np.ndarray, bad: np.ndarray, cfg: Config, flagged_mask: np.ndarray,
              threshold: dict, expected, what: str) -> Result:
    """A per-channel outlier check's Result (known-flagged channels apart)."""
    valid = ~np.isnan(values)
    if not valid.any():
        return Result(name, "too_few", None, expected, threshold,
                      {"channels": [], "known": [], "readings": 0, "reason": f"no {what} readings during the run"})
    found = np.flatnonzero(bad & ~flagged_mask).tolist()
    known = np.flatnonzero(bad & flagged_mask).tolist()
    status = _count_status(len(found), cfg, name) or "good"
    threshold = {**threshold, "warning": cfg.num(name, "warning"), "error": cfg.num(name, "error")}
    return Result(name, status, len(found), expected, threshold,
                  {"channels": found, "known": known, "readings": int(valid.sum()),
                   "values": {str(i): _clean(values[i]) for i in found[:100]}})


def _flag_mask(flagged) -> np.ndarray:
    mask = np.zeros(NCHANNELS_TOTAL, bool)
    fl = np.fromiter((int(x) for x in flagged), np.int64)
    mask[fl[(fl >= 0) & (fl < NCHANNELS_TOTAL)]] = True
    return mask


def cmos_outliers(run: RunData, cfg: Config, flagged=frozenset()) -> Result:
    """``cmos_outliers``: screamers, channels whose mean CMOS rate exceeds ``screamer_hz``."""
    limit = cfg.num("cmos_outliers", "screamer_hz")
    values = np.asarray(run.cmos, np.float64)
    with np.errstate(invalid="ignore"):
        bad = values > limit
    return _outliers("cmos_outliers", values, bad, cfg, _flag_mask(flagged), {"screamer_hz": limit}, 0, "CMOS")


def base_outliers(run: RunData, cfg: Config, flagged=frozenset()) -> Result:
    """``base_outliers``: channels whose mean base current is ``max_deviation`` from the median."""
    dev = cfg.num("base_outliers", "max_deviation")
    values = np.asarray(run.base, np.float64)
    median = float(np.nanmedian(values)) if (~np.isnan(values)).any() else None
    with np.errstate(invalid="ignore"):
        bad = np.abs(values - (median or 0.0)) > dev
    return _outliers("base_outliers", values, bad, cfg, _flag_mask(flagged), {"max_deviation": dev},
                     median, "base-current")


def integrity(run: RunData, cfg: Config) -> Result:
    """``integrity``: losses (missing GTIDs, corrupt records, dropped and unaccounted
    events) as a fraction of the run's events, orphans, GTID jumps and bad hits."""
    c = "integrity"
    k = {key: int(v) for key, v in run.integrity.items()}
    lost = k.get("gtid_missing", 0) + k.get("corrupt", 0) + k.get("dropped", 0) + k.get("unaccounted", 0)
    events = max(run.events, 0)
    threshold = {key: cfg.num(c, key) for key in DEFAULTS[c]}
    if events == 0 and not lost:
        return Result(c, "too_few", None, 0, threshold, {**k, "reason": "no events"})
    frac = lost / max(events + lost, 1)
    orphans = k.get("orphans", 0) / max(events + k.get("orphans", 0), 1)
    bad_hits = k.get("bad_hits", 0) / max(k.get("hits", 0), 1)
    states, reasons = [], []
    for label, value, warn, err in (("lost", frac, threshold["lost_warning"], threshold["lost_error"]),
                                    ("orphans", orphans, threshold["orphans_warning"], threshold["orphans_error"]),
                                    ("bad_hits", bad_hits, threshold["bad_hits_warning"], math.inf),
                                    ("gtid_jumps", k.get("gtid_jumps", 0), threshold["jumps_warning"], math.inf)):
        if value >= err:
            states.append("error")
            reasons.append(f"{label} {value:.3g} >= {err:g}")
        elif value >= warn and value > 0:
            states.append("warning")
            reasons.append(f"{label} {value:.3g} >= {warn:g}")
    return Result(c, worst(states), frac, 0, threshold,
                  {**k, "lost": lost, "orphan_fraction": orphans, "reasons": reasons})


# ------------------------------------------------------------------- a report

def evaluate(run: RunData, ref: RunData | None, cfg: Config, flagged=frozenset()) -> dict:
    """Every check that applies to the run's type; the ``minard dq --json`` object.

    ``{"run", "reference", "status", "checks": [...]}``; checks against a
    reference are ``too_few`` when there is none.
    """
    rt = run.run_type
    checks: list[Result] = []
    none = RunData(run=-1)
    if cfg.applies("trigger_rate", rt):
        if ref is None:
            checks.append(Result("trigger_rate:TOTAL", "too_few", None, None, {},
                                 {"reason": "no reference run"}))
        else:
            checks.extend(trigger_rates(run, ref, cfg))
    if cfg.applies("nhit_distribution", rt):
        checks.append(nhit_distribution(run, ref or none, cfg))
    occ = occupancy(run, ref or none, cfg, flagged)
    checks.extend(r for r in occ if cfg.applies(r.name, rt) and cfg.applies("occupancy", rt))
    if ref is None:
        for r in checks:
            if r.status == "too_few":
                r.detail["reason"] = "no reference run"
    if cfg.applies("cmos_outliers", rt):
        checks.append(cmos_outliers(run, cfg, flagged))
    if cfg.applies("base_outliers", rt):
        checks.append(base_outliers(run, cfg, flagged))
    if cfg.applies("integrity", rt):
        checks.append(integrity(run, cfg))
    return {"run": run.run, "reference": None if ref is None else ref.run,
            "status": worst(r.status for r in checks), "checks": [r.as_dict() for r in checks]}
