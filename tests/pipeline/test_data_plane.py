"""The ZMQ side of a data plane that can sit on a network (issue 13), with real processes.

* CURVE on every PUSH/PULL link: a PULL without the server key, or with a key
  the producer has not authorized, receives nothing.
* No input kills a process: malformed batches sent over a real socket into a
  real ``minard_dispatch pull`` / ``data_consumer`` are counted by reason and
  the next good batch is still processed (explicit shapes measured on the old
  code, then generated ones).
* Start order loses nothing: the push keeps a backlog until a consumer connects.
* The ORCA producer hands on a record as soon as ORCA goes quiet after it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_py
import zmq
import zmq.auth
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dispatch_stream import (
    Stack,
    accounted_run,
    comparable,
    file_totals,
    synthetic,
)

from minard.formats import orca, wire
from minard.formats.pmt import encode_event, pack_dispatch
from minard.pipeline import curve
from minard.store.runs import get_run
from minard.store.status import stats
from minard.testing import stop_pid, wait_for

pytestmark = pytest.mark.timeout(180)
BIN = Path(sys.executable).parent


def good_batch(run: int, n: int = 3) -> list[bytes]:
    """A valid 'pmt' wire message of *n* events of run *run*."""
    records = [pack_dispatch(encode_event(run=run, evnum=i, gtid=1 + i, trigger_word=1)) for i in range(n)]
    return wire.encode("pmt", records, {"producer": "test", "seq": run})


class Consumer:
    """A real consumer process (``minard_dispatch pull`` or ``data_consumer``) fed by a
    CURVE PUSH socket of the test's own, as a producer would."""

    def __init__(self, cfg, tmp_path, redis_url, argv, endpoint_key="zmq_dispatch"):
        self.cfg = {"var_dir": str(tmp_path / "var"), endpoint_key: cfg[endpoint_key]}
        env = dict(os.environ)
        env.update({f"MINARD_{k.upper()}": str(v) for k, v in {
            "redis_url": redis_url, "var_dir": self.cfg["var_dir"], "zmq_dispatch": cfg["zmq_dispatch"],
            "zmq_cmos": cfg["zmq_cmos"], "zmq_base": cfg["zmq_base"], "dispatch_close_retry": 1,
            "orca_close_retry": 1}.items()})
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        curve.secure_server(self.push, self.cfg, self.ctx)
        self.push.bind(cfg[endpoint_key])
        self.log = tmp_path / "consumer.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(BIN / argv[0]), *argv[1:]], env=env, stdout=log, stderr=log)
        self.redis = redis_py.Redis.from_url(redis_url)

    def send(self, frames) -> None:
        self.push.send_multipart([bytes(f) for f in frames])

    def beat(self, component) -> dict:
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(f"status:{component}").items()}

    def close(self) -> None:
        stop_pid(self.proc)
        curve.stop_authenticator(self.ctx)
        self.ctx.destroy(linger=0)
        self.redis.close()


@pytest.fixture
def pull(cfg, tmp_path, redis_url):
    consumer = Consumer(cfg, tmp_path, redis_url, ["minard_dispatch", "pull"])
    yield consumer
    consumer.close()


def stored(redis_client, run) -> int:
    got = get_run(redis_client, run)
    return got["events"] if got else 0


# ------------------------------------------------------------------ CURVE

def test_a_pull_without_the_server_key_or_an_authorized_key_receives_nothing(cfg, tmp_path, redis_url,
                                                                             redis_client):
    path = tmp_path / "sim.zdab"
    synthetic(path, n=2000)
    want, _ = file_totals(path)
    stack = Stack(cfg, tmp_path, redis_url).start()
    ctx = zmq.Context()
    try:
        plain = ctx.socket(zmq.PULL)  # no keys at all
        plain.connect(cfg["zmq_dispatch"])
        stranger = ctx.socket(zmq.PULL)  # knows the server's public key, but its own key is unknown
        server_public, _ = zmq.auth.load_certificate(str(curve.keys_dir(
            {"var_dir": str(tmp_path / "var")}) / "server.key"))
        stranger.curve_serverkey = server_public
        stranger.curve_publickey, stranger.curve_secretkey = zmq.curve_keypair()
        stranger.connect(cfg["zmq_dispatch"])
        stack.replay(path)
        stack.wait_settled(2000)
        assert comparable(get_run(redis_client, 2000)) == want[2000]  # the pool got every event
        assert not plain.poll(500) and not stranger.poll(100)
        assert stats(redis_client)["push"].get("dropped", 0) == 0
    except AssertionError:
        print(stack.logs())
        raise
    finally:
        ctx.destroy(linger=0)
        stack.stop()


