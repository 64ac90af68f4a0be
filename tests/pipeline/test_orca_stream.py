"""End to end with real processes: ORCA replay -> data_producer -> data_consumer pools -> Redis.

Streams come from the seeded simulator (minard.simulate.orca) with NON-default
data ids.  Expected values are computed here independently, one channel at a
time from the raw record bytes (:func:`oracle_cmos`, :func:`oracle_base`), and
checked against the simulator's known true rates.
"""

from __future__ import annotations

import calendar
import datetime as dt
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import redis as redis_py

from minard.formats import orca, wire
from minard.formats.detector import NCHANNELS_TOTAL
from minard.pipeline.orca_base import BaseHandler
from minard.pipeline.orca_cmos import CMOS_STATE_KEY, CmosHandler, card_rounds
from minard.pipeline.orca_consumer import stream_for
from minard.pipeline.orca_replay import OrcaReplay
from minard.simulate.orca import OrcaSimulator
from minard.store import channels, schema
from minard.store import timeseries as ts
from minard.store.channels import ChannelWriter
from minard.store.query import latest_values
from minard.store.status import stats
from minard.testing import stop_pid, wait_for
from minard.testing.faults import kill_worker_holding_records

pytestmark = pytest.mark.timeout(120)
BIN = Path(sys.executable).parent
CMOS_ID, BASE_ID = 9 << 18, 12 << 18  # not the 2012-2016 ids (5<<18, 4<<18)


# ------------------------------------------------------------------ oracles

def _time_us(raw: bytes) -> int:
    text = raw[-24:].split(b"\0")[0].decode()
    stamp = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    return calendar.timegm(stamp.timetuple()) * 1_000_000 + stamp.microsecond


def oracle_cmos(records, max_dt=10.0):
    """Per-channel rates the straightforward way: ``(rates {lcn: [Hz]}, latest {lcn: last valid Hz})``.

    A reading that gives no rate leaves the channel's last valid rate in place."""
    last, rates, latest = {}, defaultdict(list), {}
    for raw, order in records:
        fmt = "<" if order == "little" else ">"
        w = struct.unpack_from(fmt + "21I", raw, 0)
        crate, slots, chmask, err = w[1], w[2], w[3:19], w[20]
        t = _time_us(raw)
        block = 0
        for slot in range(16):
            if not slots >> slot & 1:
                continue
            for ch in range(32):
                word = struct.unpack_from(fmt + "I", raw, 4 * (21 + block * 32 + ch))[0]
                lcn = crate * 512 + slot * 32 + ch
                value = None
                if not chmask[slot] >> ch & 1 or word >> 31 or err:
                    last.pop(lcn, None)
                else:
                    count = word & 0x7FFFFFFF
                    prev = last.get(lcn)
                    if prev and 0 < t - prev[1] <= max_dt * 1e6 and count >= prev[0]:
                        value = (count - prev[0]) / ((t - prev[1]) / 1e6)
                        rates[lcn].append(value)
                    last[lcn] = (count, t)
                if value is not None:
                    latest[lcn] = value
            block += 1
    return rates, latest


def oracle_base(records):
    """Per-channel valid values (byte - 127) and the latest value/busy per channel."""
    values, latest, busy = defaultdict(list), {}, {}
    for raw, order in records:
        fmt = "<" if order == "little" else ">"
        w = struct.unpack_from(fmt + "20I", raw, 0)
        crate, slots, chmask, err = w[1], w[2], w[3:19], w[19]
        for c in range(crate * 512, crate * 512 + 512):
            latest[c] = None  # the record describes the whole crate
        for slot in range(16):
            if not slots >> slot & 1:
                continue
            for ch in range(32):
                lcn = crate * 512 + slot * 32 + ch
                current, flag = raw[80 + slot * 32 + ch], raw[592 + slot * 32 + ch]
                masked = not chmask[slot] >> ch & 1
                busy[lcn] = bool(flag) and not masked
                ok = not masked and not flag and not err
                latest[lcn] = current - 127 if ok else None
                if ok:
                    values[lcn].append(current - 127)
    return values, latest, busy


def file_records(path, kind):
    return [(r.raw, r.byteorder) for r in orca.read_file(path) if r.kind == kind]


