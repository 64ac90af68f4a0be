"""Every Redis key, key family and retention level of minard, named once.

docs/storage.md describes the same schema for people; processes and the web
import the names from here instead of spelling key strings themselves.
"""

from __future__ import annotations

from minard.store import timeseries as ts

#: nhit histograms: coarser than the scalar series (each bucket holds many bins).
NHIT_LEVELS = (ts.Level(10, 2 * ts.HOUR), ts.Level(300, 2 * ts.DAY), ts.Level(3600, 30 * ts.DAY))

#: Latest value per channel of an ORCA stream (``cmos`` or ``base``):
#: 9728 big-endian float64, NaN = no valid value.
ORCA_LATEST_KEY = "orca:{stream}:latest"
#: Arrival time (Unix s) of each channel's latest value: 9728 big-endian float64.
ORCA_LATEST_TIME_KEY = "orca:{stream}:latest_t"
