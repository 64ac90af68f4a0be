"""Prometheus ``/metrics`` of every long-running process (minard/metrics.py).

Each process is started for real (its console script, as supervisord starts
it) with ``metrics_port_<program>`` on a free port; its ``/metrics`` is scraped
over HTTP and parsed with the library's own parser.  Where a process also
counts in Redis (``stats:<stage>``), its Prometheus counters must agree with
Redis exactly, including the counters of pool workers (multiprocess mode).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from minard import config, metrics, stack
from minard.store.status import stats
from minard.testing import free_port, stop_pid, wait_for

BIN = Path(sys.executable).parent


def scrape(port: int) -> dict:
    """``{(sample name, frozenset(labels)): value}`` of a /metrics page, parsed by the library."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    """One sample's value, or None."""
    return samples.get((name, frozenset(labels.items())))


def answers(port: int) -> bool:
    """True once something serves /metrics on *port*."""
    try:
        scrape(port)
    except OSError:
        return False
    return True


class Processes:
    """Console scripts started with MINARD_* settings, stopped by pid."""

    def __init__(self, tmp_path: Path, settings: dict):
        self.tmp = tmp_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MINARD_")}
        self.env.update({f"MINARD_{k.upper()}": str(v) for k, v in settings.items()})
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *argv: str) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen([str(BIN / argv[0]), *argv[1:]], env=self.env,
                                                stdout=log, stderr=log, cwd=str(config.ROOT))
        return self.procs[name]

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self, name: str) -> int | None:
        return stop_pid(self.procs.pop(name), 15)

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@pytest.fixture
def procs(cfg, tmp_path):
    """Processes on this test's Redis, ports and var_dir; every metrics port free."""
    ports = {p: free_port() for p in metrics.PROGRAMS}
    settings = {k: cfg[k] for k in ("redis_url", "var_dir", "dispatcher_port", "dispatcher_accounting_dir",
                                    "zmq_dispatch", "zmq_cmos", "zmq_base", "orca_port",
                                    "dispatcher_keys_file", "dispatcher_credentials_file")}
    settings.update({f"metrics_port_{p}": n for p, n in ports.items()})
    settings.update({"dispatch_event_log": tmp_path / "pool.log", "dispatch_close_retry": 1,
                     "orca_reconnect_max": 0.2, "web_port": free_port(), "log_port": free_port(),
                     "pinger_period": 0.5, "programs_file": config.ROOT / "conf" / "programs.cfg"})
    p = Processes(tmp_path, settings)
    p.ports = ports
    yield p
    p.close()


def stage(samples: dict, stage_name: str, outcome: str) -> float:
    """``minard_stage_records_total{stage, outcome}`` (0 when absent)."""
    return value(samples, "minard_stage_records_total", stage=stage_name, outcome=outcome) or 0


# ------------------------------------------------------------------ the module itself


def test_every_program_has_a_port_key_and_the_stack_gives_each_its_own_port():
    keys = {k for k in config.load(env={}) if k.startswith("metrics_port_")}
    assert keys == {f"metrics_port_{p}" for p in metrics.PROGRAMS}
    assert set(metrics.PROGRAMS) <= {p.name for p in stack.PROGRAMS}
    cfg = config.load(env={})
    assert all(metrics.port(cfg, p) == 0 for p in metrics.PROGRAMS)  # off unless asked for
    ports = stack.metrics_ports({**cfg, "metrics_port_web": 9999})
    assert ports["metrics_port_web"] == 9999  # a configured port is kept
    assert len(set(ports.values())) == len(metrics.PROGRAMS) and all(ports.values())
    assert stack.metrics_ports({**cfg, "stack_metrics_port": 0}) == dict.fromkeys(ports, 0)


def test_prometheus_yml_scrapes_every_metrics_port_and_the_pipeline_view():
    cfg = {**config.load(env={}), "web_port": 8123}
    cfg.update(stack.metrics_ports(cfg))
    text = stack.prometheus_text(cfg)
    for p in metrics.PROGRAMS:
        assert f"'127.0.0.1:{metrics.port(cfg, p)}']\n        labels: {{program: {p}}}" in text
    assert "'127.0.0.1:8123'" in text
    assert (config.ROOT / "conf" / "prometheus.yml").read_text() == stack.production_files()["prometheus.yml"]


