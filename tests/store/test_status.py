"""Heartbeats and stage counters in a real redis-server."""

import time

from minard.store import status


def test_beat_is_visible_and_goes_stale(redis_client):
    pipe = redis_client.pipeline()
    status.beat(pipe, "push", {"dispatcher": "127.0.0.1:7000", "lag_seconds": 0.2}, started=1.0)
    pipe.execute()
    comps = status.components(redis_client)
    assert comps["push"]["alive"] is True
    assert comps["push"]["dispatcher"] == "127.0.0.1:7000"
    assert status.components(redis_client, now=time.time() + 60)["push"]["alive"] is False
    assert 0 < redis_client.ttl("status:push") <= 30


def test_stage_counters_add_up_across_processes(redis_client):
    for _ in range(3):
        pipe = redis_client.pipeline()
        status.count(pipe, "pull", received=10, processed=9, errors=1, bad_nhit=1)
        pipe.execute()
    assert status.stats(redis_client)["pull"] == {
        "received": 30, "processed": 27, "errors": 3, "bad_nhit": 3}


def test_reporter_keeps_counter_deltas_while_redis_is_down_and_writes_them_once_back(redis_client):
    from collections import Counter

    import redis as redis_py

    from minard.testing import free_port

    deltas = {"push": Counter(received=5, processed=4, dropped=1)}
    down = status.Reporter(redis_py.Redis(port=free_port(), socket_connect_timeout=0.2), "x")
    assert not down.write({"connected": 1}, deltas)
    assert deltas["push"]["received"] == 5  # kept for the next write
    up = status.Reporter(redis_client, "x")
    assert up.write({"connected": 1}, deltas)
    assert not deltas["push"]
    assert status.stats(redis_client)["push"] == {"received": 5, "processed": 4, "dropped": 1}
    assert status.components(redis_client)["x"]["connected"] == "1"
