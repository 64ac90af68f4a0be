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
            """What a client on the web host gets from the data host's Redis: 'True' or the error's name."""
            code = ("import redis\ntry:\n"
                    f"    print(redis.Redis(host={data.address!r}, port={port}, password='s3cret', "
                    f"socket_timeout={timeout}, socket_connect_timeout={timeout}).ping())\n"
                    "except redis.RedisError as exc:\n    print(type(exc).__name__)")
            try:  # a Python start-up on a loaded machine can take seconds: that is no network answer
                proc = net.run(web, [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout + 60)
            except subprocess.TimeoutExpired:
                return ""
            return proc.stdout.strip()

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
        made = _namespaces() - before
        assert len(made) == 3  # hub + two hosts
    assert _namespaces() == before
