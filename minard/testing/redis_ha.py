"""A Redis primary, a replica and three Sentinels for tests and demonstrations (issue 18).

``RedisHA`` starts real ``redis-server`` and ``redis-sentinel`` processes (Debian's
``redis-sentinel`` package) on one address -- 127.0.0.1, or a network namespace's
address when a *launcher* such as ``Network.popen`` bound to a host is given -- with a
password (``requirepass``/``masterauth``, so non-loopback clients are accepted with
protected mode on), Sentinels that judge the primary down after ``down_after_ms``.
``kill_primary()`` kills the current primary with SIGKILL; the Sentinels then promote
the replica.  ``close()`` stops every process it started, by pid, and removes its
directory.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import redis as redis_py

from minard.testing import free_port, redis_server_binary, stop_pid, wait_for

#: The Sentinel service name used by tests (config key ``redis_master_name``).
MASTER_NAME = "minard"


def sentinel_binary() -> str:
    """Path of redis-sentinel (Debian package ``redis-sentinel``), or a clear error."""
    path = shutil.which("redis-sentinel") or shutil.which("redis-server")
    if not path:
        raise RuntimeError("redis-sentinel is not installed: run ./manage.sh setup")
    return path


def _local(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Start *cmd* on this host (the default launcher)."""
    return subprocess.Popen(cmd, **kwargs)


