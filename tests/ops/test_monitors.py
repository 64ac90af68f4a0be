"""The monitors of conf/monitors.cfg against a real Redis: series written, alarm definitions evaluated."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from minard.config import ROOT
from minard.ops import alarmdefs, monitors
from minard.store import alarms, status
from minard.store import timeseries as ts
from minard.testing import wait_for


def ctx(cfg, redis_client, defs_text=None):
    """A monitor context evaluating the shipped conf/alarms.cfg (or *defs_text*)."""
    defs = alarmdefs.parse(defs_text) if defs_text else alarmdefs.load(cfg)
    return monitors.Context(cfg, redis_client, alarmdefs.Evaluator(redis_client, defs))


def alarm_messages(redis_client, *names):
    return [a["message"] for a in alarms.list_alarms(redis_client) if a["name"] in names]


def test_the_shipped_monitors_cfg_lists_every_monitor_with_a_period():
    specs = monitors.parse_monitors((ROOT / "conf" / "monitors.cfg").read_text())
    assert {s.name for s in specs} == set(monitors.CHECKS)
    assert all(s.period > 0 for s in specs)


@pytest.mark.parametrize("text,message", [
    ("redis", "expected 'NAME PERIOD'"), ("bogus 5", "unknown monitor"),
    ("redis x", "is not a number"), ("redis 0", "must be positive"),
])
def test_bad_lines_are_refused_with_the_line_number(text, message):
    with pytest.raises(ValueError, match=message) as err:
        monitors.parse_monitors("# comment\n\n" + text, "m.cfg")
    assert "m.cfg:3" in str(err.value)


def test_redis_monitor_writes_its_series_and_alarms_near_the_memory_limit(cfg, redis_client):
    redis_client.config_set("maxmemory", "1gb")
    try:
        values = monitors.run_check(ctx(cfg, redis_client), "redis")
        assert values["maxmemory"] == 2**30 and values["keys"] >= 0 and values["used_memory"] > 0
        assert alarm_messages(redis_client, "redis_memory", "redis_oom") == []
        c = ctx(cfg, redis_client, "[redis_memory]\ncondition = redis.memory_fraction > 1e-9\npriority = high\n")
        monitors.run_check(c, "redis")
        assert any("redis.memory_fraction" in m for m in alarm_messages(redis_client, "redis_memory"))
    finally:
        redis_client.config_set("maxmemory", "0")
    now = time.time()
    _, vals, _ = ts.fetch(redis_client, "mon", ["redis.used_memory"], now - 5, now)
    assert (vals["redis.used_memory"] > 0).any()


def test_disk_monitor_alarms_below_the_free_fraction(cfg, redis_client):
    values = monitors.run_check(ctx(cfg, redis_client), "disk")
    assert 0 < values["logs_free"] <= 1 and values["records_free_bytes"] > 0
    c = ctx(cfg, redis_client, "[disk_free]\ncondition = disk.*_free < 1.5\n")  # every disk is "too full"
    monitors.run_check(c, "disk")
    assert {a["program"] for a in alarms.list_alarms(redis_client) if a["name"] == "disk_free"} >= {"logs", "var"}


def test_lag_and_queue_monitors_read_the_pools_heartbeats(cfg, redis_client):
    pipe = redis_client.pipeline()
    status.beat(pipe, "data_consumer_cmos", {"lag_seconds": 12.5, "queued_batches": 40, "inflight_records": 7})
    pipe.execute()
    c = ctx(cfg, redis_client, "[consumer_lag]\ncondition = lag.* > 5\n\n"
            "[queue_backlog]\ncondition = queues.*.queued > 32\n")
    assert monitors.run_check(c, "lag") == {"data_consumer_cmos": 12.5}
    q = monitors.run_check(c, "queues")
    assert q == {"data_consumer_cmos.queued": 40, "data_consumer_cmos.inflight": 7}
    assert any("lag.data_consumer_cmos = 12.5" in m for m in alarm_messages(redis_client, "consumer_lag"))
    assert any("queues.data_consumer_cmos.queued = 40" in m for m in alarm_messages(redis_client, "queue_backlog"))


def test_loss_monitor_alarms_when_a_counter_moves(cfg, redis_client):
    pipe = redis_client.pipeline()
    status.count(pipe, "push", received=100, processed=90, dropped=10)
    pipe.execute()
    c = ctx(cfg, redis_client)
    assert monitors.run_check(c, "losses")["push"] == 10
    assert alarm_messages(redis_client, "records_lost") == []  # first reading: nothing to compare
    pipe = redis_client.pipeline()
    status.count(pipe, "push", received=5, dropped=5)
    pipe.execute()
    monitors.run_check(c, "losses")
    assert any("increase(losses.push) = 5" in m for m in alarm_messages(redis_client, "records_lost"))


def test_dispatcher_monitor_alarms_when_it_does_not_answer(cfg, redis_client):
    c = ctx(cfg, redis_client)
    for _ in range(2):  # on_delay = 2 checks
        values = monitors.run_check(c, "dispatcher")
    assert values == {"up": 0.0}
    msgs = alarm_messages(redis_client, "dispatcher_down")
    assert msgs and "dispatcher.up = 0" in msgs[0]
    assert alarms.list_alarms(redis_client)[0]["priority"] == "high"


def test_runner_starts_all_monitors_on_their_periods_and_stops_on_request(cfg, redis_client, caplog):
    caplog.set_level(logging.INFO)
    specs = [monitors.MonitorSpec("redis", 0.2), monitors.MonitorSpec("losses", 0.5),
             monitors.MonitorSpec("heartbeats", 0.3)]
    runner = monitors.Runner(cfg, specs, redis_client)
    thread = threading.Thread(target=runner.run)
    thread.start()
    wait_for(lambda: runner.runs["redis"] >= 4 and runner.runs["losses"] >= 2, 10, "monitors running")
    runner.stop()
    thread.join(3)
    assert not thread.is_alive()
    # each on its own period: losses (0.5 s) runs about 0.4 times as often as redis (0.2 s)
    assert runner.runs["losses"] <= runner.runs["redis"] // 2 + 1
    assert "poll start redis 0.2" in caplog.text and "poll stop redis" in caplog.text
    assert redis_client.hget("status:monitors", "monitors") == b"3"


def test_a_failing_check_is_logged_once_and_does_not_stop_the_others(cfg, redis_client, caplog, monkeypatch):
    def broken(_ctx):
        raise OSError("disk gone")
    monkeypatch.setitem(monitors.CHECKS, "disk", broken)
    runner = monitors.Runner(cfg, [monitors.MonitorSpec("disk", 1), monitors.MonitorSpec("redis", 1)], redis_client)
    for _ in range(3):
        assert runner.once(runner.specs[0]) is None
        assert runner.once(runner.specs[1])
    assert caplog.text.count("monitor disk failed") == 1 and runner.errors["disk"] == 3
