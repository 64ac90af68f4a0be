"""The multi-host harness: namespaces that reach each other only over the test network."""

import subprocess
import sys

import pytest
import redis as redis_py

from minard.testing import free_port, redis_server_binary, wait_for
from minard.testing import netns

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_hosts_reach_each_other_a_cut_link_does_not_and_close_removes_everything():
    before = _namespaces()
    with netns.Network() as net:
        data, web = net.add_host("data"), net.add_host("web")
        port = free_port()
        net.popen(data, [redis_server_binary(), "--bind", data.address, "--port", port, "--save", "",
                         "--appendonly", "no", "--requirepass", "s3cret"], stdout=subprocess.DEVNULL)

        def answer(timeout=1.0) -> str:
            """What a client on the web host (its socket made inside that namespace) gets from the
            data host's Redis: 'True' or the error's name."""
            client = netns.redis_client(web.ns, data.address, port, password="s3cret",
                                        socket_timeout=timeout, socket_connect_timeout=timeout)
            try:
                return str(client.ping())
            except redis_py.RedisError as exc:
                return type(exc).__name__
            finally:
                client.close()

        def ping() -> bool:
            return answer() == "True"

        wait_for(ping, 60, "redis on the data host from the web host")
        # The data host's address is not reachable from this (the machine's own) namespace.
        with pytest.raises(redis_py.exceptions.ConnectionError):
            redis_py.Redis(host=data.address, port=port, password="s3cret", socket_connect_timeout=0.5).ping()
        net.cut(data)
        assert answer(timeout=0.5) in ("TimeoutError", "ConnectionError")
        net.restore(data)
        wait_for(ping, 60, "redis again after the link is restored")
        # a program run on the web host (Network.run) reaches it too
        code = (f"import redis; print(redis.Redis(host={data.address!r}, port={port}, password='s3cret', "
                "socket_timeout=5, socket_connect_timeout=5).ping())")
        proc = net.run(web, [sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.stdout.strip() == "True", proc.stdout + proc.stderr
        made = _namespaces() - before
        assert len(made) == 3  # hub + two hosts
    assert _namespaces() == before