def as_array(mapping):
    out = np.full(NCHANNELS_TOTAL, np.nan)
    for k, v in mapping.items():
        if v is not None:
            out[k] = v
    return out


# ------------------------------------------------------------------ the stack

def write_chunks(path, chunks):
    with open(path, "wb") as fh:
        fh.writelines(chunks)
    return path


class Stack:
    """data_producer and the two data_consumer pools as real subprocesses."""

    def __init__(self, cfg, tmp_path, **settings):
        self.tmp = tmp_path
        self.cfg = cfg
        self.port = int(cfg["orca_port"])
        self.redis = redis_py.Redis.from_url(cfg["redis_url"])
        values = {"redis_url": cfg["redis_url"], "zmq_cmos": cfg["zmq_cmos"], "zmq_base": cfg["zmq_base"],
                  "orca_port": self.port, "var_dir": str(tmp_path / "var"), "orca_reconnect_max": 0.2,
                  "orca_batch_ms": 20, "orca_batch_records": 40, **settings}
        self.env = dict(os.environ)
        self.env.update({f"MINARD_{k.upper()}": str(v) for k, v in values.items()})
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name, *args):
        exe = "data_producer" if name == "producer" else "data_consumer"
        with open(self.tmp / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
            self.procs[name] = subprocess.Popen([str(BIN / exe), *args], env=self.env, stderr=log,
                                                stdout=subprocess.DEVNULL)
        return self.procs[name]

    def start_all(self, **workers):
        cmos_port = str(self.cfg["zmq_cmos"]).rsplit(":", 1)[1]
        self.start("cmos", cmos_port, *(["--workers", str(workers["cmos"])] if "cmos" in workers else []))
        self.start("base", "--stream", "base", *(["--workers", str(workers["base"])] if "base" in workers else []))
        self.start("producer")
        self.wait_consumers()
        return self

    def wait_consumers(self, stream=None):
        """Until the producer's heartbeat shows consumers on both PUSH sockets."""
        def ready():
            beat = {k.decode(): v.decode() for k, v in self.redis.hgetall("status:data_producer").items()}
            return all(int(beat.get(f"consumers_{s}", 0)) >= 1 for s in (stream,) if s) if stream else \
                all(int(beat.get(f"consumers_{s}", 0)) >= 1 for s in ("cmos", "base"))
        wait_for(ready, 30, "consumers connected to the producer")

    def stop(self, name):
        proc = self.procs.pop(name)
        code = stop_pid(proc, 15)
        assert code == 0, f"{name} exited with {code}: {(self.tmp / f'{name}.log').read_text()[-2000:]}"

    def close(self):
        for name in list(self.procs):
            stop_pid(self.procs.pop(name), 15)
        self.redis.close()

    def serve(self, path, speed=None):
        """Serve *path* like ORCA (in a thread) until its end, at full speed or
        paced (*speed* 1.0 = real time); return the replay."""
        replay = OrcaReplay(path, port=self.port, speed=speed, wait=True, progress=False)
        thread = threading.Thread(target=replay.serve, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "replay did not finish"
        return replay

    def stats(self):
        return stats(self.redis)

    def wait_processed(self, ncmos, nbase):
        """Until both consumers accounted for every record (in their flush)."""
        def done():
            s = self.stats()
            got = [s.get(k, {}).get("processed", 0) + s.get(k, {}).get("errors", 0) for k in ("cmos", "base")]
            return got == [ncmos, nbase]
        try:
            wait_for(done, 30, f"{ncmos} CMOS and {nbase} base records processed")
        except AssertionError:
            raise AssertionError(f"stats: {self.stats()}") from None


@pytest.fixture
def stack(cfg, tmp_path):
    s = Stack(cfg, tmp_path)
    yield s
    s.close()


def series_counts(redis, name):
    """(per-channel number of readings, per-channel mean) over the last 10 minutes."""
    now = time.time()
    n, _ = ts.read_counts(redis, f"{name}:n", now - 600, now + 10)
    mean, _ = ts.read_values(redis, name, now - 600, now + 10)
    return n, mean


# ------------------------------------------------------------------ end to end

def test_rates_and_currents_are_recovered_from_a_stream_with_non_default_ids_garbage_and_subruns(stack, tmp_path):
    sim = OrcaSimulator(3, cmos_id=CMOS_ID, base_id=BASE_ID, poll_period=0.3, masked_fraction=0.02,
                        flag_probability=2e-3, busy_probability=5e-3, garbage=6, subrun_period=0.9,
                        new_ids_on_subrun=True)
    path = write_chunks(tmp_path / "run.orca", sim.stream(2.4))  # 8 polls, sub-runs with new ids
    assert len({ids for _, ids in sim.subruns}) >= 3 and sim.garbage_offsets
    cmos, base = file_records(path, "cmos"), file_records(path, "base")
    assert len(cmos) == 8 * 37 and len(base) == 8 * 19  # the parser finds every record despite the garbage
    stack.start_all()
    stack.serve(path)
    stack.wait_processed(len(cmos), len(base))
    s = stack.stats()
    prod = s["orca_producer"]
    assert prod["cmos"] == len(cmos) and prod["base"] == len(base)
    assert prod["errors"] >= 1 and prod["received"] == prod["processed"] + prod["errors"] + prod.get("dropped", 0)
    assert prod["headers"] == len(sim.subruns)

    # CMOS: the latest map holds each channel's rate at its latest reading
    rates, latest = oracle_cmos(cmos)
    want = as_array(latest)
    got = latest_values(stack.redis, "cmos")
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-12)
    # ... which are the simulator's true rates, and never for masked or flagged channels
    ok = ~np.isnan(got)
    np.testing.assert_allclose(got[ok], sim.true_rates[ok], rtol=1e-12)
    assert not (ok & sim.masked_channels()).any()
    # a channel flagged in one of the last two readings keeps its last valid rate (issue 13)
    last_two = {lcn for k, lcn in sim.flagged_readings if k >= 6}
    kept = [i for i in last_two if i in latest]
    assert kept and all(ok[i] for i in kept)
    # the per-second series: every rate, averaged at the 1e-3 storage resolution
    n, mean = series_counts(stack.redis, "cmos")
    want_n = np.zeros(NCHANNELS_TOTAL, int)
    for lcn, values in rates.items():
        want_n[lcn] = len(values)
    assert np.array_equal(n, want_n)
    has = want_n > 0
    np.testing.assert_allclose(mean[has], sim.true_rates[has], atol=6e-4)

    # base currents: exact, masked and busy channels absent, busy flags kept
    values, blatest, busy = oracle_base(base)
    got = latest_values(stack.redis, "base")
    want = as_array(blatest)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)])
    assert not (~np.isnan(got) & sim.masked_channels()).any()
    n, mean = series_counts(stack.redis, "base")
    want_n = np.nan_to_num(as_array({k: len(v) for k, v in values.items()})).astype(int)
    assert np.array_equal(n, want_n)
    want_mean = as_array({k: np.mean(v) for k, v in values.items()})
    np.testing.assert_allclose(mean[want_n > 0], want_mean[want_n > 0], rtol=0, atol=1e-9)
    flags = np.frombuffer(stack.redis.get(schema.ORCA_BASE_BUSY), np.uint8)
    want_busy = np.array([busy.get(i, False) for i in range(len(flags))])
    assert flags.astype(bool).tolist() == want_busy.tolist() and want_busy.any()
    busy_n, _ = ts.read_counts(stack.redis, "base_busy", time.time() - 600, time.time() + 10)
    assert busy_n.sum() == s["base"]["busy"] > 0

    beat = {k.decode(): v.decode() for k, v in stack.redis.hgetall("status:data_producer").items()}
    assert beat["cmos_id"] == hex(sim.ids.cmos) and beat["connected"] in ("0", "1")


