"""Data-quality storage: a run's check inputs, its results, run types and reference runs.

Keys (docs/dq.md, docs/storage.md):

* ``dq:result:<run>`` string: the latest report of the run (the JSON object
  of ``minard dq --json``, plus ``final``, ``time`` and ``run_type``), kept
  :data:`~minard.store.runs.RUN_KEEP`;
* ``dq:status`` hash: run -> status of its latest report (for the runs list);
* ``dq:run_type`` hash: run -> run type (absent = no type);
* ``dq:reference`` hash: run type (``none`` for runs without one) -> the
  reference run an expert chose.

A run's check inputs (:func:`run_data`) come from its summary (``{run:<run>}``
and its parts, written by every pull worker's flush) and, for the CMOS and
base-current checks, from the per-channel ORCA series over the run's time
window; nothing is read from events.
"""

from __future__ import annotations

import json
import time

import numpy as np

from minard import config as config_mod
from minard.analysis import dq
from minard.analysis.aggregate import NAMES, NHIT_BIN, NHIT_BINS
from minard.formats.pmt import TRIGGER_NAMES
from minard.store import registry, schema
from minard.store import timeseries as ts
from minard.store.runs import (
    ACCT,
    CLOCK_END_KEY,
    CLOCK_START_KEY,
    END_KEY,
    RUN_KEEP,
    START_KEY,
    UNACCOUNTED_AFTER,
    accounting,
    records_seen,
    run_key,
)

RESULT_KEY = schema.DQ_RESULT.template
STATUS_KEY = schema.DQ_STATUS
RUN_TYPE_KEY = schema.DQ_RUN_TYPE
REFERENCE_KEY = schema.DQ_REFERENCE


def load_config(cfg) -> dq.Config:
    """The checks of ``dq_file`` (relative to the project root)."""
    path = config_mod.ROOT / str(cfg["dq_file"]) if not str(cfg["dq_file"]).startswith("/") else cfg["dq_file"]
    return dq.load_config(path=path)


def run_type(redis, run: int) -> str:
    """The run's type (``""`` if it has none)."""
    raw = redis.hget(RUN_TYPE_KEY, str(int(run)))
    return raw.decode() if raw else ""


def set_run_type(redis, run: int, kind: str) -> None:
    """Record the type of *run* (empty removes it)."""
    if kind:
        redis.hset(RUN_TYPE_KEY, str(int(run)), kind)
    else:
        redis.hdel(RUN_TYPE_KEY, str(int(run)))


def set_reference(redis, kind: str, run: int | None) -> None:
    """Make *run* the reference of runs of type *kind* (None: automatic again)."""
    field = kind or dq.NO_TYPE
    if run is None:
        redis.hdel(REFERENCE_KEY, field)
    else:
        redis.hset(REFERENCE_KEY, field, str(int(run)))


def references(redis) -> dict[str, int]:
    """Run type -> reference run chosen by an expert."""
    return {k.decode(): int(v) for k, v in redis.hgetall(REFERENCE_KEY).items()}


def choose_reference(redis, run: int, kind: str) -> int | None:
    """The reference of *run*: the expert's choice for its type, else the most
    recent other run of the same type signed ``pass`` (then ``good``)."""
    chosen = redis.hget(REFERENCE_KEY, kind or dq.NO_TYPE)
    if chosen is not None and int(chosen) != int(run):
        return int(chosen)
    states = registry.states(redis)
    types = {int(k): v.decode() for k, v in redis.hgetall(RUN_TYPE_KEY).items()}
    for wanted in ("pass", "good"):
        runs = [r for r, s in states.items() if s["state"] == wanted and r != int(run)
                and types.get(r, "") == (kind or "")]
        if runs:
            starts = {r: redis.zscore(START_KEY, str(r)) or 0.0 for r in runs}
            return max(runs, key=lambda r: (starts[r], r))
    return None


