"""A pull pool loses no aggregate when the Redis primary is killed mid-run (issue 18).

Real dispatcher, push and pull pool (two workers) writing through Sentinel to a primary with a
replica; the primary is SIGKILLed while a run is replayed.  The workers hold the flushes Redis
did not take during the failover and send them again to the promoted replica, settling a flush
whose reply was lost by its flush mark (minard.store.slots), and wait for the replica to have each
flush (``dispatch_wait_replicas = 1``) before counting it written.  So: stored + counted losses =
the file, the counted Redis loss is zero, and the run summary and the per-second series each hold
every record exactly once.
"""

from __future__ import annotations

import time

import pytest
import redis as redis_py
from redis.connection import parse_url

from minard.store import sentinel
from minard.store.runs import get_run
from minard.store.status import stats
from minard.testing import wait_for
from minard.testing.redis_ha import RedisHA
from tests.pipeline.test_dispatch_stream import make_stack, series_total, synthetic  # noqa: F401 - a fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

N = 12000


def test_a_pull_pool_loses_no_aggregate_and_counts_nothing_twice_when_the_primary_is_killed(
        make_stack, tmp_path):  # noqa: F811 - the fixture imported above
    path = synthetic(tmp_path / "failover.zdab", n=N, seed=13, run=2100)
    with RedisHA() as ha:
        settings = {"redis_sentinels": ha.sentinels_value, "redis_master_name": ha.master_name}
        opts = parse_url(ha.url)
        opts.update(socket_connect_timeout=1.0, socket_timeout=5.0)
        primary = sentinel.from_config(settings, opts)  # follows the failover, as the workers do
        stack = make_stack(redis=ha.url, dispatch_workers=2, dispatch_wait_replicas=1, **settings)
        stack.redis = primary
        t0 = time.time()
        replay = stack.replay(path, "--rate", "3000", wait=False)
        wait_for(lambda: stack.pull_stats().get("processed", 0) > 2000, 30, "data flowing")
        old = ha.kill_primary()
        ha.wait_failover(old, 30)
        assert replay.wait(60) == 0
        ha.restart(old)  # back as a replica of the new primary
        stack.wait_settled(N, timeout=90)

        def settled_redis():
            s = stats(primary)
            return s.get("redis", {}).get("received", 0) >= stack.pull_stats().get("processed", 0) and s
        st = wait_for(settled_redis, 30, "the redis stage's counters", ignore=(redis_py.RedisError,))
        run = get_run(primary, 2100)
        stored = run["events"] + run["orphans"]
        push, pull, redis_stage = st.get("push", {}), st["pull"], st["redis"]
        lost = (push.get("dropped", 0) + push.get("processed", 0) - pull["received"] + pull.get("dropped", 0)
                + pull.get("errors", 0) + redis_stage.get("errors", 0))
        assert stored + lost == N, (stored, lost, st)
        assert redis_stage.get("errors", 0) == 0, redis_stage  # the held flushes were written
        assert stored <= N and series_total(primary, "stream", "records", t0 - 1, time.time() + 1) == stored
        assert "held for a retry" in stack.logs()["pull.log"]  # the failover was in the run
        print(f"failover: stored {stored} of {N}, counted lost {lost}, redis stage {redis_stage}")
        stack.stop()  # the writers first, while Redis still answers their last flush
        primary.close()
