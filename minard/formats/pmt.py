"""The PmtEventRecord: one detector event, as stored in a ZDAB bank and as sent
on the dispatch stream.

Section numbers (§) refer to ``shared/formats/ZDAB_FORMAT.md``.  Everything is
big-endian 32-bit words (§0).  This module is pure: bytes in, numpy arrays or
bytes out, no I/O.

* ``encode_event`` builds a byte-exact record (header, MTC words, FEC hits,
  optional sub-fields) from arrays.
* ``decode_events`` / ``decode_buffer`` decode a batch of records at once into
  an ``EventBatch`` of numpy arrays, with no per-hit Python work.  Records that
  cannot be decoded are reported in ``EventBatch.errors`` and never stop the
  good ones.
* ``decode_event`` decodes one record into a plain dict (for ``minard dump``).
* ``pack_dispatch`` / ``pack_rechdr`` / ``unpack_dispatch`` add and remove the
  12-byte generic header of the dispatch stream (§9).
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from minard.formats.detector import NCARDS, NCHANNELS, NCHANNELS_TOTAL

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

#: The 27 trigger names, bit i of the SNO+ trigger word has name i (§5).
TRIGGER_NAMES: tuple[str, ...] = (
    "100L", "100M", "100H", "20", "20LB", "ESUML", "ESUMH", "OWLN", "OWLEL",
    "OWLEH", "PULGT", "PRESCL", "PED", "PONG", "SYNC", "EXTA", "EXT2", "EXT3",
    "EXT4", "EXT5", "EXT6", "EXT7", "EXT8", "SRAW", "NCD", "SOFGT", "MISS",
)
NTRIGGERS = len(TRIGGER_NAMES)
TRIGGER_BITS: dict[str, int] = {name: i for i, name in enumerate(TRIGGER_NAMES)}
TRIGGER_MASK = (1 << NTRIGGERS) - 1

#: Per-hit flag bits as returned in ``EventBatch.flags`` (§6): bits 0-1 are
#: H0 bits 30-31, bits 2-5 are H1 bits 28-31.
HIT_FLAG_NAMES: tuple[str, ...] = (
    "CGT_ES16", "CGT_ES24", "MissedCount", "NC_CC", "LGI_Select", "CMOS_ES16",
)

#: Record id of a dispatched event, ASCII 'PMT ' (§9).
PMT_RECORD_ID = 0x504D5420
#: RecordVersion of the generic dispatch header, ASCII 'PTK0' (§9).
PTK0 = 0x50544B30
#: 'RHDR' travels on the dispatch stream as 'RUN ' (§9).
RUN_RECORD_ID = 0x52554E20
#: A reader rejects records with more hits than this (§4).
MAX_NHIT = 10240

HEADER_WORDS = 11  # §4: 5 header words + 6 MTC words
HEADER_BYTES = 4 * HEADER_WORDS  # 44 = sizeof(PmtEventRecord), RecordLength in §9
HIT_WORDS = 3  # §6
GENERIC_HEADER = struct.Struct(">III")  # §9: RecordID, RecordLength, RecordVersion
#: The generic header of every 'PMT ' dispatch record (§9): 'PMT ', 44, 'PTK0'.
PMT_DISPATCH_HEADER = GENERIC_HEADER.pack(PMT_RECORD_ID, HEADER_BYTES, PTK0)

RECORD_TYPE_PMT = 10  # §4 word 0 bits 25-31
ZDAB_VERSION = 23  # §4 word 0 bits 16-23
DATA_TYPE = 0xB  # §4 word 0 bits 0-15
SUBFIELD_BIT = 1 << 23  # §4 word 4 bit 23, §7 header bit 23
OFFSET_MASK = 0x7FFFFF  # §4 word 4 bits 0-22, §7 header bits 0-22
ADC_XOR = 0x800  # §6: ADC/TAC values are the 12-bit field XOR 0x800

#: Sub-field types (§7).
SUBFIELD_TYPES: dict[int, str] = {
    8: "calibrated", 9: "mc", 10: "fit", 11: "extra_hit", 12: "extra_event",
    13: "tslh", 14: "cal_flags", 15: "hca", 16: "ncd", 32: "caen", 33: "tubii",
}


def lcn(crate, card, channel):
    """Logical channel number ``crate*512 + card*32 + channel`` (§6); works on arrays."""
    return crate * (NCARDS * NCHANNELS) + card * NCHANNELS + channel


def trigger_names(word: int) -> list[str]:
    """Names of the bits set in a 27-bit trigger word, in bit order (§5)."""
    return [name for i, name in enumerate(TRIGGER_NAMES) if word >> i & 1]


def trigger_word(*names: str) -> int:
    """The 27-bit trigger word with the named bits set (inverse of ``trigger_names``)."""
    word = 0
    for name in names:
        word |= 1 << TRIGGER_BITS[name]
    return word


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class RecordError(ValueError):
    """A record (or framing) that cannot be decoded.

    ``reason`` is a short machine-readable string ("truncated",
    "nhit_too_large", "bad_subfield", "bad_offset", "bad_header", ...) that
    processes count by; the message is for humans.
    """

    def __init__(self, reason: str, message: str | None = None):
        super().__init__(message or reason)
        self.reason = reason


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------

#: Per-hit fields accepted by ``encode_event`` and their (inclusive) maxima.
HIT_FIELDS: dict[str, int] = {
    "crate": 31, "card": 15, "channel": 31, "cell": 15,
    "qhs": 4095, "qhl": 4095, "qlx": 4095, "tac": 4095, "flags": 63,
    "gtid": (1 << 24) - 1,
}


def _hit_arrays(hits, n_default_gtid: int) -> dict[str, np.ndarray]:
    """Normalise *hits* (structured array or mapping of arrays) to uint32 arrays.

    Missing fields are 0, except ``gtid`` which defaults to the event GTID.
    Raises ValueError for unequal lengths or out-of-range values.
    """
    if hits is None:
        names: Sequence[str] = ()
        get = None
    elif isinstance(hits, np.ndarray) and hits.dtype.names:
        names, get = hits.dtype.names, hits.__getitem__
    elif isinstance(hits, Mapping):
        names, get = tuple(hits), hits.__getitem__
    else:
        raise TypeError("hits must be a numpy structured array or a mapping of arrays")
    unknown = set(names) - set(HIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown hit fields: {sorted(unknown)}")
    arrays = {name: np.asarray(get(name)).astype(np.int64, copy=False).ravel() for name in names}
    n = len(next(iter(arrays.values()))) if arrays else 0
    out = {}
    for name, maximum in HIT_FIELDS.items():
        arr = arrays.get(name)
        if arr is None:
            arr = np.full(n, n_default_gtid if name == "gtid" else 0, np.int64)
        if len(arr) != n:
            raise ValueError(f"hit field {name!r} has {len(arr)} values, expected {n}")
        if n and (arr.min() < 0 or arr.max() > maximum):
            raise ValueError(f"hit field {name!r} out of range 0..{maximum}")
        out[name] = arr.astype(np.uint32)
    return out


def _pack_hits(h: dict[str, np.ndarray]) -> bytes:
    """Pack hit arrays into 3 big-endian words per hit (§6), vectorized."""
    g = h["gtid"]
    f = h["flags"]
    words = np.empty((len(g), 3), np.uint32)
    # H0: GTID 0-15 | channel 16-20 | crate 21-25 | card 26-29 | CGT_ES16/24 30-31
    words[:, 0] = (g & 0xFFFF) | h["channel"] << 16 | h["crate"] << 21 | h["card"] << 26 | (f & 3) << 30
    # H1: QLX 0-11 | cell 12-15 | QHS 16-27 | MissedCount, NC_CC, LGI, CMOS_ES16 28-31
    words[:, 1] = (h["qlx"] ^ ADC_XOR) | h["cell"] << 12 | (h["qhs"] ^ ADC_XOR) << 16 | (f >> 2) << 28
    # H2: QHL 0-11 | GTID 16-19 at 12-15 | TAC 16-27 | GTID 20-23 at 28-31
    words[:, 2] = (h["qhl"] ^ ADC_XOR) | (g >> 16 & 0xF) << 12 | (h["tac"] ^ ADC_XOR) << 16 | (g >> 20 & 0xF) << 28
    return words.astype(">u4").tobytes()


def pack_subfields(fields: Sequence[tuple[int, bytes]]) -> bytes:
    """Build a sub-field chain (§7) from ``(type, payload)`` pairs.

    Each header word holds the length in words (header included), bit 23 when
    another sub-field follows, and the type in bits 24-31.
    """
    out = []
    for i, (ftype, payload) in enumerate(fields):
        if len(payload) % 4:
            raise ValueError("sub-field payload must be whole 32-bit words")
        length = 1 + len(payload) // 4
        more = SUBFIELD_BIT if i + 1 < len(fields) else 0
        out.append(struct.pack(">I", (ftype & 0xFF) << 24 | more | length) + bytes(payload))
    return b"".join(out)


def _mtc_words(*, clock10, clock50, gtid, trigger_word, esum_peak, esum_diff, esum_int, error_flags):
    """The six MTC words M0..M5 (§5)."""
    limits = {"clock10": 1 << 53, "clock50": 1 << 43, "gtid": 1 << 24, "trigger_word": 1 << NTRIGGERS,
              "esum_peak": 1 << 10, "esum_diff": 1 << 10, "esum_int": 1 << 10, "error_flags": 1 << 12}
    values = {"clock10": clock10, "clock50": clock50, "gtid": gtid, "trigger_word": trigger_word,
              "esum_peak": esum_peak, "esum_diff": esum_diff, "esum_int": esum_int,
              "error_flags": error_flags}
    for name, limit in limits.items():
        if not 0 <= values[name] < limit:
            raise ValueError(f"{name}={values[name]} out of range 0..{limit - 1}")
    return (
        clock10 & 0xFFFFFFFF,  # M0: 10 MHz clock bits 0-31
        (clock10 >> 32) | (clock50 & 0x7FF) << 21,  # M1: clock10 32-52, clock50 0-10
        clock50 >> 11,  # M2: clock50 bits 11-42
        gtid | (trigger_word & 0xFF) << 24,  # M3: GTID, trigger bits 0-7
        (trigger_word >> 8) | esum_peak << 19 | (esum_diff & 7) << 29,  # M4
        (esum_diff >> 3) | esum_int << 7 | error_flags << 17,  # M5
    )


def encode_event(
    *,
    run: int,
    evnum: int,
    gtid: int,
    trigger_word: int,
    clock10: int = 0,
    clock50: int = 0,
    subrun: int = 0,
    hits=None,
    subfields: bytes | Sequence[tuple[int, bytes]] = b"",
    mc: bool = False,
    esum_peak: int = 0,
    esum_diff: int = 0,
    esum_int: int = 0,
    error_flags: int = 0,
    cal_type: int = 0,
    orphan: bool = False,
) -> bytes:
    """Build one byte-exact PmtEventRecord (§4-§7).

    *hits* is a structured array or a mapping of equal-length arrays with any
    of the fields crate, card, channel, cell, qhs, qhl, qlx, tac, flags
    (``HIT_FLAG_NAMES`` bits) and gtid (default: the event GTID).  ADC and TAC
    values are the decoded 0..4095 values; the XOR 0x800 is applied here.
    *subfields* is either raw sub-field words (written as given) or
    ``(type, payload)`` pairs for ``pack_subfields``.  ``orphan=True`` writes
    all six MTC words as zero (§5) while the hits keep their GTID.
    """
    h = _hit_arrays(hits, gtid)
    nhit = len(h["gtid"])
    if nhit > 0xFFFF:
        raise ValueError(f"nhit={nhit} does not fit the 16-bit NPmtHit field")
    if not 0 <= subrun <= 0xFFFF:
        raise ValueError(f"subrun={subrun} does not fit 16 bits")
    if not isinstance(subfields, (bytes, bytearray, memoryview)):
        subfields = pack_subfields(subfields)
    if len(subfields) % 4:
        raise ValueError("subfields must be whole 32-bit words")
    calpck = (cal_type & 0xF) << 24
    if len(subfields):
        calpck |= SUBFIELD_BIT | (HEADER_WORDS - 4 + HIT_WORDS * nhit)  # §7: offset from word 4
    mtc = _mtc_words(clock10=clock10, clock50=clock50, gtid=gtid, trigger_word=trigger_word,
                     esum_peak=esum_peak, esum_diff=esum_diff, esum_int=esum_int,
                     error_flags=error_flags)
    if orphan:
        mtc = (0,) * 6
    header = struct.pack(
        ">11I",
        RECORD_TYPE_PMT << 25 | int(bool(mc)) << 24 | ZDAB_VERSION << 16 | DATA_TYPE,  # word 0
        run & 0xFFFFFFFF,  # word 1
        evnum & 0xFFFFFFFF,  # word 2
        subrun << 16 | nhit,  # word 3: DaqStatus (sub-run) | NPmtHit
        calpck,  # word 4
        *mtc,  # words 5-10
    )
    return header + _pack_hits(h) + bytes(subfields)


def encode_orphan(*, run: int, evnum: int, gtid: int, **kwargs) -> bytes:
    """An orphan: a record whose six MTC words are zero (§5); hits keep *gtid*."""
    kwargs.setdefault("trigger_word", 0)
    return encode_event(run=run, evnum=evnum, gtid=gtid, orphan=True, **kwargs)


def encode_batch(events: Mapping[str, object], hits: Mapping[str, object] | None = None):
    """Encode many records at once; return ``(buffer, offsets, lengths)``.

    The result is exactly the input of ``decode_buffer``: records back to back
    in one bytes buffer.  *events* maps per-event arrays: ``run, evnum, gtid,
    trigger_word, nhit`` (required), ``clock10, clock50, subrun, orphan, mc,
    cal_type`` (default 0/False).  *hits* maps per-hit arrays, events' hits
    back to back, as for ``encode_event`` (``gtid`` defaults to the event's).
    No sub-fields.  Fully vectorized: header words and hit words are
    scattered into one word array.
    """
    nhit = np.asarray(events["nhit"], np.int64)
    nev = len(nhit)
    if nev and (nhit.min() < 0 or nhit.max() > 0xFFFF):
        raise ValueError("nhit out of range 0..65535")

    def ev(name, default=0):
        value = events.get(name, default)
        return np.broadcast_to(np.asarray(value, np.uint64), (nev,)).astype(np.uint64)

    gtid, trig = ev("gtid"), ev("trigger_word")
    clock10, clock50, subrun = ev("clock10"), ev("clock50"), ev("subrun")
    if nev and (gtid.max() >> 24 or trig.max() >> NTRIGGERS or clock10.max() >> 53
                or clock50.max() >> 43 or subrun.max() >> 16):
        raise ValueError("an event field is out of range")
    header = np.zeros((nev, HEADER_WORDS), np.uint64)
    header[:, 0] = RECORD_TYPE_PMT << 25 | ZDAB_VERSION << 16 | DATA_TYPE | (ev("mc") & 1) << 24
    header[:, 1] = ev("run") & 0xFFFFFFFF
    header[:, 2] = ev("evnum") & 0xFFFFFFFF
    header[:, 3] = subrun << 16 | nhit.astype(np.uint64)
    header[:, 4] = (ev("cal_type") & 0xF) << 24
    mtc = header[:, 5:11]  # §5, as in _mtc_words
    mtc[:, 0] = clock10 & 0xFFFFFFFF
    mtc[:, 1] = clock10 >> 32 | (clock50 & 0x7FF) << 21
    mtc[:, 2] = clock50 >> 11
    mtc[:, 3] = gtid | (trig & 0xFF) << 24
    mtc[:, 4] = trig >> 8
    mtc[np.asarray(events.get("orphan", False), bool) & np.ones(nev, bool)] = 0
    sizes = HEADER_WORDS + HIT_WORDS * nhit
    starts = np.cumsum(sizes) - sizes
    out = np.empty(int(sizes.sum()), ">u4")
    out[(starts[:, None] + np.arange(HEADER_WORDS)).ravel()] = header.ravel()
    total = int(nhit.sum())
    if total:
        hit_fields = dict(hits or {})
        hit_fields.setdefault("gtid", np.repeat(gtid, nhit))
        h = _hit_arrays(hit_fields, 0)
        if len(h["gtid"]) != total:
            raise ValueError(f"{len(h['gtid'])} hits given, events need {total}")
        packed = np.frombuffer(_pack_hits(h), ">u4").reshape(total, HIT_WORDS)
        first = np.repeat(starts + HEADER_WORDS - HIT_WORDS * (np.cumsum(nhit) - nhit), nhit)
        first += HIT_WORDS * np.arange(total)
        for k in range(HIT_WORDS):
            out[first + k] = packed[:, k]
    return out.tobytes(), 4 * starts, 4 * sizes


# ---------------------------------------------------------------------------
# Batch decoding
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class EventBatch:
    """Decoded events and hits as numpy arrays (one row per event / per hit).

    Per event, stored: ``run, subrun, gtid, nhit, trigger`` (27-bit word,
    §5), ``orphan``, ``bad_hits`` (hits dropped for crate > 19),
    ``gtid_mismatch`` (hits whose GTID differs from the MTC GTID; always 0 for
    orphans, whose MTC GTID is zero) and ``valid_index`` (index in the input
    of each decoded record); computed from ``header`` on first use:
    ``evnum, clock10, clock50``.

    Per hit, stored: ``lcn, qhs, hit_gtid`` (what the monitoring aggregates);
    computed from ``hit_words`` on first use and cached: ``qhl, qlx, tac,
    cell, flags``, ``hit_event`` (row in the event arrays), ``crate, card,
    channel`` (from lcn) and ``hit_gtid_mismatch``.  Decoding only what is
    read keeps the decoder's passes over the hits to the few the pull
    workers need.  Hits of an event are contiguous and in record order.

    ``header`` holds the 11 native header words of each decoded record and
    ``hit_words`` the 3 big-endian words of each kept hit (§6).  ``errors``
    lists ``(input index, RecordError)`` for records that could not be
    decoded.  ``nhit`` is NPmtHit from the header, so ``nhit - bad_hits``
    hits of each event are kept (``hit_counts``).
    """

    run: np.ndarray
    subrun: np.ndarray
    gtid: np.ndarray
    nhit: np.ndarray
    trigger: np.ndarray
    orphan: np.ndarray
    bad_hits: np.ndarray
    gtid_mismatch: np.ndarray
    valid_index: np.ndarray
    lcn: np.ndarray
    qhs: np.ndarray
    hit_gtid: np.ndarray
    header: np.ndarray = field(default_factory=lambda: np.zeros((0, HEADER_WORDS), np.uint32))
    hit_words: np.ndarray = field(default_factory=lambda: np.zeros((0, HIT_WORDS), ">u4"))
    errors: list[tuple[int, RecordError]] = field(default_factory=list)

    @cached_property
    def evnum(self) -> np.ndarray:
        """EventNumber of each event (§4 word 2)."""
        return self.header[:, 2].copy()

    @cached_property
    def clock10(self) -> np.ndarray:
        """53-bit 10 MHz clock of each event (§5, M0 and M1 bits 0-20)."""
        m = self.header[:, 5:11]
        return m[:, 0].astype(np.uint64) | (m[:, 1].astype(np.uint64) & 0x1FFFFF) << np.uint64(32)

    @cached_property
    def clock50(self) -> np.ndarray:
        """43-bit 50 MHz clock of each event (§5, M1 bits 21-31 and M2)."""
        m = self.header[:, 5:11]
        return (m[:, 1] >> 21).astype(np.uint64) | m[:, 2].astype(np.uint64) << np.uint64(11)

    @cached_property
    def _adc_fields(self) -> dict[str, np.ndarray]:
        """qhl, qlx, tac, cell, flags of every kept hit, from ``hit_words`` (§6)."""
        h0, h1, h2 = (self.hit_words[:, k].astype(np.uint32) for k in range(HIT_WORDS))
        return {
            "qlx": ((h1 & 0xFFF) ^ ADC_XOR).astype(np.uint16),
            "cell": (h1 >> 12 & 0xF).astype(np.uint8),
            "qhl": ((h2 & 0xFFF) ^ ADC_XOR).astype(np.uint16),
            "tac": ((h2 >> 16 & 0xFFF) ^ ADC_XOR).astype(np.uint16),
            # H0 bits 30-31 -> flag bits 0-1, H1 bits 28-31 -> flag bits 2-5.
            "flags": (h0 >> 30 | (h1 >> 28) << 2).astype(np.uint8),
        }

    @property
    def qhl(self) -> np.ndarray:
        """QHL of each hit, 0..4095 (§6)."""
        return self._adc_fields["qhl"]

    @property
    def qlx(self) -> np.ndarray:
        """QLX of each hit, 0..4095 (§6)."""
        return self._adc_fields["qlx"]

    @property
    def tac(self) -> np.ndarray:
        """TAC of each hit, 0..4095 (§6)."""
        return self._adc_fields["tac"]

    @property
    def cell(self) -> np.ndarray:
        """CMOS cell of each hit, 0..15 (§6)."""
        return self._adc_fields["cell"]

    @property
    def flags(self) -> np.ndarray:
        """``HIT_FLAG_NAMES`` bits of each hit (§6)."""
        return self._adc_fields["flags"]

    def __len__(self) -> int:
        return len(self.gtid)

    @property
    def n_hits(self) -> int:
        """Number of decoded hits (bad-crate hits excluded)."""
        return len(self.lcn)

    @property
    def hit_counts(self) -> np.ndarray:
        """Hits kept per event: NPmtHit minus dropped bad-crate hits."""
        return self.nhit - self.bad_hits

    @cached_property
    def hit_starts(self) -> np.ndarray:
        """Index of the first kept hit of each event (int64); with ``hit_counts``, its hit range."""
        counts = self.hit_counts
        return np.cumsum(counts, dtype=np.int64) - counts

    @cached_property
    def hit_event(self) -> np.ndarray:
        """Event row of each hit (int32)."""
        return np.repeat(np.arange(len(self), dtype=np.int32), self.hit_counts)

    @cached_property
    def crate(self) -> np.ndarray:
        """Crate of each hit, 0..18 (§6)."""
        return (self.lcn >> 9).astype(np.uint8)

    @cached_property
    def card(self) -> np.ndarray:
        """Card (slot) of each hit, 0..15 (§6)."""
        return (self.lcn >> 5 & 0xF).astype(np.uint8)

    @cached_property
    def channel(self) -> np.ndarray:
        """Channel of each hit, 0..31 (§6)."""
        return (self.lcn & 0x1F).astype(np.uint8)

    @cached_property
    def hit_gtid_mismatch(self) -> np.ndarray:
        """Per hit: its GTID differs from the event's MTC GTID (never for orphans)."""
        expected = np.repeat(self.gtid, self.hit_counts)
        return (self.hit_gtid != expected) & ~np.repeat(self.orphan, self.hit_counts)

    @property
    def n_gtid_mismatch(self) -> int:
        """Number of hits whose GTID differs from their event's MTC GTID."""
        return int(self.gtid_mismatch.sum())

    def channel_counts(self) -> np.ndarray:
        """Hits per channel (length 10240, indexed by lcn)."""
        return np.bincount(self.lcn, minlength=NCHANNELS_TOTAL)

    def trigger_counts(self) -> np.ndarray:
        """Events with each of the 27 trigger bits set (index = bit, §5)."""
        as_bytes = self.trigger.astype("<u4").view(np.uint8).reshape(-1, 4)
        bits = np.unpackbits(as_bytes, axis=1, bitorder="little")  # bit i in column i
        return bits[:, :NTRIGGERS].sum(axis=0, dtype=np.int64)


_EVENT_DTYPES = {
    "run": np.uint32, "subrun": np.uint16, "gtid": np.uint32, "nhit": np.int32,
    "trigger": np.uint32, "orphan": np.bool_,
    "bad_hits": np.int32, "gtid_mismatch": np.int32, "valid_index": np.int64,
}
_HIT_DTYPES = {"lcn": np.uint16, "qhs": np.uint16, "hit_gtid": np.uint32}


def empty_batch() -> EventBatch:
    """An EventBatch with no events and no errors."""
    arrays = {k: np.zeros(0, t) for k, t in {**_EVENT_DTYPES, **_HIT_DTYPES}.items()}
    return EventBatch(**arrays)


def walk_subfields(buf, offset: int, nwords: int, nhit: int, word4: int) -> list[tuple[int, int]]:
    """Walk the sub-field headers of one record (§7) and return ``(type, length)``.

    *buf* holds the record at byte *offset*, *nwords* whole words long.
    Raises RecordError("bad_subfield") if the first header points into the
    header or hits, a length is zero, or a sub-field runs past the record.
    """
    if not word4 & SUBFIELD_BIT:
        return []
    pos = 4 + (word4 & OFFSET_MASK)  # §7: offset counted from word 4
    if pos < HEADER_WORDS + HIT_WORDS * nhit:
        raise RecordError("bad_subfield", f"first sub-field at word {pos} overlaps the hits")
    fields = []
    while True:
        if pos >= nwords:
            raise RecordError("bad_subfield", f"sub-field header at word {pos} is past the record end ({nwords} words)")
        (hdr,) = struct.unpack_from(">I", buf, offset + 4 * pos)
        length = hdr & OFFSET_MASK
        if length == 0 or pos + length > nwords:
            raise RecordError("bad_subfield", f"sub-field at word {pos} has bad length {length}")
        fields.append((hdr >> 24, length))
        pos += length
        if not hdr & SUBFIELD_BIT:
            return fields


def _as_bytes_buffer(buf) -> np.ndarray:
    """A 1-D uint8 view of any bytes-like *buf* (no copy)."""
    if isinstance(buf, np.ndarray):
        return buf.reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


class _Scratch(threading.local):
    """Per-thread temporary arrays reused from one decode to the next.

    Fresh memory costs a page fault per 4 kB on first touch, which on the
    monitoring hosts (VMs) costs more than decoding the hits in it, so the
    temporaries of ``decode_buffer`` (selected hit words, 16-bit columns) are
    kept and regrown as needed.  They never escape a call.
    """

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A C-contiguous array of *shape*, possibly holding stale values."""
        size = math.prod(shape)
        arr = self.arrays.get(name)
        if arr is None or arr.dtype != dtype or arr.size < size:
            grow = 0 if arr is None else arr.size + arr.size // 2
            arr = self.arrays[name] = np.empty(max(size, grow), dtype)
        return arr[:size].reshape(shape)

    def release(self) -> None:
        """Free the temporaries (they are rebuilt on the next decode)."""
        self.arrays.clear()


_SCRATCH = _Scratch()


def release_scratch() -> None:
    """Free this thread's decoding temporaries (e.g. after one huge batch)."""
    _SCRATCH.release()


def decode_events(records: Sequence) -> EventBatch:
    """Decode a sequence of PmtEventRecords (bytes, bytearray or memoryview).

    The records are joined into one buffer (each padded to a whole word so the
    next stays aligned) and handed to ``decode_buffer``; ``valid_index`` and
    the error indices refer to positions in *records*.
    """
    lengths = np.fromiter((memoryview(r).nbytes for r in records), np.int64, len(records))
    if not len(lengths):
        return empty_batch()
    parts = list(records)
    for i in np.flatnonzero(lengths % 4).tolist():
        parts[i] = bytes(parts[i]) + b"\0" * int(4 - lengths[i] % 4)
    padded = (lengths + 3) // 4 * 4
    offsets = np.concatenate(([0], np.cumsum(padded)[:-1]))
    return decode_buffer(b"".join(parts), offsets, lengths)


#: One record header (11 words) as a single item, for a one-pass header gather.
_HEADER_ITEM = np.dtype((np.void, HEADER_BYTES))


def _gather_headers(data: np.ndarray, first: np.ndarray) -> np.ndarray:
    """The 11 header words starting at word *first* of each record, native uint32 (n, 11).

    One gather of 44-byte items from an overlapping view of the buffer with
    a 4-byte stride (every word position is an item), then one byte-swapping
    copy: three times faster than gathering rows of 11 words.
    """
    n_items = len(data) // 4 - HEADER_WORDS + 1
    if n_items <= 0:
        return np.zeros((len(first), HEADER_WORDS), np.uint32)
    items = np.ndarray((n_items,), _HEADER_ITEM, buffer=data, strides=(4,))
    return items[first].view(">u4").reshape(len(first), HEADER_WORDS).astype(np.uint32)


@dataclass(eq=False)
class Headers:
    """The 11 header words (§4, §5) of a batch of records, read in one pass.

    ``words`` holds them as native uint32, one row per record (rows of
    records that do not hold them are zero); ``complete`` says which records
    lie inside the buffer and are at least the ``min_bytes`` asked for.  The
    properties decode the fields the pipeline reads before (or instead of)
    decoding the hits: the replay's pacing, the push's GTID bookkeeping and
    the GTIDs of records the decoder rejected.
    """

    words: np.ndarray
    complete: np.ndarray

    @property
    def run(self) -> np.ndarray:
        """Run number (§4 word 1)."""
        return self.words[:, 1]

    @property
    def nhit(self) -> np.ndarray:
        """NPmtHit (§4 word 3 bits 0-15)."""
        return self.words[:, 3] & 0xFFFF

    @property
    def gtid(self) -> np.ndarray:
        """The MTC GTID (§5 word M3 bits 0-23)."""
        return self.words[:, 8] & 0xFFFFFF

    @property
    def clock10(self) -> np.ndarray:
        """The 53-bit 10 MHz clock (§5 M0 and M1 bits 0-20) as int64."""
        return self.words[:, 5].astype(np.int64) | (self.words[:, 6] & 0x1FFFFF).astype(np.int64) << 32

    @property
    def has_mtc(self) -> np.ndarray:
        """False for orphans: all six MTC words (§5, header words 5-10) zero."""
        return self.words[:, 5:11].any(axis=1)


def read_headers(buf, offsets, lengths, min_bytes: int = HEADER_BYTES) -> Headers:
    """The header words of every record ``buf[offsets[i]:offsets[i]+lengths[i]]`` at once.

    The one PMT header reader of the pipeline: replay pacing
    (:func:`minard.dispatcher.replay.peek_many`, ``min_bytes=36`` as it reads
    words 1-8 only), the push's GTID of a batch (:func:`record_gtids`),
    aggregation (GTIDs of rejected records) and :func:`decode_buffer` read
    headers through it.  Word-aligned records (the rule) are gathered with
    :func:`_gather_headers`; others byte by byte.
    """
    data = _as_bytes_buffer(buf)
    offsets = np.asarray(offsets, np.int64).reshape(-1)
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    complete = (offsets >= 0) & (lengths >= min_bytes) & (offsets + lengths <= len(data))
    n = len(offsets)
    if not complete.any():
        return Headers(np.zeros((n, HEADER_WORDS), np.uint32), complete)
    every = bool(complete.all())
    if min_bytes < HEADER_BYTES and np.any(offsets[complete] + HEADER_BYTES > len(data)):
        data = np.concatenate([data, np.zeros(HEADER_BYTES, np.uint8)])  # a short record at the end
    if not np.any(offsets[complete] & 3):
        first = offsets // 4 if every else np.where(complete, offsets // 4, 0)
        words = _gather_headers(data, first)
    else:
        words = np.zeros((n, HEADER_WORDS), np.uint32)
        idx = offsets[complete][:, None] + np.arange(HEADER_BYTES)
        words[complete] = data[idx].view(">u4").astype(np.uint32)
    if not every:
        words[~complete] = 0
    return Headers(words, complete)


def record_gtids(buf, offsets, lengths, orphans: bool = True) -> np.ndarray:
    """Each record's GTID as the stream's GTID bookkeeping takes it; -1 for none.

    A triggered event gives its MTC GTID (§5 M3); with *orphans*, an orphan
    (MTC words zero) gives the GTID of its first hit (§6: H0 bits 0-15, H2
    bits 12-15 and 28-31) when it has one; a record too short for its header
    gives none.
    """
    offsets = np.asarray(offsets, np.int64).reshape(-1)
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    head = read_headers(buf, offsets, lengths)
    mtc = head.complete & head.has_mtc
    out = np.where(mtc, head.gtid.astype(np.int64), -1)
    if orphans:
        hit = head.complete & ~mtc & (head.nhit > 0) & (lengths >= HEADER_BYTES + 4 * HIT_WORDS)
        if hit.any():
            data = _as_bytes_buffer(buf)
            at = offsets[hit][:, None] + HEADER_BYTES + np.arange(4 * HIT_WORDS)
            h = data[at].view(">u4").astype(np.int64)
            h0, h2 = h[:, 0], h[:, 2]
            out[hit] = (h0 & 0xFFFF) | (h2 >> 12 & 0xF) << 16 | (h2 >> 28 & 0xF) << 20
    return out


def record_runs(buf, offsets, lengths) -> np.ndarray:
    """Each record's run number (§4 word 1) as int64; -1 for a record too short for its header.

    Goes with :func:`record_gtids`: GTID gaps are looked for only between
    records of the same run (a new run is a new GTID sequence for the books).
    """
    head = read_headers(buf, offsets, lengths)
    return np.where(head.complete, head.run.astype(np.int64), -1)


def _check_records(data: np.ndarray, offsets, lengths):
    """Validate record extents and headers; return (header words, error map).

    Vectorized over records, with one combined test for the usual batch where
    every record is good; the reasons are only worked out when one is not.
    Every offset is a multiple of 4.  Returns the 11 header words of each
    record as native uint32 (rows of short records are zero) and
    ``{index: RecordError}``.
    """
    head = read_headers(data, offsets, lengths)
    header, long_enough = head.words, head.complete
    nhit = (header[:, 3] & 0xFFFF).astype(np.int64)  # §4 word 3 bits 0-15
    fits = long_enough & (nhit <= MAX_NHIT) & (HEADER_BYTES + 12 * nhit <= lengths)
    if fits.all():
        return header, {}
    return header, _record_errors(offsets, lengths, len(data), long_enough, nhit)


def _record_errors(offsets, lengths, nbytes: int, long_enough, nhit) -> dict[int, RecordError]:
    """The RecordError of each record whose extent or NPmtHit is wrong (§4)."""
    errors: dict[int, RecordError] = {}
    in_bounds = (offsets >= 0) & (lengths >= 0) & (offsets + lengths <= nbytes)
    for i in np.flatnonzero(~in_bounds).tolist():
        errors[i] = RecordError("bad_offset", f"record {i} lies outside the buffer")
    for i in np.flatnonzero(in_bounds & ~long_enough).tolist():
        errors[i] = RecordError("truncated", f"record {i} has {lengths[i]} bytes, less than the 44-byte header")
    too_many = long_enough & (nhit > MAX_NHIT)
    for i in np.flatnonzero(too_many).tolist():
        errors[i] = RecordError("nhit_too_large", f"record {i} claims {nhit[i]} hits (> {MAX_NHIT})")
    short = long_enough & ~too_many & (HEADER_BYTES + 12 * nhit > lengths)
    for i in np.flatnonzero(short).tolist():
        errors[i] = RecordError("truncated", f"record {i}: {nhit[i]} hits do not fit in {lengths[i]} bytes")
    return errors


def _check_subfields(data, header, offsets, lengths, nhit, errors: dict) -> None:
    """Walk the sub-field chains of the records that have one (§7); add bad ones to *errors*."""
    with_subfields = header[:, 4] & SUBFIELD_BIT
    if not with_subfields.any():
        return
    for i in np.flatnonzero(with_subfields).tolist():
        if i not in errors:
            try:
                walk_subfields(data, int(offsets[i]), int(lengths[i]) // 4, int(nhit[i]), int(header[i, 4]))
            except RecordError as exc:
                errors[i] = exc


def decode_buffer(buf, offsets, lengths) -> EventBatch:
    """Decode records stored at byte ``offsets`` (``lengths`` bytes each) in *buf*.

    This is the hot path of the pull workers (see ``bench/decode.py`` and
    ``bench/pipeline.py``): header words are gathered in one pass, the hit
    words of all good records are selected with one boolean mask (built with
    ``np.repeat`` from the record extents), transposed into H0/H1/H2 rows,
    and the per-hit fields the monitoring aggregates (lcn, QHS, hit GTID)
    are whole-array operations writing in place; the other hit fields are
    decoded from the kept hit words only when read (see ``EventBatch``).
    Per-record Python work is limited to the sub-field header walk of records
    with CalPckType bit 23 and to building error objects.  Temporaries are
    reused between calls (per thread); the returned arrays are fresh.

    Rejected records (listed in ``errors``, reason in ``RecordError.reason``):

    * ``bad_offset``: the extent lies outside *buf*;
    * ``truncated``: shorter than the 44-byte header, or NPmtHit hits do not
      fit in the record;
    * ``nhit_too_large``: NPmtHit > 10240 (§4);
    * ``bad_subfield``: a corrupt sub-field chain (§7).

    Words after the hits and sub-fields are ignored; a length that is not a
    whole number of words loses its partial last word.

    **Hits with crate > 19** are *dropped and counted* in ``bad_hits`` rather
    than rejecting the event: one corrupt hit word must not hide an otherwise
    good event (its trigger, GTID and other hits), and such a hit cannot be
    mapped to one of the 10240 channels (crates 0-19: SNO+ data uses crate
    19, ZDAB_FORMAT.md section 6, H0).
    """
    data = _as_bytes_buffer(buf)
    offsets = np.asarray(offsets, np.int64).reshape(-1)
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    if len(offsets) != len(lengths):
        raise ValueError("offsets and lengths differ in length")
    if not len(offsets):
        return empty_batch()
    if np.any(offsets & 3) and np.any(offsets[_in_extent(offsets, lengths, len(data))] & 3):
        return _realigned(data, offsets, lengths, _in_extent(offsets, lengths, len(data)))
    header, errors = _check_records(data, offsets, lengths)
    nhit = (header[:, 3] & 0xFFFF).astype(np.int64)
    _check_subfields(data, header, offsets, lengths, nhit, errors)
    index = np.arange(len(offsets))
    if errors:
        good = np.ones(len(offsets), bool)
        good[list(errors)] = False
        index = np.flatnonzero(good)
        header, nhit = header[index], nhit[index]
    starts = offsets[index] // 4 + HEADER_WORDS
    ends = starts + HIT_WORDS * nhit
    if len(starts) > 1 and np.any(starts[1:] < ends[:-1]):
        # Hit regions overlap or are out of order: copy the records apart.
        return _realigned(data, offsets, lengths, _in_extent(offsets, lengths, len(data)))
    batch = _events_from_headers(header, index)
    _fill_hits(batch, np.frombuffer(data, ">u4", count=len(data) // 4), starts, ends, nhit)
    batch.errors = sorted(errors.items())
    return batch


def _in_extent(offsets, lengths, nbytes: int) -> np.ndarray:
    """Records whose byte extent lies inside a buffer of *nbytes*."""
    return (offsets >= 0) & (lengths >= 0) & (offsets + lengths <= nbytes)


def _realigned(data: np.ndarray, offsets, lengths, ok_extent) -> EventBatch:
    """Copy in-bounds records into a fresh aligned buffer and decode that.

    Used only for records at unaligned offsets or with overlapping hit
    regions; out-of-bounds records keep their place as bad_offset errors.
    """
    parts, new_off, new_len, pos = [], [], [], 0
    for i in range(len(offsets)):
        if ok_extent[i]:
            chunk = data[offsets[i]:offsets[i] + lengths[i]].tobytes()
            chunk += b"\0" * (-len(chunk) % 4)
            parts.append(chunk)
            new_off.append(pos)
            new_len.append(int(lengths[i]))
            pos += len(chunk)
        else:
            new_off.append(-1)
            new_len.append(0)
    return decode_buffer(b"".join(parts), new_off, new_len)


def _orphans(h: np.ndarray) -> np.ndarray:
    """Records whose six MTC words (header words 5-10) are all zero (§5).

    M3 holds the GTID, which is almost never zero, so one column settles most
    batches; the other five are only read when some M3 is zero.
    """
    orphan = h[:, 8] == 0
    if orphan.any():
        orphan &= (h[:, 5] | h[:, 6] | h[:, 7] | h[:, 9] | h[:, 10]) == 0
    return orphan


def _events_from_headers(h: np.ndarray, index: np.ndarray) -> EventBatch:
    """Per-event fields from the native header words of the good records (§4, §5)."""
    m3, m4 = h[:, 8], h[:, 9]
    return EventBatch(
        run=h[:, 1].copy(),
        subrun=(h[:, 3] >> 16).astype(np.uint16),
        gtid=m3 & 0xFFFFFF,
        nhit=(h[:, 3] & 0xFFFF).astype(np.int32),
        trigger=(m3 >> 24) | (m4 & 0x7FFFF) << 8,  # §5: 27-bit SNO+ trigger word
        orphan=_orphans(h),
        bad_hits=np.zeros(len(h), np.int32),
        gtid_mismatch=np.zeros(len(h), np.int32),
        valid_index=index.astype(np.int64, copy=False),
        **{k: np.zeros(0, t) for k, t in _HIT_DTYPES.items()},
        header=h,
    )


def _hit_mask(nwords: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Boolean mask over the buffer words selecting the [starts[i], ends[i]) runs.

    Built with one ``np.repeat`` of alternating False/True runs, much faster
    than a cumulative sum or an index gather.  Runs must be sorted, disjoint
    and non-empty in number.
    """
    runs = np.empty(2 * len(starts) + 1, np.int64)
    runs[0] = starts[0]
    runs[1:-1:2] = ends - starts  # hit words: selected
    runs[2:-1:2] = starts[1:] - ends[:-1]  # headers, sub-fields, gaps: not selected
    runs[-1] = nwords - ends[-1]
    pattern = np.zeros(len(runs), bool)
    pattern[1::2] = True
    return np.repeat(pattern, runs)


def _fill_hits(batch: EventBatch, words: np.ndarray, starts, ends, counts) -> None:
    """Decode the hits of the good records into *batch* (§6), vectorized.

    The hit words are selected with one boolean mask (kept, big-endian, as
    ``batch.hit_words``) and transposed into three contiguous native rows
    H0, H1, H2 with one casting copy (the fastest transpose numpy offers);
    lcn, QHS and the hit GTID are then whole-row operations.
    """
    total = int(counts.sum())
    if total == 0:
        return
    # Boolean indexing is the fastest numpy compaction (np.compress is 2-3x slower).
    raw = words[_hit_mask(len(words), starts, ends)].reshape(total, HIT_WORDS)
    rows = _SCRATCH.get("rows", np.uint32, (HIT_WORDS, total))
    np.copyto(rows, raw.T)  # big-endian (N, 3) -> native (3, N)
    lcn, qhs, hit_gtid = _hit_fields(total, *rows)
    if int(lcn.max()) >= NCHANNELS_TOTAL:  # a crate above 19
        bad = lcn >= NCHANNELS_TOTAL
        nev = len(batch.gtid)
        batch.bad_hits = np.bincount(np.repeat(np.arange(nev), counts)[bad], minlength=nev).astype(np.int32)
        keep = ~bad
        lcn, qhs, hit_gtid, raw = lcn[keep], qhs[keep], hit_gtid[keep], raw[keep]
    batch.lcn, batch.qhs, batch.hit_gtid, batch.hit_words = lcn, qhs, hit_gtid, raw
    batch.gtid_mismatch = _gtid_mismatch_counts(batch)


def _gtid_mismatch_counts(batch: EventBatch) -> np.ndarray:
    """Per event, the hits whose GTID differs from the MTC GTID (§6).

    The per-event minimum and maximum hit GTID (two ``reduceat`` passes)
    clear almost every batch at once; otherwise every hit is compared with its
    event's GTID in one vectorized pass.  Orphans count 0.
    """
    counts = batch.hit_counts
    out = np.zeros(len(counts), np.int32)
    rows = slice(None) if counts.all() else np.flatnonzero(counts)
    first_rows = batch.hit_starts[rows]
    if not len(first_rows):
        return out
    lo = np.minimum.reduceat(batch.hit_gtid, first_rows)
    hi = np.maximum.reduceat(batch.hit_gtid, first_rows)
    gtid = batch.gtid[rows]
    if not np.any(((lo != gtid) | (hi != gtid)) & ~batch.orphan[rows]):
        return out
    differs = (batch.hit_gtid != np.repeat(batch.gtid, counts)).astype(np.int32)
    out[rows] = np.add.reduceat(differs, first_rows)
    out[batch.orphan] = 0
    return out


def _hit_fields(n: int, h0: np.ndarray, h1: np.ndarray, h2: np.ndarray) -> tuple[np.ndarray, ...]:
    """(lcn, qhs, hit_gtid) of every hit from the native hit words H0, H1, H2 (§6).

    Every operation writes with ``out=`` into the outputs or into reused
    scratch rows; 32-bit words are narrowed to 16 bits by the first
    operation on them, so most work is on 16-bit rows.
    """
    lcn, qhs = np.empty((2, n), np.uint16)
    hit_gtid = np.empty(n, np.uint32)
    hi, tmp = _SCRATCH.get("tmp16", np.uint16, (2, n))
    wide = _SCRATCH.get("tmp32", np.uint32, (n,))
    unsafe = {"casting": "unsafe"}
    # H0 bits 16-31: channel 0-4, crate 5-9, card 10-13, CGT_ES16/24 14-15.
    np.right_shift(h0, 16, out=hi, **unsafe)
    # lcn = crate*512 + card*32 + channel = crate << 9 | card << 5 | channel.
    np.left_shift(hi, 4, out=lcn)
    np.bitwise_and(lcn, 0x3E00, out=lcn)  # crate << 9
    np.right_shift(hi, 5, out=tmp)
    np.bitwise_and(tmp, 0x1E0, out=tmp)  # card << 5
    np.bitwise_or(lcn, tmp, out=lcn)
    np.bitwise_and(hi, 0x1F, out=tmp)  # channel
    np.bitwise_or(lcn, tmp, out=lcn)
    # H1 bits 16-27: QHS; the value is the 12-bit field XOR 0x800 (§6).
    np.right_shift(h1, 16, out=qhs, **unsafe)
    np.bitwise_and(qhs, 0xFFF, out=qhs)
    np.bitwise_xor(qhs, ADC_XOR, out=qhs)
    # Hit GTID = H0 bits 0-15 | (H2 bits 12-15) << 16 | (H2 bits 28-31) << 20.
    np.bitwise_and(h0, 0xFFFF, out=hit_gtid)
    np.left_shift(h2, 4, out=wide)
    np.bitwise_and(wide, 0xF0000, out=wide)
    np.bitwise_or(hit_gtid, wide, out=hit_gtid)
    np.right_shift(h2, 8, out=wide)
    np.bitwise_and(wide, 0xF00000, out=wide)
    np.bitwise_or(hit_gtid, wide, out=hit_gtid)
    return lcn, qhs, hit_gtid


# ---------------------------------------------------------------------------
# Single-record decoding (for dump tools)
# ---------------------------------------------------------------------------


def decode_header(record) -> dict:
    """Decode the 11 header words of one record into a dict (§4, §5).

    Raises RecordError("truncated") if the record is shorter than 44 bytes.
    """
    if memoryview(record).nbytes < HEADER_BYTES:
        raise RecordError("truncated", "record shorter than the 44-byte header")
    w = struct.unpack_from(">11I", record, 0)
    m = w[5:11]
    trigger = (m[3] >> 24) | (m[4] & 0x7FFFF) << 8
    return {
        "record_type": w[0] >> 25,
        "mc": bool(w[0] >> 24 & 1),
        "version": w[0] >> 16 & 0xFF,
        "data_type": w[0] & 0xFFFF,
        "run": w[1],
        "subrun": w[3] >> 16,
        "evnum": w[2],
        "nhit": w[3] & 0xFFFF,
        "cal_type": w[4] >> 24 & 0xF,
        "gtid": m[3] & 0xFFFFFF,
        "trigger_word": trigger,
        "triggers": trigger_names(trigger),
        "clock10": m[0] | (m[1] & 0x1FFFFF) << 32,
        "clock50": m[1] >> 21 | m[2] << 11,
        "esum_peak": m[4] >> 19 & 0x3FF,
        "esum_diff": m[4] >> 29 | (m[5] & 0x7F) << 3,
        "esum_int": m[5] >> 7 & 0x3FF,
        "error_flags": m[5] >> 17 & 0xFFF,
        "orphan": not any(m),
    }


def decode_event(record) -> dict:
    """Decode one PmtEventRecord into a JSON-friendly dict.

    Keys: the header fields of ``decode_header`` plus ``hits`` (a list of
    ``[crate, card, channel, cell, qhs, qhl, qlx, tac]``), ``bad_hits``,
    ``gtid_mismatch`` (hit count) and ``subfields`` (``{type, length}``).
    Raises RecordError for a record ``decode_events`` would reject.
    """
    batch = decode_events([record])
    if batch.errors:
        raise batch.errors[0][1]
    out = decode_header(record)
    cols = (batch.crate, batch.card, batch.channel, batch.cell, batch.qhs, batch.qhl, batch.qlx, batch.tac)
    out["hits"] = np.column_stack(cols).tolist() if batch.n_hits else []
    out["bad_hits"] = int(batch.bad_hits[0])
    out["gtid_mismatch"] = batch.n_gtid_mismatch
    nbytes = memoryview(record).nbytes
    word4 = struct.unpack_from(">I", record, 16)[0]
    fields = walk_subfields(record, 0, nbytes // 4, out["nhit"], word4)
    out["subfields"] = [{"type": t, "length": n} for t, n in fields]
    return out


# ---------------------------------------------------------------------------
# Dispatch framing (§9)
# ---------------------------------------------------------------------------


def record_name(record_id: int) -> str:
    """The 4-character ASCII name of a record id (e.g. 0x504D5420 -> 'PMT ')."""
    return record_id.to_bytes(4, "big").decode("latin-1")


def pack_dispatch(record: bytes) -> bytes:
    """Frame a PmtEventRecord for the dispatch stream (§9, tag "RAWDATA").

    The generic header is 'PMT ', RecordLength = 44 (the header size only,
    as the reference sender writes it), 'PTK0'.
    """
    if memoryview(record).nbytes < HEADER_BYTES:
        raise ValueError("a PmtEventRecord has at least 44 bytes")
    return PMT_DISPATCH_HEADER + bytes(record)


def pack_rechdr(name: str, bank_words: bytes) -> bytes:
    """Frame another bank for the dispatch stream (§9, tag "RECHDR").

    RecordID is the bank name ('RHDR' is renamed 'RUN '), RecordLength the
    bank size in bytes.
    """
    if len(name) != 4 or not name.isascii():
        raise ValueError(f"bank name must be 4 ASCII characters, not {name!r}")
    if len(bank_words) % 4:
        raise ValueError("bank data must be whole 32-bit words")
    if name == "RHDR":
        name = "RUN "
    record_id = int.from_bytes(name.encode("ascii"), "big")
    return GENERIC_HEADER.pack(record_id, len(bank_words), PTK0) + bytes(bank_words)


def unpack_dispatch(payload) -> tuple[int, bytes]:
    """Split a dispatch message into ``(record id, record bytes)`` (§9).

    For 'PMT ' the record is everything after the 12-byte header (its size
    comes from the message, not RecordLength); for other ids it is the
    RecordLength bytes that follow.  Raises RecordError with reason
    "truncated" (too short), "bad_header" (id not 4 printable ASCII
    characters, version not 'PTK0', wrong RecordLength) or "bad_length".
    """
    view = memoryview(payload)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    size = view.nbytes
    if size < GENERIC_HEADER.size:
        raise RecordError("truncated", f"dispatch message of {size} bytes has no 12-byte header")
    record_id, length, version = GENERIC_HEADER.unpack_from(view, 0)
    name = record_id.to_bytes(4, "big")
    if not all(0x20 <= c < 0x7F for c in name):
        raise RecordError("bad_header", f"record id {record_id:#010x} is not an ASCII name")
    if version != PTK0:
        raise RecordError("bad_header", f"record version {version:#010x} is not 'PTK0'")
    body = bytes(view[GENERIC_HEADER.size:])
    if record_id == PMT_RECORD_ID:
        if length != HEADER_BYTES:
            raise RecordError("bad_header", f"'PMT ' RecordLength {length} is not 44")
        if len(body) < HEADER_BYTES:
            raise RecordError("truncated", f"'PMT ' record of {len(body)} bytes is shorter than 44")
        if len(body) % 4:
            raise RecordError("bad_length", f"'PMT ' record of {len(body)} bytes is not whole words")
        return record_id, body
    if length % 4:
        raise RecordError("bad_length", f"{name!r} RecordLength {length} is not whole words")
    if length > len(body):
        raise RecordError("truncated", f"{name!r} needs {length} bytes, message has {len(body)}")
    return record_id, body[:length]


def record_ids(payload, starts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The big-endian 32-bit word at each byte offset *starts* of *payload* (where *valid*).

    One gather of whole words when every offset is word-aligned (records
    are whole words, so this is the rule); a byte gather otherwise.  Entries
    that are not *valid* (records too short to hold a word) are 0.
    """
    out = np.zeros(len(starts), np.uint32)
    if not valid.any():
        return out
    if not np.any(starts & 3):
        words = np.frombuffer(payload, ">u4", count=len(payload) // 4)
        if valid.all():
            return words[starts >> 2]
        out[valid] = words[starts[valid] >> 2]
        return out
    data = np.frombuffer(payload, np.uint8)
    ids = data[starts[valid][:, None] + np.arange(4)].astype(np.uint32)
    out[valid] = ids[:, 0] << 24 | ids[:, 1] << 16 | ids[:, 2] << 8 | ids[:, 3]
    return out


#: Word of a dispatch record holding the run: after the 3-word generic header (§9), word 1 (§4).
_RUN_WORD = 3 + 1


def dispatch_runs(payload, sizes) -> dict[int, int]:
    """Records per run of the 'PMT ' dispatch records back to back in *payload*.

    *sizes* are the records' lengths (generic header included, §9).  The run
    is word 1 of the PmtEventRecord (§4), after the 12-byte generic header; a
    record that is not a 'PMT ' record or too short to hold the run is left
    out.  What the data plane attributes a batch's losses to (one vectorized
    header read, no loop over records).
    """
    sizes = np.asarray(sizes, np.int64).reshape(-1)
    data = _as_bytes_buffer(payload)
    if not len(sizes) or int(sizes.sum()) > len(data):
        return {}
    offsets = np.cumsum(sizes) - sizes
    ok = sizes >= GENERIC_HEADER.size + 8
    if not ok.any():
        return {}
    starts = offsets if ok.all() else offsets[ok]
    if not np.any(starts & 3) and len(data) % 4 == 0:  # word-aligned (the rule): two word gathers
        words = data.view(">u4")
        ids, runs = words[starts // 4], words[starts // 4 + _RUN_WORD]
    else:
        ids = data[starts[:, None] + np.arange(4)].view(">u4").reshape(-1)
        runs = data[starts[:, None] + (4 * _RUN_WORD + np.arange(4))].view(">u4").reshape(-1)
    runs = runs[ids == PMT_RECORD_ID]
    if len(runs) and runs.min() == runs.max():  # one run: the usual batch
        return {int(runs[0]): len(runs)}
    values, counts = np.unique(runs, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def split_dispatch(payload, offsets: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Offsets and lengths of the PmtEventRecords inside 'PMT ' dispatch records (§9).

    *offsets*/*lengths* locate the dispatch records in *payload* (a wire
    batch's, computed once when it was decoded); the result locates their
    PmtEventRecords and travels with the batch to :func:`decode_buffer` and
    the GTID bookkeeping.  Vectorized check of the 12-byte generic header
    (record id 'PMT '); records failing it are left out and counted by reason
    (``truncated``: shorter than the generic header, ``bad_header``: another
    record id).
    """
    inner = offsets + GENERIC_HEADER.size
    body = lengths - GENERIC_HEADER.size
    bad: dict[str, int] = {}
    short = body < 0
    wrong = ~short & (record_ids(payload, offsets, ~short) != PMT_RECORD_ID)
    if not (short.any() or wrong.any()):
        return inner, body, bad
    if wrong.any():
        bad["bad_header"] = int(wrong.sum())
    if short.any():
        bad["truncated"] = int(short.sum())
    keep = ~(short | wrong)
    return inner[keep], body[keep], bad
