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


def test_a_transaction_retried_after_its_reply_was_lost_does_not_count_twice(redis_client):
    """The cut-link case of issue 18: EXEC ran in Redis, the reply never came back, the
    writer kept its deltas and sent them again -- the counters still say 10, not 20."""
    import redis as redis_py

    deltas = {"received": 10, "processed": 10}
    pipe = redis_client.pipeline(transaction=True)
    status.count(pipe, "push", **deltas)
    queued = list(pipe.command_stack)
    pipe.execute()  # applied in Redis ...
    assert status.stats(redis_client)["push"] == {"received": 10, "processed": 10}
    writer = status._writer(redis_client)
    for _ in range(2):  # the retry, and one more for good measure
        writer.committed.clear()  # ... but the writer never saw the reply: nothing committed
        retry = redis_client.pipeline(transaction=True)
        status.count(retry, "push", **deltas)
        assert [c[0] for c in retry.command_stack] == [c[0] for c in queued]
        retry.execute()
    assert status.stats(redis_client)["push"] == {"received": 10, "processed": 10}
    # a failed execute commits nothing: the kept deltas give the same totals next time
    bad = redis_client.pipeline(transaction=True)
    status.count(bad, "push", received=5)
    bad.execute_command("NOSUCHCOMMAND")
    try:
        bad.execute()
    except redis_py.ResponseError:
        pass
    again = redis_client.pipeline(transaction=True)
    status.count(again, "push", received=5)
    again.execute()
    assert status.stats(redis_client)["push"]["received"] == 15


def test_two_writers_in_one_process_and_a_forked_child_keep_separate_totals(redis_client, redis_url):
    import multiprocessing

    import redis as redis_py

    other = redis_py.Redis.from_url(redis_url)
    for client in (redis_client, other, redis_client):
        pipe = client.pipeline()
        status.count(pipe, "pull", received=4)
        pipe.execute()

    def child():
        pipe = redis_client.pipeline()  # inherited client: a new writer in the child
        status.count(pipe, "pull", received=1)
        pipe.execute()

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    writers = status.by_writer(redis_client)["pull"]
    assert len(writers) == 3
    assert sorted(w["received"] for w in writers.values()) == [1, 4, 8]
    assert status.stats(redis_client)["pull"]["received"] == 13


def test_pools_are_listed_separately_with_their_workers_counters_and_ended_workers_fold(redis_client, redis_url):
    import redis as redis_py

    pipe = redis_client.pipeline()
    status.beat_pool(pipe, "minard_dispatch_pull", {"workers": 2})
    status.count(pipe, "pull", received=100)  # the manager's writer
    pipe.execute()
    me = status.pool_id()
    # a worker of this pool (pid 4242) and one of a pool on another host
    redis_client.hset("stats:pull", mapping={f"processed|{me}/4242.1": 60, "processed|mon2:77/78.1": 40,
                                             f"processed|{me}/4343.1": 30})
    redis_client.hset("stats:redis", f"processed|{me}/4242.1", 60)
    pools = status.pools(redis_client)
    assert list(pools) == [me]
    assert pools[me]["alive"] is True and pools[me]["workers"] == "2"
    assert pools[me]["counters"]["pull"] == {"received": 100, "processed": 90}
    assert pools[me]["counters"]["redis"] == {"processed": 60}
    totals = status.stats(redis_client)
    # worker 4242 ended: its fields fold into the pool's "ended" writer, twice is harmless
    assert status.fold(redis_client, f"{me}/4242", f"{me}/ended") == 2
    assert status.fold(redis_client, f"{me}/4242", f"{me}/ended") == 0
    assert status.stats(redis_client) == totals
    assert f"processed|{me}/ended" in {k.decode() for k in redis_client.hkeys("stats:pull")}
    assert status.pools(redis_client)[me]["counters"]["pull"]["processed"] == 90
    assert not redis_py.Redis.from_url(redis_url).exists(f"status:pool:{me}:x")


def test_minard_stats_pools_json_lists_each_pool_and_the_totals_keep_their_shape(redis_client, redis_url):
    import json
    import os
    import subprocess
    import sys

    pipe = redis_client.pipeline()
    status.beat_pool(pipe, "minard_dispatch_pull", {"workers": 2})
    status.count(pipe, "pull", received=12, processed=11, errors=1)
    pipe.execute()
    env = {**os.environ, "MINARD_REDIS_URL": redis_url}
    run = [sys.executable, "-m", "minard.cli", "stats", "--json"]
    totals = json.loads(subprocess.run(run, env=env, capture_output=True, text=True, timeout=60, check=True).stdout)
    assert totals["pull"] == {"received": 12, "processed": 11, "errors": 1}
    out = subprocess.run(run + ["--pools"], env=env, capture_output=True, text=True, timeout=60, check=True)
    pools = json.loads(out.stdout)["pools"]
    assert pools[status.pool_id()]["counters"]["pull"]["received"] == 12
    assert pools[status.pool_id()]["alive"] is True
