"""``minard pinger``: heartbeats to the log server on behalf of every pipeline component.

The pipeline processes report themselves in Redis (``status:<component>``,
:mod:`minard.store.status`), and Redis, the dispatcher, the web apps and nginx
answer on their ports; none of them posts to the log server.  The pinger
(seed 000's "pinger": a heartbeat service beside the dispatcher) turns both
into log-server heartbeats, so the Status page shows every registered program
up or down with its uptime:

* a program with a current ``status:NAME`` heartbeat is up; its uptime (from
  the process's own start time), lag and queue depth go along as metrics;
* ``redis`` answers PING, ``dispatcher`` answers ``STATS?``, ``web`` and
  ``snoplus_log`` answer ``/healthz``, ``nginx`` answers HTTP on its port;
* ``pinger`` itself is always up while it runs.

A program that is not up gets no heartbeat: after its timeout the log server
shows it down, and :func:`minard.ops.programs.check_heartbeats` (called by the
pinger every round, and by the log server) raises one alarm for the silence.

Each program posts with its own token (``pinger_tokens_file``, JSON
``{name: token}``, mode 0600, written by ``minard up``); tokens never appear in
logs.  SIGTERM stops it after the current round.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import click

from minard import config as config_mod
from minard import metrics
from minard.ops import programs
from minard.ops.logclient import Heartbeat
from minard.store import connection, status

log = logging.getLogger("minard.ops.pinger")

#: Numeric fields of a ``status:NAME`` heartbeat passed on as metrics.
RELAYED = ("lag_seconds", "queued_batches", "inflight_records", "workers", "connected", "consumers",
           "consumers_cmos", "consumers_base")


@dataclass
class Probe:
    """What the pinger found out about one program."""

    alive: bool
    status: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def _number(value) -> float | None:
    """*value* as a finite float, or None."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def component_probe(fields: dict, now: float) -> Probe:
    """A probe from a component's own heartbeat hash (:func:`minard.store.status.components`)."""
    if not fields.get("alive"):
        return Probe(False, "silent")
    metrics = {}
    started = _number(fields.get("started"))
    if started:
        metrics["uptime_s"] = round(now - started, 1)
    for name in RELAYED:
        value = _number(fields.get(name))
        if value is not None:
            metrics[name] = value
    return Probe(True, str(fields.get("state") or "running")[:64], metrics)


class _KeepRedirect(urllib.request.HTTPRedirectHandler):
    """Report a redirect as the answer (nginx's HTTP port redirects to HTTPS when TLS is on)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_NO_REDIRECT = urllib.request.build_opener(_KeepRedirect)


def http_probe(url: str, timeout: float = 2.0, any_status: bool = False) -> Probe:
    """Up if *url* answers 200 (or any HTTP status with *any_status*)."""
    t0 = time.perf_counter()
    try:
        with _NO_REDIRECT.open(url, timeout=timeout) as resp:
            code = resp.status
    except urllib.error.HTTPError as exc:
        code = exc.code
    except Exception as exc:  # noqa: BLE001 - refused, timeout, reset: not answering
        return Probe(False, f"no answer ({type(exc).__name__})")
    ms = round((time.perf_counter() - t0) * 1000, 1)
    alive = any_status or code == 200
    return Probe(alive, f"HTTP {code}", {"response_ms": ms})


def redis_probe(redis) -> Probe:
    """Up if Redis answers PING; uptime, memory and keys as metrics."""
    try:
        info = redis.info()
        keys = redis.dbsize()
    except Exception as exc:  # noqa: BLE001 - any Redis failure means not answering
        return Probe(False, f"no answer ({type(exc).__name__})")
    return Probe(True, "ok", {"uptime_s": float(info.get("uptime_in_seconds", 0)),
                              "used_memory": float(info.get("used_memory", 0)), "keys": float(keys)})


def dispatcher_probe(address: str, timeout: float = 2.0, cfg=None) -> Probe:
    """Up if the dispatcher answers ``STATS?``; its uptime, state and client count."""
    from minard.dispatcher.client import query

    try:
        reply = query(address, "STATS?", timeout, cfg=cfg)
        stats = json.loads(reply.split(":", 1)[1]) if reply.startswith("STATS:") else {}
    except Exception as exc:  # noqa: BLE001 - refused, timeout, garbled: not answering
        return Probe(False, f"no answer ({type(exc).__name__})")
    metrics = {"uptime_s": float(stats.get("uptime") or 0), "clients": float(len(stats.get("clients") or []))}
    return Probe(True, str(stats.get("state") or "running")[:64], metrics)


def load_tokens(path: Path) -> dict[str, str]:
    """The pinger's program tokens ``{name: token}`` (a missing file means none)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def tokens_path(cfg) -> Path:
    """``pinger_tokens_file`` or ``var_dir/pinger_tokens.json``."""
    return programs.ops_path(cfg, "pinger_tokens_file", "pinger_tokens.json")


