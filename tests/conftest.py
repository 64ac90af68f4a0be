"""Fixtures that start real servers (redis-server, ZMQ sockets) on free ports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis as redis_py
import zmq

from minard import config
from minard.testing import (
    RedisServer,
    dispatcher_keys,
    free_port,
    wait_for,  # noqa: F401 - the one wait helper, re-exported for tests
)
from minard.testing.dispatcher import DispatcherProcess

#: The read-only material beside the checkout (formats, recorded data).
SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
DEMO_ZDAB = SHARED / "data" / "Demo_Events.zdab"
#: Screenshots for the README are refreshed only on request, so that a test
#: run never changes tracked files: MINARD_UPDATE_DOCS_IMG=1 ./manage.sh test
UPDATE_DOCS_IMG = os.environ.get("MINARD_UPDATE_DOCS_IMG") == "1"
#: The Chromium the browser tests drive (installed by ./manage.sh setup) and its flags.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
#: A small programs.cfg registry for the operations tests (HTML in a description on purpose).
REGISTRY = """
[daq]
host = buffer1
description = DAQ <b>main</b>
timeout = 10
link = /logs/daq

[pinger]
timeout = 5
"""


@pytest.fixture(scope="session", autouse=True)
def dispatcher_credentials(tmp_path_factory):
    """Dispatcher keys for every role, shared by the session (scrypt costs ~0.1 s per key).

    Exported as MINARD_DISPATCHER_KEYS_FILE / MINARD_DISPATCHER_CREDENTIALS_FILE so
    that dispatcher subprocesses verify against it and every client (in-process
    or not) authenticates with it; ``cfg`` carries the same paths.
    """
    keys, creds = dispatcher_keys(tmp_path_factory.mktemp("dispatcher-keys"))
    saved = {k: os.environ.get(k) for k in ("MINARD_DISPATCHER_KEYS_FILE", "MINARD_DISPATCHER_CREDENTIALS_FILE")}
    os.environ["MINARD_DISPATCHER_KEYS_FILE"] = str(keys)
    os.environ["MINARD_DISPATCHER_CREDENTIALS_FILE"] = str(creds)
    yield keys, creds
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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
def cfg(redis_url, tmp_path, dispatcher_credentials):
    """A configuration pointing every address at this test's own servers."""
    return config.load(
        {
            "redis_url": redis_url,
            "dispatcher_keys_file": str(dispatcher_credentials[0]),
            "dispatcher_credentials_file": str(dispatcher_credentials[1]),
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
    from minard.pipeline import curve

    curve.stop_authenticator(ctx)  # a test that made a CURVE server started one
    ctx.destroy(linger=0)


@pytest.fixture
def demo_zdab():
    if not DEMO_ZDAB.exists():
        pytest.fail(f"{DEMO_ZDAB} is missing: the shared/ directory must sit beside the checkout")
    return DEMO_ZDAB


@pytest.fixture
def registry_cfg(cfg, tmp_path):
    """The test configuration with its own programs.cfg (:data:`REGISTRY`)."""
    (tmp_path / "programs.cfg").write_text(REGISTRY)
    cfg["programs_file"] = str(tmp_path / "programs.cfg")
    return cfg


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Playwright, one per test module, closed at its end.

    Fails (rather than skips) when Chromium is missing: the browser tests are
    part of the suite, and a silent skip would hide a broken setup.
    """
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run ./manage.sh setup")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


# ----------------------------------------------------------------------------- dispatcher

@pytest.fixture
def start_dispatcher(cfg, tmp_path):
    """Start dispatcher subprocesses with the default grants and config overrides; stop them all by pid."""
    procs = []

    def start(**settings) -> DispatcherProcess:
        base = {"redis_url": cfg["redis_url"],
                "dispatcher_accounting_dir": cfg["dispatcher_accounting_dir"],
                "dispatcher_finished_timeout": 5, "dispatcher_shutdown_wait": 0.5}
        base.update(settings)
        proc = DispatcherProcess(log_path=tmp_path / f"dispatcher-{len(procs)}.log", **base)
        procs.append(proc)
        return proc.start()

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture
def disp(start_dispatcher):
    return start_dispatcher()


def gunicorn_argv(port: int, program: str = "web", workers: int = 2) -> list[str]:
    """The gunicorn command line of a web app on *port*, exactly as ``minard up`` builds it
    (:func:`minard.stack.gunicorn_command`: worker class and timeouts), with *workers* workers."""
    from minard import stack

    return stack.gunicorn_command(config.load(env={}), program, port=port, workers=workers)
