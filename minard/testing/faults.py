"""Fault injection for the kill -9 tests: kill a pool worker at a moment that loses records."""

from __future__ import annotations

import os
import signal
import time

from minard.store import schema
from minard.testing import wait_for


def kill_worker_holding_records(redis_client, pid: int, component: str = "minard_dispatch_pull",
                                timeout: float = 30, attempts: int = 5) -> None:
    """kill -9 the pool's only worker *pid* while it holds records it never processed.

    The worker is stopped (SIGSTOP) first; the manager, which keeps receiving
    data, hands it the next batch (or it already held one), and the pool's
    heartbeat (*component*) shows it in flight.  That batch dies with the worker,
    so the kill always loses records, whatever the worker had flushed.  A worker
    stopped between its DONE and its READY is never handed a batch: it is let run
    on (SIGCONT) until the manager hands it one, and stopped again.
    """
    def beat():
        return redis_client.hgetall(schema.STATUS.key(component=component))

    for attempt in range(attempts):
        os.kill(pid, signal.SIGSTOP)
        stopped = time.time() + 0.05
        try:
            wait_for(lambda since=stopped: (b := beat()) and float(b.get(b"time", 0)) > since
                     and int(b.get(b"inflight_records", 0)) > 0, timeout / attempts,
                     "a batch handed to the stopped worker")
        except AssertionError:
            if attempt == attempts - 1:
                os.kill(pid, signal.SIGKILL)
                raise
            os.kill(pid, signal.SIGCONT)
            continue
        os.kill(pid, signal.SIGKILL)
        return