class Pinger:
    """Probe every registered program and post a heartbeat for each one that is up."""

    def __init__(self, cfg, tokens: dict[str, str], redis=None):
        self.cfg = cfg
        self.tokens = tokens
        self.redis = redis or connection.redis(cfg, "logserver")
        self.registry = programs.Registry.from_config(cfg)
        self.url = str(cfg["log_url"])
        self.period = float(cfg["pinger_period"])
        self.started = time.time()
        self.beats: dict[str, Heartbeat] = {}
        self.alive: dict[str, bool] = {}
        self.rounds = self.posted = self.failed = 0
        self._warned: set[str] = set()
        self._stop = threading.Event()

    # -- probing --------------------------------------------------------------

    def probe_all(self, now: float) -> dict[str, Probe]:
        """A probe for every registered program (never raises)."""
        try:
            comps = status.components(self.redis, now)
        except Exception as exc:  # noqa: BLE001 - Redis down: no component can be seen
            self._warn_once("redis-components", f"cannot read component heartbeats: {type(exc).__name__}")
            comps = {}
        else:
            self._warned.discard("redis-components")
        special = {
            "redis": lambda: redis_probe(self.redis),
            "dispatcher": lambda: dispatcher_probe(f"127.0.0.1:{self.cfg['dispatcher_port']}", cfg=self.cfg),
            "web": lambda: http_probe(f"http://127.0.0.1:{self.cfg['web_port']}/healthz"),
            "snoplus_log": lambda: http_probe(f"http://127.0.0.1:{self.cfg['log_port']}/healthz"),
            "nginx": lambda: http_probe(f"http://127.0.0.1:{self.cfg['nginx_port']}/static/css/minard.css",
                                        any_status=True),
            "pinger": lambda: Probe(True, "ok", {"uptime_s": round(now - self.started, 1),
                                                 "failed_posts": float(self.failed)}),
        }
        out = {}
        for prog in self.registry:
            if prog.name in special:
                out[prog.name] = special[prog.name]()
            else:
                out[prog.name] = component_probe(comps.get(prog.name, {}), now)
        return out

    # -- posting --------------------------------------------------------------

    def post(self, name: str, probe: Probe) -> bool:
        """One heartbeat for *name* with its own token; False if there is none or it failed."""
        token = self.tokens.get(name)
        if not token:
            self._warn_once(f"token-{name}", f"no token for {name} in {tokens_path(self.cfg)}: not posting")
            return False
        hb = self.beats.get(name)
        if hb is None:
            hb = self.beats[name] = Heartbeat(name, self.url, token, period=self.period)
        hb.status = probe.status or "ok"
        hb.metrics = dict(list(probe.metrics.items())[: programs.MAX_METRICS])
        ok = hb.beat()
        self.posted += ok
        self.failed += not ok
        return ok

    def round(self, now: float | None = None) -> dict[str, Probe]:
        """Probe, post, log changes and alarm on silences; return the probes."""
        now = time.time() if now is None else now
        probes = self.probe_all(now)
        failed = [name for name, p in probes.items() if p.alive and not self.post(name, p)]
        if failed and len(failed) == sum(p.alive for p in probes.values()):
            self._warn_once("logserver", f"the log server {self.url} accepts no heartbeat")
        elif not failed:
            self._warned.discard("logserver")
        for name, probe in probes.items():
            if self.alive.get(name, True) != probe.alive:
                log.log(logging.WARNING if not probe.alive else logging.INFO, "%s is %s (%s)", name,
                        "up" if probe.alive else "not answering", probe.status)
            self.alive[name] = probe.alive
        try:
            programs.check_heartbeats(self.redis, self.registry, time.time(),
                                      float(self.cfg["alarm_history_days"]))
        except Exception as exc:  # noqa: BLE001 - Redis down: the log server checks too
            log.debug("check_heartbeats: %s", exc)
        self.rounds += 1
        return probes

    def _warn_once(self, key: str, message: str) -> None:
        """Log *message* once until the condition clears (no log flood every round)."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    # -- lifecycle ------------------------------------------------------------

    def stop(self, *_args) -> None:
        """Signal handler: stop after the current round."""
        self._stop.set()

    def run(self) -> None:
        """A round every ``pinger_period`` seconds until stopped."""
        log.info("pinger: %d programs every %.1fs -> %s", len(list(self.registry)), self.period, self.url)
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.round()
            self._stop.wait(max(0.0, self.period - (time.monotonic() - t0)))
        log.info("pinger stopped after %d rounds (%d heartbeats posted, %d failed)",
                 self.rounds, self.posted, self.failed)


@click.command("pinger")
@click.option("--once", is_flag=True, help="One round, print what was found, exit.")
@config_mod.pass_config
def pinger_cmd(cfg, once):
    """Post heartbeats to the log server for every pipeline component that is up."""
    pinger = Pinger(cfg, load_tokens(tokens_path(cfg)))
    if once:
        for name, p in pinger.round().items():
            click.echo(f"{name:<24} {'up' if p.alive else 'DOWN':<5} {p.status}")
        return
    metrics.serve(cfg, "pinger", metrics.Snapshot("minard_pinger", lambda: {
        "rounds": pinger.rounds, "heartbeats_posted": pinger.posted, "heartbeats_failed": pinger.failed,
        "program_up": dict(pinger.alive)}, counters=("rounds", "heartbeats_posted", "heartbeats_failed"),
        labels={"program_up": "program"}, help={"program_up": "1 while the program answers its probe."}))
    signal.signal(signal.SIGTERM, pinger.stop)
    signal.signal(signal.SIGINT, pinger.stop)
    pinger.run()
