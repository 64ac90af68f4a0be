"""Real servers for tests and benchmarks: free ports, a throwaway redis-server.

Used by ``tests/conftest.py`` and ``bench/``.  Every process started here is
stopped by its pid; nothing is faked.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path


#: The ports :func:`free_port` handed out lately (newest last), never handed out again meanwhile.
_HANDED_OUT: collections.deque = collections.deque(maxlen=2048)
_HANDED_OUT_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and not one of the last
    2048 this process handed out.

    The kernel readily gives a just-closed port again (bind to port 0), so two calls
    for one test could return the same port (e.g. a gunicorn app's and its master's
    metrics port: ``/metrics`` there would be the web app's own page).
    """
    with _HANDED_OUT_LOCK:
        for _ in range(100):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                break
        _HANDED_OUT.append(port)
        return port


def wait_for(pred, timeout: float = 30.0, what: str = "condition", interval: float = 0.05,
             ignore: tuple[type[BaseException], ...] = ()):
    """Poll *pred* until it returns something truthy and return that value.

    The one way tests wait for a process to reach a state (never a fixed sleep).
    Exceptions of the types in *ignore* count as "not yet" (e.g. connection errors
    while a server restarts); after *timeout* seconds it fails with *what* and the
    last value seen.
    """
    end = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = pred()
        except ignore as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def wait_settled(read, quiet: float, timeout: float = 60.0, what: str = "value",
                 ready=lambda value: True, interval: float = 0.25):
    """Poll *read* until its value (one that *ready* accepts) has not changed for *quiet* s; return it.

    For counts that a pipeline finishes writing at no announced moment: "settled"
    is the only observable end (several flush periods without a change).
    """
    state = {"value": read(), "since": time.monotonic()}

    def settled():
        now = read()
        if now != state["value"]:
            state["value"], state["since"] = now, time.monotonic()
        return ready(now) and time.monotonic() - state["since"] >= quiet

    wait_for(settled, timeout, f"{what} to settle (last: {state['value']!r})", interval)
    return state["value"]


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Block until something accepts connections on *port*, or raise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")
            time.sleep(0.02)


def stop_pid(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM *proc*, then SIGKILL if it outlives *timeout*; return its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def dispatcher_keys(directory: str | os.PathLike) -> tuple[Path, Path]:
    """A key file and a credentials file holding a dispatcher key for every role.

    Returns (keys file, credentials file) under *directory*; point
    ``dispatcher_keys_file`` (the server) and ``dispatcher_credentials_file``
    (the clients) at them.
    """
    from minard.dispatcher.client import issue_credentials
    from minard.ops.keys import KeyStore

    directory = Path(directory)
    keys, creds = directory / "dispatcher_keys.json", directory / "dispatcher_credentials.json"
    issue_credentials(KeyStore(keys), creds)
    return keys, creds


def export_dispatcher_keys(directory: str | os.PathLike) -> tuple[Path, Path]:
    """:func:`dispatcher_keys`, exported through ``MINARD_DISPATCHER_*`` to this process
    and every process it starts (benchmarks)."""
    keys, creds = dispatcher_keys(directory)
    os.environ["MINARD_DISPATCHER_KEYS_FILE"] = str(keys)
    os.environ["MINARD_DISPATCHER_CREDENTIALS_FILE"] = str(creds)
    return keys, creds


def redis_server_binary() -> str:
    """Path of redis-server, or raise a clear error telling how to get it."""
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if not path:
        raise RuntimeError("redis-server is not installed: run ./manage.sh setup")
    return path


class RedisServer:
    """A redis-server on a free loopback port with its data in a temp dir."""

    def __init__(self, port: int | None = None, password: str | None = None, appendonly: bool = False):
        """*appendonly*: persist every write in an append-only file as the stack's
        redis.conf does (``appendfsync everysec``), so that a server killed with
        ``kill -9`` and started again has every write it acknowledged."""
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.dir = Path(tempfile.mkdtemp(prefix="minard-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the server and wait until it answers."""
        args = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.dir), "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        """Stop the server by pid (it is restartable on the same port)."""
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
