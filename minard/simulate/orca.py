"""A seeded ORCA stream of XL3 polling records with known per-channel rates.

The stream looks like what ORCA's Dispatcher sends (ORCA_FORMAT.md §1): a
header record, a run-start record, then every ``poll_period`` seconds, for each
crate, its CMOS-rate record(s) (two records with slot masks ``mask & 0x00FF``
and ``mask & 0xFF00`` when more than 8 cards are polled, one otherwise; same
timestamp, §5), its base-current record (§6), an ``Xl3Vlt`` record and a
short GTID record (other records consumers must skip, §7); a heartbeat every
30 s; at each sub-run boundary the header again (optionally with NEW data
ids) and a sub-run record; an end-of-run record.

**Known rates.**  Each channel counts a fixed integer number of hits per poll,
``n``; its true rate is ``n / poll_period`` (``true_rates``).  Timestamps lie
on the centisecond grid of the record text (crate c is offset by a whole
number of centiseconds), so every rate a consumer computes from two
successive valid readings equals the true rate to float precision.

Injected faults, all recorded on the simulator: masked channels (channel-mask
bits cleared) and absent slots, flagged counts (bit 31 set) in
``flagged_readings``, one counter reset in ``resets``, busy base channels,
and garbage between records in ``garbage_offsets``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import click
import numpy as np

from minard.formats import orca
from minard.formats.detector import NCARDS, NCHANNELS
from minard.formats.detector import (
    NCHANNELS_TOTAL as DETECTOR_CHANNELS,  # truth arrays: the whole detector
)
from minard.formats.detector import (
    NCHANNELS_XL3 as NCHANNELS_TOTAL,  # the ORCA stream: XL3 crates 0-18
)
from minard.formats.detector import NCRATES as DETECTOR_CRATES
from minard.formats.detector import NCRATES_XL3 as NCRATES

#: Default absent-slot layout: crate 5 has an empty slot 7 (a gap, two CMOS
#: records), crate 11 has 8 cards spread over both halves (one CMOS record).
DEFAULT_SLOT_MASKS = {5: 0xFF7F, 11: 0x0F0F}
#: The short record emitted every poll: a GTID-like record of another model.
#: Its id goes into the plist as a negative number, as a 32-bit ORCA would
#: write it (§4.1).
SHORT_MODEL = ("ORMTCModel", "MTCGTID", "ORMTCDecoderForGTID")
DEFAULT_SHORT_ID = 33 << 26
HEARTBEAT_PERIOD_US = 30_000_000


def _signed32(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


def _valid_long_id(value: int) -> int:
    if value <= 0 or value & ~orca.LONG_ID_MASK or value & orca.SHORT_BIT or value == 0x1FFF << 18:
        raise ValueError(f"{value:#x} is not a usable long data id (n << 18 with 1 <= n <= 0x1FFE)")
    return value


def _shifted_id(data_id: int, step: int) -> int:
    """The id *step* sub-runs later when ids change (stays a valid long id)."""
    n = data_id >> 18
    return (((n - 1 + step) % 0x1FFE) + 1) << 18


def _whole(values: np.ndarray, fill) -> np.ndarray:
    """*values* of the XL3 channels extended to the whole detector with *fill*."""
    out = np.full(DETECTOR_CHANNELS, fill, dtype=values.dtype)
    out[:len(values)] = values
    return out


class OrcaSimulator:
    """A reproducible ORCA stream; the same arguments give the same bytes.

    Truth attributes: ``true_rates`` (Hz per lcn, NaN for absent channels),
    ``counts_per_poll``, ``slot_masks`` (per crate), ``channel_masks``
    (crate×slot words), ``flagged_readings`` / ``resets`` /
    ``garbage_offsets`` / ``subruns`` (filled while streaming).
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        cmos_id: int = orca.DEFAULT_CMOS_ID,
        base_id: int = orca.DEFAULT_BASE_ID,
        start_time: float = 1_700_000_000.0,
        poll_period: float = 1.0,
        crates: int | list[int] = NCRATES,
        byteorder: str = "little",
        slot_masks: Mapping[int, int] | None = None,
        masked_fraction: float = 0.01,
        flag_probability: float = 1e-4,
        busy_probability: float = 1e-4,
        counter_reset: bool = True,
        garbage: int = 0,
        subrun_period: float | None = None,
        new_ids_on_subrun: bool = False,
        extra_records: bool = True,
        run: int = 100000,
    ):
        if cmos_id == base_id:
            raise ValueError("cmos_id and base_id must differ")
        self.cmos_id, self.base_id = _valid_long_id(cmos_id), _valid_long_id(base_id)
        self.seed = seed
        self.byteorder = byteorder
        self.poll_us = round(poll_period * 100) * 10_000
        if self.poll_us <= 0:
            raise ValueError("poll_period must be at least 0.01 s")
        self.start_us = math.floor(start_time * 100) * 10_000
        self.crates = list(range(crates)) if isinstance(crates, int) else sorted(crates)
        if any(not 0 <= c < NCRATES for c in self.crates):
            raise ValueError("crates must be in 0..18")
        self.flag_probability = flag_probability
        self.busy_probability = busy_probability
        self.counter_reset = counter_reset
        self.garbage = garbage
        self.subrun_us = None if not subrun_period else round(subrun_period * 100) * 10_000
        self.new_ids_on_subrun = new_ids_on_subrun
        self.extra_records = extra_records
        self.run = run
        self._rng = np.random.default_rng(seed)
        # garbage has its own generator so that the records do not depend on it
        self._junk_rng = np.random.default_rng([seed, 1])
        self._make_truth(DEFAULT_SLOT_MASKS if slot_masks is None else slot_masks, masked_fraction)
        self.flagged_readings: list[tuple[int, int]] = []
        self.resets: list[tuple[int, int]] = []
        self.garbage_offsets: list[tuple[int, int]] = []
        self.subruns: list[tuple[int, orca.XL3Ids]] = []

    # -- truth ---------------------------------------------------------------

    def _make_truth(self, slot_masks: Mapping[int, int], masked_fraction: float) -> None:
        """Draw masks, per-poll counts, base-current baselines."""
        rng = self._rng
        self.slot_masks = np.zeros(DETECTOR_CRATES, dtype=np.int64)
        for c in self.crates:
            self.slot_masks[c] = slot_masks.get(c, 0xFFFF) & 0xFFFF
        masked = rng.random((NCRATES, NCARDS, NCHANNELS)) < masked_fraction
        bits = (1 << np.arange(NCHANNELS, dtype=np.int64))
        self.channel_masks = np.full((DETECTOR_CRATES, NCARDS), 0xFFFFFFFF, np.int64)
        self.channel_masks[:NCRATES] = 0xFFFFFFFF - (masked * bits).sum(axis=2)
        seconds = self.poll_us / 1e6
        per_poll = rng.lognormal(math.log(800.0 * seconds), 0.5, NCHANNELS_TOTAL)
        per_poll[rng.random(NCHANNELS_TOTAL) < 0.005] = 0.0  # dead channels
        hot = rng.random(NCHANNELS_TOTAL) < 0.002
        per_poll[hot] *= 20
        # Drawn for the XL3 crates 0-18 (the random stream of a seed stays the
        # same), kept as arrays over the whole detector (crate 19: no XL3 data).
        self.counts_per_poll = _whole(np.round(per_poll).astype(np.int64), 0)
        self.initial_counts = _whole(rng.integers(0, 1 << 20, NCHANNELS_TOTAL), 0)
        self.true_rates = self.counts_per_poll / seconds
        self.true_rates[~self.present_channels()] = np.nan
        self.base_bytes = _whole(np.clip(127 + np.round(rng.normal(0, 3, NCHANNELS_TOTAL)), 0, 255)
                                 .astype(np.int64), 0)
        self.reset_crate = int(rng.choice(self.crates)) if self.crates else 0

    def present_channels(self) -> np.ndarray:
        """Bool per lcn: the channel's crate is simulated and its slot polled."""
        lcn = np.arange(DETECTOR_CHANNELS)
        crate, slot = lcn // (NCARDS * NCHANNELS), lcn // NCHANNELS % NCARDS
        return ((self.slot_masks[crate] >> slot) & 1).astype(bool) & np.isin(crate, self.crates)

    def masked_channels(self) -> np.ndarray:
        """Bool per lcn: its channel-mask bit is 0."""
        lcn = np.arange(DETECTOR_CHANNELS)
        word = self.channel_masks.reshape(-1)[lcn // NCHANNELS]
        return ((word >> (lcn % NCHANNELS)) & 1) == 0

    def polls(self, duration_s: float) -> int:
        """Number of polls in *duration_s* seconds (at least one)."""
        return max(1, round(duration_s * 1e6) // self.poll_us)

    # -- records -------------------------------------------------------------

    def _header(self, subrun: int, time_us: int) -> bytes:
        """The header record (and the ids it announces) of sub-run *subrun*."""
        step = subrun * 16 if self.new_ids_on_subrun else 0
        cmos, base = _shifted_id(self.cmos_id, step), _shifted_id(self.base_id, step)
        if step and cmos == base:  # cannot happen for distinct ids, kept for safety
            base = _shifted_id(base, 1)
        extra = {SHORT_MODEL[0]: {SHORT_MODEL[1]: {
            "decoder": SHORT_MODEL[2], "dataId": _signed32(DEFAULT_SHORT_ID), "length": 1, "variable": False}}}
        plist = orca.make_header_plist(cmos, base, run=self.run, subrun=subrun,
                                       start_time=time_us // 1_000_000, extra_models=extra)
        desc = orca.data_description(plist)
        self.ids = orca.XL3Ids(cmos, base)
        self.run_id = next(i for i, d in desc.items() if d.model == "ORRunModel")
        self.vlt_id = next(i for i, d in desc.items() if d.name == "Xl3Vlt")
        self.subruns.append((time_us, self.ids))
        return orca.encode_header(plist, self.byteorder)

    def _run_control(self, flags: int, time_us: int, subrun: int = 0, number: int | None = None) -> bytes:
        return orca.encode_run_control(self.run_id, flags, self.run if number is None else number,
                                       time_us // 1_000_000, subrun, self.byteorder)

    def _counts(self, crate: int, k: int, reset_poll: int | None) -> np.ndarray:
        """(16, 32) count words of *crate* at poll *k*, flags included."""
        sl = slice(crate * NCARDS * NCHANNELS, (crate + 1) * NCARDS * NCHANNELS)
        n = self.counts_per_poll[sl]
        if reset_poll is not None and crate == self.reset_crate and k >= reset_poll:
            counts = n * (k - reset_poll)
        else:
            counts = self.initial_counts[sl] + n * k
        counts = counts & 0x7FFFFFFF
        present = np.repeat((self.slot_masks[crate] >> np.arange(NCARDS)) & 1, NCHANNELS).astype(bool)
        flagged = (self._rng.random(counts.shape) < self.flag_probability) & present
        for j in np.nonzero(flagged)[0]:
            self.flagged_readings.append((k, crate * NCARDS * NCHANNELS + int(j)))
        return (counts | (flagged.astype(np.int64) << 31)).reshape(NCARDS, NCHANNELS)

    def _crate_records(self, crate: int, k: int, time_us: int, reset_poll: int | None) -> list[bytes]:
        """CMOS, base, voltage and short records of one crate at one poll."""
        text = orca.format_timestamp_us(time_us)
        mask = int(self.slot_masks[crate])
        if not mask:
            return []
        counts = self._counts(crate, k, reset_poll)
        chmask = self.channel_masks[crate]
        halves = [mask] if mask.bit_count() <= orca.CMOS_MAX_CARDS else [mask & 0x00FF, mask & 0xFF00]
        out = []
        for half in (h for h in halves if h):
            slots = [s for s in range(NCARDS) if half >> s & 1]
            out.append(orca.encode_cmos(self.ids.cmos, crate, half, chmask, counts[slots], text,
                                        byteorder=self.byteorder))
        out.append(self._base_record(crate, mask, chmask, text))
        if self.extra_records:
            volts = np.frombuffer(self._rng.normal(5.0, 0.1, 8).astype(np.float32).tobytes(), np.uint32)
            stamp = np.frombuffer(text.ljust(24, b"\0"), np.uint32)  # an opaque 6-word field
            out.append(orca.encode_long(self.vlt_id, [crate, *volts.tolist(), *stamp.tolist()], self.byteorder))
            out.append(orca.encode_short(DEFAULT_SHORT_ID, (k * NCRATES + crate) & orca.SHORT_DATA_MASK,
                                         self.byteorder))
        return out

    def _base_record(self, crate: int, mask: int, chmask, text: bytes) -> bytes:
        """One base-current record; absent slots carry 0xFF to show they are ignored."""
        sl = slice(crate * NCARDS * NCHANNELS, (crate + 1) * NCARDS * NCHANNELS)
        values = self.base_bytes[sl] + self._rng.integers(-1, 2, NCARDS * NCHANNELS)
        present = np.repeat((mask >> np.arange(NCARDS)) & 1, NCHANNELS).astype(bool)
        currents = np.where(present, np.clip(values, 0, 255), 0xFF).reshape(NCARDS, NCHANNELS)
        busy = ((self._rng.random(NCARDS * NCHANNELS) < self.busy_probability) & present).reshape(NCARDS, NCHANNELS)
        return orca.encode_base(self.ids.base, crate, mask, chmask, currents, busy, text, byteorder=self.byteorder)

    # -- the stream ------------------------------------------------------------

    def stream(self, duration_s: float) -> Iterator[bytes]:
        """Yield the stream as chunks: the run start, then one chunk per poll
        (all crates), then the end of run."""
        npolls = self.polls(duration_s)
        reset_poll = npolls // 2 if self.counter_reset and npolls >= 4 else None
        if reset_poll is not None:
            self.resets.append((reset_poll, self.reset_crate))
        garbage_polls = sorted(self._junk_rng.integers(0, npolls, self.garbage).tolist())
        offset = 0
        subrun = 0
        first = self._header(0, self.start_us) + self._run_control(orca.RUN_START, self.start_us)
        offset += len(first)
        yield first
        ncr = max(1, len(self.crates))
        phases = [round(i * self.poll_us / ncr / 10_000) * 10_000 for i in range(len(self.crates))]
        for k in range(npolls):
            t_k = self.start_us + k * self.poll_us
            parts = []
            if self.subrun_us and k and (t_k - self.start_us) // self.subrun_us != subrun:
                subrun = (t_k - self.start_us) // self.subrun_us
                parts.append(self._run_control(orca.RUN_END_SUBRUN, t_k, subrun - 1))
                parts.append(self._header(subrun, t_k))
                parts.append(self._run_control(orca.RUN_START_SUBRUN, t_k, subrun))
            if k and (k * self.poll_us) // HEARTBEAT_PERIOD_US != ((k - 1) * self.poll_us) // HEARTBEAT_PERIOD_US:
                parts.append(self._run_control(orca.RUN_HEARTBEAT, t_k, subrun, 30))
            for crate, phase in zip(self.crates, phases):
                parts += self._crate_records(crate, k, t_k + phase, reset_poll)
            chunk = b"".join(parts)
            for _ in range(garbage_polls.count(k)):
                size = self._junk_rng.integers(1, 41)
                junk = self._junk_rng.integers(0, 256, size, dtype=np.uint8).tobytes()
                self.garbage_offsets.append((offset + len(chunk), len(junk)))
                chunk += junk
            offset += len(chunk)
            yield chunk
        end_us = self.start_us + npolls * self.poll_us
        yield self._run_control(0, end_us, subrun)


def generate_stream(seed: int, duration_s: float, **options) -> Iterator[bytes]:
    """The byte chunks of a simulated ORCA stream (options as OrcaSimulator:
    cmos_id, base_id, start_time, poll_period, byteorder, garbage, ...)."""
    return OrcaSimulator(seed, **options).stream(duration_s)


def write_stream(path, seed: int, duration_s: float, *, progress: bool = True, **options) -> OrcaSimulator:
    """Write a simulated stream to *path* with a progress bar; return the
    simulator (for its truth attributes)."""
    from tqdm import tqdm

    sim = OrcaSimulator(seed, **options)
    total = sim.polls(duration_s)
    with open(path, "wb") as fh, tqdm(total=total, unit="poll", disable=not progress) as bar:
        for i, chunk in enumerate(sim.stream(duration_s)):
            fh.write(chunk)
            if 0 < i <= total:
                bar.update(1)
    return sim


def _data_id(ctx, param, value):
    """click callback: an id as an integer (decimal, 0x.., or 'N<<18')."""
    if value is None:
        return None
    try:
        if "<<" in value:
            n, shift = value.split("<<")
            number = int(n.strip(), 0) << int(shift.strip(), 0)
        else:
            number = int(value, 0)
        return _valid_long_id(number)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("orca", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seconds", type=float, default=60.0, show_default=True, help="Length of the run in seconds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--cmos-id", callback=_data_id, default=None,
              help=f"Data id of Xl3CmosRate records, e.g. 0x140000 or '5<<18' [default: {orca.DEFAULT_CMOS_ID:#x}].")
@click.option("--base-id", callback=_data_id, default=None,
              help=f"Data id of Xl3PmtBaseCurrent records [default: {orca.DEFAULT_BASE_ID:#x}].")
@click.option("--poll", type=float, default=1.0, show_default=True, help="Polling period per crate in seconds.")
@click.option("--crates", type=click.IntRange(1, NCRATES), default=NCRATES, show_default=True,
              help="Number of crates (0..N-1).")
@click.option("--big-endian", is_flag=True, help="Write integer words big-endian (default little-endian).")
@click.option("--garbage", type=int, default=0, show_default=True, help="Garbage blobs to insert between records.")
@click.option("--subrun", type=float, default=None, help="Sub-run length in seconds (header re-sent at each).")
@click.option("--new-ids", is_flag=True, help="Give the XL3 records new data ids at every sub-run.")
@click.option("--start-time", type=float, default=1_700_000_000.0, show_default=True, help="Unix time of the first poll.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
def orca_cmd(out, seconds, seed, cmos_id, base_id, poll, crates, big_endian, garbage, subrun, new_ids,
             start_time, quiet):
    """Write a simulated ORCA stream of XL3 CMOS-rate and base-current records
    to OUT, with known per-channel rates (seeded and reproducible).

    Replay it with the ORCA stream server or read it with `minard dump`.
    """
    sim = write_stream(
        out, seed, seconds, progress=not quiet,
        cmos_id=cmos_id or orca.DEFAULT_CMOS_ID, base_id=base_id or orca.DEFAULT_BASE_ID,
        poll_period=poll, crates=crates, byteorder="big" if big_endian else "little",
        garbage=garbage, subrun_period=subrun, new_ids_on_subrun=new_ids, start_time=start_time,
    )
    if not quiet:
        click.echo(f"wrote {out}: {sim.polls(seconds)} polls x {len(sim.crates)} crates, "
                   f"{out.stat().st_size} bytes, ids cmos={sim.ids.cmos:#x} base={sim.ids.base:#x}")