def test_a_restarted_consumer_resumes_from_the_shared_state_without_spurious_rates(stack, tmp_path):
    sim = OrcaSimulator(5, cmos_id=CMOS_ID, base_id=BASE_ID, poll_period=0.4, crates=[0, 3, 5, 11, 18],
                        flag_probability=1e-3, counter_reset=False)
    chunks = list(sim.stream(4.0))  # header+run start, 10 polls, end of run
    first = write_chunks(tmp_path / "a.orca", chunks[:6])
    second = write_chunks(tmp_path / "b.orca", [chunks[0], *chunks[6:]])  # ORCA sends the header again
    cmos1, cmos2 = file_records(first, "cmos"), file_records(second, "cmos")
    base1, base2 = file_records(first, "base"), file_records(second, "base")
    stack.start_all()
    stack.serve(first)
    stack.wait_processed(len(cmos1), len(base1))
    stack.stop("cmos")  # SIGTERM: the pool drains and its workers flush
    stack.start("cmos", "--stream", "cmos")
    time.sleep(0.5)
    stack.wait_consumers("cmos")
    stack.serve(second)
    stack.wait_processed(len(cmos1) + len(cmos2), len(base1) + len(base2))

    rates, latest = oracle_cmos(cmos1 + cmos2)  # one uninterrupted computation
    n, mean = series_counts(stack.redis, "cmos")
    want_n = as_array({k: len(v) for k, v in rates.items()})
    # the pair across the restart was computed too: as many rates as without a restart
    assert np.array_equal(n, np.nan_to_num(want_n).astype(int))
    has = n > 0
    np.testing.assert_allclose(mean[has], sim.true_rates[has], atol=6e-4)  # nothing spurious
    got = latest_values(stack.redis, "cmos")
    want = as_array(latest)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], sim.true_rates[~np.isnan(got)], rtol=1e-12)


