"""Benchmark of the dispatch-stream monitoring: dispatcher -> push -> pull pool -> Redis.

Parts, all in the same run, on a throwaway redis-server:

1. **consumer**: the pull worker's code path (wire decode, numpy decode,
   aggregation, one Redis transaction per second of data) against a *baseline*
   consumer that decodes with a per-hit ``struct`` loop, the way the original
   minard did, and writes the same aggregates.  Same batches (1000 records,
   the push's default), same Redis; each side runs for 1.5 s at a time
   (flushing once a second, as a worker does), the two sides in turn, three
   times; the best round of each side is reported, with the spread of the
   round-by-round ratios.  Goal: consumer >= 20x baseline.
2. **end to end**: ``minard replay --loop --speed max`` -> dispatcher -> push
   -> pull (1 and 2 workers) -> Redis, as real processes, at mean nhit ~40
   and ~300.  events/s = records the pool processed / elapsed; losses at
   every stage come from ``stats:*`` in Redis.  Also Redis memory growth per
   hour at that rate and the RSS of the pull process and its workers.
3. **burst**: a data source sends 10^4 events as one RAWBATCH (the time they
   take to leave it is printed; goal <= 10 ms); every event must end up
   stored or counted as dropped.
   **latency**: seconds from a record leaving the source to its aggregate in
   Redis (goal <= 2 s), for single records at different phases of the
   workers' once-a-second flush.
   **zero loss**: offered rates (nhit 40, 2 workers, the ZMQ link with CURVE as
   deployed); **cost of encryption**: the same offered rate with CURVE and over
   plain TCP (``zmq_insecure``), interleaved, CPU per event as a ratio.
4. **storage**: MEMORY USAGE of every key family at full detector occupancy,
   extrapolated to bytes/day and the steady-state total (docs/storage.md).

Run: ``.venv/bin/python bench/pipeline.py [--quick] [--skip-e2e]`` (about 3 minutes; --quick ~1;
--skip-e2e leaves out the sustained end-to-end runs, part 2).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import redis as redis_py

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minard import config
from minard.analysis.aggregate import NHIT_BINS, NTRIG, TOTAL, RunAgg, SecondAgg
from minard.dispatcher.client import DispatchClient
from minard.formats import pmt, wire
from minard.formats.framing import encode_rawbatch
from minard.formats.zdab import ZdabWriter
from minard.pipeline.dispatch_pull import PullHandler, write_second
from minard.store import status
from minard.store import timeseries as ts
from minard.store.channels import ChannelWriter
from minard.store.runs import run_key, write_run
from minard.store.schema import NHIT_LEVELS
from minard.testing import RedisServer, export_dispatcher_keys, free_port, stop_pid
from minard.testing.dispatcher import DispatcherProcess

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def say(text: str) -> None:
    """Progress on stderr (results go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ data

def make_records(n: int, nhit: float, seed: int = 1, run: int = 9000) -> list[bytes]:
    """*n* PmtEventRecords with Poisson(nhit) hits; 128 templates with fresh GTIDs."""
    rng = np.random.default_rng(seed)
    words = [1, 2, 3, 8, 1 << 12, (1 << 26) | 1]
    templates = []
    for k in range(128):
        m = int(rng.poisson(nhit))
        hits = {"crate": rng.integers(0, 19, m), "card": rng.integers(0, 16, m),
                "channel": rng.integers(0, 32, m), "qhs": rng.integers(0, 4096, m),
                "tac": rng.integers(0, 4096, m)}
        templates.append(pmt.encode_event(run=run, evnum=k, gtid=1, trigger_word=words[k % len(words)],
                                          hits=hits, clock10=1))
    out = []
    for i in range(n):
        words = np.frombuffer(templates[i % 128], ">u4").copy()
        gtid = (i + 1) % (1 << 24) or 1
        words[2] = i
        words[8] = (words[8] & 0xFF000000) | gtid
        # the hits carry the event's GTID too (H0 bits 0-15, H2 bits 12-15 and 28-31)
        words[11::3] = (words[11::3] & 0xFFFF0000) | (gtid & 0xFFFF)
        words[13::3] = (words[13::3] & 0x0FFF0FFF) | (gtid >> 16 & 0xF) << 12 | (gtid >> 20 & 0xF) << 28
        out.append(words.tobytes())
    return out


def wire_batches(records: list[bytes], size: int = 1000) -> list[list[bytes]]:
    """The wire messages the push would send for *records*."""
    out, prev = [], None
    for i in range(0, len(records), size):
        chunk = [pmt.pack_dispatch(r) for r in records[i:i + size]]
        out.append(wire.encode("pmt", chunk, {"seq": i // size, "prev_gtid": prev}))
        prev = struct.unpack_from(">I", records[min(i + size, len(records)) - 1], 32)[0] & 0xFFFFFF
    return out


# ------------------------------------------------------------------ baseline consumer

class BaselineConsumer:
    """Per-hit Python decoding (struct) and the same aggregates, as the original minard."""

    def __init__(self, redis_url: str):
        self.redis = redis_py.Redis.from_url(redis_url)
        self.counts = ChannelWriter(self.redis)
        self.sec = SecondAgg(0)
        self.run: dict[int, RunAgg] = {}

    def process(self, frames) -> None:
        batch = wire.decode(frames)
        t = float(batch.meta["sent"])
        self.sec.t = int(t)
        counts, nhit_sum, qhs_sum = self.sec.counts, self.sec.nhit_sum, self.sec.qhs_sum
        channel = self.sec.channel_hits
        for rec in batch.records():
            w = struct.unpack_from(">11I", rec, 12)
            run, nhit = w[1], w[3] & 0xFFFF
            trig = (w[8] >> 24) | (w[9] & 0x7FFFF) << 8
            qsum = 0
            ra = self.run.get(run) or self.run.setdefault(run, RunAgg(run))
            for k in range(nhit):
                h0, h1, _ = struct.unpack_from(">III", rec, 56 + 12 * k)
                ch, crate, card = h0 >> 16 & 0x1F, h0 >> 21 & 0x1F, h0 >> 26 & 0xF
                qsum += (h1 >> 16 & 0xFFF) ^ 0x800
                lcn = crate * 512 + card * 32 + ch
                channel[lcn] += 1
                ra.channel_hits[lcn] += 1
            for bit in range(NTRIG):
                if trig >> bit & 1:
                    counts[bit] += 1
                    nhit_sum[bit] += nhit
                    qhs_sum[bit] += qsum
                    self.sec.nhit_hist[bit, min(nhit // 5, NHIT_BINS - 1)] += 1
                    ra.triggers[bit] += 1
            counts[TOTAL] += 1
            nhit_sum[TOTAL] += nhit
            qhs_sum[TOTAL] += qsum
            self.sec.nhit_hist[TOTAL, min(nhit // 5, NHIT_BINS - 1)] += 1
            ra.events += 1
            ra.nhit_counts[nhit] += 1

    def flush(self, now: float) -> None:
        pipe = self.redis.pipeline(transaction=True)
        write_second(pipe, self.sec, self.counts)
        for ra in self.run.values():
            write_run(pipe, ra, now, self.counts)
        self.counts.add(pipe)
        pipe.execute()
        self.sec = SecondAgg(self.sec.t)
        self.run = {}


def run_for(process, flush, batches: list, seconds: float) -> tuple[int, float]:
    """Feed *batches* to *process* in turn for at least *seconds*; (events, elapsed s).

    As a pool worker does: one flush per second of wall time, and a last one
    at the end (counted in the elapsed time).  The batches are used round
    robin, so a run lasts long enough for the flush to weigh what it does in
    production (a few percent of a second), whatever the speed.
    """
    t0 = time.perf_counter()
    next_flush = t0 + 1.0
    events = i = 0
    while True:
        frames = batches[i % len(batches)]
        process(frames)
        events += len(frames[3]) // 4
        i += 1
        now = time.perf_counter()
        if now >= next_flush:
            flush(time.time())
            next_flush += 1.0
        if now - t0 >= seconds:
            break
    flush(time.time())
    return events, time.perf_counter() - t0


def bench_consumer(redis_url: str, nhit: float, n: int, seconds: float, rounds: int) -> dict:
    """events/s of the pull handler and of the baseline on the same batches.

    The two sides run in turn, *rounds* times each for *seconds*, so that a
    busy machine slows both alike; each side's best round is reported (and
    the spread of the round-by-round ratios).
    """
    records = make_records(n, nhit)
    hits = sum(struct.unpack_from(">I", r, 12)[0] & 0xFFFF for r in records) / len(records)
    batches = wire_batches(records)
    cfg = config.load({"redis_url": redis_url, "zmq_max_frame": 64 << 20}, env={})
    fast, slow = [], []
    for _ in range(rounds):
        handler = PullHandler(cfg)  # a fresh worker each round
        events, elapsed = run_for(handler.process, handler.flush, batches, seconds)
        fast.append(events / elapsed)
        base = BaselineConsumer(redis_url)
        events, elapsed = run_for(base.process, base.flush, batches, seconds)
        slow.append(events / elapsed)
    ratios = [f / s for f, s in zip(fast, slow)]
    return {"nhit": nhit, "events_s": max(fast), "hits_s": max(fast) * hits,
            "baseline_events_s": max(slow), "ratio": max(fast) / max(slow),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": rounds,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ------------------------------------------------------------------ end to end

def children(pid: int) -> list[int]:
    """The child processes of *pid* (the pool's workers), from /proc."""
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(p) for p in fh.read().split()]
    except OSError:
        pass
    return out


def rss_tree_mb(pid: int) -> float:
    """Resident memory of *pid* and its children (the pool's workers), MB."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class Stack:
    """dispatcher, minard_dispatch pull and push as real processes."""

    def __init__(self, redis_url: str, workdir: Path, workers: int, insecure: bool = False):
        self.redis = redis_py.Redis.from_url(redis_url)
        self.port = free_port()
        self.dir = workdir
        export_dispatcher_keys(workdir)  # every connection authenticates, as in production
        settings = {"redis_url": redis_url, "zmq_dispatch": f"tcp://127.0.0.1:{free_port()}",
                    "var_dir": str(workdir), "dispatcher_port": self.port,
                    "dispatcher_accounting_dir": str(workdir / "acct"), "dispatch_workers": workers,
                    "dispatch_max_total_workers": max(4, workers), "log_level": "WARNING",
                    "dispatcher_analyzer_queue": 200000, "zmq_insecure": insecure}
        self.env = {**os.environ, **{f"MINARD_{k.upper()}": str(v) for k, v in settings.items()}}
        self.dispatcher = DispatcherProcess(self.port, workdir / "dispatcher.log", log_level="WARNING",
                                            redis_url=redis_url, dispatcher_analyzer_queue=200000)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> "Stack":
        self.dispatcher.start()
        for name, args in (("pull", []), ("push", ["--host", f"127.0.0.1:{self.port}"])):
            with open(self.dir / f"{name}.log", "ab") as log:
                self.procs[name] = subprocess.Popen([str(BIN / "minard_dispatch"), name, *args],
                                                    env=self.env, stdout=log, stderr=log)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            push = self.redis.hgetall("status:minard_dispatch_push")
            if int(push.get(b"consumers", 0)) >= 1 and push.get(b"connected") == b"1":
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"stack did not start; see {self.dir}")
        time.sleep(0.5)
        return self

    def replay(self, path: Path, loop: bool, rate: float | None = None) -> subprocess.Popen:
        """``minard replay`` of *path* at full speed, or at *rate* events/s."""
        pace = ["--rate", str(rate)] if rate else ["--speed", "max"]
        args = [sys.executable, "-m", "minard.cli", "replay", str(path), "--dispatcher",
                f"127.0.0.1:{self.port}", *pace, "--no-progress"] + (["--loop"] if loop else [])
        with open(self.dir / "replay.log", "ab") as log:
            return subprocess.Popen(args, env=self.env, stdout=log, stderr=log, cwd=str(ROOT))

    def stats(self) -> dict:
        return status.stats(self.redis)

    def stop(self) -> None:
        for name in ("pull", "push"):
            if name in self.procs:
                stop_pid(self.procs[name])
        self.dispatcher.stop()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by the processes *pids* (Linux /proc)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def stage_pids(stack: Stack, replay: subprocess.Popen) -> dict[str, list[int]]:
    """The processes of each stage (the pull stage: its manager and workers)."""
    pull = stack.procs["pull"].pid
    return {"replay": [replay.pid], "dispatcher": [stack.dispatcher.proc.pid],
            "push": [stack.procs["push"].pid], "pull manager": [pull], "pull workers": children(pull)}


def _processed(stack: Stack) -> int:
    s = stack.stats().get("pull", {})
    return s.get("processed", 0) + s.get("errors", 0)


def bench_end_to_end(redis_url: str, path: Path, nhit: float, workers: int, seconds: float,
                     workdir: Path, rate: float | None = None, insecure: bool = False) -> dict:
    """Sustained events/s through the whole chain with a looping replay (at *rate*, or flat out);
    the ZMQ link with CURVE unless *insecure*."""
    client = redis_py.Redis.from_url(redis_url)
    client.flushall()
    stack = Stack(redis_url, workdir, workers, insecure).start()
    mem0 = client.info("memory")["used_memory"]
    rss = 0.0
    try:
        replay = stack.replay(path, loop=True, rate=rate)
        time.sleep(1.0)  # warm-up
        pids = stage_pids(stack, replay)
        cpu0 = {stage: cpu_seconds(p) for stage, p in pids.items()}
        n0, t0 = _processed(stack), time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(0.5)
            rss = max(rss, rss_tree_mb(stack.procs["pull"].pid))
        n1, t1 = _processed(stack), time.monotonic()
        cpu_us = {stage: (cpu_seconds(p) - cpu0[stage]) / max(1, n1 - n0) * 1e6 for stage, p in pids.items()}
        replay.send_signal(signal.SIGTERM)
        replay.wait(60)
        sent = 0
        end = time.monotonic() + 30
        while time.monotonic() < end:  # drain: every stage settled
            s = stack.stats()
            pull = s.get("pull", {})
            if pull.get("received", 0) == pull.get("processed", 0) + pull.get("errors", 0) + pull.get("dropped", 0) \
                    and s.get("push", {}).get("processed", -1) == pull.get("received", 0):
                break
            time.sleep(0.3)
        s = stack.stats()
        mem1 = client.info("memory")["used_memory"]
        elapsed = t1 - t0
        rate = (n1 - n0) / elapsed
        lost = {st: s.get(st, {}).get("dropped", 0) + (s.get(st, {}).get("errors", 0) if st == "redis" else 0)
                for st in ("dispatcher", "push", "pull", "redis")}
        sent = s.get("push", {}).get("received", 0)
        return {"nhit": nhit, "workers": workers, "events_s": rate, "hits_s": rate * nhit,
                "events": sent, "lost": lost, "rss_mb": rss, "cpu_us": cpu_us,
                "redis_mb_per_hour": (mem1 - mem0) / max(1.0, elapsed + 2) * 3600 / 1e6,
                "lag_s": float(client.hget("status:minard_dispatch_pull", "lag_seconds") or 0)}
    finally:
        stack.stop()
        client.close()


def source_client(stack: Stack, run: int) -> DispatchClient:
    """A data-source connection to the stack's dispatcher that has begun *run*.

    Its send buffer holds a whole burst, so sending does not wait for the
    dispatcher to read: the time measured is the time the data took to leave
    the source.
    """
    client = DispatchClient.connect(f"127.0.0.1:{stack.port}", "source", "bench", sndbuf=16 << 20)
    client.command(f"BEGINTAPE:{run}:1", check=True)
    return client


def stored_events(client, run: int) -> int:
    """Events of *run* in its Redis summary (written in the same transaction as the time series)."""
    return int(client.hget(run_key(run), "events") or 0)


def wait_stored(client, run: int, events: int, timeout: float = 30.0) -> float:
    """time.time() at which *run* shows *events* events in Redis (polled every 2 ms)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if stored_events(client, run) >= events:
            return time.time()
        time.sleep(0.002)
    raise RuntimeError(f"run {run}: {events} events not in Redis after {timeout} s")


def bench_latency(redis_url: str, workdir: Path, n: int = 8) -> dict:
    """Seconds from a record leaving the source to its aggregate in Redis.

    One record at a time, spaced so that they land at different phases of the
    workers' once-a-second flush; the first one also starts the pool's worker.
    """
    client = redis_py.Redis.from_url(redis_url)
    client.flushall()
    records = [pmt.pack_dispatch(r) for r in make_records(n, 40, seed=7, run=9200)]
    stack = Stack(redis_url, workdir, 1).start()
    latencies = []
    try:
        with source_client(stack, 9200) as src:
            for i, rec in enumerate(records):
                sent = time.time()
                src.send_batch([rec])
                latencies.append(wait_stored(client, 9200, i + 1) - sent)
                time.sleep(0.1 + 0.23 * i)
            src.command("ENDTAPE", check=True)
        return {"first": latencies[0], "warm": latencies[1:]}
    finally:
        stack.stop()
        client.close()


def bench_burst(redis_url: str, workdir: Path, n: int = 10_000) -> dict:
    """10^4 events sent by the source as one RAWBATCH; every event stored or its drop counted."""
    client = redis_py.Redis.from_url(redis_url)
    client.flushall()
    records = [pmt.pack_dispatch(r) for r in make_records(n, 40, seed=5, run=9100)]
    frame = encode_rawbatch(np.fromiter(map(len, records), np.int64, n), b"".join(records))
    stack = Stack(redis_url, workdir, 1).start()
    try:
        with source_client(stack, 9099) as src:
            src.send_batch([pmt.pack_dispatch(make_records(1, 40, run=9099)[0])])  # a worker is running
            wait_stored(client, 9099, 1)
            src.command("ENDTAPE", check=True)
            src.wait_command("ALLFINISHED", timeout=30)
            src.command("BEGINTAPE:9100:1", check=True)
            t0 = time.perf_counter()
            src.send_raw(frame)
            sent = time.perf_counter() - t0
            end = time.monotonic() + 60
            while time.monotonic() < end:
                s = stack.stats()
                dropped = sum(s.get(st, {}).get("dropped", 0) for st in ("dispatcher", "push", "pull"))
                if stored_events(client, 9100) + dropped >= n:
                    break
                time.sleep(0.01)
            settled = time.perf_counter() - t0
            src.command("ENDTAPE", check=True)
        s = stack.stats()
        stored = stored_events(client, 9100)
        dropped = sum(s.get(st, {}).get("dropped", 0) for st in ("dispatcher", "push", "pull"))
        return {"events": n, "megabytes": len(frame) / 1e6, "send_ms": sent * 1e3, "stored": stored,
                "dropped_counted": dropped, "accounted": stored + dropped == n, "seconds": settled}
    finally:
        stack.stop()
        client.close()


# ------------------------------------------------------------------ storage

def full_second(t: int, rng) -> SecondAgg:
    """One second at full detector occupancy: every channel hit, 6 trigger types."""
    sec = SecondAgg(t)
    for bit in (0, 1, 3, 11, 12, 26):
        sec.counts[bit] = 1000
        sec.nhit_sum[bit] = 40_000
        sec.qhs_sum[bit] = 40_000_000
        sec.nhit_hist[bit, :60] = rng.integers(1, 100, 60)
    sec.counts[TOTAL], sec.nhit_sum[TOTAL], sec.qhs_sum[TOTAL] = 3000, 120_000, 120_000_000
    sec.nhit_hist[TOTAL, :60] = rng.integers(1, 300, 60)
    sec.channel_hits[:] = rng.integers(1, 1000, len(sec.channel_hits))
    sec.records, sec.hits, sec.orphans, sec.gtid_gaps, sec.gtid_missing = 3000, 120_000, 3, 1, 2
    sec.corrupt = Counter(truncated=1)
    sec.last = (9000, 1, 123456)
    return sec


def family(key: str) -> tuple[str, int] | None:
    """(family, step) of a time-series key (``ts:{<step>:<bucket>}:<group>``), None for others."""
    head, _, rest = key.partition("}:")
    kind, _, tag = head.partition(":{")
    if kind in ("ts", "ch") and rest and ":" in tag:
        return f"{kind}:*:{rest}", int(tag.split(":")[0])
    return None


def bench_storage(redis_url: str, seconds: int = 30) -> dict:
    """MEMORY USAGE per key family at full occupancy -> bytes/day and steady state."""
    client = redis_py.Redis.from_url(redis_url)
    client.flushall()
    rng = np.random.default_rng(3)
    t0 = 1_700_000_000
    counts = ChannelWriter(client)
    for s in range(seconds):
        pipe = client.pipeline(transaction=True)
        write_second(pipe, full_second(t0 + s, rng), counts)
        counts.add(pipe)
        pipe.execute()
    ra = RunAgg(9000, events=10**6, triggers=np.full(NTRIG, 1000), subruns={0, 1}, start=t0, end=t0 + 1)
    ra.nhit_counts[:400] = 1000
    ra.channel_hits[:] = 10**5
    pipe = client.pipeline()
    write_run(pipe, ra, t0, counts)
    counts.add(pipe)
    pipe.execute()
    sizes: dict[tuple[str, int], list[int]] = defaultdict(list)
    run_bytes = 0
    for key in client.scan_iter(count=1000):
        k = key.decode()
        used = client.memory_usage(key, samples=0) or 0
        fam = family(k)
        if fam:
            sizes[fam].append(used)
        elif k.startswith("{run:"):
            run_bytes += used
    levels = {"ts:*:trig": ts.SCALAR_LEVELS, "ts:*:stream": ts.SCALAR_LEVELS, "ts:*:crate": ts.SCALAR_LEVELS,
              "ts:*:nhit": NHIT_LEVELS, "ts:*:occ": ts.CHANNEL_LEVELS, "ch:*:hits": ts.CHANNEL_LEVELS,
              "ch:*:card_hits": ts.CHANNEL_LEVELS}
    rows = []
    per_day = steady = 0.0
    for name, lv in levels.items():
        for level in lv:
            vals = sizes.get((name, level.step))
            if not vals:
                continue
            per_key = max(vals)  # coarse buckets hold as many fields as a full 1 s one
            day = 86400 / level.step * per_key
            total = (level.keep / level.step + 1) * per_key
            per_day += day
            steady += total
            rows.append((name, level.step, level.keep, per_key, day, total))
    client.close()
    return {"rows": rows, "bytes_per_day": per_day, "steady_bytes": steady, "run_bytes": run_bytes,
            "runs_per_year_bytes": run_bytes * 365 * 4}


# ------------------------------------------------------------------ main

def zero_loss_search(redis_url: str, workdir: Path, rates: list[float], seconds: float) -> None:
    """Offer increasing rates (nhit 40, 2 workers); print the highest carried with zero loss."""
    print("\n== End to end at offered rates (nhit 40, 2 workers): the goal is >= 200k events/s with zero loss ==")
    path = workdir / "nhit40.zdab"
    best = 0.0
    for rate in rates:
        say(f"end to end at {rate:,.0f} events/s offered")
        sub = workdir / f"e2e-rate-{rate:.0f}"
        sub.mkdir()
        r = bench_end_to_end(redis_url, path, 40, 2, seconds, sub, rate=rate)
        lost = sum(r["lost"].values())
        print(f"offered {rate:>9,.0f}: carried {r['events_s']:>9,.0f} events/s, lost {r['lost']}"
              f"; CPU per event {sum(r['cpu_us'].values()):.1f} us")
        if lost or r["events_s"] < 0.97 * rate:
            break
        best = rate
    print(f"highest offered rate carried with zero loss: {best:,.0f} events/s (ZMQ link with CURVE)")


def encryption_cost(redis_url: str, workdir: Path, rate: float, seconds: float, rounds: int = 2) -> None:
    """The cost of CURVE on the push -> pull link: the same offered rate with CURVE and over
    plain TCP (``zmq_insecure``), interleaved; CPU per event of the two ZMQ ends and in total."""
    print(f"\n== Cost of encryption: CURVE vs plain TCP at {rate:,.0f} events/s offered (nhit 40, 2 workers,"
          f" {rounds} interleaved rounds, best of each) ==")
    path = workdir / "nhit40.zdab"
    best: dict[str, dict] = {}
    for k in range(rounds):
        for name, insecure in (("curve", False), ("plain", True)):
            say(f"encryption cost: {name}, round {k + 1}")
            sub = workdir / f"e2e-{name}-{k}"
            sub.mkdir()
            r = bench_end_to_end(redis_url, path, 40, 2, seconds, sub, rate=rate, insecure=insecure)
            r["ends_us"] = r["cpu_us"]["push"] + r["cpu_us"]["pull manager"]
            r["total_us"] = sum(r["cpu_us"].values())
            if name not in best or r["total_us"] < best[name]["total_us"]:
                best[name] = r
    for name, r in best.items():
        print(f"{name:<6} carried {r['events_s']:>9,.0f} events/s, lost {sum(r['lost'].values())};"
              f" CPU per event: push + pull manager {r['ends_us']:.2f} us, total {r['total_us']:.2f} us")
    c, p = best["curve"], best["plain"]
    print(f"CURVE / plain: CPU per event at the ZMQ ends {c['ends_us'] / p['ends_us']:.2f}x,"
          f" total {c['total_us'] / p['total_us']:.2f}x; carried {c['events_s'] / p['events_s']:.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--quick", action="store_true", help="Shorter runs (about a minute).")
    parser.add_argument("--seconds", type=float, default=None, help="Seconds per end-to-end run.")
    parser.add_argument("--rates", default="100000,150000,200000,250000",
                        help="Offered rates (events/s, nhit 40, 2 workers) for the zero-loss search.")
    parser.add_argument("--skip-e2e", action="store_true",
                        help="Skip the sustained end-to-end runs (consumer, storage, burst and latency only).")
    args = parser.parse_args(argv)
    seconds = args.seconds or (4.0 if args.quick else 10.0)
    n_consumer = 20_000 if args.quick else 100_000
    workdir = Path(tempfile.mkdtemp(prefix="minard-bench-"))
    with RedisServer() as server:
        say("storage: writing seconds at full detector occupancy")
        st = bench_storage(server.url, 10 if args.quick else 30)
        print("\n== Storage at full detector occupancy (MEMORY USAGE) ==")
        print(f"{'family':<18} {'step':>6} {'keep':>9} {'bytes/key':>10} {'bytes/day':>12} {'steady':>12}")
        for name, step, keep, per_key, day, total in st["rows"]:
            print(f"{name:<18} {step:>6} {keep:>9} {per_key:>10} {day:>12.3g} {total:>12.3g}")
        print(f"total: {st['bytes_per_day'] / 1e6:.1f} MB/day, steady state {st['steady_bytes'] / 1e9:.2f} GB;"
              f" one run summary {st['run_bytes'] / 1e3:.1f} kB")

        rounds, run_s = (2, 0.6) if args.quick else (3, 1.5)
        print("\n== Consumer: numpy pull handler vs per-hit struct loop (same batches, same Redis) ==")
        print(f"(batches of 1000 records; {rounds} interleaved rounds of {run_s} s per side, best of each;"
              " one flush per second)")
        for nhit in (40, 300):
            say(f"consumer at nhit {nhit}")
            r = bench_consumer(server.url, nhit, n_consumer if nhit == 40 else n_consumer // 4, run_s, rounds)
            print(f"nhit {nhit:>3}: consumer {r['events_s']:>10,.0f} events/s ({r['hits_s'] / 1e6:6.1f} M hits/s)"
                  f"  baseline {r['baseline_events_s']:>8,.0f} events/s  ratio {r['ratio']:5.1f}x"
                  f" (rounds {r['ratio_min']:.1f}-{r['ratio_max']:.1f}x)  (goal >= 20x)  RSS {r['rss_mb']:.0f} MB")

        if not args.skip_e2e:
            print("\n== End to end: replay -> dispatcher -> push -> pull -> Redis ==")
            for nhit, n_file in ((40, 20_000 if args.quick else 50_000), (300, 5_000 if args.quick else 10_000)):
                path = workdir / f"nhit{nhit}.zdab"
                say(f"writing {n_file} events at nhit {nhit} to {path}")
                with ZdabWriter(path) as w:
                    for rec in make_records(n_file, nhit, seed=nhit):
                        w.write_event(rec)
                for workers in (1, 2):
                    say(f"end to end: nhit {nhit}, {workers} worker(s), {seconds:.0f} s")
                    sub = workdir / f"e2e-{nhit}-{workers}"
                    sub.mkdir()
                    r = bench_end_to_end(server.url, path, nhit, workers, seconds, sub)
                    print(f"nhit {nhit:>3} workers {workers}: {r['events_s']:>9,.0f} events/s"
                          f" ({r['hits_s'] / 1e6:5.1f} M hits/s), {r['events']:,} events; lost {r['lost']};"
                          f" Redis +{r['redis_mb_per_hour']:.0f} MB/h; pull RSS {r['rss_mb']:.0f} MB;"
                          f" lag {r['lag_s']:.2f} s")
                    print("    CPU per event: " + ", ".join(f"{k} {v:.2f} us" for k, v in r["cpu_us"].items())
                          + f" (total {sum(r['cpu_us'].values()):.1f} us; {os.cpu_count()} CPUs)")
            zero_loss_search(server.url, workdir, [float(r) for r in args.rates.split(",")], seconds)
            encryption_cost(server.url, workdir, 200_000, seconds)

        say("burst of 10^4 events")
        sub = workdir / "burst"
        sub.mkdir()
        b = bench_burst(server.url, sub)
        print(f"\n== Burst: {b['events']} events ({b['megabytes']:.1f} MB) left the source in {b['send_ms']:.1f} ms"
              f" (goal <= 10 ms): stored {b['stored']}, drops counted {b['dropped_counted']},"
              f" all accounted: {b['accounted']} ({b['seconds']:.2f} s to settle) ==")
        say("latency source -> Redis")
        sub = workdir / "latency"
        sub.mkdir()
        lat = bench_latency(server.url, sub)
        print(f"\n== Latency, record leaves the source -> its aggregate in Redis (goal <= 2 s):"
              f" max {max(lat['warm']):.2f} s, median {float(np.median(lat['warm'])):.2f} s"
              f" over {len(lat['warm'])} records; first record (starts the worker) {lat['first']:.2f} s ==")
    say(f"done (work files in {workdir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
