"""Benchmark of the dispatch stream across hosts (network namespaces), issue 18.

All in the same run, as real processes in namespaces on one bridge
(:class:`minard.testing.multihost.MultiHostStack`: dispatcher, push, pools and
Redis each on its own "host", every link real TCP):

1. **one host vs two**: a synthetic run replayed at full speed, consumed by one
   pool of ``W`` workers on one host (the baseline), then by two pools of
   ``W/2`` workers on two hosts (same number of workers).  events/s = records
   processed / seconds from the first record sent to the last one stored.  The
   two layouts alternate, ``--rounds`` times each; the best round of each is
   reported, with the ratio two hosts / one host.
2. **failover gap** (``--failover``, needs the Sentinel support of
   ``minard.store.connection``): a primary, a replica and three Sentinels on the
   data host; a run replayed at a fixed rate; the primary killed with SIGKILL.
   The gap is the time from the kill until the pipeline's counters in Redis
   move again (polled every 50 ms through the new primary); goal <= 5 s,
   interface limit 30 s.  Records lost in the switch are printed (stored +
   counted losses must equal the records sent).

Run as root (namespaces): ``.venv/bin/python bench/multihost.py [--events N] [--failover]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from minard.store import status
from minard.store.runs import get_run
from minard.testing import export_dispatcher_keys, netns, wait_for
from minard.testing.multihost import MultiHostStack


def synthetic_run(path: Path, n: int, run: int) -> Path:
    """A ZDAB file of *n* events of run *run* (the tests' generator)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.pipeline.test_dispatch_stream import synthetic

    return synthetic(path, n=n, run=run, mean_nhit=30)


def processed(stack: MultiHostStack) -> int:
    """Records the pools have stored or counted (pull processed + errors + dropped)."""
    pull = status.stats(stack.redis()).get("pull", {})
    return pull.get("processed", 0) + pull.get("errors", 0) + pull.get("dropped", 0)


def throughput(directory: Path, path: Path, n: int, pools: tuple[str, ...], workers: int) -> float:
    """events/s of one replay of *path* through *pools* with *workers* workers each."""
    with MultiHostStack(directory, dispatch_workers=workers, dispatch_max_total_workers=workers) as stack:
        stack.start(pools=pools)
        t0 = time.monotonic()
        stack.replay(path)
        wait_for(lambda: processed(stack) >= n, 300, f"{n} records through {pools}", interval=0.05)
        return n / (time.monotonic() - t0)


def failover(directory: Path, path: Path, n: int, rate: float) -> dict:
    """Kill the primary in the middle of a paced replay; the gap and the accounting."""
    with MultiHostStack(directory, ha=True, dispatch_workers=2) as stack:
        stack.start(pools=("poola",))
        replay = stack.replay(path, "--rate", str(rate), wait=False)
        wait_for(lambda: processed(stack) > n // 4, 120, "a quarter of the run stored")
        gap = stack.fail_over(30, interval=0.05)
        replay.wait(300)
        wait_for(lambda: processed(stack) >= n, 120, "the run through the pool")
        st = status.stats(stack.redis())
        stored = get_run(stack.redis(), 4900) or {}
        records = stored.get("events", 0) + stored.get("orphans", 0)
        lost = st.get("redis", {}).get("errors", 0) + st.get("pull", {}).get("errors", 0) \
            + st.get("pull", {}).get("dropped", 0) + st.get("push", {}).get("dropped", 0)
        return {"gap_s": gap, "stored": records, "lost": lost, "sent": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=30000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--failover", action="store_true", help="also measure the Sentinel failover gap")
    args = parser.parse_args()
    reason = netns.available()
    if reason:
        raise SystemExit(f"cannot create network namespaces: {reason}")
    tmp = Path(tempfile.mkdtemp(prefix="minard-bench-multihost-"))
    export_dispatcher_keys(tmp / "keys")
    path = synthetic_run(tmp / "run.zdab", args.events, 4800)
    half = max(1, args.workers // 2)
    one, two = [], []
    for i in range(args.rounds):
        one.append(throughput(tmp / f"one{i}", path, args.events, ("poola",), args.workers))
        two.append(throughput(tmp / f"two{i}", path, args.events, ("poola", "poolb"), half))
        print(f"round {i + 1}: one host {one[-1]:,.0f} events/s, two hosts {two[-1]:,.0f} events/s")
    print(f"one host ({args.workers} workers): {max(one):,.0f} events/s (baseline)")
    print(f"two hosts ({half}+{half} workers): {max(two):,.0f} events/s")
    print(f"ratio two hosts / one host: {max(two) / max(one):.2f}")
    if args.failover:
        fpath = synthetic_run(tmp / "failover.zdab", 12000, 4900)
        result = failover(tmp / "failover", fpath, 12000, rate=2000)
        print(f"failover gap: {result['gap_s']:.2f} s (goal <= 5 s, limit 30 s); "
              f"stored {result['stored']} + counted lost {result['lost']} = "
              f"{result['stored'] + result['lost']} of {result['sent']} sent")


if __name__ == "__main__":
    main()