def test_the_producer_reconnects_to_a_restarted_orca_and_reads_its_new_header_and_ids(stack, tmp_path):
    a = OrcaSimulator(1, cmos_id=CMOS_ID, base_id=BASE_ID, poll_period=0.5, crates=[0, 1, 2])
    b = OrcaSimulator(2, cmos_id=40 << 18, base_id=41 << 18, poll_period=0.5, byteorder="big",
                      start_time=1_700_003_600.0, crates=[1, 2, 7], garbage=2)
    pa = write_chunks(tmp_path / "a.orca", a.stream(2.0))
    pb = write_chunks(tmp_path / "b.orca", b.stream(2.0))
    ca, cb = file_records(pa, "cmos"), file_records(pb, "cmos")
    ba, bb = file_records(pa, "base"), file_records(pb, "base")
    stack.start_all()
    stack.serve(pa)  # ORCA closes the connection at its end ...
    stack.serve(pb)  # ... and comes back with another configuration
    stack.wait_processed(len(ca) + len(cb), len(ba) + len(bb))
    prod = stack.stats()["orca_producer"]
    assert prod["cmos"] == len(ca) + len(cb) and prod["base"] == len(ba) + len(bb)
    beat = {k.decode(): v.decode() for k, v in stack.redis.hgetall("status:data_producer").items()}
    assert beat["cmos_id"] == hex(40 << 18) and beat["base_id"] == hex(41 << 18)
    assert beat["byteorder"] == "big" and int(beat["connects"]) >= 2
    # ORCA comes back but closes before its header: the heartbeat keeps the last header's ids
    connects = int(beat["connects"])
    with socket.create_server(("127.0.0.1", stack.port)) as headerless:
        threading.Thread(target=lambda: headerless.accept()[0].close(), daemon=True).start()

        def beat_after_it():
            b = {k.decode(): v.decode() for k, v in stack.redis.hgetall("status:data_producer").items()}
            return b if int(b.get("connects", 0)) > connects else None
        beat = wait_for(beat_after_it, 30, "a heartbeat after the headerless connection")
    assert beat["cmos_id"] == hex(40 << 18) and beat["base_id"] == hex(41 << 18)

    _, latest = oracle_cmos(ca + cb)
    got = latest_values(stack.redis, "cmos")
    want = as_array(latest)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-12)
    # crate 1 of the new run: its rates come from the new run only (an hour later: new
    # baselines); a channel without a rate in the new run keeps the old run's last one
    _, latest_b = oracle_cmos(cb)
    new = np.array([lcn for lcn in latest_b if 512 <= lcn < 1024])
    assert len(new) > 400
    np.testing.assert_allclose(got[new], b.true_rates[new], rtol=1e-12)
    _, blatest, _ = oracle_base(ba + bb)
    gotb = latest_values(stack.redis, "base")
    wantb = as_array(blatest)
    assert np.array_equal(np.isnan(gotb), np.isnan(wantb))
    assert np.array_equal(gotb[~np.isnan(gotb)], wantb[~np.isnan(wantb)])