def test_port_zero_serves_nothing_and_a_taken_port_is_logged_not_fatal(caplog):
    assert metrics.serve({"metrics_port_pinger": 0}, "pinger") is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, "minard.metrics"):
            assert metrics.serve({"metrics_port_pinger": port}, "pinger") is None
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text


def test_stage_counters_keep_one_unit_per_family():
    before = scrape_registry()
    metrics.add_stage("t_units", {"received": 5, "processed": 4, "errors": 1, "wire_bad": 1,
                                  "bytes_skipped": 300, "lost_seconds": 2, "dropped": 0})
    after = scrape_registry()

    def delta(name, **labels):
        return (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)

    assert delta("minard_stage_records_total", stage="t_units", outcome="received") == 5
    assert delta("minard_stage_records_total", stage="t_units", outcome="errors") == 1
    assert delta("minard_stage_reason_records_total", stage="t_units", reason="wire_bad") == 1
    assert delta("minard_stage_skipped_bytes_total", stage="t_units") == 300
    assert delta("minard_stage_lost_seconds_total", stage="t_units") == 2
    outcomes = {dict(k[1])["outcome"] for k in after if k[0] == "minard_stage_records_total"}
    assert outcomes <= set(metrics.OUTCOMES)


def scrape_registry() -> dict:
    """This process's own metrics, through the text format and the parser."""
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry_for()).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_merged_sources_add_up_one_series_and_keep_one_family():
    class Source:
        def __init__(self, n, stage):
            self.n, self.stage = n, stage

        def collect(self):
            fam = CounterMetricFamily("minard_t_merge", "test", labels=["stage"])
            fam.add_metric([self.stage], self.n)
            return [fam]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.Merged([Source(2, "a"), Source(3, "a"), Source(7, "b")]))
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    assert text.count("# TYPE minard_t_merge_total counter") == 1 or text.count("# TYPE minard_t_merge counter") == 1
    fams = list(text_string_to_metric_families(text))
    got = {s.labels["stage"]: s.value for f in fams for s in f.samples if s.name == "minard_t_merge_total"}
    assert got == {"a": 5, "b": 7}


def test_request_metrics_label_routes_not_raw_paths(cfg):
    from minard.web import create_app

    app = create_app(cfg)
    client = app.test_client()
    before = scrape_registry()
    for i in range(3):
        client.get(f"/api/runs/{i}")
        client.get(f"/no/such/page/{i}")
    after = scrape_registry()
    key = {"app": "web", "route": "/api/runs/<run>", "method": "GET", "status": "404"}

    def delta(**labels):
        return (value(after, "minard_http_requests_total", **labels) or 0) - \
            (value(before, "minard_http_requests_total", **labels) or 0)

    assert delta(**key) == 3
    assert delta(app="web", route="unmatched", method="GET", status="404") == 3
    assert not any("/no/such" in str(k) or "/api/runs/1" in str(k) for k in after)


# ------------------------------------------------------------------ real processes


