"""A pull worker's flush runs on a real 3-node Redis Cluster: each slot group one transaction (issue 18).

Three ``redis-server --cluster-enabled yes`` nodes joined by ``redis-cli --cluster create``
(16384 slots over three primaries).  A real flush -- time series of every resolution, a run
summary with its channel array, burst candidates -- is collected by a
:class:`minard.store.slots.SlotBatch` and every group sent as a ``MULTI/EXEC`` through redis-py's
cluster client, which refuses a transaction whose keys span slots (Redis would answer
``CROSSSLOT``).  The summary and the series read back through the same client equal what was
aggregated: the schema needs no rewrite to move to Cluster.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import CrossSlotTransactionError

from minard import config
from minard.analysis.aggregate import Aggregator
from minard.formats.pmt import decode_events
from minard.pipeline.dispatch_pull import write_second
from minard.store import timeseries as ts
from minard.store.bursts import BurstMonitor
from minard.store.channels import ChannelWriter
from minard.store.runs import get_run, write_run
from minard.store.slots import SlotBatch
from minard.testing import free_port, redis_server_binary, stop_pid, wait_for, wait_port
from minard.testing.records import expected, make_records

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            port -= 20000
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture(scope="module")
def cluster():
    """Three cluster-enabled redis-servers joined into one cluster; stopped by pid."""
    if not shutil.which("redis-cli"):
        pytest.skip("redis-cli is not installed (Debian package redis-tools)")
    work = Path(tempfile.mkdtemp(prefix="minard-cluster-"))
    ports = [cluster_port() for _ in range(3)]
    procs = []
    try:
        for port in ports:
            d = work / str(port)
            d.mkdir()
            procs.append(subprocess.Popen(
                [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--save", "",
                 "--appendonly", "no", "--logfile", str(d / "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports:
            wait_port(port)
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in ports])
        wait_for(lambda: client.cluster_info().get("cluster_state") == "ok", 30, "the cluster to be ok")
        yield client
        client.close()
    finally:
        for proc in procs:
            stop_pid(proc)
        shutil.rmtree(work, ignore_errors=True)


def test_a_real_flush_runs_on_redis_cluster_one_transaction_per_slot_group(cluster):
    records = make_records(400, seed=3, run=4242, mean_nhit=60)
    want = expected(records)
    events = decode_events(records)
    agg = Aggregator()
    t = time.time()
    agg.add_batch(events, t)
    seconds, runs, taken = agg.take()
    cfg = config.load({"burst_nhit_threshold": 20}, env={})
    burst = BurstMonitor(None, cfg)
    burst.add(events)
    batch, channels = SlotBatch(), ChannelWriter(cluster)
    for sec in seconds.values():
        write_second(batch, sec, channels)
    for run in runs.values():
        write_run(batch, run, t, channels)
    channels.add(batch)
    burst.write(batch)
    nodes = set()
    for group in batch.groups.values():
        with cluster.pipeline(transaction=True) as pipe:  # refuses keys of several slots
            for args in group.commands:
                pipe.execute_command(*args)
            pipe.execute()
        nodes.add(cluster.get_node_from_key(group.commands[0][1]).name)
    assert len(batch.groups) >= 8 and len(nodes) >= 2  # the flush is spread over the nodes
    with pytest.raises(CrossSlotTransactionError), cluster.pipeline(transaction=True) as pipe:  # what the groups avoid
        pipe.hincrby("ts:1:1:trig", "TOTAL", 1)
        pipe.hincrby("run:4242", "events", 1)
        pipe.execute()
    got = get_run(cluster, 4242)
    assert got["events"] == 400 - want["orphans"] and got["orphans"] == want["orphans"]
    assert got["channel_hits"] == {str(k): v for k, v in sorted(want["channels"].items())}
    assert {k: v for k, v in got["triggers"].items() if v} == {k: v for k, v in want["trig"].items() if v and k != "TOTAL"}
    _, vals, _ = ts.fetch(cluster, "stream", ["records"], t - 1, t + 1, step=1)
    assert np.nansum(vals["records"]) == taken == 400
    counts, _ = ts.read_counts(cluster, "hits", t - 10, t + 10)
    assert counts.sum() == sum(want["channels"].values())
