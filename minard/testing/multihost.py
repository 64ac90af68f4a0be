"""The dispatch stream spread over several "hosts" (network namespaces), for tests and bench.

``MultiHostStack`` builds, on a :class:`minard.testing.netns.Network`, the production
layout of docs/deploy.md in miniature:

==========  ==========================================================
``source``  the dispatcher (and the replay feeding it: the event builder)
``push``    ``minard_dispatch push`` (binds the ZMQ PUSH socket)
``poola``   a ``minard_dispatch pull`` pool
``poolb``   a second pool (started with :meth:`add_pool`, also mid-run)
``redis``   redis-server with a password (or, with ``ha=True``, a primary,
            a replica and three Sentinels: :class:`minard.testing.redis_ha.RedisHA`)
==========  ==========================================================

Every process is a real subprocess started inside its namespace with its settings
as ``MINARD_*`` environment variables (the one configuration path), talking to the
others over TCP on 198.18.<net>.0/24 only.  ``close()`` stops every process by pid
and deletes every namespace it made.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis as redis_py

from minard.store import status
from minard.testing import free_port, netns, redis_server_binary, wait_for
from minard.testing.redis_ha import RedisHA

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "multihost-test-password"


class MultiHostStack:
    """Dispatcher, push, pools and Redis in separate namespaces (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike | None = None, *, ha: bool = False, **settings):
        self.dir = Path(directory or tempfile.mkdtemp(prefix="minard-multihost-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.net = netns.Network()
        self.hosts = {name: self.net.add_host(name) for name in ("source", "push", "poola", "poolb", "redis")}
        self.ha = ha
        self.settings = settings
        self.redis_port = free_port()
        self.dispatcher_port = free_port()
        self.zmq_port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.redis_ha: RedisHA | None = None

    # -- addresses ---------------------------------------------------------------
    def address(self, host: str) -> str:
        """The test-network address of *host*."""
        return self.hosts[host].address

    @property
    def redis_url(self) -> str:
        """The ``redis_url`` every process uses (with Sentinels: only password and db count)."""
        if self.redis_ha is not None:
            return self.redis_ha.url
        return f"redis://:{PASSWORD}@{self.address('redis')}:{self.redis_port}/0"

    def env(self, name: str, **extra) -> dict[str, str]:
        """The environment of process *name*: this stack's settings as ``MINARD_*`` variables."""
        values = {"redis_url": self.redis_url,
                  "zmq_dispatch": f"tcp://{self.address('push')}:{self.zmq_port}",
                  "dispatcher_port": self.dispatcher_port, "dispatcher_host": self.address("source"),
                  "var_dir": str(self.dir / name / "var"),
                  # the ZMQ CURVE keys, distributed to every host as in production (docs/security.md)
                  "zmq_keys_dir": str(self.dir / "zmq_keys"),
                  "dispatcher_accounting_dir": str(self.dir / "dispatcher"),
                  "dispatch_event_log": str(self.dir / name / "pool.log"), "dispatch_close_retry": 3,
                  **self.settings, **extra}
        if self.redis_ha is not None:
            values.update(redis_sentinels=self.redis_ha.sentinels_value,
                          redis_master_name=self.redis_ha.master_name)
        env = dict(os.environ)
        env.update({f"MINARD_{k.upper()}": str(v) for k, v in values.items()})
        return env

    # -- processes ---------------------------------------------------------------
    def start(self, pools: tuple[str, ...] = ("poola",)) -> MultiHostStack:
        """Redis, dispatcher, push and the given pools; wait until data can flow."""
        self._start_redis()
        self.spawn("dispatcher", "source", [sys.executable, "-m", "minard.cli", "dispatcher",
                                            "--port", self.dispatcher_port, "--host", self.address("source")])
        wait_for(lambda: self._port_open("source", self.dispatcher_port), 30, "the dispatcher")
        for pool in pools:
            self.add_pool(pool)
        self.spawn("push", "push", [BIN / "minard_dispatch", "push", "--host",
                                    f"{self.address('source')}:{self.dispatcher_port}"])
        wait_for(lambda: self.status("minard_dispatch_push").get("connected") == "1", 30, "push connected")
        wait_for(lambda: int(self.status("minard_dispatch_push").get("consumers", 0)) >= len(pools), 30,
                 "pools connected to push")
        return self

    def _start_redis(self) -> None:
        host = self.hosts["redis"]
        if self.ha:
            self.redis_ha = RedisHA(host.address, PASSWORD, launcher=lambda cmd, **kw: self.net.popen(host, cmd, **kw),
                                    connect=lambda h, p, **kw: netns.redis_client(host.ns, h, p, **kw))
            self.redis_ha.start()
            return
        data = self.dir / "redis"
        data.mkdir(exist_ok=True)
        self.spawn("redis", "redis", [redis_server_binary(), "--port", self.redis_port, "--bind", host.address,
                                      "--requirepass", PASSWORD, "--dir", data, "--save", "", "--appendonly", "no"])
        wait_for(lambda: self._ping(), 20, "redis-server")

    def _ping(self) -> bool:
        try:
            return bool(self.redis().ping())
        except redis_py.RedisError:
            return False

    def add_pool(self, host: str) -> None:
        """Start a ``minard_dispatch pull`` pool on *host* (before or during a run)."""
        self.spawn(host, host, [BIN / "minard_dispatch", "pull"])
        wait_for(lambda: any(p.get("host") and p.get("alive") and int(p.get("pid", 0)) == self.procs[host].pid
                             for p in self.pools().values()), 30, f"the pool on {host} beating")

    def spawn(self, name: str, host: str, cmd: list) -> subprocess.Popen:
        """Start *cmd* as process *name* in namespace *host*, logging to ``<dir>/<name>.log``."""
        (self.dir / name).mkdir(exist_ok=True)
        with open(self.dir / f"{name}.log", "ab") as log:
            proc = self.net.popen(self.hosts[host], cmd, env=self.env(name), stdout=log, stderr=log)
        self.procs[name] = proc
        return proc

    def start_web(self, **settings) -> str:
        """gunicorn minard:app on a sixth host ``front``; returns its base URL.

        *settings* are extra configuration keys (e.g. ``web_redis_replica=True``).
        """
        host = self.net.add_host("front")
        self.hosts["front"] = host
        port = free_port()
        (self.dir / "web").mkdir(exist_ok=True)
        env = self.env("web", **settings)
        with open(self.dir / "web.log", "ab") as log:
            self.procs["web"] = self.net.popen(host, [BIN / "gunicorn", "-b", f"{host.address}:{port}", "-w", "2",
                                                      "--timeout", "30", "minard:app"],
                                               env=env, stdout=log, stderr=log, cwd=str(ROOT))
        wait_for(lambda: self._port_open("front", port), 30, "gunicorn on the front host")
        return f"http://{host.address}:{port}"

    def chromium(self, directory: Path) -> Path:
        """An executable that runs Chromium inside the front host's namespace (for Playwright)."""
        wrapper = Path(directory) / "chromium-front"
        wrapper.write_text(f"#!/bin/sh\nexec ip netns exec {self.hosts['front'].ns} /usr/bin/chromium \"$@\"\n")
        wrapper.chmod(0o700)
        return wrapper

    def replay(self, path, *args: str, wait: bool = True, timeout: float = 120) -> subprocess.Popen:
        """Replay *path* from the source host into the dispatcher (``--speed max`` by default)."""
        with open(self.dir / "replay.log", "ab") as log:
            proc = self.net.popen(self.hosts["source"], [
                sys.executable, "-m", "minard.cli", "replay", str(path), "--dispatcher",
                f"{self.address('source')}:{self.dispatcher_port}", "--no-progress",
                *(args or ("--speed", "max"))], env=self.env("replay"), stdout=log, stderr=log)
        if wait:
            assert proc.wait(timeout) == 0, (self.dir / "replay.log").read_text()[-2000:]
        return proc

    def _port_open(self, host: str, port: int) -> bool:
        """Whether *host* accepts TCP connections on *port* (tried from inside its namespace)."""
        with netns.inside(self.hosts[host].ns):
            try:
                socket.create_connection((self.address(host), port), 1).close()
                return True
            except OSError:
                return False

    # -- reading Redis from the test (connections made inside the Redis namespace) ------
    def redis(self) -> redis_py.Redis:
        """A client of the current primary, connected from inside the Redis host's namespace."""
        port = self.redis_port
        if self.redis_ha is not None:
            port = self.redis_ha.primary_port() or self.redis_ha.ports[0]
        return netns.redis_client(self.hosts["redis"].ns, self.address("redis"), port, password=PASSWORD,
                                  socket_connect_timeout=1.0, socket_timeout=5.0)

    def fail_over(self, timeout: float = 30, during=lambda: None, interval: float = 0.1) -> float:
        """Kill the Redis primary (``ha=True``) and return the gap: seconds until the
        writers' Redis counter moves again on the promoted replica.  *during* runs right
        after the kill (e.g. pages loaded while Sentinel switches)."""
        before = status.stats(self.redis()).get("redis", {}).get("received", 0)
        t_kill = time.monotonic()
        old = self.redis_ha.kill_primary()
        during()
        self.redis_ha.wait_failover(old, timeout)

        def moved():
            try:
                return status.stats(self.redis()).get("redis", {}).get("received", 0) > before
            except Exception:  # noqa: BLE001 - the new primary may still be settling
                return False
        wait_for(moved, 2 * timeout, "the writers writing to the new primary", interval)
        return time.monotonic() - t_kill

    def status(self, component: str) -> dict[str, str]:
        """The heartbeat of *component* ({} while Redis cannot be read)."""
        try:
            return status.components(self.redis()).get(component, {})
        except redis_py.RedisError:
            return {}

    def pools(self) -> dict:
        """:func:`minard.store.status.pools` ({} while Redis cannot be read)."""
        try:
            return status.pools(self.redis())
        except redis_py.RedisError:
            return {}

    def cut(self, host: str) -> None:
        self.net.cut(self.hosts[host])

    def restore(self, host: str) -> None:
        self.net.restore(self.hosts[host])

    def close(self) -> None:
        """Stop every process (by pid, the last started first: Redis last, so that every
        writer's final flush reaches it) and delete the namespaces."""
        self.net.stop_all()
        if self.redis_ha is not None:
            self.redis_ha.close()
        self.net.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in self.dir.glob("*.log"))

    def __enter__(self) -> MultiHostStack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
