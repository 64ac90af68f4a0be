"""Benchmark of the website under gunicorn with a day of realistic data.

Starts its own redis-server, fills it with a day of 1 s data for the whole
detector (``minard.testing.sample.write_day``: trigger rates, run/subrun/GTID,
10240-channel hits, CMOS rates and base currents, nhit histograms at every
resolution level), starts ``gunicorn minard:app`` on a free port and measures,
with N concurrent clients (threads, one HTTP connection per request):

* ``occupancy``  the Detector page's map query (/api/detector, 10 min window,
  with its rolling baseline, ``encoding=f32`` as the page asks for it);
* ``rate-1d``    the Stream page's rate plot query (/api/stream, ``encoding=f64``
  as the page asks for it; 1 day for the same view, 10 min to 1 day for
  distinct windows);
* ``page``       the Stream page's HTML;
* ``static``     a static file of the same size as the occupancy answer, served
  by the same gunicorn in the same run (the reference).

Each query is run twice: every client asking for the *same* live view (many
screens showing one view, as in a control room) and every request asking for
a *distinct* fixed window anywhere in the day of data (no response reuse).
The targets' requests run in interleaved rounds (``--rounds``), so load from
elsewhere on the machine falls on each target and on the static reference
alike, and only once the workers' warmer has filled the shared cache
(``minard.web.warm``; a site that has been up for a minute).
Prints p50/p95 per target and the ratio of API p95 to static p95 (goal: API
p95 < 50 ms and <= 3x static), then where the time of one request goes
(Redis round trips, JSON encoding, the rest) measured in one process.

    .venv/bin/python bench/web.py            # a day of data, 20 clients
    .venv/bin/python bench/web.py --quick    # 2 hours of data, fewer requests
"""

from __future__ import annotations

import argparse
import gc
import http.client
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis as redis_py

from minard import config, stack
from minard.testing import RedisServer, free_port, sample, stop_pid, wait_port


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="2 hours of data and fewer requests (a smoke run)")
    p.add_argument("--clients", type=int, default=20, help="concurrent clients (threads) [20]")
    p.add_argument("--requests", type=int, default=None, help="requests per target [600; 200 with --quick]")
    p.add_argument("--workers", type=int, default=None,
                   help="gunicorn workers [stack_web_workers, as `minard up` runs it]")
    p.add_argument("--rounds", type=int, default=5,
                   help="each target's requests are split into this many rounds, interleaved with the other "
                        "targets', so that every target (and the static reference) sees the same load on a shared "
                        "machine [5]")
    p.add_argument("--days", type=float, default=None, help="days of data [1; 2 h with --quick]")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 200:
        p.error("--clients must be between 1 and 200")
    args.requests = args.requests or (200 if args.quick else 600)
    args.days = args.days or (2 / 24 if args.quick else 1.0)
    return args


