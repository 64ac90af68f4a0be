"""minard.ops.logclient against a real log server, a stopped one and a hung one."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from minard.ops.keys import KeyStore
from minard.ops.logclient import Heartbeat, HttpLogHandler
from minard.ops.logserver import create_app
from minard.testing import free_port, wait_for


@pytest.fixture
def server(cfg, tmp_path):
    """A log server (werkzeug, threaded) with program 'daq' registered; yields (url, token, cfg)."""
    (tmp_path / "programs.cfg").write_text("[daq]\ntimeout = 10\n")
    cfg["programs_file"] = str(tmp_path / "programs.cfg")
    token = KeyStore.from_config(cfg).add("daq")
    srv = make_server("127.0.0.1", 0, create_app(cfg), threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}", token, cfg
    srv.shutdown()
    thread.join(5)


def make_logger(handler, name):
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return logger


def test_handler_delivers_records_and_notify_to_the_server(server, redis_client):
    url, token, cfg = server
    handler = HttpLogHandler("daq", url, token)
    logger = make_logger(handler, "test.delivers")
    try:
        logger.info("run 7 started")
        logger.error("crate 3 lost")
        logger.warning("end of run", extra={"notify": True})
        assert wait_for(lambda: handler.sent == 3), (handler.sent, handler.failed, handler.rejected)
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = (Path(cfg["var_dir"]) / "logs" / "daq.log").read_text()
    assert "INFO    run 7 started" in text and "DANGER  crate 3 lost" in text
    from minard.store import alarms
    assert {a["message"] for a in alarms.list_alarms(redis_client)} == {"crate 3 lost", "end of run"}


def test_heartbeat_thread_marks_the_program_up(server, redis_client):
    url, token, _cfg = server
    with Heartbeat("daq", url, token, period=0.1, metrics=lambda: {"lag": 0.5}) as hb:
        assert wait_for(lambda: hb.sent >= 2)
    assert redis_client.hget("minard:ops:hb:daq", "status") == b"ok"
    assert redis_client.hget("minard:ops:metrics:daq", "lag") == b"0.5"


def test_bad_token_is_counted_as_rejected_not_retried(server):
    url, _token, _cfg = server
    handler = HttpLogHandler("daq", url, "mnd_not-the-token")
    logger = make_logger(handler, "test.rejected")
    logger.error("x")
    assert wait_for(lambda: handler.rejected == 1)
    assert Heartbeat("daq", url, "mnd_not-the-token").beat() is False
    handler.close()


def test_logging_1000_records_with_the_server_down_takes_under_a_second():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    handler = HttpLogHandler("daq", url, "mnd_token", queue_size=100)
    logger = make_logger(handler, "test.down")
    start = time.perf_counter()
    for i in range(1000):
        logger.error("record %d", i)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0
    assert handler.dropped >= 800          # the queue holds 100; the rest is dropped and counted
    assert wait_for(lambda: handler.failed >= 1)
    t = time.perf_counter()
    handler.close()
    assert time.perf_counter() - t < 2.0
    logger.removeHandler(handler)


def test_hung_server_blocks_neither_logging_nor_heartbeat_stop():
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(100)  # accepts TCP connections, never answers
    url = f"http://127.0.0.1:{hung.getsockname()[1]}"
    try:
        handler = HttpLogHandler("daq", url, "mnd_token", timeout=0.5)
        logger = make_logger(handler, "test.hung")
        start = time.perf_counter()
        for i in range(1000):
            logger.warning("record %d", i)
        assert time.perf_counter() - start < 1.0
        hb = Heartbeat("daq", url, "mnd_token", period=0.1, timeout=0.3).start()
        time.sleep(0.2)
        t = time.perf_counter()
        hb.stop(timeout=1.0)
        assert time.perf_counter() - t < 1.2
        t = time.perf_counter()
        handler.close()
        assert time.perf_counter() - t < 2.0
        logger.removeHandler(handler)
    finally:
        hung.close()


def test_heartbeat_beat_with_server_down_returns_false_quickly():
    hb = Heartbeat("daq", f"http://127.0.0.1:{free_port()}", "mnd_token")
    t = time.perf_counter()
    assert hb.beat() is False and hb.failed == 1
    assert time.perf_counter() - t < 1.0
