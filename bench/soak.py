"""Soak test: the whole stack (``minard up``) for N minutes at a set event rate.

    .venv/bin/python bench/soak.py               # 10 minutes at 1000 events/s
    .venv/bin/python bench/soak.py --minutes 1   # a quick run

Starts the stack on free ports in a temporary directory, replays at
``--rate`` events/s, samples every ``--interval`` seconds and reports:

* CPU per program (all processes of its group, e.g. a pool and its workers),
* RSS per program over time: first, last, max and growth from the first
  quarter to the last quarter of the run (a leak shows as steady growth),
* Redis memory and keys,
* loss counters per stage (dropped + errors, expected to stay zero),
* consumer lag (max over the run).

The stack is stopped with ``minard down`` at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis as redis_py

from minard import config
from minard import stack as stack_mod
from minard.store import status
from minard.testing.stack import stack_env

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_sample(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, RSS bytes) of one process, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICK, rss


def program_sample(lay) -> dict[str, dict]:
    """Per program: CPU seconds of its live processes (by pid) and their total RSS."""
    out = {}
    for name, pgid in stack_mod.recorded_groups(lay).items():
        cpu, rss = {}, 0
        for pid in stack_mod.group_pids(pgid):
            s = proc_sample(pid)
            if s:
                cpu[pid] = s[0]
                rss += s[1]
        out[name] = {"cpu": cpu, "rss": rss}
    return out


def cpu_percent(prev: dict, cur: dict, dt: float) -> dict[str, float]:
    """CPU % per program between two samples (processes present in both)."""
    out = {}
    for name, c in cur.items():
        p = prev.get(name, {}).get("cpu", {})
        used = sum(max(0.0, t - p[pid]) for pid, t in c["cpu"].items() if pid in p)
        out[name] = 100.0 * used / dt if dt > 0 else 0.0
    return out


def losses(redis) -> dict[str, int]:
    """dropped + errors per stage."""
    return {s: c.get("dropped", 0) + c.get("errors", 0) for s, c in status.stats(redis).items()}


def max_lag(redis) -> float:
    """The largest lag any component reports now."""
    lags = [float(f.get("lag_seconds") or 0) for f in status.components(redis).values() if f.get("alive")]
    return max(lags or [0.0])


def mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def report(samples: list[dict], cpu: dict[str, list[float]], rate: float, minutes: float) -> dict:
    """Print the summary table; return it as a dict (also written as JSON)."""
    n = len(samples)
    q = max(1, n // 4)
    print(f"\nsoak: {minutes:g} min at {rate:g} events/s, {n} samples")
    print(f"{'program':<22} {'cpu% avg':>8} {'cpu% max':>8} {'rss MB first':>12} {'last':>8} {'max':>8} {'growth':>8}")
    programs = {}
    for name in sorted(samples[-1]["programs"]):
        rss = [s["programs"].get(name, {}).get("rss", 0) for s in samples]
        early, late = statistics.mean(rss[:q]), statistics.mean(rss[-q:])
        growth = (late - early) / early * 100 if early else 0.0
        c = cpu.get(name) or [0.0]
        programs[name] = {"cpu_avg": statistics.mean(c), "cpu_max": max(c), "rss_first": rss[0],
                          "rss_last": rss[-1], "rss_max": max(rss), "rss_growth_pct": growth}
        print(f"{name:<22} {statistics.mean(c):8.1f} {max(c):8.1f} {mb(rss[0]):>12} {mb(rss[-1]):>8} "
              f"{mb(max(rss)):>8} {growth:7.1f}%")
    first, last = samples[0], samples[-1]
    print(f"\nRedis used_memory: {mb(first['redis_memory'])} MB -> {mb(last['redis_memory'])} MB, "
          f"keys {first['redis_keys']} -> {last['redis_keys']}")
    lost = {s: v for s, v in last["losses"].items() if v}
    print(f"loss counters (dropped + errors): {lost or 'all zero'}")
    print(f"events through the dispatcher: {last['events'] - first['events']} "
          f"({(last['events'] - first['events']) / max(1.0, last['t'] - first['t']):.0f}/s)")
    print(f"max consumer lag: {max(s['lag'] for s in samples):.2f} s")
    return {"rate": rate, "minutes": minutes, "programs": programs, "losses": last["losses"],
            "redis_memory": [first["redis_memory"], last["redis_memory"]],
            "max_lag": max(s["lag"] for s in samples)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=1000.0, help="events/s replayed into the dispatcher")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="minard-soak-"))
    env = stack_env(work / "stack", supervisor_port=0, stack_replay_rate=args.rate)
    minard = str(Path(sys.executable).parent / "minard")
    up = subprocess.run([minard, "up"], env=env, capture_output=True, text=True, timeout=180, check=False)
    print(up.stdout.strip())
    lay = stack_mod.Layout(work / "stack")
    try:
        if up.returncode != 0:
            print(up.stderr, file=sys.stderr)
            return 1
        cfg = config.load(path=lay.minard_conf, env={})
        redis = redis_py.Redis.from_url(str(cfg["redis_url"]))
        time.sleep(5)  # let every process connect
        samples, cpu = [], {}
        prev, prev_t = program_sample(lay), time.monotonic()
        end = time.monotonic() + args.minutes * 60
        while True:
            time.sleep(min(args.interval, max(0.5, end - time.monotonic())))
            cur, now = program_sample(lay), time.monotonic()
            for name, pct in cpu_percent(prev, cur, now - prev_t).items():
                cpu.setdefault(name, []).append(pct)
            prev, prev_t = cur, now
            info = redis.info("memory")
            stats = status.stats(redis)
            s = {"t": time.time(), "programs": cur, "redis_memory": info["used_memory"],
                 "redis_keys": redis.dbsize(), "losses": losses(redis), "lag": max_lag(redis),
                 "events": stats.get("dispatcher", {}).get("processed", 0)}
            samples.append(s)
            left = max(0.0, end - time.monotonic())
            total_cpu = sum(c[-1] for c in cpu.values())
            print(f"[{len(samples):3d}] {left:5.0f}s left  cpu {total_cpu:5.1f}%  rss "
                  f"{mb(sum(p['rss'] for p in cur.values()))} MB  redis {mb(s['redis_memory'])} MB  "
                  f"lost {sum(s['losses'].values())}  lag {s['lag']:.2f}s", flush=True)
            if left <= 0:
                break
        summary = report(samples, cpu, args.rate, args.minutes)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
        return 0
    finally:
        down = subprocess.run([minard, "down"], env=env, capture_output=True, text=True, timeout=180, check=False)
        print(down.stdout.strip().splitlines()[-1] if down.stdout.strip() else down.stderr)


if __name__ == "__main__":
    sys.exit(main())