def get(port: int, path: str) -> tuple[float, int, int]:
    """(seconds, status, bytes) of one GET on a new connection."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return time.perf_counter() - t0, resp.status, len(body)
    finally:
        conn.close()


def load(port: int, paths, clients: int) -> list[float]:
    """Run every path in *paths* with *clients* threads; latencies in seconds."""
    lock = threading.Lock()
    queue = list(paths)
    out: list[float] = []
    errors: list[str] = []

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                path = queue.pop()
            dt, status, _ = get(port, path)
            with lock:
                out.append(dt)
                if status != 200:
                    errors.append(f"{status} {path}")

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return out


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def fill(url: str, days: float) -> float:
    """Write the data; returns seconds taken."""
    client = redis_py.Redis.from_url(url)
    t0 = time.perf_counter()
    written = sample.write_day(client, time.time(), days=days)
    dt = time.perf_counter() - t0
    mem = client.info("memory")["used_memory"] / 2**20
    print(f"data: {days * 24:.1f} h of 1 s data, {written['keys']} bucket keys written in {dt:.1f} s,"
          f" Redis {mem:.0f} MiB")
    client.close()
    return dt


def targets(now: int, n: int, static_path: str, days: float) -> dict[str, dict[str, list[str]]]:
    """For each target, the 'same' and 'distinct' request lists.

    Distinct: every request a different window anywhere in the data (seeded):
    10-minute maps, and rate plots from 10 minutes to a day long.
    """
    rng = random.Random(15)
    span_data = int(days * 86400)

    def occupancy(i):
        stop = now - 60 - rng.randrange(0, max(60, span_data - 4200))
        return f"/api/detector?quantity=occupancy&start={stop - 600}&stop={stop}&encoding=f32"

    def rate(i):
        span = rng.choice((600, 3600, 6 * 3600, 86400))
        stop = now - rng.randrange(0, max(60, span_data - span))
        return f"/api/stream?start={stop - span}&stop={stop}&encoding=f64"

    return {
        "occupancy": {"same": ["/api/detector?quantity=occupancy&window=10m&encoding=f32"] * n,
                      "distinct": [occupancy(i) for i in range(n)]},
        "rate-1d": {"same": ["/api/stream?window=1d&encoding=f64"] * n, "distinct": [rate(i) for i in range(n)]},
        "page": {"same": ["/stream"] * n, "distinct": [f"/stream?window=1h&stop={now - i}" for i in range(n)]},
        "static": {"same": [static_path] * n, "distinct": [f"{static_path}?v={i}" for i in range(n)]},
    }


def where_time_goes(url: str, paths: dict[str, list[str]], count: int = 60) -> None:
    """In one process (Flask test client, no HTTP): CPU and wall ms per request split into
    Redis round trips, JSON encoding and the rest (reading cached data, numpy), for the
    distinct windows of each target (and of the map as plain JSON, ``map-json``) after
    one pass to warm the data caches (rendered answers are not reused)."""
    import cProfile
    import pstats

    from minard import config
    from minard.web import create_app

    app = create_app(config.load({"redis_url": url, "var_dir": tempfile.mkdtemp(prefix="minard-bench-web-")}, env={}))
    client = app.test_client()
    print(f"\nwhere the time goes (one process, {count} distinct windows after a warm-up pass, ms per request):")
    print(f"{'target':<11} {'wall':>7} {'cpu':>7} {'redis':>7} {'encode':>7} {'other':>7}")
    plain = [u.replace("&encoding=f32", "") for u in paths["occupancy"]["distinct"][:count]]
    for name, urls in (("occupancy", paths["occupancy"]["distinct"][:count]), ("map-json", plain),
                       ("rate-1d", paths["rate-1d"]["distinct"][:count])):
        for u in urls:
            client.get(u)
        app.extensions["minard_responses"].clear()  # measure the work, not the 0.5 s answer reuse
        prof = cProfile.Profile()
        w0, c0 = time.perf_counter(), time.process_time()
        prof.enable()
        for u in urls:
            client.get(u)
        prof.disable()
        wall, cpu = (time.perf_counter() - w0) * 1000 / count, (time.process_time() - c0) * 1000 / count
        stats = pstats.Stats(prof).stats
        def cum(pred):
            return sum(v[3] for k, v in stats.items() if pred(k)) * 1000 / count
        redis_ms = cum(lambda k: k[2] in ("execute", "execute_command") and k[0].endswith("redis/client.py"))
        encode_ms = cum(lambda k: k[2] == "json_response")
        print(f"{name:<11} {wall:7.1f} {cpu:7.1f} {redis_ms:7.1f} {encode_ms:7.1f} {wall - redis_ms - encode_ms:7.1f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    static_dir = REPO / "static"
    static_file = static_dir / f".bench-{os.getpid()}.json"
    procs = []
    with RedisServer() as server:
        try:
            fill(server.url, args.days)
            port = free_port()
            var = tempfile.mkdtemp(prefix="minard-bench-web-")
            settings = {"redis_url": server.url, "var_dir": var, "log_level": "WARNING"}
            env = {**os.environ, **{f"MINARD_{k.upper()}": v for k, v in settings.items()}}
            cfg = config.load(settings)  # conf/minard.conf and MINARD_* of this shell, as the stack reads them
            args.workers = args.workers or int(cfg["stack_web_workers"])
            # the command line `minard up` gives supervisord (worker class, connections, timeouts)
            argv = stack.gunicorn_command(cfg, "web", port=port, workers=args.workers)
            gunicorn_log = open(Path(var) / "gunicorn.log", "wb")  # noqa: SIM115 - handed to the child
            procs.append(subprocess.Popen([*argv[:-1], "--log-level", "warning", argv[-1]], cwd=REPO, env=env,
                                          stdout=gunicorn_log, stderr=gunicorn_log))
            gunicorn_log.close()
            wait_port(port, timeout=20)
            _, _, size = get(port, "/api/detector?quantity=occupancy&window=10m&encoding=f32")
            static_file.write_bytes(b"[" + b"0.0001234," * (size // 10) + b"0]")
            static_path = "/static/" + static_file.name
            for path in ("/api/stream?window=1d", "/stream", static_path):
                get(port, path)  # warm every worker's imports
            load(port, ["/api/detector?quantity=occupancy&window=10m", "/api/stream?window=1d"] * args.workers * 2,
                 args.clients)
            wait_warm(server.url)
            now = int(time.time())
            kind = argv[argv.index("--worker-class") + 1]
            conns = argv[argv.index("--worker-connections") + 1] if "--worker-connections" in argv else "-"
            print(f"gunicorn (as `minard up`): {args.workers} {kind} workers x {conns} connections;"
                  f" {args.clients} concurrent clients;"
                  f" {args.requests} requests per target and mode in {args.rounds} interleaved rounds;"
                  f" occupancy answer {size / 1024:.0f} KiB; load average before: {os.getloadavg()[0]:.1f}")
            plan = targets(now, args.requests, static_path, args.days)
            results = measure(port, plan, args.clients, args.rounds)
            report(results)
            print(f"load average after: {os.getloadavg()[0]:.1f} (1 min)")
            where_time_goes(server.url, plan)
        finally:
            for p in procs:
                stop_pid(p)
            static_file.unlink(missing_ok=True)
    return 0


def wait_warm(url: str, timeout: float = 120.0) -> None:
    """Wait until the workers' warmer (minard.web.warm) has filled the shared cache: no worker
    holds its lock and the key count has not moved for 2 s.  The site is measured as one
    that has been up for a minute, not in its first seconds."""
    from minard.store.schema import WEB_WARM_LOCK

    client = redis_py.Redis.from_url(url)
    t0 = time.monotonic()
    first = last = client.dbsize()
    still = time.monotonic()
    while time.monotonic() - t0 < timeout:
        time.sleep(0.5)  # polling a process we do not control; bounded by timeout
        size, held = client.dbsize(), client.exists(WEB_WARM_LOCK)
        if size != last or held:
            last, still = size, time.monotonic()
        elif time.monotonic() - still >= 2.0:
            break
    print(f"shared cache warmed: {last - first} keys in {time.monotonic() - t0:.1f} s")
    client.close()


def measure(port: int, plan: dict, clients: int, rounds: int) -> dict:
    """p50, p95 (ms) and req/s of every target and mode, the targets' rounds interleaved.

    Round r of every target runs before round r + 1 of any, so a burst of load
    from elsewhere on the machine falls on all of them alike.
    """
    out = {}
    gc.collect()
    gc.disable()  # as timeit does: a full collection of this process (20-38 ms) is not the server's time
    try:
        for mode in ("same", "distinct"):
            _measure_mode(port, plan, clients, rounds, mode, out)
    finally:
        gc.enable()
    return dict(sorted(out.items(), key=lambda kv: list(plan).index(kv[0][0])))


def _measure_mode(port: int, plan: dict, clients: int, rounds: int, mode: str, out: dict) -> None:
    """:func:`measure` of one mode (``same`` or ``distinct``) into *out*."""
    lat: dict[str, list[float]] = {name: [] for name in plan}
    wall = dict.fromkeys(plan, 0.0)
    for r in range(rounds):
        for name, modes in plan.items():
            paths = modes[mode]
            chunk = paths[r * len(paths) // rounds: (r + 1) * len(paths) // rounds]
            t0 = time.perf_counter()
            lat[name] += load(port, chunk, clients)
            wall[name] += time.perf_counter() - t0
    for name in plan:
        out[(name, mode)] = (pct(lat[name], 50) * 1000, pct(lat[name], 95) * 1000, len(lat[name]) / wall[name])


def report(results: dict) -> None:
    print(f"\n{'target':<11} {'mode':<9} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>8} {'p95/static':>11}")
    for (name, mode), (p50, p95, rps) in results.items():
        ref = results[("static", mode)][1]
        print(f"{name:<11} {mode:<9} {p50:8.1f} {p95:8.1f} {rps:8.0f} {p95 / ref:11.2f}")
    print("\ngoal: API p95 < 50 ms and <= 3x the static-file p95")
    for name in ("occupancy", "rate-1d"):
        for mode in ("same", "distinct"):
            p95 = results[(name, mode)][1]
            ratio = p95 / results[("static", mode)][1]
            ok = "met" if p95 < 50 and ratio <= 3 else "NOT met"
            print(f"  {name:<10} {mode:<9} p95 {p95:6.1f} ms, {ratio:4.2f}x static: {ok}")


if __name__ == "__main__":
    raise SystemExit(main())
