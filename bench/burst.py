"""Benchmark: cost of the supernova burst search in a dispatch pull worker.

Feeds the same simulated run (as the push's wire messages, with a burst) to
a real PullHandler on a private redis-server twice: with the burst search
off (an nhit threshold no event reaches: the baseline) and on (the default
``burst_nhit_threshold`` and ``burst_windows``).  The worker flushes after
every ``--flush-every`` messages, as its once-a-second flush would at the
run's rate.  Each is run ``--repeat`` times, interleaved, and the best run
counts (the machine is shared).  Prints events/s of both, their ratio, and
the time per flush.
Not a test; runs in about a minute:

    .venv/bin/python bench/burst.py [--events 200000] [--rate 1000] [--flush-every 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minard import config
from minard.formats import wire
from minard.formats.pmt import pack_dispatch
from minard.pipeline.dispatch_pull import PullHandler
from minard.simulate.events import Faults, generate_batches
from minard.store import schema
from minard.testing import RedisServer


def messages(n: int, rate: float) -> list:
    """The run as wire messages of 1000 records (burst of 10 000 events in 10 ms at 60 %)."""
    faults = Faults(burst=(int(n * 0.6), 0.01, 1e6))
    out = []
    for buf, offsets, lengths in generate_batches(7, n, rate_hz=rate, faults=faults, batch_size=1000):
        recs = [pack_dispatch(buf[o:o + k]) for o, k in zip(offsets.tolist(), lengths.tolist())]
        out.append(wire.encode("pmt", recs, {"sent": time.time()}))
    return out


def run(url: str, msgs: list, threshold: int, flush_every: int) -> tuple[float, np.ndarray, int]:
    """(events/s, seconds per flush, bursts found) of one worker over *msgs*."""
    import redis

    r = redis.Redis.from_url(url)
    r.flushall()
    cfg = {**config.DEFAULTS, "redis_url": url, "burst_nhit_threshold": threshold, "burst_min_background": 10.0}
    h = PullHandler(cfg)
    h.first_batch = False
    flushes = []
    t0 = time.perf_counter()
    for k, frames in enumerate(msgs):
        h.process(frames)
        if k % flush_every == flush_every - 1:
            f0 = time.perf_counter()
            h.flush(time.time())
            flushes.append(time.perf_counter() - f0)
    h.flush(time.time())
    elapsed = time.perf_counter() - t0
    found = r.zcard(schema.BURSTS_INDEX)
    return len(msgs) * 1000 / elapsed, np.array(flushes), found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--rate", type=float, default=1000.0, help="simulated event rate (Hz)")
    ap.add_argument("--flush-every", type=int, default=1, help="messages (of 1000 events) per flush")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved; the best counts")
    args = ap.parse_args()
    msgs = messages(args.events, args.rate)
    best = {}
    with RedisServer() as server:
        for _ in range(args.repeat):  # interleaved, so load from other processes hits both alike
            for name, threshold in (("base", 1 << 16), ("on", int(config.DEFAULTS["burst_nhit_threshold"]))):
                result = run(server.url, msgs, threshold, args.flush_every)
                if name not in best or result[0] > best[name][0]:
                    best[name] = result
    (base, fb, _), (on, fo, found) = best["base"], best["on"]
    print(f"events: {args.events} at {args.rate:g} Hz, flush every {args.flush_every * 1000} events")
    print(f"baseline (search off): {base:12,.0f} events/s   flush mean {fb.mean() * 1e3:6.1f} ms  max {fb.max() * 1e3:6.1f} ms")
    print(f"burst search on:       {on:12,.0f} events/s   flush mean {fo.mean() * 1e3:6.1f} ms  max {fo.max() * 1e3:6.1f} ms")
    print(f"ratio on/baseline: {on / base:.3f}   bursts found: {found} (one injected)")


if __name__ == "__main__":
    main()
