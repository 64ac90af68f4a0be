"""Consumer pools with real worker processes, real ZMQ and a real redis-server."""

import os
import signal
import threading

import pytest
import zmq

from minard.formats import wire
from minard.pipeline import curve
from minard.pipeline.pool import Pool, PoolManager, PoolSpec
from minard.testing import wait_for

HANDLER = "pool_handlers:Counting"


def _push(ctx, cfg):
    """A producer's PUSH socket: a CURVE server with the test's keys (as every producer's)."""
    sock = ctx.socket(zmq.PUSH)
    curve.secure_server(sock, cfg, ctx)
    sock.bind(cfg["zmq_dispatch"])
    return sock


def _send(sock, n_batches, per_batch=10, start=0):
    for i in range(start, start + n_batches):
        sock.send_multipart(wire.encode("pmt", [b"r" * 8] * per_batch, {"seq": i}))


def _run_pool(pool, seconds):
    thread = threading.Thread(target=pool.run, kwargs={"stop_after": seconds})
    thread.start()
    return thread


@pytest.fixture
def spec(cfg):
    return PoolSpec(name="test", handler=HANDLER, upstream=cfg["zmq_dispatch"], max_workers=2,
                    idle_timeout=30, flush_period=0.2)


def test_every_record_is_processed_exactly_once_by_several_workers(cfg, spec, zmq_context, redis_client, tmp_path):
    push = _push(zmq_context, cfg)
    pool = Pool(spec, cfg, event_log=tmp_path / "pool.log")
    thread = _run_pool(pool, 8)
    _send(push, 200)
    wait_for(lambda: int(redis_client.get("pooltest:records") or 0) == 2000, 20)
    pool.request_stop()
    thread.join(20)
    seqs = sorted(int(s) for s in redis_client.lrange("pooltest:seqs", 0, -1))
    assert seqs == list(range(200))
    assert pool.stats.records_received == pool.stats.records_processed == 2000
    assert pool.stats.records_lost == 0
    assert "CREATING: D" in (tmp_path / "pool.log").read_text()


def test_worker_is_recycled_after_trx_limit_and_loses_nothing(cfg, spec, zmq_context, redis_client, tmp_path):
    spec.trx_limit = 100
    spec.max_workers = 1
    push = _push(zmq_context, cfg)
    pool = Pool(spec, cfg, event_log=tmp_path / "pool.log")
    thread = _run_pool(pool, 30)
    _send(push, 50)
    wait_for(lambda: int(redis_client.get("pooltest:records") or 0) == 500, 20)
    pool.request_stop()
    thread.join(20)
    assert pool.stats.workers_recycled >= 4
    assert redis_client.scard("pooltest:pids") >= 5
    text = (tmp_path / "pool.log").read_text()
    assert "RECYCLING: D1 S1" in text and "ASOTrxLimit: 100" in text


def test_idle_worker_is_stopped_and_started_again_when_data_arrives(cfg, spec, zmq_context, redis_client):
    spec.idle_timeout = 0.5
    spec.max_workers = 1
    push = _push(zmq_context, cfg)
    pool = Pool(spec, cfg)
    thread = _run_pool(pool, 30)
    _send(push, 3)
    wait_for(lambda: int(redis_client.get("pooltest:records") or 0) == 30, 20)
    wait_for(lambda: pool.stats.workers_idle_stopped == 1 and not pool.workers, 20)
    _send(push, 3, start=3)
    wait_for(lambda: int(redis_client.get("pooltest:records") or 0) == 60, 20)
    pool.request_stop()
    thread.join(20)
    events = "".join(pool.events.lines)
    assert "IDLE STOP: D1 S1" in events and "STARTING: D1 S2" in events


def test_killed_worker_is_restarted_and_its_batch_is_counted_lost(cfg, spec, zmq_context, redis_client):
    cfg["test_delay"] = 0.2
    spec.max_workers = 1
    push = _push(zmq_context, cfg)
    pool = Pool(spec, cfg)
    thread = _run_pool(pool, 60)
    _send(push, 20)
    wait_for(lambda: any(w.inflight for w in pool.workers.values()), 20)
    victim = next(iter(pool.workers.values()))
    os.kill(victim.proc.pid, signal.SIGKILL)
    wait_for(lambda: pool.stats.workers_crashed == 1, 20)
    wait_for(lambda: pool.stats.records_processed + pool.stats.records_lost == 200, 40)
    pool.request_stop()
    thread.join(20)
    assert pool.stats.records_lost == 10
    assert int(redis_client.get("pooltest:records") or 0) + 10 >= 190  # flushed before the kill or after
    assert "CRASHED: D1 S1" in "".join(pool.events.lines)
    # ids are never reused
    assert "RESTARTING: D1 S2" in "".join(pool.events.lines)


def test_global_cap_refuses_a_pool_that_would_exceed_it(cfg, spec):
    manager = PoolManager(max_total=3)
    Pool(spec, cfg, manager=manager)
    with pytest.raises(ValueError, match="MaxTotalSlaves"):
        Pool(spec, cfg, manager=manager)


def test_event_log_matches_the_seed_format(cfg, spec, tmp_path):
    Pool(spec, cfg, event_log=tmp_path / "ev.log")
    lines = (tmp_path / "ev.log").read_text().splitlines()
    import re
    assert re.match(r"^\d{4}/\d\d/\d\d_\d\d:\d\d:\d\d\.\d{3} CREATING: D1$", lines[0])
    names = [line.split(":")[0].strip() for line in lines[1:]]
    assert names == ["ImageFile", "CmdFlags", "ASOLocation", "MaxSlaves", "ASOTrxLimit", "Timeout"]
    # field names end in the same column, as in the seed
    assert len({line.index(":") for line in lines[1:]}) == 1


def test_workers_exit_when_their_manager_is_killed(cfg, spec, zmq_context, redis_client, tmp_path):
    import subprocess
    import sys

    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "from minard import config\n"
        "from minard.pipeline.pool import Pool, PoolSpec\n"
        "spec = PoolSpec(name='t', handler=%r, upstream=%r, max_workers=1, flush_period=0.2)\n"
        "Pool(spec, config.load({'redis_url': %r, 'var_dir': %r}, env={})).run()\n"
    ) % (str(tmp_path.parent), HANDLER, cfg["zmq_dispatch"], cfg["redis_url"], cfg["var_dir"])
    push = _push(zmq_context, cfg)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    manager = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        _send(push, 2)
        wait_for(lambda: redis_client.scard("pooltest:pids") == 1, 20)
        worker_pid = int(redis_client.smembers("pooltest:pids").pop())
        os.kill(manager.pid, signal.SIGKILL)
        manager.wait(5)

        def gone():
            try:
                os.kill(worker_pid, 0)
            except ProcessLookupError:
                return True
            with open(f"/proc/{worker_pid}/stat") as fh:  # a zombie counts as gone
                return fh.read().split()[2] == "Z"

        wait_for(gone, 10, "the manager reaped")
    finally:
        if manager.poll() is None:
            manager.kill()