def test_key_files_are_private_and_plain_tcp_needs_zmq_insecure_and_is_warned(cfg, tmp_path, redis_url):
    directory = curve.ensure_keys(tmp_path / "keys")
    assert (directory.stat().st_mode & 0o777) == 0o700
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"server.key", "server.key_secret", "client.key", "client.key_secret"}
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in files)
    stack = Stack(cfg, tmp_path, redis_url, zmq_insecure="true").start()
    try:
        logs = stack.logs()
        assert "zmq_insecure = true" in logs["push.log"] and "zmq_insecure = true" in logs["pull.log"]
    finally:
        stack.stop()


# ------------------------------------------------------------------ no input kills a process

def test_sent_as_a_string_nan_or_list_is_counted_and_the_worker_survives(pull, redis_client):
    """Measured on the old code: each of these crashed a pull worker."""
    bad = {"string": "soon", "list": [1, 2], "negative": -5.0, "bool": True}
    for value in bad.values():
        frames = good_batch(9)
        frames[2] = json.dumps({"sent": value, "count": 3}).encode()
        pull.send(frames)
    nan = good_batch(9)
    nan[2] = b'{"sent": NaN, "count": 3}'  # what json.dumps(float("nan")) writes
    pull.send(nan)
    pull.send(good_batch(100))
    wait_for(lambda: stored(redis_client, 100) == 3, 30, "the good batch after the bad ones")
    s = stats(redis_client)["pull"]
    assert s["wire_bad_meta_sent"] == 3 * len(bad) and s["wire_bad_meta"] == 3
    assert s["errors"] == 3 * (len(bad) + 1) and s["bad_batches"] == len(bad) + 1
    assert stored(redis_client, 9) == 0
    assert get_run(redis_client, 9)["dropped_by"] == {"pull_bad_batch": 3 * (len(bad) + 1)}  # per run
    wait_for(lambda: pull.beat("minard_dispatch_pull").get("workers_crashed") == "0", 10)


def test_a_burst_of_100_bad_batches_leaves_the_pool_manager_running(pull, redis_client):
    """Measured on the old code: the manager itself died, leaving 531 records unaccounted."""
    shapes = [{"sent": "x"}, {"sent": [1]}, {"count": -1}, {"count": 10**12}, {"prev_gtid": "a"}, {"prev_run": -1},
              {"seq": 1.5}, {"sent": 1e300}]
    for i in range(100):
        frames = good_batch(9)
        frames[2] = json.dumps({**shapes[i % len(shapes)]}).encode()
        pull.send(frames)
    pull.send(good_batch(101))
    wait_for(lambda: stored(redis_client, 101) == 3, 30, "the good batch after the burst")
    assert pull.proc.poll() is None
    wait_for(lambda: stats(redis_client)["pull"].get("bad_batches") == 100, 10)
    s = stats(redis_client)["pull"]
    assert s["received"] == s["processed"] + s["errors"] == 303


def test_zero_record_shapes_on_the_cmos_link_are_counted(cfg, tmp_path, redis_url, redis_client):
    """Measured on the old code: five zero-record shapes were only logged."""
    consumer = Consumer(cfg, tmp_path, redis_url, ["data_consumer", "--stream", "cmos"], "zmq_cmos")
    try:
        meta = json.dumps({"byteorder": "little"}).encode()
        shapes = [
            wire.encode("cmos", [], {"byteorder": "little"}),  # a valid but empty batch
            [wire.VERSION_FRAME, b"cmos", meta, b"", b"\0" * 8],  # payload without lengths
            [wire.VERSION_FRAME, b"cmos", meta, b""],  # a frame missing
            [wire.VERSION_FRAME],  # one frame
            [wire.VERSION_FRAME, b"cmos", meta, b"", b"", b"extra"],  # an extra frame
        ]
        for frames in shapes:
            consumer.send(frames)
        wait_for(lambda: stats(redis_client).get("cmos", {}).get("bad_batches") == 5, 30,
                 "five bad batches counted")
        assert consumer.proc.poll() is None
    finally:
        consumer.close()


