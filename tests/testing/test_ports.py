"""minard.testing.free_port: ports that one test (one process) asks for are distinct."""

import socket

from minard.testing import free_port


def test_free_port_gives_distinct_ports_that_can_be_bound_at_once():
    ports = [free_port() for _ in range(2048)]
    assert len(set(ports)) == len(ports)  # the kernel alone repeats a just-closed port
    socks = []
    try:
        for port in ports[:50]:
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            socks.append(s)
    finally:
        for s in socks:
            s.close()
