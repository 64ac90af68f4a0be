"""The pinger against a real log server (werkzeug in a thread) and a real Redis."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from werkzeug.serving import make_server

from minard.ops import programs
from minard.ops.keys import KeyStore
from minard.ops.logserver import create_app
from minard.ops.pinger import Pinger, component_probe, load_tokens
from minard.store import alarms, status
from minard.testing import free_port, wait_for

REGISTRY = """
[minard_dispatch_pull]
description = pull pool
timeout = 1
[redis]
timeout = 30
[dispatcher]
timeout = 30
[pinger]
timeout = 30
[notoken]
timeout = 30
"""


@pytest.fixture
def logserver(cfg, tmp_path):
    """The log server on a free port, with tokens for every program but 'notoken'."""
    (tmp_path / "programs.cfg").write_text(REGISTRY)
    port = free_port()
    cfg.update(programs_file=str(tmp_path / "programs.cfg"), log_port=port, log_url=f"http://127.0.0.1:{port}")
    store = KeyStore.from_config(cfg)
    tokens = {n: store.add(n) for n in ("minard_dispatch_pull", "redis", "dispatcher", "pinger")}
    server = make_server("127.0.0.1", port, create_app(cfg), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield cfg, tokens
    server.shutdown()


def beat_pull(redis_client, lag=0.5):
    pipe = redis_client.pipeline()
    status.beat(pipe, "minard_dispatch_pull", {"lag_seconds": lag, "queued_batches": 3, "workers": 2},
                started=time.time() - 100)
    pipe.execute()


def test_every_component_that_is_up_gets_a_heartbeat_with_uptime(logserver, redis_client, caplog):
    cfg, tokens = logserver
    beat_pull(redis_client)
    pipe = redis_client.pipeline()
    status.beat(pipe, "notoken", {})  # alive, but the pinger has no token to post for it
    pipe.execute()
    caplog.set_level(logging.INFO)
    pinger = Pinger(cfg, tokens, redis_client)
    probes = pinger.round()
    assert probes["minard_dispatch_pull"].alive and probes["redis"].alive and probes["pinger"].alive
    assert not probes["dispatcher"].alive  # nothing listens on dispatcher_port
    rows = {r["name"]: r for r in programs.statuses(redis_client, programs.Registry.from_config(cfg))}
    assert rows["minard_dispatch_pull"]["state"] == "up"
    assert rows["minard_dispatch_pull"]["metrics"]["uptime_s"] >= 100
    assert rows["minard_dispatch_pull"]["metrics"]["lag_seconds"] == 0.5
    assert rows["redis"]["state"] == "up" and rows["redis"]["metrics"]["keys"] > 0
    assert rows["dispatcher"]["state"] == "unknown"
    assert rows["notoken"]["state"] == "unknown"
    assert "no token for notoken" in caplog.text
    assert not any(t in caplog.text for t in tokens.values())  # tokens never logged
    pinger.round()
    assert caplog.text.count("no token for notoken") == 1  # warned once, not every round


def test_a_component_that_goes_silent_raises_one_alarm(logserver, redis_client):
    cfg, tokens = logserver
    beat_pull(redis_client)
    pinger = Pinger(cfg, tokens, redis_client)
    pinger.round()
    redis_client.delete("status:minard_dispatch_pull")  # the process died

    def silence_alarms():
        return [a for a in alarms.list_alarms(redis_client) if a["program"] == "minard_dispatch_pull"]

    # its timeout is 1 s, judged by the log server's clock: keep probing until it raises the alarm
    wait_for(lambda: pinger.round() and silence_alarms(), 10, "the silence alarm")
    assert not pinger.round()["minard_dispatch_pull"].alive
    found = silence_alarms()
    assert len(found) == 1 and found[0]["level"] == alarms.DANGER
    assert "stopped sending heartbeats" in found[0]["message"]
    pinger.round()
    assert len(silence_alarms()) == 1


def test_component_probe_reads_the_heartbeat_hash():
    now = time.time()
    p = component_probe({"alive": True, "state": "running", "started": str(now - 5), "lag_seconds": "1.5",
                         "queued_batches": "x"}, now)
    assert p.alive and p.status == "running" and p.metrics == {"uptime_s": 5.0, "lag_seconds": 1.5}
    assert not component_probe({}, now).alive


def test_tokens_file_missing_means_none(tmp_path):
    assert load_tokens(tmp_path / "absent.json") == {}