META_VALUES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                             max_size=2))
META = st.dictionaries(st.sampled_from(["sent", "seq", "count", "prev_gtid", "prev_run", "byteorder", "producer",
                                        "data_id", "other"]), META_VALUES, max_size=5)


@st.composite
def bad_messages(draw):
    """A message that is wrong in one or more ways: frames, version, kind, meta, lengths."""
    records = draw(st.lists(st.binary(max_size=64), max_size=4))
    frames = wire.encode("pmt", records)
    frames[0] = draw(st.sampled_from([wire.VERSION_FRAME, b"minard/2", b"", b"zmq"]))
    frames[1] = draw(st.sampled_from([b"pmt", b"rechdr", b"cmos", b"???", b""]))
    meta = draw(META)
    frames[2] = draw(st.sampled_from([
        json.dumps(meta, allow_nan=True).encode(), b"[1, 2]", b"\xff\xfe", b"{", b"null"]))
    if draw(st.booleans()):
        frames[3] = draw(st.binary(max_size=16))
    cut = draw(st.integers(1, 7))  # ZMQ cannot send a message of no frames
    frames = (frames + [draw(st.binary(max_size=8))] * 2)[:cut]
    return frames


@pytest.mark.slow
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(bad_messages(), min_size=1, max_size=6))
def test_generated_bad_batches_are_counted_and_a_good_batch_is_processed_after_them(pull, redis_client, batch):
    run = 1000 + int(redis_client.incr("test:runs"))
    for frames in batch:
        pull.send(frames)
    pull.send(good_batch(run))
    wait_for(lambda: stored(redis_client, run) == 3, 30, f"run {run} after {len(batch)} bad messages")
    assert pull.proc.poll() is None
    assert pull.beat("minard_dispatch_pull").get("workers_crashed", "0") == "0"

    def balanced():
        s = stats(redis_client)["pull"]
        return s["received"] == s.get("processed", 0) + s.get("errors", 0)

    wait_for(balanced, 10, "pull counters balance")


# ------------------------------------------------------------------ start order

def test_a_push_started_before_any_consumer_keeps_its_backlog_and_loses_nothing(cfg, tmp_path, redis_url,
                                                                                redis_client):
    path = tmp_path / "sim.zdab"
    synthetic(path, n=3000, run=2100)
    want, _ = file_totals(path)
    stack = Stack(cfg, tmp_path, redis_url)
    try:
        stack.dispatcher.start(timeout=30)
        stack.start_proc("push", "--host", f"127.0.0.1:{stack.port}")
        wait_for(lambda: stack.status("minard_dispatch_push").get("connected") == "1", 20, "push connected")
        stack.replay(path)
        wait_for(lambda: int(stack.status("minard_dispatch_push").get("backlog_records", 0)) == 3000, 20,
                 "every event in the push's backlog")
        assert stats(redis_client)["push"].get("dropped", 0) == 0
        stack.start_proc("pull")  # the consumers come late
        stack.wait_settled(3000)
        assert comparable(get_run(redis_client, 2100)) == want[2100]
        s = stats(redis_client)["push"]
        assert s["received"] == s["processed"] == 3000 and s.get("dropped", 0) == 0
    finally:
        stack.stop()