class RedisHA:
    """Primary + replica + three Sentinels on *address*; see the module docstring."""

    def __init__(self, address: str = "127.0.0.1", password: str = "ha-test-password",
                 launcher: Callable[..., subprocess.Popen] = _local, down_after_ms: int = 1000,
                 master_name: str = MASTER_NAME, connect: Callable[..., redis_py.Redis] | None = None):
        self.address, self.password, self.launcher = address, password, launcher
        # how this process reaches *address* (netns.redis_client for a namespace)
        self.connect = connect or (lambda host, port, **kw: redis_py.Redis(host=host, port=port, **kw))
        self.down_after_ms, self.master_name = down_after_ms, master_name
        self.dir = Path(tempfile.mkdtemp(prefix="minard-redis-ha-"))
        self.ports = [free_port(), free_port()]  # primary, replica (at start)
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.servers: dict[int, subprocess.Popen] = {}
        self.sentinels: list[subprocess.Popen] = []

    # -- configuration the clients need --------------------------------------------
    @property
    def sentinels_value(self) -> str:
        """The ``redis_sentinels`` config value: ``host:port,host:port,host:port``."""
        return ",".join(f"{self.address}:{p}" for p in self.sentinel_ports)

    @property
    def url(self) -> str:
        """The ``redis_url`` to use with Sentinels: only its password and database count."""
        return f"redis://:{self.password}@{self.address}:{self.ports[0]}/0"

    # -- processes -----------------------------------------------------------------
    def start(self) -> RedisHA:
        """Start primary, replica and Sentinels; wait until the Sentinels see the replica."""
        for i, port in enumerate(self.ports):
            self.servers[port] = self._server(port, replica_of=self.ports[0] if i else None)
        wait_for(lambda: self._answers(self.ports[0]), 15, "the primary")
        wait_for(lambda: self._synced(self.ports[1]), 20, "the replica to sync")
        for port in self.sentinel_ports:
            self.sentinels.append(self._sentinel(port))
        for port in self.sentinel_ports:
            wait_for(lambda port=port: self._quicken(port), 15, f"the Sentinel on port {port}",
                     ignore=(redis_py.ConnectionError,))
        wait_for(lambda: all(self._sentinel_ready(p) for p in self.sentinel_ports), 30,
                 "three Sentinels that know the replica and each other")
        return self

    def _quicken(self, port: int) -> bool:
        """Shorten a Sentinel's INFO and hello periods (``SENTINEL DEBUG``, Redis 7.0).

        With the defaults (INFO every 10 s, hello every 2 s) a restarted old primary is
        made a replica only after 4 hello periods plus an INFO round, 10 s at best and
        more on a loaded machine; tests would wait on Sentinel's clock, not on minard.
        """
        s = self.connect(self.address, port, socket_connect_timeout=0.5, socket_timeout=2.0)
        return s.execute_command("SENTINEL", "DEBUG", "info-period", 1000, "publish-period", 500)

    def _server(self, port: int, replica_of: int | None) -> subprocess.Popen:
        """One redis-server (restartable on the same port and directory)."""
        data = self.dir / f"r{port}"
        data.mkdir(exist_ok=True)
        cmd = [redis_server_binary(), "--port", str(port), "--bind", self.address, "--dir", str(data),
               "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", str(data / "redis.log"),
               "--requirepass", self.password, "--masterauth", self.password,
               "--shutdown-on-sigterm", "now"]  # no wait for lagging replicas at teardown
        if replica_of is not None:
            cmd += ["--replicaof", self.address, str(replica_of)]
        return self.launcher(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _sentinel(self, port: int) -> subprocess.Popen:
        """One redis-sentinel with its own (rewritable) configuration file."""
        conf = self.dir / f"sentinel-{port}.conf"
        conf.write_text("\n".join([
            f"port {port}", f"bind {self.address}", "protected-mode no", "daemonize no",
            f"dir {self.dir}", f"logfile {self.dir / f'sentinel-{port}.log'}",
            f"sentinel monitor {self.master_name} {self.address} {self.ports[0]} 2",
            f"sentinel auth-pass {self.master_name} {self.password}",
            f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
            f"sentinel failover-timeout {self.master_name} 10000",
            f"sentinel parallel-syncs {self.master_name} 1", ""]))
        conf.chmod(0o600)
        return self.launcher([sentinel_binary(), str(conf), "--sentinel"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def client(self, port: int, **kwargs) -> redis_py.Redis:
        """A direct client of the server on *port* (not through Sentinel)."""
        return self.connect(self.address, port, password=self.password,
                            socket_connect_timeout=0.5, socket_timeout=2.0, **kwargs)

    def _answers(self, port: int) -> bool:
        try:
            return bool(self.client(port).ping())
        except redis_py.RedisError:
            return False

    def _synced(self, port: int) -> bool:
        try:
            return self.client(port).info("replication").get("master_link_status") == "up"
        except redis_py.RedisError:
            return False

    def _sentinel_ready(self, port: int) -> bool:
        try:
            s = self.connect(self.address, port, socket_connect_timeout=0.5, socket_timeout=2.0)
            master = s.sentinel_master(self.master_name)
            return int(master.get("num-slaves", 0)) >= 1 and int(master.get("num-other-sentinels", 0)) >= 2
        except redis_py.RedisError:
            return False

    def primary_port(self) -> int | None:
        """The port of the primary the Sentinels name now (None if no Sentinel answers)."""
        for port in self.sentinel_ports:
            try:
                s = self.connect(self.address, port, socket_connect_timeout=0.5, socket_timeout=1.0)
                _, master_port = s.sentinel_get_master_addr_by_name(self.master_name)
                return int(master_port)
            except (redis_py.RedisError, TypeError):
                continue
        return None

    def kill_primary(self) -> int:
        """SIGKILL the current primary; returns its port (the replica will be promoted)."""
        port = self.primary_port()
        proc = self.servers.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        return port

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """Wait until the Sentinels name a primary other than *old_port* that accepts writes."""
        def promoted():
            port = self.primary_port()
            if port in (None, old_port):
                return None
            try:
                return port if self.client(port).info("replication").get("role") == "master" else None
            except redis_py.RedisError:
                return None
        return wait_for(promoted, timeout, "Sentinel failover")

    def restart(self, port: int) -> None:
        """Start a killed server again on *port* (Sentinels make it a replica of the new primary)."""
        self.servers[port] = self._server(port, replica_of=None)

    def wait_demoted(self, port: int, timeout: float = 60.0) -> None:
        """Wait until the restarted server on *port* has been made a replica by the Sentinels.

        On a timeout the Sentinels' log tails are part of the failure (e.g. a TILT period).
        """
        try:
            wait_for(lambda: self.client(port).info("replication").get("role") == "slave", timeout,
                     f"the old primary on port {port} made a replica", ignore=(redis_py.RedisError,))
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.sentinel_logs()}") from None

    def sentinel_logs(self, lines: int = 15) -> str:
        """The last *lines* of each Sentinel's log, for a failure message."""
        out = []
        for port in self.sentinel_ports:
            path = self.dir / f"sentinel-{port}.log"
            tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            out.append(f"--- sentinel {port}\n" + "\n".join(tail))
        return "\n".join(out)

    def close(self) -> None:
        """Stop every process started here by pid; remove the directory."""
        for proc in [*self.sentinels, *self.servers.values()]:
            stop_pid(proc)
        self.sentinels.clear()
        self.servers.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisHA:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()