@pytest.mark.slow
def test_dispatcher_push_and_pull_pool_serve_counters_that_agree_with_redis(procs, redis_client, demo_zdab):
    ports = procs.ports
    procs.start("dispatcher", "minard", "dispatcher")
    wait_for(lambda: answers(ports["dispatcher"]), 30, "dispatcher /metrics")
    procs.start("pull", "minard_dispatch", "pull")
    procs.start("push", "minard_dispatch", "push")
    for p in ("minard_dispatch_pull", "minard_dispatch_push"):
        wait_for(lambda p=p: answers(ports[p]), 30, f"{p} /metrics")
    wait_for(lambda: value(scrape(ports["minard_dispatch_push"]), "minard_push_consumers") == 1, 30,
             "pull connected to push")
    wait_for(lambda: value(scrape(ports["dispatcher"]), "minard_dispatcher_clients", role="analyzer") == 1, 30,
             "push connected to the dispatcher")
    replay = subprocess.run([str(BIN / "minard"), "replay", str(demo_zdab), "--dispatcher",
                             f"127.0.0.1:{procs.env['MINARD_DISPATCHER_PORT']}", "--speed", "max",
                             "--no-progress"], env=procs.env, capture_output=True, text=True, timeout=120, check=False)
    assert replay.returncode == 0, replay.stderr[-2000:]

    def settled():
        s = stats(redis_client)
        pull = s.get("pull", {})
        return pull.get("received") and pull["received"] == pull.get("processed", 0) + pull.get("errors", 0) \
            + pull.get("dropped", 0) and s
    redis_stats = wait_for(settled, 60, "records through the pool")
    disp = scrape(ports["dispatcher"])
    events = value(disp, "minard_dispatcher_received_events_total")
    assert events and events == redis_stats["pull"]["received"]
    assert value(disp, "process_cpu_seconds_total") is not None  # the process's own metrics

    def agree(port, *stages):
        """Prometheus equals stats:<stage> in Redis for every outcome (once both caught up)."""
        s, r = scrape(port), stats(redis_client)
        return all(stage(s, st, o) == r.get(st, {}).get(o, 0) for st in stages for o in metrics.OUTCOMES)

    wait_for(lambda: agree(ports["minard_dispatch_push"], "push"), 20, "push counters = stats:push")
    # received/dropped come from the pool manager, processed/errors from its worker
    # processes (multiprocess mode), redis from the workers' flushes
    wait_for(lambda: agree(ports["minard_dispatch_pull"], "pull", "redis"), 20,
             f"pull counters = stats:pull ({scrape(ports['minard_dispatch_pull'])})")
    pull = scrape(ports["minard_dispatch_pull"])
    assert stage(pull, "pull", "processed") > 0 and stage(pull, "redis", "processed") > 0
    assert value(pull, "minard_pool_records_received_total") == events
    assert value(pull, "minard_pool_workers_started_total") >= 1
    assert value(pull, "minard_pool_queued_batches") is not None  # a gauge, from the last tick
    shared = list((Path(procs.env["MINARD_VAR_DIR"]) / "metrics").glob("minard_dispatch_pull-*"))
    assert len(shared) == 1 and any(shared[0].iterdir())  # the workers' files
    assert procs.stop("pull") == 0, procs.log("pull")
    assert not shared[0].exists()  # removed at a clean exit


@pytest.mark.slow
def test_orca_producer_and_both_consumers_serve_counters_that_agree_with_redis(procs, redis_client, tmp_path):
    ports = procs.ports
    data = tmp_path / "orca.dat"
    sim = subprocess.run([str(BIN / "minard"), "simulate", "orca", str(data), "--seconds", "4", "--seed", "3",
                          "--quiet"], env=procs.env, capture_output=True, text=True, timeout=120, check=False)
    assert sim.returncode == 0, sim.stderr
    procs.start("cmos", "data_consumer", procs.env["MINARD_ZMQ_CMOS"].rsplit(":", 1)[1])
    procs.start("base", "data_consumer", "--stream", "base")
    procs.start("producer", "data_producer")
    for p in ("data_consumer_cmos", "data_consumer_base", "data_producer"):
        wait_for(lambda p=p: answers(ports[p]), 30, f"{p} /metrics")
    wait_for(lambda: (value(scrape(ports["data_producer"]), "minard_producer_consumers_cmos") == 1
                      and value(scrape(ports["data_producer"]), "minard_producer_consumers_base") == 1),
             30, "consumers connected")
    procs.start("orca", "minard", "orca-replay", str(data), "--port", procs.env["MINARD_ORCA_PORT"],
                "--speed", "max", "--wait", "--quiet")

    def agree():
        r = stats(redis_client)
        if not r.get("cmos", {}).get("processed") or not r.get("base", {}).get("processed"):
            return False
        checks = [(ports["data_producer"], "orca_producer"), (ports["data_consumer_cmos"], "cmos"),
                  (ports["data_consumer_base"], "base")]
        return all(stage(scrape(port), st, o) == r.get(st, {}).get(o, 0)
                   for port, st in checks for o in metrics.OUTCOMES) and r
    r = wait_for(agree, 60, f"ORCA counters = Redis ({stats(redis_client)})")
    assert stage(scrape(ports["data_consumer_cmos"]), "cmos", "processed") == r["cmos"]["processed"] > 0
    producer = scrape(ports["data_producer"])
    assert value(producer, "minard_producer_orca_connected") in (0, 1)
    assert value(producer, "minard_stage_headers_total", stage="orca_producer") >= 1  # not records