def test_a_backlog_beyond_its_bound_is_counted_as_dropped(cfg, tmp_path, redis_url, redis_client):
    path = tmp_path / "sim.zdab"
    synthetic(path, n=3000, run=2200)
    stack = Stack(cfg, tmp_path, redis_url, zmq_backlog_records=1000, dispatch_batch_records=100)
    try:
        stack.dispatcher.start(timeout=30)
        stack.start_proc("push", "--host", f"127.0.0.1:{stack.port}")
        wait_for(lambda: stack.status("minard_dispatch_push").get("connected") == "1", 20, "push connected")
        stack.replay(path)
        wait_for(lambda: stats(redis_client).get("push", {}).get("received") == 3000, 20)
        wait_for(lambda: stats(redis_client)["push"].get("backlog_full") == 2000, 10)
        stack.start_proc("pull")
        stack.wait_settled(1000)
        assert stored(redis_client, 2200) == 1000
        s = stats(redis_client)["push"]
        assert s["dropped"] == 2000 and s["processed"] == 1000
        # counted against the run they belong to: dropped, not unaccounted
        got = wait_for(lambda: accounted_run(redis_client, 2200, 3000), 10, "the run's accounting")
        assert got["dropped_by"] == {"push_backlog_full": 2000} and got["unaccounted"] == 0
    finally:
        stack.stop()


# ------------------------------------------------------------------ ORCA goes quiet

def test_the_orca_producer_hands_on_a_record_as_soon_as_orca_goes_quiet(cfg, tmp_path, redis_url):
    cmos_id, base_id = 9 << 18, 12 << 18
    header = orca.encode_header(orca.make_header_plist(cmos_id, base_id))
    record = orca.encode_cmos(cmos_id, 3, 1, 0xFFFFFFFF, [[100] * 32],
                              orca.format_timestamp_us(int(time.time() * 1e6)))
    server = socket.create_server(("127.0.0.1", int(cfg["orca_port"])))
    env = dict(os.environ)
    env.update({f"MINARD_{k.upper()}": str(v) for k, v in {
        "redis_url": redis_url, "var_dir": str(tmp_path / "var"), "zmq_cmos": cfg["zmq_cmos"],
        "zmq_base": cfg["zmq_base"], "orca_port": cfg["orca_port"]}.items()})
    with open(tmp_path / "producer.log", "ab") as log:
        proc = subprocess.Popen([str(BIN / "data_producer")], env=env, stdout=log, stderr=log)
    ctx = zmq.Context()
    try:
        sink = ctx.socket(zmq.PULL)
        curve.secure_client(sink, {"var_dir": str(tmp_path / "var")})
        sink.connect(cfg["zmq_cmos"])
        server.settimeout(20)
        conn, _ = server.accept()
        conn.sendall(header + record)  # then ORCA goes quiet, the connection stays open
        assert sink.poll(5000), "the record waited for the next one"
        batch = wire.decode(sink.recv_multipart())
        assert batch.kind == "cmos" and batch.records() == [record]
        conn.close()
    finally:
        ctx.destroy(linger=0)
        server.close()
        stop_pid(proc)


def test_the_parser_releases_only_a_complete_record_when_the_stream_goes_quiet():
    cmos_id = 9 << 18
    header = orca.encode_header(orca.make_header_plist(cmos_id, 12 << 18))
    record = orca.encode_cmos(cmos_id, 3, 1, 0xFFFFFFFF, [[100] * 32], orca.format_timestamp_us(10**15))
    parser = orca.OrcaStreamParser()
    assert [r.kind for r in parser.feed(header + record[:-4])] == ["header"]
    assert parser.release() == []  # incomplete: keeps waiting
    assert parser.feed(record[-4:]) == []  # complete, held for the look-ahead
    assert [r.raw for r in parser.release()] == [record]
    assert parser.buffered == 0 and parser.close() == [] and not parser.errors


def test_minard_keys_zmq_makes_private_keys_and_authorizes_and_revokes_a_client(tmp_path):
    env = dict(os.environ, MINARD_ZMQ_KEYS_DIR=str(tmp_path / "k"))
    out = subprocess.run([str(BIN / "minard"), "keys", "zmq", "--client", "remote1"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    keys = tmp_path / "k"
    assert sorted(p.name for p in (keys / "authorized").iterdir()) == ["client.key", "remote1.key"]
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in keys.rglob("*") if p.is_file())
    secret_before = (keys / "server.key_secret").read_bytes()
    out = subprocess.run([str(BIN / "minard"), "keys", "zmq", "--revoke", "remote1"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (keys / "authorized").iterdir()) == ["client.key"]
    assert (keys / "server.key_secret").read_bytes() == secret_before  # existing keys are kept
