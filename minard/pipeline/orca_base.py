"""Base currents: the handler of the ``data_consumer 5558`` pool's workers.

Value − 127 per channel, skipping masked channels, busy channels (ORCA shows
"BSY" instead of a value) and records with XL3 error flags; busy flags are
kept (a count series ``base_busy`` and a latest map).  The values of each
second go into the per-channel series ``base``
(:class:`minard.store.channels.ChannelWriter`); each crate's newest reading
into the latest map, only if newer than the one stored (WATCHed per-crate
times).
"""

from __future__ import annotations

import logging

import numpy as np

from minard.formats import orca
from minard.formats.detector import NCARDS, NCHANNELS, NCHANNELS_TOTAL
from minard.pipeline.orca_consumer import OrcaHandler
from minard.store import schema
from minard.store.channels import write_latest

log = logging.getLogger("minard.pipeline.orca_base")

CRATE_CHANNELS = NCARDS * NCHANNELS  # 512
BUSY_KEY = schema.ORCA_BASE_BUSY  # one uint8 per channel (10240): busy flag at the latest reading
BASE_CRATE_TIME_KEY = schema.ORCA_BASE_CRATE_TIME  # hash crate -> record time (µs) of the latest map
BUSY_SERIES = "base_busy"  # per-channel count series: busy readings per bucket


class BaseHandler(OrcaHandler):
    """A base-current pool worker: value − 127 per valid channel, busy flags kept."""

    stage = "base"

    def __init__(self, cfg, flushed_key: str = ""):
        super().__init__(cfg, flushed_key)
        self.series: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.busy: dict[int, list[np.ndarray]] = {}
        #: crate -> (record time µs, arrival t, 512 values, 512 busy) of its newest reading
        self.latest: dict[int, tuple[int, float, np.ndarray, np.ndarray]] = {}

    def process(self, frames) -> None:
        """Decode a batch and keep values, busy flags and latest readings for the flush."""
        opened = self.open_stream(frames)
        if opened is None:
            return
        batch, order, t = opened
        dec = orca.decode_base(batch.records(), order)
        nbad = self.count_decode_errors(dec.errors)
        self.counts["processed"] += len(batch) - nbad
        if not len(dec.index):
            return
        err = dec.error_flags[dec.record] != 0
        if err.any():
            self.counts["xl3_error_flags"] += int((dec.error_flags != 0).sum())
        valid = ~dec.masked & ~dec.busy & ~err
        value = np.where(valid, dec.current.astype(float), np.nan)
        sec = int(t)
        self.series.setdefault(sec, []).append((dec.lcn[valid], dec.current[valid]))
        busy = dec.busy & ~dec.masked
        if busy.any():
            self.busy.setdefault(sec, []).append(dec.lcn[busy])
            self.counts["busy"] += int(busy.sum())
        self.keep_latest(dec, value, busy, t)

    def keep_latest(self, dec: orca.BaseBatch, value: np.ndarray, busy: np.ndarray, t: float) -> None:
        """Remember each crate's newest reading as a whole 512-channel block.

        Slots absent from the record's slot mask are not polled: NaN.
        """
        newest = np.lexsort((np.arange(len(dec.crate)), dec.time_us, dec.crate))
        last_of_crate = newest[np.r_[dec.crate[newest][1:] != dec.crate[newest][:-1], True]]
        for r in last_of_crate.tolist():  # one per crate (at most 19)
            crate, t_us = int(dec.crate[r]), int(dec.time_us[r])
            held = self.latest.get(crate)
            if held is not None and held[0] > t_us:
                continue
            sel = dec.record == r
            local = dec.lcn[sel] - crate * CRATE_CHANNELS
            vals = np.full(CRATE_CHANNELS, np.nan)
            vals[local] = value[sel]
            flags = np.zeros(CRATE_CHANNELS, dtype=np.uint8)
            flags[local] = busy[sel]
            self.latest[crate] = (t_us, t, vals, flags)

    def has_pending(self) -> bool:
        return bool(self.series or self.busy or self.latest or self.writer)

    def pending_stores(self) -> list[dict]:
        return [self.series, self.busy]

    def fold_pending(self) -> None:
        """Series ``base`` and ``base_busy`` of each second into the writer."""
        for sec, parts in self.series.items():
            self.writer.add_values("base", sec, np.concatenate([p[0] for p in parts]),
                                   np.concatenate([p[1] for p in parts]))
        for sec, parts in self.busy.items():
            self.writer.add_counts(BUSY_SERIES, sec, np.concatenate(parts), 1)
        self.series.clear()
        self.busy.clear()

    def slot_groups(self) -> list:
        """The series' slot groups, and the latest map (tag ``{base}``) when a reading is new."""
        return super().slot_groups() + (["latest"] if self.latest else [])

    def prepare(self, pipe, group) -> None:
        """For the latest map: WATCH the per-crate times, so that only newer readings win."""
        if group != "latest":
            return super().prepare(pipe, group)
        pipe.watch(BASE_CRATE_TIME_KEY)
        stored = pipe.hmget(BASE_CRATE_TIME_KEY, [str(c) for c in self.latest])
        self.newer = [c for c, s in zip(self.latest, stored) if s is None or int(s) <= self.latest[c][0]]
        pipe.multi()

    def write_pending(self, pipe, group, now: float) -> None:
        """The series' arrays, or the latest map of the newer crates (absolute writes)."""
        if group != "latest":
            return super().write_pending(pipe, group, now)
        if not self.newer:
            return
        values = np.full(NCHANNELS_TOTAL, np.nan)
        flags = np.zeros(NCHANNELS_TOTAL, dtype=np.uint8)
        times = {}
        for crate in self.newer:
            t_us, t, vals, busy = self.latest[crate]
            sl = slice(crate * CRATE_CHANNELS, (crate + 1) * CRATE_CHANNELS)
            values[sl], flags[sl] = vals, busy
            times[str(crate)] = t_us
            cards = np.arange(crate * NCARDS, (crate + 1) * NCARDS)
            write_latest(pipe, "base", values, t, cards, self.ttl)
            pipe.setrange(BUSY_KEY, sl.start, flags[sl].tobytes())
        pipe.expire(BUSY_KEY, self.ttl)
        pipe.hset(BASE_CRATE_TIME_KEY, mapping=times)
        pipe.expire(BASE_CRATE_TIME_KEY, self.ttl)

    def group_done(self, group) -> None:
        if group == "latest":
            self.latest.clear()
        else:
            super().group_done(group)
