"""Fixtures that start real servers (redis-server, ZMQ sockets) on free ports."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis as redis_py
import zmq

from minard import config
from minard.testing import RedisServer, free_port

#: The read-only material beside the checkout (formats, recorded data).
SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
DEMO_ZDAB = SHARED / "data" / "Demo_Events.zdab"


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server for the test session, stopped by pid at the end."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    """The URL of an empty database (flushed before each test)."""
    client = redis_py.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url):
    client = redis_py.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def cfg(redis_url, tmp_path):
    """A configuration pointing every address at this test's own servers."""
    return config.load(
        {
            "redis_url": redis_url,
            "var_dir": str(tmp_path / "var"),
            "dispatcher_port": free_port(),
            "dispatcher_accounting_dir": str(tmp_path / "var" / "dispatcher"),
            "zmq_dispatch": f"tcp://127.0.0.1:{free_port()}",
            "zmq_cmos": f"tcp://127.0.0.1:{free_port()}",
            "zmq_base": f"tcp://127.0.0.1:{free_port()}",
            "orca_port": free_port(),
        },
        env={},
    )


@pytest.fixture
def zmq_context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def demo_zdab():
    if not DEMO_ZDAB.exists():
        pytest.fail(f"{DEMO_ZDAB} is missing: the shared/ directory must sit beside the checkout")
    return DEMO_ZDAB
