"""Fault injection for the kill -9 tests: kill a pool worker at a moment that loses records."""

from __future__ import annotations

import os
import signal
import time

from minard.store import schema
from minard.testing import wait_for


def kill_worker_holding_records(redis_client, pid: int, component: str = "minard_dispatch_pull",
                                timeout: float = 30) -> None:
    """kill -9 the pool's only worker *pid* while it holds records it never processed.

    The worker is stopped (SIGSTOP) first; the manager, which keeps receiving
    data, hands it the next batch (or it already held one), and the pool's
    heartbeat (*component*) shows it in flight.  That batch dies with the worker,
    so the kill always loses records, whatever the worker had flushed.
    """
    os.kill(pid, signal.SIGSTOP)
    stopped = time.time() + 0.05

    def holding():
        beat = redis_client.hgetall(schema.STATUS.key(component=component))
        return float(beat.get(b"time", 0)) > stopped and int(beat.get(b"inflight_records", 0)) > 0
    try:
        wait_for(holding, timeout, "a batch handed to the stopped worker")
    finally:
        os.kill(pid, signal.SIGKILL)
