"""Where the children of a forking process write their Prometheus metrics.

``prometheus_client`` chooses its multiprocess mode once, when it is first
imported, from ``PROMETHEUS_MULTIPROC_DIR``.  So this module imports only the
standard library: gunicorn's master (:mod:`minard.gunicorn_conf`) calls
:func:`prepare` before anything imports the library, and its forked workers
inherit the mode; the pool manager calls it before it spawns workers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: Environment variable the library reads (multiprocess mode).
ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare(cfg, program: str) -> Path:
    """A fresh ``var_dir/metrics/<program>-<pid>`` (0700), exported in :data:`ENV`.

    Directories of earlier runs of *program* whose process is gone (kill -9)
    are removed first, so their counters are not added to this run's.
    """
    var = cfg.path("var_dir") if hasattr(cfg, "path") else Path(str(cfg["var_dir"]))
    base = Path(var) / "metrics"
    base.mkdir(parents=True, exist_ok=True)
    for old in base.glob(f"{program}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = base / f"{program}-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    os.environ[ENV] = str(path)
    return path


def remove(path: str | os.PathLike | None) -> None:
    """Remove a directory made by :func:`prepare` (at a clean exit) and stop exporting it."""
    if path:
        shutil.rmtree(path, ignore_errors=True)
        if os.environ.get(ENV) == str(path):
            del os.environ[ENV]


def _alive(pid: int) -> bool:
    """True if a process *pid* exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
