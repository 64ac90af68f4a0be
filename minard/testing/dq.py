"""Simulated runs written into Redis through the pull worker's own code (DQ tests, bench).

:func:`write_run` generates seeded events with :mod:`minard.simulate.events`
(the generator behind ``minard simulate zdab``), decodes them with
:func:`minard.formats.pmt.decode_buffer` and folds them with the pull worker's
:class:`~minard.analysis.aggregate.Aggregator`, then writes them with its
writers (:func:`minard.pipeline.dispatch_pull.write_second`,
:func:`minard.store.runs.write_run`): the stored aggregates are the
pipeline's.  Each batch "arrives" at ``t0`` plus its first event's offset on
the simulated 10 MHz clock, as if replayed at ``--speed 1x``.
"""

from __future__ import annotations

from minard.analysis.aggregate import Aggregator, record_gtids, record_runs
from minard.formats import pmt
from minard.pipeline.dispatch_pull import write_second
from minard.simulate.events import DEFAULT_CLOCK10, Faults, generate_batches
from minard.store.channels import ChannelWriter
from minard.store.runs import write_run as store_run


def write_run(redis, seed: int, n_events: int, run: int, t0: float, faults: Faults | None = None,
              trigger_scale: dict | None = None, batch_size: int = 1000, **options) -> float:
    """Write one simulated run; return the arrival time of its last batch."""
    channels = ChannelWriter(redis)
    t, prev, prev_run = t0, None, None
    for buf, offsets, lengths in generate_batches(seed, n_events, run=run, faults=faults,
                                                  trigger_scale=trigger_scale, batch_size=batch_size,
                                                  **options):
        events = pmt.decode_buffer(buf, offsets, lengths)
        t = t0 + (int(events.clock10[0]) - DEFAULT_CLOCK10) / 1e7
        agg = Aggregator()
        every = record_gtids(events, buf, offsets, lengths)  # as the worker: corrupt records keep theirs
        has = every >= 0
        gtids, runs = every[has], record_runs(events, buf, offsets, lengths)[has]
        agg.add_batch(events, t, prev_gtid=prev, gtids=gtids, prev_run=prev_run, runs=runs)
        if len(gtids):
            prev, prev_run = int(gtids[-1]), int(runs[-1])
        seconds, runs, _ = agg.take()
        pipe = redis.pipeline(transaction=True)
        for sec in seconds.values():
            write_second(pipe, sec, channels)
        for ragg in runs.values():
            store_run(pipe, ragg, t, channels)
        channels.add(pipe)
        pipe.execute()
    return t
