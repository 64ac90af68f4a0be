"""Client of the log server for other programs: heartbeats and a logging handler.

    from minard.ops.logclient import Heartbeat, HttpLogHandler
    hb = Heartbeat("data_producer", "http://127.0.0.1:8081", token, period=5).start()
    logging.getLogger().addHandler(HttpLogHandler("data_producer", url, token))
    log.error("crate 3 lost", extra={"notify": True})

Neither ever blocks nor crashes the host program when the server is down or
slow: records go through a bounded queue to one background thread that posts
with a short timeout; when the queue is full a record is dropped and counted
(``handler.dropped``); failed posts are counted (``handler.failed``) and make
the thread wait a little before trying again.  Only the standard library is
used (urllib), so any program can import this module.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request

SUCCESS = 21
logging.addLevelName(SUCCESS, "SUCCESS")


def _post(url: str, path: str, token: str, payload: dict, timeout: float) -> int:
    """POST *payload* as JSON with a Bearer token; return the HTTP status."""
    req = urllib.request.Request(
        url.rstrip("/") + path, data=json.dumps(payload).encode("utf-8"), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


class _Sender:
    """A daemon thread posting queued payloads; failures back off, never raise."""

    def __init__(self, url: str, path: str, token: str, maxsize: int, timeout: float,
                 max_backoff: float = 30.0):
        self.url, self.path, self.token, self.timeout = url, path, token, timeout
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.max_backoff = max_backoff
        self.sent = self.failed = self.dropped = self.rejected = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"minard-logclient{path}", daemon=True)
        self._thread.start()

    def submit(self, payload: dict) -> bool:
        """Queue *payload* without waiting; count it as dropped if the queue is full."""
        try:
            self.queue.put_nowait(payload)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def _run(self) -> None:
        """Post payloads until stopped, waiting longer after each failure."""
        backoff = 0.0
        while not self._stop.is_set():
            try:
                payload = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if payload is None:
                break
            try:
                status = _post(self.url, self.path, self.token, payload, self.timeout)
            except Exception:  # noqa: BLE001 - connection refused, timeout, DNS...: the server is away
                status = 0
            if 200 <= status < 300:
                self.sent += 1
                backoff = 0.0
                continue
            if 400 <= status < 500:
                self.rejected += 1  # our fault (bad token, unknown program): retrying won't help
                continue
            self.failed += 1
            backoff = min(self.max_backoff, backoff * 2 if backoff else 0.5)
            self._stop.wait(backoff)

    def close(self, timeout: float = 1.0) -> None:
        """Let queued payloads go out for up to *timeout* seconds, then stop."""
        deadline = time.monotonic() + timeout
        while not self.queue.empty() and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        self._stop.set()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()) + 0.2)

    @property
    def thread(self) -> threading.Thread:
        return self._thread


def _level(levelno: int) -> int:
    """A logging level as a log-server level (CRITICAL 50 -> danger 40)."""
    return max(0, min(40, int(levelno)))


class HttpLogHandler(logging.Handler):
    """A logging handler posting records to the log server's ``POST /log``.

    ``emit`` only formats and queues, so it costs microseconds even when the
    server is down.  Pass ``extra={"notify": True}`` to raise an alarm for a
    record below level 40.
    """

    def __init__(self, name: str, url: str, token: str, level: int = logging.NOTSET,
                 queue_size: int = 1000, timeout: float = 2.0, max_message: int = 16384):
        super().__init__(level)
        self.program = name
        self.max_message = max_message
        self._sender = _Sender(url, "/log", token, queue_size, timeout)

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the record; never raise, never wait."""
        if threading.current_thread() is self._sender.thread:
            return  # never log about our own posting (no feedback loops)
        try:
            payload = {"name": self.program, "level": _level(record.levelno), "message": self.format(record)[: self.max_message]}
            if getattr(record, "notify", False):
                payload["notify"] = True
            self._sender.submit(payload)
        except Exception:  # noqa: BLE001 - a handler must never break the host program
            self._sender.dropped += 1

    @property
    def dropped(self) -> int:
        """Records lost because the queue was full (server down or slow)."""
        return self._sender.dropped

    @property
    def failed(self) -> int:
        """Posts that failed (server unreachable or 5xx)."""
        return self._sender.failed

    @property
    def sent(self) -> int:
        """Records the server accepted."""
        return self._sender.sent

    @property
    def rejected(self) -> int:
        """Records the server refused with a 4xx (bad token, unknown program...)."""
        return self._sender.rejected

    def close(self) -> None:
        """Flush for at most a second, then stop the thread."""
        self._sender.close(1.0)
        super().close()


class Heartbeat:
    """A background thread posting ``POST /heartbeat`` every *period* seconds.

    ``status`` and ``metrics`` (a dict or a callable returning one, e.g. lag and
    loss counters) may be changed at any time.  ``stop()`` returns within about
    a second even if the server hangs.
    """

    def __init__(self, name: str, url: str, token: str, period: float = 5.0,
                 status: str = "ok", metrics=None, timeout: float | None = None):
        self.name, self.url, self.token, self.period = name, url, token, float(period)
        self.status = status
        self.metrics = metrics
        self.timeout = min(2.0, self.period) if timeout is None else timeout
        self.sent = self.failed = self.rejected = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def payload(self) -> dict:
        """The body of the next heartbeat."""
        body = {"name": self.name, "status": self.status}
        metrics = self.metrics() if callable(self.metrics) else self.metrics
        if metrics:
            body["metrics"] = dict(metrics)
        return body

    def beat(self) -> bool:
        """Post one heartbeat now; True if the server accepted it.  Never raises."""
        try:
            status = _post(self.url, "/heartbeat", self.token, self.payload(), self.timeout)
        except Exception:  # noqa: BLE001 - the server is away; count it, never raise
            status = 0
        if 200 <= status < 300:
            self.sent += 1
            return True
        if 400 <= status < 500:
            self.rejected += 1
        else:
            self.failed += 1
        return False

    def _run(self) -> None:
        """Beat every period until stopped."""
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(self.period)

    def start(self) -> Heartbeat:
        """Start the daemon thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"minard-heartbeat-{self.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Stop beating; waits at most *timeout* (the thread is a daemon anyway)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Heartbeat:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
