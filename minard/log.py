"""Logging set-up shared by every long-running minard process.

Everything logs to stderr with a timestamp (supervisord captures it into a file);
the format names the process so that interleaved logs stay readable.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s.%(msecs)03d %(name)s[%(process)d] %(levelname)s %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


class _Stderr(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at the time of the record.

    So that a process that replaces stderr after set-up (click's test runner
    does, once per invocation) never logs to a closed stream.
    """

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup(level: str | int = "INFO") -> None:
    """Send log records of *level* and above to stderr, once per process."""
    root = logging.getLogger()
    if not any(getattr(h, "_minard", False) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        handler._minard = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
