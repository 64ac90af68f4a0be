"""Seeded synthetic PMT events for the 10240-channel detector (crates 0-19) (``minard simulate zdab``).

The same arguments always give the same bytes.  Events are generated in
batches with numpy (one ``pmt.encode_batch`` per batch), so a million events
take seconds.  What is modelled:

* **Trigger mix** (27-bit word, §5): ~94 % physics (100L always; 100M, 100H,
  20, 20LB, ESUML, ESUMH depending on nhit and chance; 1 % of them PRESCL),
  4 % PULGT (pulser, few noise hits), 1 % PED+PULGT (pedestal: one card's 32
  channels), 0.5 % EXTA; 0.1 % of events also carry MISS.
* **nhit**: lognormal with the requested mean (sigma 0.6), plus 0.2 % large
  events (muon-like) log-uniform in 500..5000 hits.  Channels are drawn with
  replacement from the live channels.
* **Charges**: per-channel pedestals 500-650 for QHS, QHL and QLX (the demo
  event's range), plus an exponential single-photoelectron signal; TAC
  around 1500 +- 200; random CMOS cell; flags 0.
* **Clocks**: Poisson arrivals at ``rate_hz``; clock10 (10 MHz, 53 bits,
  wraps) advances by the arrival gaps so a replay can pace on it; clock50 =
  5 x clock10 + 0..4 jitter, modulo 2**43.
* **GTID**: +1 per event modulo 2**24, and GTIDs whose low 16 bits are zero
  are never issued (the rule this simulation uses for the MTC/D's skipped
  GTIDs), so the wrap goes 0xFFFFFF -> 0x000001 and e.g. 0x010000 is
  skipped too.  Hit GTIDs equal the event GTID.
* **Orphans**: a fraction (default 0.1 %) of records have all six MTC words
  zero; their hits keep the GTID.
* **Runs and sub-runs**: ``subrun_every`` events per sub-run (DaqStatus),
  ``run_every`` events per run (the run number goes up by one and EvNumber
  restarts at 0; the GTID keeps counting, as the hardware does).

``--trigger-scale NAME=FACTOR`` changes the mix: for PULGT (pulser
events), PED and EXTA it makes that kind of event FACTOR times as frequent
(the total rate grows accordingly); for a bit of physics events it clears
the bit on a share of them or sets it on more of them.

Faults (``Faults``): a hot channel present in half the events, dead crates
and cards (no hits), a rate burst (e.g. 1 MHz for 10 ms), a GTID jump, and
corrupt records (truncated, NPmtHit too large, or a broken sub-field chain,
in rotation) which the decoder must reject.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import click
import numpy as np

from minard.formats import pmt
from minard.formats.detector import NCHANNELS_TOTAL
from minard.formats.zdab import ZdabWriter

#: The SNO time zero (§5): clock10 counts 100 ns ticks since then.
SNO_EPOCH = datetime(1996, 1, 1, tzinfo=UTC)
CLOCK10_WRAP = 1 << 53
CLOCK50_WRAP = 1 << 43
GTID_WRAP = 1 << 24
#: Default start time of the 10 MHz clock: 2023-01-01 00:00 UTC.
DEFAULT_CLOCK10 = int((datetime(2023, 1, 1, tzinfo=UTC) - SNO_EPOCH).total_seconds() * 10_000_000)

T = pmt.TRIGGER_BITS


@dataclass
class Faults:
    """Fault injection for ``generate_events`` (all off by default).

    ``burst = (first_event, duration_s, rate_hz)``; ``gtid_jump =
    (event_index, jump)``; ``corrupt`` = number of records to corrupt, chosen
    at random among all events; ``dead_cards`` = (crate, card) pairs.
    """

    hot_channel: int | None = None
    hot_fraction: float = 0.5
    dead_crates: tuple[int, ...] = ()
    dead_cards: tuple[tuple[int, int], ...] = ()
    burst: tuple[int, float, float] | None = None
    gtid_jump: tuple[int, int] | None = None
    corrupt: int = 0


def next_gtids(start: int, n: int) -> np.ndarray:
    """*n* consecutive GTIDs from *start* (inclusive), skipping low-16-bits-zero values."""
    if n == 0:
        return np.zeros(0, np.int64)
    # Index the issued GTIDs: each 65536 block holds 65535 issued values.
    start %= GTID_WRAP
    if start & 0xFFFF == 0:
        start += 1
    rank0 = (start >> 16) * 0xFFFF + (start & 0xFFFF) - 1
    rank = (rank0 + np.arange(n, dtype=np.int64)) % (256 * 0xFFFF)
    return (rank // 0xFFFF) << 16 | (rank % 0xFFFF + 1)


def gtid_after(gtid: int) -> int:
    """The GTID issued after *gtid* (see ``next_gtids``)."""
    return int(next_gtids(gtid + 1, 1)[0])


@dataclass
class _State:
    """What carries over from one batch to the next."""

    index: int = 0
    gtid: int = 1
    clock10: int = DEFAULT_CLOCK10
    extra: dict = field(default_factory=dict)


class _Detector:
    """Per-channel constants drawn once from the seed."""

    def __init__(self, rng: np.random.Generator, faults: Faults):
        self.ped = rng.integers(500, 651, size=(3, NCHANNELS_TOTAL))  # qhs, qhl, qlx pedestals
        alive = np.ones(NCHANNELS_TOTAL, bool)
        lcn = np.arange(NCHANNELS_TOTAL)
        for crate in faults.dead_crates:
            alive &= lcn // 512 != crate
        for crate, card in faults.dead_cards:
            alive &= ~((lcn // 512 == crate) & (lcn // 32 % 16 == card))
        self.alive = lcn[alive]
        if not len(self.alive):
            raise ValueError("every channel is dead")
        self.alive_cards = np.unique(self.alive // 32)  # crate*16 + card


#: Event kinds of the simulated trigger mix and their shares of the events.
KIND_SHARES = {"physics": 0.945, "PULGT": 0.04, "PED": 0.01, "EXTA": 0.005}
#: Trigger bits set on physics events (scaled by thinning or adding the bit).
PHYSICS_BITS = ("100L", "100M", "100H", "20", "20LB", "ESUML", "ESUMH", "PRESCL", "MISS")


def kind_shares(scale: dict | None = None) -> tuple[np.ndarray, float]:
    """Cumulative shares of the event kinds after *scale*, and the factor on the total rate.

    Scaling an event kind (PULGT = pulser events, PED, EXTA) by F makes that
    kind F times as frequent while the others keep their absolute rate, so
    the total rate changes by the factor returned.
    """
    w = np.array([KIND_SHARES[k] * (scale or {}).get(k, 1.0) for k in KIND_SHARES])
    total = float(w.sum())
    if total <= 0:
        raise ValueError("the trigger scales leave no events")
    return np.cumsum(w / total), total


def _scale_bit(rng, trig: np.ndarray, eligible: np.ndarray, bit: int, factor: float) -> None:
    """Multiply the count of events with *bit* among *eligible* by *factor* (in place).

    Below 1, the bit is cleared on a random share ``1 - factor`` of the events
    that have it; above 1, it is set on enough of the eligible events without
    it (at most all of them).
    """
    has = eligible & (trig >> bit & 1).astype(bool)
    if factor < 1:
        trig[has & (rng.random(len(trig)) >= factor)] &= ~(1 << bit)
        return
    lacks = eligible & ~has
    n_has, n_lacks = int(has.sum()), int(lacks.sum())
    if n_lacks and factor > 1:
        p = min(1.0, (factor - 1) * n_has / n_lacks)
        trig[lacks & (rng.random(len(trig)) < p)] |= 1 << bit


def _nhit_and_triggers(rng, n: int, mean_nhit: float, cards: np.ndarray,
                       scale: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """nhit, trigger word and pedestal card (crate*16+card, -1 = none) for *n* events.

    *scale* (trigger name -> factor, ``--trigger-scale``) changes the mix:
    see :func:`kind_shares` and :func:`_scale_bit`.
    """
    sigma = 0.6
    mu = math.log(max(mean_nhit, 1.0)) - sigma**2 / 2
    nhit = np.rint(rng.lognormal(mu, sigma, n)).astype(np.int64)
    big = rng.random(n) < 0.002
    nhit[big] = np.rint(np.exp(rng.uniform(math.log(500), math.log(5000), big.sum())))
    kind = rng.random(n)
    c_phys, c_pulser, c_ped = (0.945, 0.985, 0.995) if not scale else kind_shares(scale)[0][:3]
    trig = np.zeros(n, np.int64)
    physics = kind < c_phys
    trig[physics] = 1 << T["100L"]
    trig[physics & ((nhit > 15) | (rng.random(n) < 0.3))] |= 1 << T["100M"]
    trig[physics & (nhit > 40)] |= 1 << T["100H"]
    trig[physics & (rng.random(n) < 0.8)] |= 1 << T["20"]
    trig[physics & (rng.random(n) < 0.5)] |= 1 << T["20LB"]
    trig[physics & (rng.random(n) < 0.3)] |= 1 << T["ESUML"]
    trig[physics & (nhit > 100)] |= 1 << T["ESUMH"]
    trig[physics & (rng.random(n) < 0.01)] |= 1 << T["PRESCL"]
    pulser = (kind >= c_phys) & (kind < c_pulser)
    trig[pulser] = 1 << T["PULGT"]
    nhit[pulser] = rng.poisson(3, pulser.sum())
    ped = (kind >= c_pulser) & (kind < c_ped)
    trig[ped] = 1 << T["PED"] | 1 << T["PULGT"]
    nhit[ped] = 32
    exta = kind >= c_ped
    trig[exta] = 1 << T["EXTA"]
    trig[rng.random(n) < 0.001] |= 1 << T["MISS"]
    for name, factor in sorted((scale or {}).items()):
        if name in PHYSICS_BITS:
            _scale_bit(rng, trig, physics if name != "MISS" else np.ones(n, bool), T[name], factor)
    ped_card = np.where(ped, cards[rng.integers(0, len(cards), n)], -1)
    return np.clip(nhit, 0, pmt.MAX_NHIT), trig, ped_card


def _hits(rng, det: _Detector, nhit: np.ndarray, ped_card: np.ndarray, faults: Faults) -> dict:
    """Per-hit arrays for a batch (hits of each event back to back)."""
    total = int(nhit.sum())
    lcn = det.alive[rng.integers(0, len(det.alive), total)]
    first = np.cumsum(nhit) - nhit
    for i in np.flatnonzero(ped_card >= 0).tolist():  # pedestal: one whole card
        lcn[first[i]:first[i] + 32] = ped_card[i] * 32 + np.arange(32)
    if faults.hot_channel is not None:
        hot = (nhit > 0) & (rng.random(len(nhit)) < faults.hot_fraction)
        lcn[first[hot]] = faults.hot_channel
    signal = rng.exponential(30.0, total)
    q = det.ped[:, lcn] + np.stack([signal, signal * 0.1, signal * 0.05]).astype(np.int64)
    return {
        "crate": lcn // 512, "card": lcn // 32 % 16, "channel": lcn % 32,
        "cell": rng.integers(0, 16, total),
        "qhs": np.clip(q[0], 0, 4095), "qhl": np.clip(q[1], 0, 4095), "qlx": np.clip(q[2], 0, 4095),
        "tac": np.clip(np.rint(rng.normal(1500, 200, total)), 0, 4095).astype(np.int64),
    }


def _gaps_ticks(rng, indices: np.ndarray, rate_hz: float, faults: Faults) -> np.ndarray:
    """10 MHz ticks between consecutive events (Poisson; burst rate inside a burst)."""
    rates = np.full(len(indices), float(rate_hz))
    if faults.burst is not None:
        first, duration, burst_rate = faults.burst
        in_burst = (indices >= first) & (indices < first + int(duration * burst_rate))
        rates[in_burst] = burst_rate
    return np.maximum(1, np.rint(rng.exponential(1.0 / rates) * 1e7)).astype(np.int64)


def corrupt_record(record: bytes, kind: int, rng: np.random.Generator) -> bytes:
    """A record the decoder must reject: kind 0 truncated, 1 nhit > 10240, 2 bad sub-field."""
    if kind == 0:
        words = len(record) // 4
        return record[:4 * int(rng.integers(1, max(2, min(words, 11))))] if words <= 11 else record[:-4]
    out = bytearray(record)
    if kind == 1:
        out[14:16] = (pmt.MAX_NHIT + 1 + int(rng.integers(0, 1000))).to_bytes(2, "big")
    else:
        out[16:20] = (pmt.SUBFIELD_BIT | 0x7FFFFF).to_bytes(4, "big")  # first sub-field far past the end
    return bytes(out)


def generate_events(seed: int, n_events: int, **options) -> Iterator[bytes]:
    """Yield *n_events* PmtEventRecords (bytes); *options* as :func:`generate_batches`."""
    for buf, offsets, lengths in generate_batches(seed, n_events, **options):
        for offset, length in zip(offsets.tolist(), lengths.tolist()):
            yield buf[offset:offset + length]


def check_trigger_scale(scale: dict | None) -> None:
    """Raise ValueError for a trigger name the simulation does not generate."""
    for name in scale or {}:
        if name == "physics" or (name not in KIND_SHARES and name not in PHYSICS_BITS):
            raise ValueError(f"trigger {name} is not simulated; scalable: "
                             f"{', '.join(sorted(set(KIND_SHARES) - {'physics'} | set(PHYSICS_BITS)))}")


def generate_batches(
    seed: int,
    n_events: int,
    *,
    run: int = 1000,
    start_gtid: int = 1,
    rate_hz: float = 1000.0,
    mean_nhit: float = 40.0,
    subrun_every: int = 0,
    run_every: int = 0,
    orphan_rate: float = 0.001,
    start_clock10: int = DEFAULT_CLOCK10,
    faults: Faults | None = None,
    batch_size: int = 10_000,
    trigger_scale: dict | None = None,
) -> Iterator[tuple[bytes, np.ndarray, np.ndarray]]:
    """Like ``generate_events`` but yields ``(buffer, offsets, lengths)`` batches,
    the input of ``pmt.decode_buffer`` and the shape of the ZMQ wire format.

    *trigger_scale* (name -> factor) multiplies the rate of those trigger
    types; *rate_hz* is the total rate before scaling (see :func:`kind_shares`).
    """
    if rate_hz <= 0 or n_events < 0:
        raise ValueError("rate_hz must be > 0 and n_events >= 0")
    check_trigger_scale(trigger_scale)
    if trigger_scale:
        rate_hz *= kind_shares(trigger_scale)[1]
    faults = faults or Faults()
    rng = np.random.default_rng(seed)
    det = _Detector(rng, faults)
    corrupt_at = np.sort(rng.choice(n_events, min(faults.corrupt, n_events), replace=False)) if n_events else []
    corrupt_kind = {int(i): k % 3 for k, i in enumerate(corrupt_at)}
    gtid = int(next_gtids(start_gtid, 1)[0])
    clock10 = start_clock10
    for first in range(0, n_events, batch_size):
        n = min(batch_size, n_events - first)
        index = np.arange(first, first + n, dtype=np.int64)
        nhit, trig, ped_card = _nhit_and_triggers(rng, n, mean_nhit, det.alive_cards, trigger_scale)
        hits = _hits(rng, det, nhit, ped_card, faults)
        gtids = next_gtids(gtid, n)
        if faults.gtid_jump is not None and first <= faults.gtid_jump[0] < first + n:
            at = faults.gtid_jump[0] - first
            gtids[at:] = next_gtids(int(gtids[at]) + faults.gtid_jump[1], n - at)
        gtid = gtid_after(int(gtids[-1]))
        ticks = np.cumsum(_gaps_ticks(rng, index, rate_hz, faults))
        clocks = (clock10 + ticks) % CLOCK10_WRAP
        clock10 = int(clocks[-1])
        clock50 = (clocks * 5 + rng.integers(0, 5, n)) % CLOCK50_WRAP
        run_no = run + (index // run_every if run_every else 0)
        evnum = index % run_every if run_every else index
        subrun = (evnum // subrun_every if subrun_every else np.zeros(n, np.int64)) % 0x10000
        events = {"run": run_no, "evnum": evnum, "gtid": gtids, "trigger_word": trig, "nhit": nhit,
                  "clock10": clocks, "clock50": clock50, "subrun": subrun,
                  "orphan": rng.random(n) < orphan_rate}
        buf, offsets, lengths = pmt.encode_batch(events, hits)
        bad = [i for i in range(first, first + n) if i in corrupt_kind]
        if bad:
            buf, offsets, lengths = _apply_corruption(buf, offsets, lengths, bad, first, corrupt_kind, rng)
        yield buf, offsets, lengths


def _apply_corruption(buf, offsets, lengths, bad, first, kinds, rng):
    """Replace the records at absolute indices *bad* with corrupt versions."""
    parts, new_off, new_len, pos = [], [], [], 0
    bad_set = set(bad)
    for i, (o, n) in enumerate(zip(offsets.tolist(), lengths.tolist())):
        record = buf[o:o + n]
        if first + i in bad_set:
            record = corrupt_record(record, kinds[first + i], rng)
        parts.append(record)
        new_off.append(pos)
        new_len.append(len(record))
        pos += len(record)
    return b"".join(parts), np.array(new_off, np.int64), np.array(new_len, np.int64)


def write_zdab(path, events: Iterable[bytes], progress: bool = True, total: int | None = None,
               record_words: int = 3840) -> int:
    """Write PmtEventRecords to a ZDAB file with a tqdm progress bar; return the count."""
    from tqdm import tqdm

    with ZdabWriter(path, record_words) as writer:
        for record in tqdm(events, total=total, disable=not progress, unit="ev", desc="zdab"):
            writer.write_event(record)
        return writer.events


def parse_trigger_scale(items) -> dict[str, float]:
    """``NAME=FACTOR`` options as a dict (a later repeat of a name wins)."""
    out = {}
    for text in items:
        name, sep, value = str(text).partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = -1.0
        if not sep or not name or not math.isfinite(factor) or factor < 0:
            raise click.BadParameter(f"{text!r}: use NAME=FACTOR with FACTOR >= 0, e.g. PULGT=3",
                                     param_hint="--trigger-scale")
        out[name.strip()] = factor
    return out


def _parse_burst(text: str | None) -> tuple[int, float, float] | None:
    if not text:
        return None
    try:
        first, duration, rate = text.split(":")
        return int(first), float(duration), float(rate)
    except ValueError:
        raise click.BadParameter("use FIRST_EVENT:DURATION_S:RATE_HZ, e.g. 5000:0.01:1e6") from None


def _parse_pair(text: str | None, what: str) -> tuple[int, int] | None:
    if not text:
        return None
    for sep in ("/", ":"):
        if sep in text:
            a, _, b = text.partition(sep)
            try:
                return int(a, 0), int(b, 0)
            except ValueError:
                break
    raise click.BadParameter(f"use {what}")


@click.command("zdab", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(dir_okay=False, writable=True))
@click.option("--events", "n_events", type=click.IntRange(min=0), default=10_000, show_default=True,
              help="Number of events to write.")
@click.option("--seed", type=int, default=1, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--run", type=click.IntRange(0, 2**32 - 1), default=1000, show_default=True, help="Run number.")
@click.option("--start-gtid", type=click.IntRange(0, 2**24 - 1), default=1, show_default=True,
              help="First GTID.")
@click.option("--mean-nhit", type=click.FloatRange(min=0), default=40.0, show_default=True,
              help="Mean hits per physics event.")
@click.option("--rate", "rate_hz", type=click.FloatRange(min=0, min_open=True), default=1000.0,
              show_default=True, help="Mean event rate in Hz (sets the 10 MHz clock).")
@click.option("--subrun-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Events per sub-run (0: one sub-run).")
@click.option("--run-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Events per run (0: one run); later runs are RUN+1, RUN+2, ...")
@click.option("--orphan-rate", type=click.FloatRange(0, 1), default=0.001, show_default=True,
              help="Fraction of orphans (all MTC words zero).")
@click.option("--hot-channel", type=click.IntRange(0, NCHANNELS_TOTAL - 1), default=None,
              help="Channel (lcn) that fires in half of the events.")
@click.option("--dead-crate", type=click.IntRange(0, 18), multiple=True, help="Crate with no hits (repeatable).")
@click.option("--dead-card", multiple=True, metavar="CRATE/CARD", help="Card with no hits (repeatable).")
@click.option("--burst", metavar="FIRST:DURATION_S:RATE_HZ",
              help="Rate burst, e.g. 5000:0.01:1e6 (1 MHz for 10 ms from event 5000).")
@click.option("--gtid-jump", metavar="EVENT:JUMP", help="Add JUMP to the GTID from event EVENT on.")
@click.option("--corrupt", type=click.IntRange(min=0), default=0, show_default=True,
              help="Number of corrupt records (truncated, nhit too large, bad sub-field).")
@click.option("--trigger-scale", multiple=True, metavar="NAME=FACTOR",
              help="Multiply the rate of trigger type NAME by FACTOR (repeatable), e.g. PULGT=3.")
@click.option("--record-words", type=click.IntRange(16, 3840), default=3840, show_default=True,
              help="Physical record size in words.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def zdab_cmd(out, n_events, seed, run, start_gtid, mean_nhit, rate_hz, subrun_every, run_every,
             orphan_rate, hot_channel, dead_crate, dead_card, burst, gtid_jump, corrupt, trigger_scale,
             record_words, progress):
    """Write OUT, a ZDAB file of N seeded synthetic PMT events.

    The trigger mix, nhit distribution, charges, clocks and GTIDs are those of
    minard.simulate.events; the fault options inject detector problems for
    the monitoring to find.
    """
    cards = []
    for text in dead_card:
        pair = _parse_pair(text, "CRATE/CARD, e.g. 3/7")
        if not (0 <= pair[0] <= 18 and 0 <= pair[1] <= 15):
            raise click.BadParameter(f"no card {text}")
        cards.append(pair)
    faults = Faults(hot_channel=hot_channel, dead_crates=tuple(dead_crate), dead_cards=tuple(cards),
                    burst=_parse_burst(burst), gtid_jump=_parse_pair(gtid_jump, "EVENT:JUMP"),
                    corrupt=corrupt)
    scale = parse_trigger_scale(trigger_scale)
    try:
        check_trigger_scale(scale)  # before the file is created
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--trigger-scale") from None
    events = generate_events(seed, n_events, run=run, start_gtid=start_gtid, rate_hz=rate_hz,
                             mean_nhit=mean_nhit, subrun_every=subrun_every, run_every=run_every,
                             orphan_rate=orphan_rate, faults=faults, trigger_scale=scale)
    count = write_zdab(out, events, progress=progress, total=n_events, record_words=record_words)
    click.echo(f"wrote {count} events to {out}")