def test_two_cmos_workers_give_the_same_rates_as_one(cfg, tmp_path):
    sim = OrcaSimulator(8, cmos_id=CMOS_ID, base_id=BASE_ID, poll_period=0.25, flag_probability=0,
                        counter_reset=False, crates=[2, 4, 6, 9, 13])
    path = write_chunks(tmp_path / "run.orca", sim.stream(3.0))
    cmos, base = file_records(path, "cmos"), file_records(path, "base")
    rates, _ = oracle_cmos(cmos)
    results = {}
    for workers in (1, 2):
        Redis = redis_py.Redis.from_url(cfg["redis_url"])
        Redis.flushall()
        stack = Stack(cfg, tmp_path / f"w{workers}", orca_batch_records=3, orca_batch_ms=1)
        (tmp_path / f"w{workers}").mkdir()
        try:
            stack.start_all(cmos=workers)
            stack.serve(path)
            stack.wait_processed(len(cmos), len(base))
            stack.stop("cmos")
            events = (tmp_path / f"w{workers}" / "var" / "orca_cmos_pool.log").read_text()
            assert events.count("STARTING:") + events.count("RESTARTING:") >= workers
            results[workers] = series_counts(stack.redis, "cmos") + (stack.stats()["cmos"],)
        finally:
            stack.close()
            Redis.close()
    (n1, mean1, s1), (n2, mean2, _) = results[1], results[2]
    want_n = np.nan_to_num(as_array({k: len(v) for k, v in rates.items()})).astype(int)
    assert np.array_equal(n1, want_n) and s1.get("stale", 0) == 0
    # with two workers a batch can be overtaken by the next one: its readings are then
    # skipped ("stale") and the next rate spans both intervals, so the rates are the same
    assert np.array_equal(n2 > 0, want_n > 0) and (n2 <= want_n).all()
    has = want_n > 0
    np.testing.assert_allclose(mean2[has], mean1[has], atol=6e-4)
    np.testing.assert_allclose(mean1[has], sim.true_rates[has], atol=6e-4)


def test_two_cmos_workers_racing_for_the_same_crates_retry_and_give_exactly_the_rates_of_one(cfg, tmp_path):
    """Each record is a batch of its own, paced as ORCA sends them: the two
    half-crate records of a poll reach the two workers together, so both
    transactions WATCH the same crate state and one of them must retry."""
    sim = OrcaSimulator(21, cmos_id=CMOS_ID, base_id=BASE_ID, poll_period=0.5, flag_probability=0,
                        counter_reset=False, masked_fraction=0.02)
    path = write_chunks(tmp_path / "run.orca", sim.stream(6.0))
    cmos, base = file_records(path, "cmos"), file_records(path, "base")
    stack = Stack(cfg, tmp_path, orca_batch_records=1, orca_batch_ms=1)
    try:
        stack.start_all(cmos=2)
        stack.serve(path, speed=1.0)
        stack.wait_processed(len(cmos), len(base))
        events = (tmp_path / "var" / "orca_cmos_pool.log").read_text()
        assert events.count("STARTING:") >= 2  # two workers took part
        s = stack.stats()["cmos"]
        assert s["state_conflicts"] > 0, s  # the race happened and was retried
        assert s.get("stale", 0) == 0 and s["processed"] == len(cmos)  # and nothing overtook anything
        rates, latest = oracle_cmos(cmos)
        n, mean = series_counts(stack.redis, "cmos")
        want_n = np.nan_to_num(as_array({k: len(v) for k, v in rates.items()})).astype(int)
        assert np.array_equal(n, want_n)  # every rate once: none lost, none doubled
        has = want_n > 0
        np.testing.assert_allclose(mean[has], sim.true_rates[has], atol=6e-4)  # 1e-3 storage resolution
        got, want = latest_values(stack.redis, "cmos"), as_array(latest)
        assert np.array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got[~np.isnan(got)], sim.true_rates[~np.isnan(got)], rtol=1e-12)
    finally:
        stack.close()


def _worker_pids(log_path):
    """Pids of the pool's workers, in start order, from its event log."""
    text = Path(log_path).read_text()
    return [int(p) for p in re.findall(r"(?:STARTING|RESTARTING): D\d+ S\d+\n\s+Pid: (\d+)", text)]


