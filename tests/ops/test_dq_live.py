"""`minard dq-live`'s checker against a real Redis: live and final judgements, and
alarms that leave known-flagged channels out."""

from __future__ import annotations

import time

from minard import config
from minard.ops.dq import LiveChecker
from minard.simulate.events import Faults
from minard.store import alarms, registry
from minard.store import channel_status as channels
from minard.store import dq as store_dq
from minard.testing.dq import write_run

T0 = time.time() - 3600


def dq_alarms(r):
    return [a["message"] for a in alarms.list_alarms(r) if "data quality" in a["message"]]


def test_a_hot_channel_alarms_until_it_is_flagged(redis_url, redis_client):
    cfg = config.load({"redis_url": redis_url, "dq_interval": 1.0}, env={})
    write_run(redis_client, 1000, 20000, 1, T0)
    store_dq.set_reference(redis_client, "", 1)
    checker = LiveChecker(cfg)
    write_run(redis_client, 7, 20000, 2, T0 + 100, faults=Faults(hot_channel=4321))
    checker.tick()
    assert store_dq.result(redis_client, 2)["final"] is False
    assert any("run 2 data quality occupancy_hot warning: 4321" in m for m in dq_alarms(redis_client))

    channels.change(redis_client, 4321, "hot", "flag", "known: fires in half the events", "expert")
    write_run(redis_client, 8, 20000, 3, T0 + 200, faults=Faults(hot_channel=4321))
    checker.tick()  # run 3 replaced run 2: run 2 is judged final, run 3 live
    assert store_dq.result(redis_client, 2)["final"] is True
    report = store_dq.result(redis_client, 3)
    hot = next(c for c in report["checks"] if c["name"] == "occupancy_hot")
    assert hot["status"] == "good" and hot["detail"]["known"] == [4321]
    assert not any("run 3" in m for m in dq_alarms(redis_client))
    checker.beat()
    assert redis_client.hget("status:dq_live", "run") == b"3"


def test_the_reference_is_chosen_automatically_from_signed_runs(redis_url, redis_client):
    cfg = config.load({"redis_url": redis_url}, env={})
    write_run(redis_client, 1000, 5000, 1, T0)
    registry.sign(redis_client, 1, "good", "s", "ok", False)
    registry.sign(redis_client, 1, "pass", "e", "ok", True)
    write_run(redis_client, 3, 5000, 2, T0 + 100)
    LiveChecker(cfg).tick()
    assert store_dq.result(redis_client, 2)["reference"] == 1
