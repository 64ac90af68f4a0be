"""Prometheus metrics of every long-running minard process (``prometheus_client``).

Each process serves ``/metrics`` on its own port, ``metrics_port_<program>``
(program names as in ``minard/stack.py`` and ``conf/supervisord.conf``; ``0``,
the default, turns it off; ``minard up`` gives every program a port).
:func:`serve` starts that HTTP server from the configuration; a port that is
taken is logged and the process goes on without metrics (the data matter more).

The shared families are fed from the counting points the processes already
have, not from new hand-kept counters:

* :func:`add_stage` — what a process adds to its ``stats:<stage>`` hash in Redis
  (:mod:`minard.store.status`), counted once the transaction has committed, so
  the Prometheus counters and Redis agree record for record.  Loss outcomes
  (``received``, ``processed``, ``dropped``, ``errors``) go to
  ``minard_stage_records_total``; named reasons to
  ``minard_stage_reason_records_total``; the few counters that are not records
  (bytes, seconds, ...) to their own family with their own unit (:data:`UNITS`).
* collectors read live state at scrape time (the dispatcher's counters, the
  pool's accounting) — :class:`Snapshot` turns a ``{name: number}`` mapping into
  families.

Forking processes use the library's multiprocess mode: :func:`multiprocess_dir`
prepares the directory that child processes (pool workers, gunicorn workers)
write to, and :func:`serve` merges it with the parent's own registry.  This
module imports only the standard library and ``prometheus_client`` (checked by
``.importlinter``), so every layer from the store up may use it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from minard import metrics_dir

log = logging.getLogger("minard.metrics")

#: Every long-running program that serves metrics (``metrics_port_<program>``), in stack order.
PROGRAMS = ("dispatcher", "minard_dispatch_pull", "data_consumer_cmos", "data_consumer_base",
            "minard_dispatch_push", "data_producer", "web", "snoplus_log", "pinger", "monitors", "notifier", "dq_live")
#: Outcomes of the loss accounting (received = processed + dropped + errors).
OUTCOMES = ("received", "processed", "dropped", "errors")
#: Stage counters that are not counts of records: name -> (family, help).
UNITS = {
    "bytes_skipped": ("minard_stage_skipped_bytes", "Bytes of the input stream skipped while resynchronising."),
    "headers": ("minard_stage_headers", "ORCA header records read (they describe the stream, not data)."),
    "lost_seconds": ("minard_stage_lost_seconds", "Seconds of data whose values could not be stored."),
    "flush_conflicts": ("minard_stage_flush_conflicts", "Redis flushes retried because another worker wrote first."),
    "rates": ("minard_stage_rates", "Per-channel rates computed and stored."),
}

STAGE_RECORDS = Counter("minard_stage_records", "Records per pipeline stage and outcome "
                        "(received = processed + dropped + errors), as added to stats:<stage>.",
                        ["stage", "outcome"])
STAGE_REASONS = Counter("minard_stage_reason_records", "Records per pipeline stage counted under a named "
                        "reason (a drop, an error, or a kind of record), as added to stats:<stage>.",
                        ["stage", "reason"])
_UNIT_COUNTERS = {name: Counter(family, text, ["stage"]) for name, (family, text) in UNITS.items()}
REDIS_WRITE_FAILURES = Counter("minard_redis_write_failures", "Heartbeat and counter transactions that "
                               "Redis refused or did not answer (kept and retried).", ["component"])
HTTP_REQUESTS = Counter("minard_http_requests", "HTTP requests answered, by route, method and status.",
                        ["app", "route", "method", "status"])
HTTP_BODY_TIMEOUTS = Counter("minard_http_body_timeouts", "Requests whose body did not arrive within "
                             "web_body_timeout, answered 408 before the app ran.", ["app"])
HTTP_SECONDS = Histogram("minard_http_request_duration_seconds", "Time to produce a response, by route.",
                         ["app", "route"], buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))


# ------------------------------------------------------------------ counting points


def add_stage(stage: str, counts: Mapping[str, int]) -> None:
    """Count *counts* (what was just committed to ``stats:<stage>``) into the stage families."""
    for name, value in counts.items():
        if not value or value < 0:
            continue
        if name in OUTCOMES:
            STAGE_RECORDS.labels(stage, name).inc(value)
        elif name in _UNIT_COUNTERS:
            _UNIT_COUNTERS[name].labels(stage).inc(value)
        else:
            STAGE_REASONS.labels(stage, name).inc(value)


def stage_families(prefix: str, stats: Mapping[str, Mapping[str, int]]) -> list[Metric]:
    """Counter families of whole ``stats:<stage>`` hashes, split as :func:`add_stage` splits them.

    For the web app's view of the pipeline in Redis (``prefix`` ``minard_pipeline``):
    ``<prefix>_records_total{stage,outcome}``, ``<prefix>_reason_records_total{stage,reason}``
    and one family per unit of :data:`UNITS`.
    """
    records = CounterMetricFamily(f"{prefix}_records", "Records per pipeline stage and outcome "
                                  "(received = processed + dropped + errors), all processes, from Redis.",
                                  labels=["stage", "outcome"])
    reasons = CounterMetricFamily(f"{prefix}_reason_records", "Records per pipeline stage under a named "
                                  "reason, all processes, from Redis.", labels=["stage", "reason"])
    units = {name: CounterMetricFamily(family.replace("minard_stage", prefix, 1), text, labels=["stage"])
             for name, (family, text) in UNITS.items()}
    for stage, counts in sorted(stats.items()):
        for name, value in sorted(counts.items()):
            if name in OUTCOMES:
                records.add_metric([stage, name], value)
            elif name in units:
                units[name].add_metric([stage], value)
            else:
                reasons.add_metric([stage, name], value)
    return [records, reasons, *units.values()]


def redis_write_failed(component: str) -> None:
    """One failed heartbeat/counter transaction of *component*."""
    REDIS_WRITE_FAILURES.labels(component).inc()


def metric_name(text: str) -> str:
    """*text* as a Prometheus name fragment: lower case, ``[a-z0-9_]`` only."""
    return re.sub(r"[^a-z0-9_]+", "_", str(text).lower()).strip("_") or "unnamed"


def _number(value) -> float | None:
    """*value* as a sample value, or None if it is not a number."""
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, (int, float)) else None


class Snapshot:
    """A collector over live state: ``read()`` returns ``{name: value}`` at scrape time.

    A value is a number, or a mapping ``{label value: number}`` whose label is
    named by *labels* (default ``name``).  Names in *counters* become
    ``<prefix>_<name>_total`` counters, the others ``<prefix>_<name>`` gauges;
    *help* maps a name to its help text.  A failing ``read`` is logged and
    yields nothing (a scrape never breaks the process).
    """

    def __init__(self, prefix: str, read: Callable[[], Mapping[str, object]],
                 counters: Iterable[str] = (), help: Mapping[str, str] | None = None,
                 labels: Mapping[str, str] | None = None):
        self.prefix, self.read, self.counters = prefix, read, frozenset(counters)
        self.help, self.labels = dict(help or {}), dict(labels or {})

    def collect(self) -> Iterable[Metric]:
        """One family per numeric (or labelled numeric) value of ``read()``."""
        try:
            values = dict(self.read())
        except Exception:  # noqa: BLE001 - a scrape must not break the process
            log.exception("metrics: reading %s failed", self.prefix)
            return []
        out = []
        for name, value in sorted(values.items()):
            kind = CounterMetricFamily if name in self.counters else GaugeMetricFamily
            full, text = f"{self.prefix}_{metric_name(name)}", self.help.get(name, name.replace("_", " "))
            if isinstance(value, Mapping):
                fam = kind(full, text, labels=[self.labels.get(name, "name")])
                for label, v in sorted(value.items(), key=lambda kv: str(kv[0])):
                    if _number(v) is not None:
                        fam.add_metric([str(label)], _number(v))
                out.append(fam)
            elif _number(value) is not None:
                out.append(kind(full, text, value=_number(value)))
        return out


# ------------------------------------------------------------------ web apps


#: The WSGI environ key where an instrumented Flask app leaves the URL rule it matched.
ROUTE_KEY = "minard.route"


class WSGIMetrics:
    """WSGI middleware counting requests and their duration per route (bounded labels).

    The route label is the URL rule (``/api/runs/<run>``), never the raw path,
    so a scan of random URLs adds one label value (``unmatched``), not one per URL.
    Needs only the app's ``url_map`` (no Flask import here).
    """

    METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})

    def __init__(self, wsgi_app, url_map, app_name: str):
        self.wsgi_app, self.url_map, self.app_name = wsgi_app, url_map, app_name

    def route(self, environ) -> str:
        """The matched URL rule of a request, or ``unmatched``.

        The app's own match when it recorded one (:func:`instrument`: matching
        the URL a second time was a tenth of a data request's time), else matched here.
        """
        if ROUTE_KEY in environ:
            return environ[ROUTE_KEY]
        try:
            rule, _ = self.url_map.bind_to_environ(environ).match(return_rule=True)
            return rule.rule
        except Exception:  # noqa: BLE001 - 404, 405 and redirects all raise
            return "unmatched"

    def __call__(self, environ, start_response):
        t0 = time.perf_counter()
        seen = {"status": "500"}

        def recording_start_response(status, headers, exc_info=None):
            seen["status"] = str(status).split(" ", 1)[0]
            return start_response(status, headers, exc_info)

        try:
            return self.wsgi_app(environ, recording_start_response)
        finally:
            method = environ.get("REQUEST_METHOD", "")
            route = self.route(environ)
            HTTP_REQUESTS.labels(self.app_name, route, method if method in self.METHODS else "other",
                                 seen["status"]).inc()
            HTTP_SECONDS.labels(self.app_name, route).observe(time.perf_counter() - t0)


def instrument(app, app_name: str, request=None) -> None:
    """Count the requests of a Flask *app* (:class:`WSGIMetrics`).

    With *request* (the app's ``flask.request``: this module imports no web
    framework), the route Flask matched is recorded for the middleware instead
    of being matched a second time.
    """
    app.wsgi_app = WSGIMetrics(app.wsgi_app, app.url_map, app_name)
    if request is None:
        return

    def record_route():
        """Leave the URL rule Flask matched for :meth:`WSGIMetrics.route`."""
        request.environ[ROUTE_KEY] = request.url_rule.rule if request.url_rule is not None else "unmatched"

    app.before_request_funcs.setdefault(None, []).insert(0, record_route)  # first: before any hook can abort


# ------------------------------------------------------------------ serving


def port(cfg: Mapping[str, object], program: str) -> int:
    """The metrics port of *program* (``metrics_port_<program>``; 0 = off)."""
    return int(cfg.get(f"metrics_port_{program}", 0) or 0)


class Merged:
    """One collector over several sources, families of one name merged into one.

    The text format allows a family only once, and a forking process has the
    same family in its own registry and in its children's files.
    """

    def __init__(self, sources: Iterable[object]):
        self.sources = list(sources)

    def collect(self) -> Iterable[Metric]:
        """Every family of every source; samples of one series are added up."""
        merged: dict[str, Metric] = {}
        for source in self.sources:
            try:
                families = list(source.collect())
            except Exception:  # noqa: BLE001 - one broken source must not hide the others
                log.exception("metrics: a collector failed")
                continue
            for fam in families:
                have = merged.get(fam.name)
                if have is None:
                    merged[fam.name] = fam
                    continue
                index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(have.samples)}
                for s in fam.samples:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    if key in index and not s.name.endswith("_created"):
                        old = have.samples[index[key]]
                        have.samples[index[key]] = old._replace(value=old.value + s.value)
                    elif key not in index:
                        have.samples.append(s)
        return list(merged.values())


def registry_for(*collectors, multiprocess: str | os.PathLike | None = None, own: bool = True) -> CollectorRegistry:
    """A registry serving this process's metrics (unless not *own*), *collectors*, and a
    multiprocess directory (a gunicorn master serves only its workers' files: its own
    metrics are in them too)."""
    sources: list[object] = [REGISTRY, *collectors] if own else list(collectors)
    if multiprocess:
        sources.append(MultiProcessCollector(None, path=str(multiprocess)))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged(sources))
    return registry


def serve(cfg: Mapping[str, object], program: str, *collectors, multiprocess=None, own: bool = True):
    """Serve ``/metrics`` of *program* on ``metrics_host:metrics_port_<program>``.

    Returns the HTTP server (``shutdown()`` stops it), or None when the port is
    0 or cannot be bound (logged; the process runs on without metrics).
    """
    number = port(cfg, program)
    if number <= 0:
        return None
    host = str(cfg.get("metrics_host") or "127.0.0.1")
    try:
        server, _thread = start_http_server(number, addr=host,
                                            registry=registry_for(*collectors, multiprocess=multiprocess, own=own))
    except OSError as exc:
        log.error("metrics of %s: cannot listen on %s:%d (%s); running without metrics",
                  program, host, number, exc)
        return None
    log.info("metrics of %s on http://%s:%d/metrics", program, host, number)
    return server


def multiprocess_dir(cfg, program: str) -> Path:
    """The multiprocess directory of *program*'s children, exported to them (see :mod:`minard.metrics_dir`)."""
    return metrics_dir.prepare(cfg, program)


def remove_multiprocess_dir(path: str | os.PathLike | None) -> None:
    """Remove a directory made by :func:`multiprocess_dir` (at a clean exit)."""
    metrics_dir.remove(path)
