"""CMOS rates: the handler of the ``data_consumer 5557`` pool's workers.

Rates = Δcount/Δt per channel with :class:`minard.formats.orca.CmosRateState`
(masked channels, bit-31 flags, resets, Δt outside (0, ``cmos_max_dt``] give
no rate).  The state is SHARED through Redis, one key per crate
(``orca:{cmos}:state:<crate>``), read and written in an optimistic
``WATCH``/``MULTI`` transaction per batch: any number of workers, and a
restarted consumer, continue from the same baselines, and a batch whose
crates changed meanwhile is simply recomputed.  Readings older than the
stored baseline by less than ``cmos_max_dt`` (a batch overtaken by a later
one in another worker, or a duplicate) are skipped (``stale``) so that the
baseline never moves backwards.  A record with non-zero XL3 error flags
counts as flagged.  The rates of each second go into the per-channel series
``cmos`` (:class:`minard.store.channels.ChannelWriter`), and each reading
into the latest map.
"""

from __future__ import annotations

import logging

import numpy as np
import redis as redis_py

from minard.formats import orca
from minard.formats.detector import NCARDS, NCHANNELS, NCHANNELS_TOTAL
from minard.pipeline.orca_consumer import OrcaHandler
from minard.store import schema
from minard.store.channels import write_latest_valid

log = logging.getLogger("minard.pipeline.orca_cmos")

CRATE_CHANNELS = NCARDS * NCHANNELS  # 512
#: One key per crate: its channels' last counts and times (docs/storage.md).
CMOS_STATE_KEY = schema.ORCA_CMOS_STATE.template
#: Optimistic state transactions retried at most this often before a batch is given up.
MAX_RETRIES = 100


