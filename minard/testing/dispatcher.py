"""A dispatcher for tests and benchmarks, as a real subprocess stopped by its pid."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from minard.config import ROOT
from minard.testing import free_port, stop_pid, wait_port


class DispatcherProcess:
    """``python -m minard.cli dispatcher`` as a real subprocess (tests, bench).

    *settings* are configuration keys (e.g. ``dispatcher_analyzer_queue=100``)
    passed as ``MINARD_*`` environment variables; stderr goes to *log_path*.
    ``dispatcher_accounting_dir`` defaults to a directory of its own beside the
    log (or in a temporary directory).
    Stopped by its pid.
    """

    def __init__(self, port: int | None = None, log_path=None, **settings):
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else None
        # Its own accounting directory (Accounting.dat and the accounting journal), kept
        # across restarts of this process, never shared with another test's dispatcher.
        where = self.log_path.parent if self.log_path else Path(tempfile.mkdtemp(prefix="minard-dispatcher-"))
        settings.setdefault("dispatcher_accounting_dir", str(where / f"dispatcher-{self.port}"))
        self.settings = settings
        self.proc = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> DispatcherProcess:
        """Start the process and wait until it accepts connections."""
        env = dict(os.environ)
        env.update({f"MINARD_{k.upper()}": str(v) for k, v in self.settings.items()})
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "minard.cli", "dispatcher", "--port", str(self.port)],
                env=env, stdout=out, stderr=out, cwd=str(ROOT))
        finally:
            if self.log_path:
                out.close()
        wait_port(self.port, timeout=timeout)
        return self

    def log_text(self) -> str:
        """What the process logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; return its exit code."""
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM (then SIGKILL) by pid; return the exit code."""
        return stop_pid(self.proc) if self.proc is not None else None

    def __enter__(self) -> DispatcherProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
