"""gunicorn settings of both web apps: ``/metrics`` over all workers (``-c python:minard.gunicorn_conf``).

``minard up`` starts ``gunicorn minard:app`` (program ``web``) and
``gunicorn snoplus_log:app`` (program ``snoplus_log``) with this file.  The
master prepares a multiprocess directory *before* anything imports
``prometheus_client`` (the library picks its mode at import), so every forked
worker counts its requests there (:class:`minard.metrics.WSGIMetrics`); once
ready, the master serves them added up on ``metrics_port_<program>``.  A
worker that exits is marked dead; at exit the directory is removed.

Slow clients (docs/security.md): in a gevent worker (``minard.stack.gunicorn_command``)
each connection is a greenlet; gunicorn reads a request's line and headers
under the ``--keep-alive`` deadline, but the body is read by the app, with no
deadline.  So every worker reads a request's body before the app runs, within
``web_body_timeout`` seconds, and answers 408 to a client that is slower
(:class:`_BodyDeadline`).  (gunicorn reads every public name of this module as
a setting: helpers are private.)
"""

from __future__ import annotations

import gc as _gc
import io as _io
import json as _json
import logging as _logging

from minard import config as _config
from minard import metrics_dir as _metrics_dir

#: gunicorn ``--name`` of each app -> its program name (``metrics_port_<program>``).
_PROGRAM_OF = {"minard_web": "web", "snoplus_log": "snoplus_log"}

_cfg = _config.load()
_shared = _metrics_dir.prepare(_cfg, "gunicorn")  # before prometheus_client is imported anywhere
_state: dict = {}


def when_ready(server) -> None:
    """Serve the workers' metrics from the master on ``metrics_port_<program>``."""
    from minard import metrics

    program = _PROGRAM_OF.get(server.cfg.proc_name, server.cfg.proc_name)
    _state["server"] = metrics.serve(_cfg, program, multiprocess=_shared, own=False)


def child_exit(server, worker) -> None:
    """A worker ended: its live gauges no longer count (its counters do)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    """The master stops: stop serving and remove the workers' files."""
    http = _state.pop("server", None)
    if http is not None:
        http.shutdown()
    _metrics_dir.remove(_shared)
    _logging.getLogger("minard.metrics").info("metrics directory %s removed", _shared)


def post_fork(server, worker) -> None:
    """A stop signal that reaches a worker while it boots stops it, instead of being lost.

    Until the worker installs its own handlers -- after gevent's monkey
    patching, about a second -- a SIGTERM falls to the master's handlers
    copied by fork, which only queue it in the worker's copy of the master's
    queue: the worker then serves on and the master waits its whole
    ``--graceful-timeout`` (10 s) before killing it.  Measured: an init-script
    ``restart`` or a ``stop`` right after a start took 10.2-10.4 s; now the
    worker's ``alive`` flag is cleared and it leaves as soon as it runs.
    """
    import signal as _signal

    def stop(*_args) -> None:
        worker.alive = False

    for sig in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGQUIT):
        _signal.signal(sig, stop)


def post_worker_init(worker) -> None:
    """A gevent worker reads each request's body before its app, within ``web_body_timeout`` s;
    the app's import-time objects are kept out of the garbage collector's full passes.

    A worker holds some hundred thousand long-lived objects (modules, the app,
    later the warmer's preloaded caches); each full collection walked them all,
    25-44 ms during which none of the worker's greenlets ran (``bench/web.py``).
    ``gc.freeze`` moves them to the permanent generation (objects freed by
    reference counting are still freed).
    """
    if type(worker).__module__ == "gunicorn.workers.ggevent":
        program = _PROGRAM_OF.get(worker.cfg.proc_name, worker.cfg.proc_name)
        worker.wsgi = _BodyDeadline(worker.wsgi, float(_cfg["web_body_timeout"]), program)
    _gc.freeze()


class _BodyDeadline:
    """WSGI wrapper of a gevent worker's app: the request body arrives within *seconds*, or 408.

    The body (at most the app's ``MAX_CONTENT_LENGTH`` + 1 bytes, so that the
    app still answers 413 to a larger one) is read under a ``gevent.Timeout``
    and handed to the app as ``wsgi.input``; a body announced larger than the
    limit is not read (the app refuses it unread).  A client that stops
    sending gets 408 and is counted in ``minard_http_body_timeouts``; gunicorn
    then closes its connection within ``--keep-alive`` s.
    """

    def __init__(self, app, seconds: float, program: str):
        self.app, self.seconds, self.program = app, seconds, program
        limit = getattr(app, "config", {}).get("MAX_CONTENT_LENGTH")
        self.limit = int(limit) if limit else 1 << 20
        self.log = _logging.getLogger("minard.gunicorn")

    def __call__(self, environ, start_response):
        """Read the body under the deadline, then call the app (or answer 408)."""
        want = self._wanted(environ)
        if want == 0:
            return self.app(environ, start_response)
        import gevent

        try:
            with gevent.Timeout(self.seconds):
                body = environ["wsgi.input"].read(want)
        except gevent.Timeout:
            return self._timed_out(environ, start_response)
        environ["wsgi.input"] = _io.BytesIO(body)
        return self.app(environ, start_response)

    def _wanted(self, environ) -> int:
        """Bytes to read ahead: the announced length, limit + 1 for a chunked body, 0 for none."""
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            return self.limit + 1
        length = environ.get("CONTENT_LENGTH") or "0"
        # gunicorn has checked the header (ASCII digits); a larger body than the limit is refused unread.
        return int(length) if length.isascii() and length.isdigit() and int(length) <= self.limit else 0

    def _timed_out(self, environ, start_response):
        """Answer 408 (JSON) and count it; the client's address is logged, nothing it sent."""
        from minard import metrics

        metrics.HTTP_BODY_TIMEOUTS.labels(self.program).inc()
        self.log.warning("%s: request body from %s not received within %.0f s: 408", self.program,
                         environ.get("REMOTE_ADDR", "?"), self.seconds)
        body = _json.dumps({"error": f"request body not received within {self.seconds:g} s"}).encode()
        start_response("408 Request Timeout", [("Content-Type", "application/json"),
                                               ("Content-Length", str(len(body)))])
        return [body]
