"""False-positive rate of the data-quality checks (issue 16).

Writes a reference run and N clean runs with different seeds (20 000 events
each at 1 kHz, no faults) into a throwaway redis-server through the pull
worker's aggregation and writers (minard.testing.dq), judges every clean run
against the reference with conf/dq.cfg, and prints how many checks went to
warning and to error (goal: none to error, at most one warning in all runs).
As a baseline measured in the same run, it also judges a run with a hot
channel, a dead card and a changed trigger mix and prints what it flagged:
the checks must find those and only those.  The baseline, measured on the
same runs, is a naive configuration (:data:`NAIVE`: per-channel 3 sigma
without a ratio cut, 5 % rate bands at 2 sigma, nhit p < 0.01 without a
size cut); the script prints the ratio of false positives naive / ours.

    PYTHONPATH=. python bench/dq_false_positives.py [--runs 20] [--events 20000]
"""

from __future__ import annotations

import time
from collections import Counter

import click
import redis as redis_py

from minard.analysis import dq
from minard.config import ROOT
from minard.simulate.events import Faults
from minard.store import dq as store_dq
from minard.testing import RedisServer
from minard.testing.dq import write_run

REFERENCE_SEED = 1000
#: The baseline: what a check without trial-factor and effect-size guards flags.
NAIVE = """
[occupancy]
z = 3
hot_ratio = 1
dead_ratio = 1
[trigger_rate]
z = 2
warning = 0.95 1.05
[nhit_distribution]
d_warning = 0
p_warning = 0.01
"""
HOT, DEAD_CARD, SCALE = 1234, (3, 7), {"PULGT": 3.0, "20LB": 0.5}


def flagged(report: dict) -> list[tuple[str, str]]:
    """(check, state) of every check at warning or error."""
    return [(c["name"], c["status"]) for c in report["checks"] if c["status"] in ("warning", "error")]


@click.command()
@click.option("--runs", type=click.IntRange(1, 200), default=20, show_default=True)
@click.option("--events", type=click.IntRange(1000), default=20000, show_default=True)
def main(runs, events):
    """Count false positives over RUNS clean runs against one reference."""
    cfg = dq.load_config(path=ROOT / "conf" / "dq.cfg")
    naive_cfg = dq.load_config(text=NAIVE)
    naive = 0
    with RedisServer() as server:
        r = redis_py.Redis.from_url(server.url)
        t0 = time.time() - 7200
        write_run(r, REFERENCE_SEED, events, 1, t0)
        states = Counter()
        warnings, errors = [], []
        spent = 0.0
        for i in range(runs):
            run = 100 + i
            write_run(r, i + 1, events, run, t0 + 60 * (i + 1))
            start = time.perf_counter()
            report = store_dq.compute(r, run, cfg, reference=1)
            spent += time.perf_counter() - start
            naive += len(flagged(store_dq.compute(r, run, naive_cfg, reference=1, store=False)))
            states.update(c["status"] for c in report["checks"])
            for name, state in flagged(report):
                (errors if state == "error" else warnings).append((run, name))
        write_run(r, 99, events, 99, t0 + 60 * (runs + 2), faults=Faults(hot_channel=HOT, dead_cards=(DEAD_CARD,)),
                  trigger_scale=SCALE)
        fault = store_dq.compute(r, 99, cfg, reference=1)
    total = sum(states.values())
    print(f"clean runs: {runs} x {events} events against reference seed {REFERENCE_SEED}")
    print(f"checks evaluated: {total}; by state: {dict(sorted(states.items()))}")
    print(f"warnings: {len(warnings)} {warnings}")
    print(f"errors:   {len(errors)} {errors}")
    print(f"false-positive rate: {(len(warnings) + len(errors)) / max(total, 1):.2e} per check "
          f"(goal: 0 errors, <= 1 warning in {runs} runs): {'MET' if not errors and len(warnings) <= 1 else 'MISSED'}")
    ours = len(warnings) + len(errors)
    print(f"baseline (naive thresholds, same runs): {naive} checks at warning/error; "
          f"ratio naive/ours = {naive / max(ours, 1):.0f}x{' (ours: 0, shown as /1)' if not ours else ''}")
    print(f"faulty run (hot {HOT}, dead card {DEAD_CARD}, scale {SCALE}) flagged: {flagged(fault)}")
    print(f"mean time per judgement: {spent / runs * 1000:.1f} ms")


if __name__ == "__main__":
    main()