@pytest.mark.slow
@pytest.mark.parametrize("app,name,program", [("minard:app", "minard_web", "web"),
                                              ("snoplus_log:app", "snoplus_log", "snoplus_log")])
def test_gunicorn_master_serves_the_requests_of_all_its_workers(procs, app, name, program):
    port = free_port()
    argv = stack.gunicorn_command(config.load({f"metrics_port_{program}": procs.ports[program]}, env={}),
                                  program, port=port, workers=2)  # as minard up runs it
    assert argv[-1] == app and argv[argv.index("--name") + 1] == name
    procs.start(program, *argv)
    mport = procs.ports[program]
    assert port != mport  # one port for both: /metrics there would be the web app's own page
    wait_for(lambda: answers(mport), 30, f"{program} /metrics")
    wait_for(lambda: _status(f"http://127.0.0.1:{port}/healthz") in (200, 503), 30, "the app")
    # the page on mport is this master's (it logs when it cannot listen there and runs on without)
    assert "cannot listen" not in procs.log(program), procs.log(program)
    answered = [(_status(f"http://127.0.0.1:{port}/healthz"), _status(f"http://127.0.0.1:{port}/nonexistent"))
                for _ in range(20)]  # new connections: both workers answer some
    assert all(ok in (200, 503) and missing == 404 for ok, missing in answered), answered
    seen = {}

    def counted():
        s = seen["last"] = scrape(mport)
        ok = sum(v for (n, labels), v in s.items() if n == "minard_http_requests_total"
                 and dict(labels)["route"] == "/healthz")
        missing = sum(v for (n, labels), v in s.items() if n == "minard_http_requests_total"
                      and dict(labels)["route"] == "unmatched" and dict(labels)["status"] == "404")
        return ok >= 20 and missing == 20 and s
    try:
        s = wait_for(counted, 20, "requests of every worker counted")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last scrape {seen.get('last')}; log {procs.log(program)}") from None
    assert value(s, "minard_http_request_duration_seconds_count", app=program, route="unmatched") == 20
    shared = list((Path(procs.env["MINARD_VAR_DIR"]) / "metrics").glob("gunicorn-*"))
    assert len(shared) == 1 and len(list(shared[0].glob("counter_*.db"))) >= 1
    assert procs.stop(program) == 0, procs.log(program)
    assert not shared[0].exists()


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@pytest.mark.slow
def test_pinger_and_monitors_serve_their_rounds_and_checks(procs):
    ports = procs.ports
    procs.start("pinger", "minard", "pinger")
    procs.start("monitors", "minard", "monitors")
    wait_for(lambda: answers(ports["pinger"]) and (value(scrape(ports["pinger"]), "minard_pinger_rounds_total")
                                                   or 0) >= 2, 30, "pinger rounds")
    pinger = scrape(ports["pinger"])
    assert value(pinger, "minard_pinger_program_up", program="redis") == 1  # the test's Redis answers
    assert value(pinger, "minard_pinger_program_up", program="dispatcher") == 0  # none runs
    wait_for(lambda: answers(ports["monitors"]) and (value(scrape(ports["monitors"]), "minard_monitor_checks_total",
                                                           monitor="redis") or 0) >= 1, 30, "monitor checks")
    mon = scrape(ports["monitors"])
    assert value(mon, "minard_monitor_failing", monitor="redis") == 0
    for name in ("pinger", "monitors"):
        assert procs.stop(name) == 0, procs.log(name)


@pytest.mark.slow
def test_dq_live_serves_its_judgements(procs, redis_client):
    from minard.testing.dq import write_run

    write_run(redis_client, 3, 2000, 77, 1_700_000_000.0)
    procs.start("dq_live", "minard", "dq-live")
    port = procs.ports["dq_live"]
    wait_for(lambda: answers(port) and (value(scrape(port), "minard_dq_judgements_total", kind="live") or 0) >= 1,
             60, "a live judgement")
    assert value(scrape(port), "minard_dq_run") == 77
    assert procs.stop("dq_live") == 0, procs.log("dq_live")