def _subset(batch: orca.CmosBatch, rows: np.ndarray) -> orca.CmosBatch:
    """The records *rows* (positions in the per-record arrays) of a CmosBatch."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == len(batch.index):
        return batch
    keep_card = np.isin(batch.card_record, rows)
    keep_chan = np.repeat(keep_card, NCHANNELS)
    newpos = np.full(len(batch.index), -1, dtype=np.int64)
    newpos[rows] = np.arange(len(rows))
    return orca.CmosBatch(
        index=batch.index[rows], crate=batch.crate[rows], slot_mask=batch.slot_mask[rows],
        channel_masks=batch.channel_masks[rows], delay=batch.delay[rows],
        error_flags=batch.error_flags[rows], time_us=batch.time_us[rows],
        timestamp=batch.timestamp[rows], lcn=batch.lcn[keep_chan], count=batch.count[keep_chan],
        flagged=batch.flagged[keep_chan], masked=batch.masked[keep_chan],
        card=batch.card[keep_card], card_record=newpos[batch.card_record[keep_card]])


def card_rounds(batch: orca.CmosBatch) -> list[np.ndarray]:
    """Split the records into rounds in which no card repeats, in stream order.

    A batch usually holds each card once (one round).  When a card is read
    twice (a replay at full speed), its readings must be applied in order:
    round k holds each card's k-th reading, so a round is one whole-card
    vectorised update and its rates belong to known readings.
    """
    nrec = len(batch.index)
    if len(np.unique(batch.card)) == len(batch.card):
        return [np.arange(nrec)]
    bounds = np.searchsorted(batch.card_record, np.arange(nrec + 1))
    cards = batch.card.tolist()
    last: dict[int, int] = {}
    rnd = np.zeros(nrec, dtype=np.int64)
    for r in range(nrec):  # a loop over records (tens), not channels
        mine = cards[bounds[r]:bounds[r + 1]]
        k = 1 + max((last.get(c, -1) for c in mine), default=-1)
        rnd[r] = k
        for c in mine:
            last[c] = k
    return [np.flatnonzero(rnd == k) for k in range(int(rnd.max()) + 1)]


class CmosHandler(OrcaHandler):
    """A CMOS pool worker: counts -> rates with baselines shared through Redis."""

    stage = "cmos"

    def __init__(self, cfg, flushed_key: str = ""):
        super().__init__(cfg, flushed_key)
        self.max_dt = float(cfg["cmos_max_dt"])
        self.max_dt_us = round(self.max_dt * 1e6)
        self.pending: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.conflicts = 0

    def process(self, frames) -> None:
        """Decode a batch, update the shared state, keep the rates for the flush."""
        opened = self.open_stream(frames)
        if opened is None:
            return
        batch, order, t = opened
        dec = orca.decode_cmos(batch.records(), order)
        nbad = self.count_decode_errors(dec.errors)
        good = len(batch) - nbad
        if not len(dec.index):
            return
        if dec.error_flags.any():  # an XL3 read error: none of its counts is valid
            dec.flagged = dec.flagged | np.repeat(dec.error_flags[dec.card_record] != 0, NCHANNELS)
            self.counts["xl3_error_flags"] += int((dec.error_flags != 0).sum())
        crates = np.unique(dec.crate).tolist()
        try:
            lcn, rate, stale = self.update_shared(dec, crates, t)
        except redis_py.RedisError as exc:
            self.counts.update(errors=good, redis=good)
            log.warning("CMOS state unavailable (%s): %d records not processed", exc, good)
            return
        self.counts.update(processed=good, rates=len(lcn))
        if stale:
            self.counts["stale"] += stale
        if len(lcn):
            self.pending.setdefault(int(t), []).append((lcn, rate))

    # -- the shared state --------------------------------------------------
    def update_shared(self, dec: orca.CmosBatch, crates: list[int], t: float):
        """Apply *dec* to the per-crate states in Redis, atomically (WATCH/MULTI).

        Returns ``(lcn, rate, stale records)``.  On a conflict (another worker
        changed one of these crates meanwhile) everything is recomputed from
        the new state, so the result is as if the batches had run in turn.
        The latest map is updated in the same transaction, only where a
        reading gave a rate: a reading without one (flagged, masked, reset,
        a new baseline after a flagged reading) keeps the channel's last valid
        rate and its time, so ``minard query cmos`` shows it with its age.
        """
        keys = [CMOS_STATE_KEY.format(crate=c) for c in crates]
        rounds = card_rounds(dec)
        with self.redis.pipeline(transaction=True) as pipe:
            for _ in range(MAX_RETRIES):
                try:
                    pipe.watch(*keys)
                    state = self.load_state(crates, pipe.mget(keys))
                    lcn, rate, latest, stale = self.apply(state, dec, rounds)
                    pipe.multi()
                    for crate, key in zip(crates, keys):
                        pipe.set(key, self.crate_state(state, crate), ex=self.ttl)
                    for values, _ in latest:  # in the crates' transaction: in reading order
                        write_latest_valid(pipe, "cmos", values, t, self.ttl)
                    pipe.execute()
                    return lcn, rate, stale
                except redis_py.WatchError:
                    self.conflicts += 1
                    self.counts["state_conflicts"] += 1
        raise redis_py.RedisError(f"CMOS state of crates {crates} kept changing ({MAX_RETRIES} tries)")

    def load_state(self, crates: list[int], raws) -> orca.CmosRateState:
        """A whole-detector CmosRateState filled from the stored per-crate states."""
        state = orca.CmosRateState(self.max_dt)
        for crate, raw in zip(crates, raws):
            if raw is None:
                continue
            try:
                sub = orca.CmosRateState.from_bytes(raw)
            except orca.OrcaError as exc:
                log.warning("crate %d: stored CMOS state unreadable (%s); starting afresh", crate, exc)
                self.counts["bad_state"] += 1
                continue
            if sub.size != CRATE_CHANNELS:
                self.counts["bad_state"] += 1
                continue
            sl = slice(crate * CRATE_CHANNELS, (crate + 1) * CRATE_CHANNELS)
            state.last_count[sl] = sub.last_count
            state.last_time_us[sl] = sub.last_time_us
        return state

    def crate_state(self, state: orca.CmosRateState, crate: int) -> bytes:
        """The stored form of one crate's slice of *state*."""
        sub = orca.CmosRateState(self.max_dt, CRATE_CHANNELS)
        sl = slice(crate * CRATE_CHANNELS, (crate + 1) * CRATE_CHANNELS)
        sub.last_count = state.last_count[sl].copy()
        sub.last_time_us = state.last_time_us[sl].copy()
        return sub.to_bytes()

    def apply(self, state: orca.CmosRateState, dec: orca.CmosBatch, rounds: list[np.ndarray]):
        """Run the rounds through *state*; return rates, latest-map blocks, stale count."""
        lcns, rates, latest = [], [], []
        stale = 0
        for rows in rounds:
            sub = _subset(dec, rows)
            keep = self.fresh_records(state, sub)
            stale += len(sub.index) - len(keep)
            if not len(keep):
                continue
            sub = _subset(sub, keep)
            lcn, rate = state.update(sub)
            values = np.full(NCHANNELS_TOTAL, np.nan)
            values[lcn] = rate
            latest.append((values, sub.card))
            lcns.append(lcn)
            rates.append(rate)
        if not lcns:
            return np.zeros(0, np.int64), np.zeros(0), latest, stale
        return np.concatenate(lcns), np.concatenate(rates), latest, stale

    def fresh_records(self, state: orca.CmosRateState, sub: orca.CmosBatch) -> np.ndarray:
        """Rows of *sub* not older than the stored baseline of their cards.

        A reading at or before its card's baseline, by less than max_dt, came
        late (another worker already applied a later one) or twice: it is
        skipped so the baseline never moves back.  Much older readings are a
        new stream (ORCA restarted, a replay) and start new baselines.
        """
        last = state.last_time_us.reshape(-1, NCHANNELS)[sub.card].max(axis=1)
        t_card = sub.time_us[sub.card_record]
        behind = last - t_card
        old_card = (behind >= 0) & (behind < self.max_dt_us)
        if not old_card.any():
            return np.arange(len(sub.index))
        return np.setdiff1d(np.arange(len(sub.index)), sub.card_record[old_card])

    # -- the flush -------------------------------------------------------------
    def has_pending(self) -> bool:
        return bool(self.pending or self.writer)

    def pending_stores(self) -> list[dict]:
        return [self.pending]

    def fold_pending(self) -> None:
        """The rates of each second into the per-channel series ``cmos`` (the writer)."""
        for sec, parts in self.pending.items():
            self.writer.add_values("cmos", sec, np.concatenate([p[0] for p in parts]),
                                   np.concatenate([p[1] for p in parts]))
        self.pending.clear()