def _hist(fields: dict, trigger: str) -> np.ndarray:
    """The (201,) nhit histogram of *trigger* from ``<NAME>:<lo>`` fields."""
    out = np.zeros(NHIT_BINS, np.int64)
    prefix = trigger + ":"
    for k, v in fields.items():
        if k.startswith(prefix):
            lo = k[len(prefix):]
            if lo.isdigit():
                out[min(int(lo) // NHIT_BIN, NHIT_BINS - 1)] += int(v)
    return out


def _duration(start, end, clock_start, clock_end) -> float:
    """The run's span in seconds: by its 10 MHz clock (independent of how fast
    it was replayed), or by arrival times if the clock span is not positive
    (a clock wrap or no clock)."""
    if clock_start is not None and clock_end is not None and clock_end > clock_start:
        return (clock_end - clock_start) / 1e7
    if start is not None and end is not None:
        return float(end - start)
    return 0.0


def run_data(redis, run: int, now: float | None = None, final: bool = False) -> dq.RunData | None:
    """The check inputs of *run* from Redis, or None if the run is unknown.

    The dispatcher's accounting of the run (``{run:<run>}:acct``) adds its
    counted losses (``dropped``) and, for a *final* judgement or a run whose
    last event is older than :data:`UNACCOUNTED_AFTER` s, ``unaccounted``.
    """
    run = int(run)
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(run_key(run))
    pipe.hgetall(run_key(run, "nhit_trig"))
    pipe.get(run_key(run, "channels"))
    pipe.zscore(START_KEY, str(run))
    pipe.zscore(END_KEY, str(run))
    pipe.hget(RUN_TYPE_KEY, str(run))
    pipe.zscore(CLOCK_START_KEY, str(run))
    pipe.zscore(CLOCK_END_KEY, str(run))
    pipe.hgetall(run_key(run, ACCT))
    head, nhit, channels, start, end, kind, clock_start, clock_end, acct = pipe.execute()
    if not head and start is None:
        return None
    head = {k.decode(): int(v) for k, v in head.items()}
    nhit = {k.decode(): int(v) for k, v in nhit.items()}
    data = dq.RunData(run=run, events=head.get("events", 0), duration=_duration(start, end, clock_start, clock_end),
                      run_type=kind.decode() if kind else "",
                      triggers={n: head.get(f"trig:{n}", 0) for n in TRIGGER_NAMES},
                      nhit_hist={n: _hist(nhit, n) for n in {t.split(":", 1)[0] for t in nhit} & set(NAMES)},
                      channel_hits=ts._array(channels, ">u4").astype(np.int64))
    prefix = schema.RUN_DQ_FIELD.format(name="")
    data.integrity = {k[len(prefix):]: v for k, v in head.items() if k.startswith(prefix)}
    data.integrity.update(orphans=head.get("orphans", 0), hits=head.get("hits", 0))
    now = time.time() if now is None else now
    acct = accounting({k.decode(): int(v) for k, v in acct.items()}, records_seen(head))
    if acct["source_events"] is not None:
        data.integrity["dropped"] = acct["dropped"]
        # Events in flight are not lost: unaccounted counts once the run is over.
        if final or (end is not None and now - end > UNACCOUNTED_AFTER):
            data.integrity["unaccounted"] = acct["unaccounted"]
    if start is not None and end is not None:
        data.cmos, _ = ts.read_values(redis, "cmos", start, max(end, start), now=now)
        data.base, _ = ts.read_values(redis, "base", start, max(end, start), now=now)
    return data


def compute(redis, run: int, dq_cfg: dq.Config, reference: int | None = None,
            final: bool = False, now: float | None = None, store: bool = True) -> dict | None:
    """Judge *run* (against *reference*, or the chosen one), store and return the report.

    None if the run is unknown.  An explicit *reference* that is unknown is
    an error (ValueError).
    """
    from minard.store import channel_status as channels

    data = run_data(redis, run, now, final)
    if data is None:
        return None
    ref_no = reference if reference is not None else choose_reference(redis, run, data.run_type)
    ref = run_data(redis, ref_no, now) if ref_no is not None else None
    if reference is not None and ref is None:
        raise ValueError(f"reference run {reference} is not known")
    report = dq.evaluate(data, ref, dq_cfg, channels.flagged(redis))
    report.update(final=bool(final), time=time.time() if now is None else now, run_type=data.run_type)
    if store:
        save(redis, report)
    return report


def save(redis, report: dict) -> None:
    """Store *report* as the run's latest result."""
    run = int(report["run"])
    pipe = redis.pipeline(transaction=True)
    pipe.set(RESULT_KEY.format(run=run), json.dumps(report), ex=RUN_KEEP)
    pipe.hset(STATUS_KEY, str(run), report["status"])
    pipe.execute()


def result(redis, run: int) -> dict | None:
    """The stored report of *run*, or None."""
    raw = redis.get(RESULT_KEY.format(run=int(run)))
    return json.loads(raw) if raw else None


def statuses(redis) -> dict[int, str]:
    """Run -> status of its latest stored report."""
    return {int(k): v.decode() for k, v in redis.hgetall(STATUS_KEY).items()}


def overlay(redis, run: int, reference: int | None) -> dict | None:
    """Run against reference for the pages' overlays: trigger rates (Hz), the
    normalized nhit histogram of the compared trigger and the per-channel
    occupancy ratio (run / reference, None where the reference has no hits)."""
    data = run_data(redis, run)
    if data is None:
        return None
    ref = run_data(redis, reference) if reference is not None else None
    trig_name = "100L"
    stored = result(redis, run)
    for c in (stored or {}).get("checks", []):
        if c["name"] == "nhit_distribution":
            trig_name = c["detail"].get("trigger", trig_name)

    def rates(d):
        return {n: (c / d.duration if d.duration > 0 else None) for n, c in d.triggers.items()}

    def norm(d):
        h = np.asarray(d.nhit_hist.get(trig_name, np.zeros(NHIT_BINS)), np.float64)
        return (h / h.sum()).round(6).tolist() if h.sum() else [0.0] * NHIT_BINS

    out = {"run": int(run), "reference": reference, "triggers": {}, "nhit": {
        "trigger": trig_name, "bins": [i * NHIT_BIN for i in range(NHIT_BINS)], "run": norm(data),
        "reference": norm(ref) if ref else None}, "occupancy_ratio": None}
    run_rates, ref_rates = rates(data), rates(ref) if ref else {}
    for n in TRIGGER_NAMES:
        if data.triggers.get(n) or (ref and ref.triggers.get(n)):
            out["triggers"][n] = {"run": run_rates.get(n), "reference": ref_rates.get(n)}
    if ref is not None and data.events and ref.events:
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = (data.channel_hits / data.events) / (ref.channel_hits / ref.events)
        out["occupancy_ratio"] = [None if not np.isfinite(x) else round(float(x), 4) for x in ratio]
    return out
