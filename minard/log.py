"""Logging set-up shared by every long-running minard process.

Everything logs to stderr with a timestamp (supervisord captures it into a file);
the format names the process so that interleaved logs stay readable.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s.%(msecs)03d %(name)s[%(process)d] %(levelname)s %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


def setup(level: str | int = "INFO") -> None:
    """Send log records of *level* and above to stderr, once per process."""
    root = logging.getLogger()
    if not any(getattr(h, "_minard", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        handler._minard = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