@pytest.mark.parametrize("stream", ["cmos", "base"])
def test_a_killed_consumer_worker_is_restarted_and_what_it_held_is_counted_dropped(cfg, tmp_path, stream):
    sim = OrcaSimulator(23, cmos_id=CMOS_ID, base_id=BASE_ID, poll_period=0.25, crates=[1, 4, 9])
    path = write_chunks(tmp_path / "run.orca", sim.stream(8.0))
    ncmos, nbase = len(file_records(path, "cmos")), len(file_records(path, "base"))
    total = {"cmos": ncmos, "base": nbase}[stream]
    stack = Stack(cfg, tmp_path, orca_batch_records=2, orca_batch_ms=1)
    try:
        stack.start_all(**{stream: 1})
        thread = threading.Thread(target=stack.serve, args=(path, 1.0), daemon=True)
        thread.start()
        log = tmp_path / "var" / f"orca_{stream}_pool.log"
        wait_for(lambda: stack.stats().get(stream, {}).get("processed", 0) >= total // 4, 30, "data flowing")
        victim = _worker_pids(log)[0]
        kill_worker_holding_records(stack.redis, victim, f"data_consumer_{stream}")
        thread.join(60)
        assert not thread.is_alive()

        def settled():
            s = stack.stats().get(stream, {})
            done = s.get("processed", 0) + s.get("dropped", 0) + s.get("errors", 0)
            return s if s.get("received") == total and done == total else None
        s = wait_for(settled, 30, f"{stream} counters settled")
        text = log.read_text()
        assert "CRASHED: D1 S1" in text and "RESTARTING: D1 S2" in text
        assert s["dropped"] == s.get("worker_lost", 0) > 0  # the records it held unflushed
        assert s["processed"] == total - s["dropped"] and s.get("errors", 0) == 0
        assert _worker_pids(log)[-1] != victim and stack.procs[stream].poll() is None
        if stream == "cmos":  # the restarted worker carries on from the shared state: still true rates
            got = latest_values(stack.redis, "cmos")
            ok = ~np.isnan(got)
            assert ok.sum() > 0
            np.testing.assert_allclose(got[ok], sim.true_rates[ok], rtol=1e-12)
    finally:
        stack.close()


# ------------------------------------------------------------------ handlers in-process

def _frames(kind, records, order="little", sent=None):
    meta = {"byteorder": order, "sent": sent or time.time()}
    return wire.encode(kind, [r if isinstance(r, bytes) else r.raw for r in records], meta)


def _sim_records(sim, seconds):
    parser = orca.OrcaStreamParser()
    out = []
    for chunk in sim.stream(seconds):
        out += parser.feed(chunk)
    out += parser.close()
    return out


def test_a_late_batch_is_skipped_so_the_shared_baseline_never_moves_back(cfg, redis_client):
    sim = OrcaSimulator(4, cmos_id=CMOS_ID, base_id=BASE_ID, poll_period=1.0, crates=[3], flag_probability=0,
                        counter_reset=False, masked_fraction=0)
    recs = [r for r in _sim_records(sim, 4.0) if r.kind == "cmos"]  # 4 polls x 2 records
    a, b = CmosHandler(cfg), CmosHandler(cfg)  # two workers sharing the state
    a.process(_frames("cmos", recs[0:2]))
    b.process(_frames("cmos", recs[4:6]))  # poll 2 overtakes poll 1
    a.process(_frames("cmos", recs[2:4]))  # poll 1 arrives late: stale
    b.process(_frames("cmos", recs[6:8]))
    assert a.counts["stale"] == 2 and b.counts["stale"] == 0
    values = [v for h in (a, b) for parts in h.pending.values() for _, r in parts for v in r.tolist()]
    present = sim.present_channels()[1536:2048]
    assert len(values) == 2 * present.sum()  # poll 2 (vs poll 0) and poll 3 (vs poll 2)
    np.testing.assert_allclose(sorted(values), sorted(np.tile(sim.true_rates[1536:2048][present], 2)), rtol=1e-12)
    state = orca.CmosRateState.from_bytes(redis_client.get(CMOS_STATE_KEY.format(crate=3)))
    assert state.last_time_us.max() == _time_us(recs[7].raw)
    for h in (a, b):
        assert h.flush(time.time())
    assert stats(redis_client)["cmos"]["processed"] == 8


def test_repeated_cards_in_one_batch_are_applied_in_order(cfg, redis_client):
    sim = OrcaSimulator(6, cmos_id=CMOS_ID, base_id=BASE_ID, poll_period=0.5, crates=[0, 1], flag_probability=0,
                        counter_reset=False, masked_fraction=0)
    recs = [r for r in _sim_records(sim, 2.0) if r.kind == "cmos"]  # 4 polls in one batch
    dec = orca.decode_cmos(recs)
    assert len(card_rounds(dec)) == 4
    handler = CmosHandler(cfg)
    handler.process(_frames("cmos", recs))
    (lcn, rate), = [p for parts in handler.pending.values() for p in parts]
    assert len(lcn) == 3 * 1024
    np.testing.assert_allclose(rate, sim.true_rates[lcn], rtol=1e-12)
    got = latest_values(redis_client, "cmos")
    np.testing.assert_allclose(got[:1024], sim.true_rates[:1024], rtol=1e-12)


def test_bad_batches_and_records_are_counted_not_fatal(cfg, redis_client):
    handler = BaseHandler(cfg)
    handler.process([b"minard/1", b"base", b"{}", b"\0\0\0\5", b"xx"])  # lengths do not add up
    handler.process(_frames("cmos", [b"\0" * orca.BASE_WORDS * 4]))  # wrong kind on the base port
    handler.process(_frames("base", [b"\1" * 100]))  # a record of the wrong size
    assert handler.flush(time.time())
    s = stats(redis_client)["base"]
    assert s["errors"] == 3 and s["wire_bad_lengths"] == 1 and s["wrong_kind"] == 1 and s["bad_length"] == 1


def test_the_consumer_port_selects_the_stream(cfg):
    import click

    assert stream_for(str(cfg["zmq_cmos"]).rsplit(":", 1)[1], None, cfg) == "cmos"
    assert stream_for(str(cfg["zmq_base"]).rsplit(":", 1)[1], None, cfg) == "base"
    assert stream_for("1", "base", cfg) == "base"
    with pytest.raises(click.UsageError, match="neither"):
        stream_for("1", None, cfg)
    env = dict(os.environ, MINARD_ZMQ_CMOS="tcp://127.0.0.1:5557", MINARD_ZMQ_BASE="tcp://127.0.0.1:5558")
    out = subprocess.run([str(BIN / "data_consumer"), "5999"], env=env, capture_output=True, text=True,
                         timeout=20, check=False)
    assert out.returncode == 2 and "5557 (cmos)" in out.stderr


def test_a_worker_whose_crates_changed_meanwhile_recomputes_from_the_new_state(cfg, redis_client):
    sim = OrcaSimulator(9, cmos_id=CMOS_ID, base_id=BASE_ID, poll_period=1.0, crates=[7], flag_probability=0,
                        counter_reset=False, masked_fraction=0)
    recs = [r for r in _sim_records(sim, 3.0) if r.kind == "cmos"]  # 3 polls x 2 records
    a, b = CmosHandler(cfg), CmosHandler(cfg)
    a.process(_frames("cmos", recs[0:2]))
    real_load = a.load_state
    raced = []

    def racing_load(crates, raws):
        if not raced:  # another worker commits poll 1 between a's read and its write
            raced.append(1)
            b.process(_frames("cmos", recs[2:4]))
        return real_load(crates, raws)

    a.load_state = racing_load
    a.process(_frames("cmos", recs[4:6]))  # poll 2: first try conflicts, the retry sees poll 1
    assert a.counts["state_conflicts"] == 1 and not a.counts["stale"]
    present = sim.present_channels()[7 * 512:8 * 512]
    for h in (a, b):
        (lcn, rate), = [p for parts in h.pending.values() for p in parts]
        assert len(lcn) == present.sum()  # one interval each: no rate lost, none doubled
        np.testing.assert_allclose(rate, sim.true_rates[lcn], rtol=1e-12)


def test_a_flush_while_redis_is_down_keeps_the_data_for_the_next_one(cfg):
    from minard.testing import RedisServer

    with RedisServer() as server:
        local = dict(cfg, redis_url=server.url, orca_close_retry=0.1)
        sim = OrcaSimulator(12, cmos_id=CMOS_ID, base_id=BASE_ID, poll_period=1.0, crates=[2], flag_probability=0,
                            counter_reset=False, busy_probability=0)
        recs = [r for r in _sim_records(sim, 1.0) if r.kind == "base"]
        handler = BaseHandler(local)
        handler.process(_frames("base", recs))
        server.stop()
        assert not handler.flush(time.time())
        server.start()
        assert handler.flush(time.time())
        client = redis_py.Redis.from_url(server.url)
        try:
            assert stats(client)["base"]["processed"] == 1
            n, _ = ts.read_counts(client, "base:n", time.time() - 60, time.time() + 10)
            assert n.sum() == (~sim.masked_channels() & sim.present_channels()).sum()
        finally:
            client.close()


def _padded(raw, dtype):
    arr = np.zeros(NCHANNELS_TOTAL, dtype=np.dtype(dtype).newbyteorder("="))
    got = np.frombuffer(raw or b"", dtype=dtype)
    arr[:len(got)] = got
    return arr


def test_read_modify_write_stores_exactly_what_atomic_bitfield_adds_store(redis_client):
    rng = np.random.default_rng(3)
    t0 = 1_700_000_000.0
    for round_ in range(3):  # the second and third rounds add to what is stored
        with redis_client.pipeline(transaction=True) as pipe:
            writer = ChannelWriter()
            for k in range(4):
                t = t0 + 7 * k + round_
                lcn = rng.choice(NCHANNELS_TOTAL, 3000 + 1000 * k, replace=False)
                values = rng.normal(0, 500, len(lcn)).round(4)
                values[::50] = 0.0  # a zero reading adds to :n only
                writer.add_values("a", t, lcn, values)
                writer.add_counts("c", t, lcn[::3], 1)
                channels.add_values(redis_client, "b", t, lcn, values)
                channels.add_counts(redis_client, "d", t, lcn[::3], np.ones(len(lcn[::3]), dtype=np.int64))
            writer.read(pipe)
            pipe.multi()
            writer.write(pipe)
            pipe.execute()
    keys = sorted(k.decode() for k in redis_client.keys("ch:*"))
    mine = [k for k in keys if k.endswith((":a:sum", ":a:n", ":c"))]
    assert 2 * len(mine) == len(keys) and len(mine) == 3 * (3 + 1 + 1 + 1)  # 3 buckets of 10 s, 1 of the others
    for key in mine:
        twin = key.replace(":a:", ":b:") if ":a:" in key else key[:-1] + "d"
        dtype = ">i8" if key.endswith("sum") else ">u4"
        assert np.array_equal(_padded(redis_client.get(key), dtype), _padded(redis_client.get(twin), dtype))
        assert abs(redis_client.ttl(key) - redis_client.ttl(twin)) <= 10  # keep + step after the write
    for window in ((t0, t0 + 30), (t0 + 10, t0 + 12)):
        a, _ = ts.read_values(redis_client, "a", *window, now=t0 + 40)
        b, _ = ts.read_values(redis_client, "b", *window, now=t0 + 40)
        assert np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(a[~np.isnan(a)], b[~np.isnan(b)])


def test_read_modify_write_saturates_like_bitfield_overflow_sat(redis_client):
    key_n, key_sum = ts.channel_key(10, 170_000_000, "x:n"), ts.channel_key(10, 170_000_000, "x:sum")
    redis_client.set(key_n, np.array([2**32 - 3, 7], ">u4").tobytes())
    redis_client.set(key_sum, np.array([2**63 - 10, -(2**63) + 5, 4], ">i8").tobytes())
    writer = ChannelWriter(levels=(ts.Level(10, 3600),))
    for _ in range(5):
        writer.add_values("x", 1_700_000_000.0, np.array([0, 1, 2]), np.array([1.0, -1.0, 0.002]))
    with redis_client.pipeline(transaction=True) as pipe:
        writer.read(pipe)
        pipe.multi()
        writer.write(pipe)
        pipe.execute()
    assert np.frombuffer(redis_client.get(key_n), ">u4").tolist() == [2**32 - 1, 12, 5]
    assert np.frombuffer(redis_client.get(key_sum), ">i8").tolist() == [2**63 - 1, -(2**63), 14]
