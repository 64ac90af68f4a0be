"""ZMQ socket helpers shared by the producers."""

from __future__ import annotations

import zmq
from zmq.utils.monitor import recv_monitor_message


def peers_changed(monitor) -> int:
    """Net change in connected peers since the last call, from a ZMQ socket monitor."""
    change = 0
    while monitor.poll(0):
        change += 1 if recv_monitor_message(monitor)["event"] == zmq.EVENT_ACCEPTED else -1
    return change
