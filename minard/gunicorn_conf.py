"""gunicorn settings of both web apps: ``/metrics`` over all workers (``-c python:minard.gunicorn_conf``).

``minard up`` starts ``gunicorn minard:app`` (program ``web``) and
``gunicorn snoplus_log:app`` (program ``snoplus_log``) with this file.  The
master prepares a multiprocess directory *before* anything imports
``prometheus_client`` (the library picks its mode at import), so every forked
worker counts its requests there (:class:`minard.metrics.WSGIMetrics`); once
ready, the master serves them added up on ``metrics_port_<program>``.  A
worker that exits is marked dead; at exit the directory is removed.  (gunicorn
reads every public name of this module as a setting: helpers are private.)
"""

from __future__ import annotations

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
