"""Everything that touches Redis: keys, time series, runs, counters, alarms."""
