"""The ORCA data stream: record framing, header plist, XL3 CMOS-rate and
PMT-base-current records, and CMOS rate computation.  Pure code, no sockets.

Every layout here is described in ``shared/formats/ORCA_FORMAT.md`` (cited as
"§n" below).  The parts:

* :class:`OrcaStreamParser` cuts a byte stream (a TCP socket or a run file) into
  :class:`Record` s, classifies them with the data ids read from the *header
  record* of the stream itself (data ids are never hard-coded: §3, §4.1), and
  recovers from bad input (see "Resynchronisation" in the class docstring).
* :func:`decode_cmos` / :func:`decode_base` decode many records at once with
  numpy into flat per-channel arrays (:class:`CmosBatch`, :class:`BaseBatch`).
* :class:`CmosRateState` turns successive CMOS counts into rates in Hz.
* ``encode_*`` and :func:`make_header_plist` write the same format, for the
  simulator, replays and tests.

Byte order (§2): integer words are in the ORCA machine's order, which the
parser learns from each header record; byte arrays (timestamp text, base
currents, busy flags) are never swapped.  A :class:`Record` remembers the order
of the stream it came from.
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import plistlib
import re
import struct
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from minard.formats.detector import NCARDS, NCHANNELS, NCHANNELS_TOTAL
from minard.formats.detector import (
    NCRATES_XL3 as NCRATES,  # XL3 crates 0-18 (ORCA_FORMAT.md)
)

# --------------------------------------------------------------------------
# Constants (§3–§6)
# --------------------------------------------------------------------------

#: §3: long form: id in bits 31..18 (bit 31 clear), length in bits 17..0.
LONG_ID_MASK = 0xFFFC0000
LONG_LENGTH_MASK = 0x0003FFFF
#: §3: short form: bit 31 set, id in bits 31..26, data in bits 25..0.
SHORT_ID_MASK = 0xFC000000
SHORT_DATA_MASK = 0x03FFFFFF
SHORT_BIT = 0x80000000
#: §3: the short id n=63 is never handed out (n counts 32..62).
INVALID_SHORT_ID = 0xFC000000

HEADER_ID = 0
#: §5 and §6: fixed record lengths in 32-bit words, word 0 included.
CMOS_WORDS = 283
BASE_WORDS = 282
#: §5: at most 8 cards (count blocks) per CMOS record.
CMOS_MAX_CARDS = 8
#: §5, §6: the timestamp text field is the last 6 words (24 bytes).
TIMESTAMP_BYTES = 24

#: The data ids of the 2012–2016 configuration (§3).  Only defaults for the
#: simulator and writers; the parser always takes ids from the header.
DEFAULT_CMOS_ID = 5 << 18
DEFAULT_BASE_ID = 4 << 18

#: Largest record the parser accepts, in words (configurable per parser).
DEFAULT_MAX_WORDS = 1 << 16
#: Largest header record: the whole 18-bit length field (1 MiB).
DEFAULT_MAX_HEADER_WORDS = LONG_LENGTH_MASK

CMOS_DECODER = "ORXL3DecoderForCmosRate"
BASE_DECODER = "ORXL3DecoderForPmtBaseCurrent"

#: §5 word indices of the CMOS record.
_C_CRATE, _C_SLOTS, _C_CHMASK, _C_DELAY, _C_ERR, _C_COUNTS = 1, 2, 3, 19, 20, 21
#: §6 word indices / byte offsets of the base-current record.
_B_CRATE, _B_SLOTS, _B_CHMASK, _B_ERR = 1, 2, 3, 19
_B_CURRENT_BYTE = 20 * 4
_B_BUSY_BYTE = 148 * 4

_U32 = {"little": struct.Struct("<I"), "big": struct.Struct(">I")}
_OTHER_ORDER = {"little": "big", "big": "little"}
_CHANNEL = np.arange(NCHANNELS, dtype=np.int64)
_CHANNEL_U32 = _CHANNEL.astype(np.uint32)


class OrcaError(ValueError):
    """Bad ORCA input.  ``reason`` is a short machine-readable tag (used as the
    key of the parser's error counters); ``offset`` is the stream byte offset
    when known."""

    def __init__(self, reason: str, message: str = "", offset: int | None = None):
        self.reason = reason
        self.offset = offset
        text = f"{reason}: {message}" if message else reason
        if offset is not None:
            text += f" (at byte {offset})"
        super().__init__(text)


class XL3Ids(NamedTuple):
    """The data ids of the two XL3 records consumers want (None = absent)."""

    cmos: int | None
    base: int | None


class RecordDescription(NamedTuple):
    """One entry of the header's ``dataDescription`` (§4.1)."""

    model: str
    name: str
    decoder: str
    data_id: int
    length: int
    variable: bool

    @property
    def fixed_length(self) -> int | None:
        """The record length every record of this id must have, if fixed."""
        return None if self.variable or self.length <= 0 else self.length


class Record(NamedTuple):
    """One framed record of the stream.

    ``raw`` is the whole record, word 0 included, in the stream's byte order
    ``byteorder``; ``offset`` is the byte offset of word 0 in the stream.
    ``kind`` is "header", "cmos", "base", "other" (another long record) or
    "short".  ``header`` is the parsed plist of a header record.
    """

    kind: str
    data_id: int
    raw: bytes
    offset: int
    byteorder: str = "little"
    header: dict | None = None

    @property
    def nwords(self) -> int:
        return len(self.raw) // 4

    @property
    def words(self) -> np.ndarray:
        """The record as native ``uint32`` words (byte arrays come out scrambled
        on a big-endian stream; use the decoders for those)."""
        dtype = "<u4" if self.byteorder == "little" else ">u4"
        usable = len(self.raw) - len(self.raw) % 4
        return np.frombuffer(self.raw[:usable], dtype=dtype).astype(np.uint32)

    @property
    def short_data(self) -> int:
        """The low 26 bits of a short record (§3)."""
        return _U32[self.byteorder].unpack_from(self.raw, 0)[0] & SHORT_DATA_MASK


# --------------------------------------------------------------------------
# Record header word (§3)
# --------------------------------------------------------------------------


def split_word(word: int) -> tuple[int, int, bool]:
    """Split a record's word 0 into ``(data_id, length_words, is_short)``.

    A short record (bit 31 set) is always 1 word long; its low 26 bits are
    data, not a length (§3).
    """
    word &= 0xFFFFFFFF
    if word & SHORT_BIT:
        return word & SHORT_ID_MASK, 1, True
    return word & LONG_ID_MASK, word & LONG_LENGTH_MASK, False


def detect_byteorder(head: bytes) -> str | None:
    """The byte order of a stream starting with a header record, or None.

    §2: word 0 of the header record is ``0 | length`` so its data id bits are
    zero in the writer's order; word 1 (the XML length) must fit the record and
    the XML must start at byte 8.
    """
    for order in ("little", "big"):
        if _header_geometry(head, 0, order, DEFAULT_MAX_HEADER_WORDS) is not None:
            return order
    return None


def sniff(head: bytes) -> bool:
    """True if *head* (the first bytes of a file) looks like an ORCA stream:
    a header record in either byte order, or a legacy bare ``<?xml`` header."""
    return head.startswith(b"<?xml") or detect_byteorder(head) is not None


def _header_geometry(buf, p: int, order: str, max_words: int) -> tuple[int, int] | None:
    """``(total_words, xml_bytes)`` if a plausible header record starts at *p*.

    §4: word 0 = ``0 | total_words``, word 1 = XML length n, XML from byte 8,
    then 1–4 NUL bytes.  We accept any n that fits (word 0 is what skips the
    record) but require the XML declaration so garbage is not taken for one.
    """
    if len(buf) - p < 13:
        return None
    w0, n = struct.unpack_from("<II" if order == "little" else ">II", buf, p)
    if w0 & LONG_ID_MASK:
        return None
    total = w0 & LONG_LENGTH_MASK
    if total < 3 or total > max_words or n < 5 or n + 8 > 4 * total:
        return None
    if bytes(buf[p + 8:p + 13]) != b"<?xml":
        return None
    return total, n


# --------------------------------------------------------------------------
# Header plist (§4, §4.1)
# --------------------------------------------------------------------------


def parse_plist(xml: bytes) -> dict:
    """Parse the header's XML property list into a dict, or raise OrcaError.

    plistlib uses expat without external entities, so hostile input cannot
    make it read files or the network.
    """
    xml = bytes(xml).rstrip(b"\0")
    try:
        value = plistlib.loads(xml, fmt=plistlib.FMT_XML)
    except Exception as exc:  # noqa: BLE001 - plistlib/expat raise many unrelated types
        raise OrcaError("bad_header_plist", f"{type(exc).__name__}: {exc}") from None
    if not isinstance(value, dict):
        raise OrcaError("bad_header_plist", "top level is not a <dict>")
    return value


def parse_header_record(raw: bytes, byteorder: str | None = None) -> dict:
    """Parse a whole header record (word 0 included) into its plist dict.

    §4: word 1 gives the XML length; the padding after it is ignored.
    """
    raw = bytes(raw)
    if byteorder is None:
        byteorder = detect_byteorder(raw)
        if byteorder is None:
            raise OrcaError("bad_header", "not a header record")
    if len(raw) < 8:
        raise OrcaError("bad_header", "shorter than 2 words")
    n = _U32[byteorder].unpack_from(raw, 4)[0]
    if n + 8 > len(raw):
        raise OrcaError("bad_header", f"XML length {n} exceeds the record")
    return parse_plist(raw[8:8 + n])


def _as_id(value: object) -> int | None:
    """A plist ``dataId`` as an unsigned 32-bit id (§4.1: may be negative)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value & 0xFFFFFFFF


def data_description(header: Mapping) -> dict[int, RecordDescription]:
    """All records described in ``header['dataDescription']``, keyed by id.

    §4.1: ``{model: {record: {decoder, dataId, variable, length}}}``.
    Malformed entries are ignored.
    """
    out: dict[int, RecordDescription] = {}
    desc = header.get("dataDescription") if isinstance(header, Mapping) else None
    if not isinstance(desc, Mapping):
        return out
    for model, records in desc.items():
        if not isinstance(records, Mapping):
            continue
        for name, entry in records.items():
            if not isinstance(entry, Mapping):
                continue
            data_id = _as_id(entry.get("dataId"))
            if data_id is None:
                continue
            length = entry.get("length", -1)
            length = length if isinstance(length, int) and not isinstance(length, bool) else -1
            out[data_id] = RecordDescription(
                str(model), str(name), str(entry.get("decoder", "")), data_id,
                length, bool(entry.get("variable", length <= 0)),
            )
    return out


def _lookup_id(desc: object, model: str, record: str) -> int | None:
    """``desc[model][record]['dataId']`` masked, or None if any step is missing."""
    entry = desc.get(model) if isinstance(desc, Mapping) else None
    entry = entry.get(record) if isinstance(entry, Mapping) else None
    return _as_id(entry.get("dataId")) if isinstance(entry, Mapping) else None


def _find_decoder_id(desc: object, decoder: str) -> int | None:
    """The data id of the first record of any model using *decoder*."""
    if not isinstance(desc, Mapping):
        return None
    for records in desc.values():
        if not isinstance(records, Mapping):
            continue
        for entry in records.values():
            if isinstance(entry, Mapping) and entry.get("decoder") == decoder:
                found = _as_id(entry.get("dataId"))
                if found is not None:
                    return found
    return None


def xl3_data_ids(header: Mapping) -> XL3Ids:
    """The CMOS-rate and base-current data ids announced by a header.

    §4.1: ``dataDescription/ORXL3Model/Xl3CmosRate/dataId`` and
    ``.../Xl3PmtBaseCurrent/dataId``; failing that, any model's record whose
    decoder is ``ORXL3DecoderForCmosRate`` / ``...ForPmtBaseCurrent``.
    """
    desc = header.get("dataDescription") if isinstance(header, Mapping) else None
    cmos = _lookup_id(desc, "ORXL3Model", "Xl3CmosRate")
    if cmos is None:
        cmos = _find_decoder_id(desc, CMOS_DECODER)
    base = _lookup_id(desc, "ORXL3Model", "Xl3PmtBaseCurrent")
    if base is None:
        base = _find_decoder_id(desc, BASE_DECODER)
    return XL3Ids(cmos, base)


# --------------------------------------------------------------------------
# Timestamps (§5: "YYYY-MM-DDTHH:MM:SS.ccZ", UTC, centiseconds)
# --------------------------------------------------------------------------

_TS_RE = re.compile(rb"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?Z?")
_EPOCH_ORDINAL = _dt.date(1970, 1, 1).toordinal()


@functools.lru_cache(maxsize=1024)
def parse_timestamp_us(text: bytes) -> int:
    """Unix time in integer microseconds of an ORCA timestamp field.

    The field is NUL-terminated text; anything after the first NUL is
    ignored.  Fractions of 1–6 digits and a missing ``Z`` are accepted.
    Integers keep Δt exact for rate computation.  Raises OrcaError.
    """
    text = bytes(text).split(b"\0", 1)[0].strip()
    m = _TS_RE.fullmatch(text)
    if m is None:
        raise OrcaError("bad_timestamp", f"unparsable timestamp {text[:32]!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    frac = m.group(7) or b""
    try:
        days = _dt.date(year, month, day).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        raise OrcaError("bad_timestamp", f"impossible date {text[:32]!r}") from None
    if hour > 23 or minute > 59 or second > 59:
        raise OrcaError("bad_timestamp", f"impossible time {text[:32]!r}")
    micros = int(frac.ljust(6, b"0")) if frac else 0
    return (((days * 24 + hour) * 60 + minute) * 60 + second) * 1_000_000 + micros


def parse_timestamp(text: bytes) -> float:
    """Unix time in float seconds of an ORCA timestamp field (see
    :func:`parse_timestamp_us`)."""
    return parse_timestamp_us(text) / 1e6


def format_timestamp_us(micros: int) -> bytes:
    """ORCA's timestamp text for a Unix time in microseconds, truncated to
    centiseconds (§5 says ORCA probably truncates)."""
    cs = micros // 10_000
    sec, frac = divmod(cs, 100)
    stamp = _dt.datetime.fromtimestamp(sec, tz=_dt.UTC)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{frac:02d}Z".encode("ascii")


def format_timestamp(t: float) -> bytes:
    """ORCA's timestamp text for float Unix seconds (truncated to centiseconds;
    a 1 µs tolerance absorbs float error so that parse∘format is exact)."""
    return format_timestamp_us(math.floor(t * 1e6 + 1.0) if t >= 0 else math.floor(t * 1e6))


# --------------------------------------------------------------------------
# Stream parser (§1, §3, §4, §7)
# --------------------------------------------------------------------------

_STRONG, _KNOWN, _UNKNOWN, _BAD = "strong", "known", "unknown", "bad"
_NEED = object()  # sentinel: more bytes are needed to decide
_BLANK = frozenset(b" \t\r\n\0")


class _Word(NamedTuple):
    """What the word at a record boundary announces."""

    status: str  # _STRONG, _KNOWN, _UNKNOWN or _BAD
    kind: str = ""
    data_id: int = 0
    nwords: int = 0
    order: str = "little"
    reason: str = ""


@dataclass
class ParserStats:
    """Counters of an :class:`OrcaStreamParser`."""

    bytes: int = 0
    records: Counter = field(default_factory=Counter)
    headers: int = 0
    skipped_unknown: int = 0
    errors: Counter = field(default_factory=Counter)
    resyncs: int = 0
    bytes_skipped: int = 0

    def as_dict(self) -> dict:
        """A JSON-able snapshot."""
        return {
            "bytes": self.bytes, "records": dict(self.records), "headers": self.headers,
            "skipped_unknown": self.skipped_unknown, "errors": dict(self.errors),
            "resyncs": self.resyncs, "bytes_skipped": self.bytes_skipped,
        }


class OrcaStreamParser:
    """Incremental parser: ``feed(bytes) -> [Record]``, ``close() -> [Record]``.

    Works on any chunking of the input (a TCP socket, a file read in blocks):
    partial records are kept until complete, and the records returned do not
    depend on where the chunks were cut.

    **Classification.**  Each header record (data id 0, §4), which may appear
    at any point (§1), resets the byte order (§2), the XL3 ids
    (:func:`xl3_data_ids`) and the table of described records
    (:func:`data_description`).  Before any header, the ids given to the
    constructor (default: none) are used and every long record is "other".
    Once a description is known, a record whose id it does not list is skipped
    by its length word as ORCA does (§3) and counted in
    ``stats.skipped_unknown``; it is not returned.

    **Bad input.**  A boundary word with length 0, length above ``max_words``,
    a length different from the described fixed length (CMOS 283, base 282 and
    every other fixed-length record), an id-0 word that is not a valid header,
    a short word with the never-assigned id 63, a header whose plist does not
    parse, or bytes left over at ``close()`` are errors: an :class:`OrcaError`
    is appended to ``errors`` (the last 100), passed to ``on_error``, and
    counted in ``stats.errors[reason]``.  Errors never raise.

    **Resynchronisation.**  After an error the parser scans forward *byte by
    byte* (so garbage of any length, not only whole words, is survived) for
    the first *strong* boundary: a header record (id-0 word, plausible XML
    length, ``<?xml`` at byte 8, in either byte order) or the exact word 0 of
    a fixed-length described record (``id | length``, e.g. the CMOS and base
    words).  Variable-length and short records after garbage are lost until
    then.  Counted in ``stats.resyncs`` and ``stats.bytes_skipped``.

    **Look-ahead** (``lookahead=True``, the default): a record is returned
    only once the 13 bytes after it are seen (or at ``close()``).  If they do
    not start a described record (bad or unknown id) and a strong boundary lies *inside* the
    record, the record was truncated and overrun by the next one: it is
    dropped ("truncated") and parsing resumes at that boundary, so the next
    record is not lost.  An unknown-id record with a strong boundary inside it
    is treated as garbage rather than skipped.  The cost is a latency of one
    record; ``lookahead=False`` returns records as soon as they are complete.
    """

    def __init__(
        self,
        *,
        byteorder: str = "little",
        ids: XL3Ids | None = None,
        max_words: int = DEFAULT_MAX_WORDS,
        max_header_words: int = DEFAULT_MAX_HEADER_WORDS,
        lookahead: bool = True,
        on_error: Callable[[OrcaError], None] | None = None,
    ):
        if byteorder not in _U32:
            raise ValueError(f"byteorder must be 'little' or 'big', not {byteorder!r}")
        self.byteorder = byteorder
        self._preset = ids if ids is not None else XL3Ids(None, None)
        self.ids = self._preset
        self.description: dict[int, RecordDescription] = {}
        self.header: dict | None = None
        self.max_words = max_words
        self.max_header_words = max_header_words
        self.lookahead = lookahead
        self.on_error = on_error
        self.stats = ParserStats()
        self.errors: deque[OrcaError] = deque(maxlen=100)
        self._buf = bytearray()
        self._pos = 0  # index in _buf of the next boundary (or resync scan point)
        self._base = 0  # stream offset of _buf[0]
        self._resync_from: int | None = None  # stream offset of the error being recovered
        self._legacy_scan: int | None = None
        self._legacy_end: int | None = None
        self._skip_blank = False
        self._order_unsure = False
        self._closed = False
        self._quiet = False  # release(): a record ending the buffer needs no follower
        self._rebuild()

    # -- public --------------------------------------------------------------

    def feed(self, data: bytes) -> list[Record]:
        """Add bytes from the stream; return the records completed by them."""
        if self._closed:
            raise OrcaError("closed", "feed() after close()")
        self.stats.bytes += len(data)
        self._buf += data
        return self._run(final=False)

    def release(self) -> list[Record]:
        """The stream went quiet: return the complete record held for the look-ahead.

        With look-ahead a record waits for the 13 bytes after it; when no more
        bytes come (ORCA has nothing to send), the reader calls this after a
        short pause so that the last reading is handed on instead of waiting
        for the next one.  A record that ends exactly where the bytes end is
        returned; a partial one keeps waiting.
        """
        if self._closed:
            return []
        self._quiet = True
        try:
            return self._run(final=False)
        finally:
            self._quiet = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a record or skipped."""
        return len(self._buf) - self._pos

    def close(self) -> list[Record]:
        """Signal the end of the stream: return the last records and report
        what is left over as "truncated"."""
        if self._closed:
            return []
        out = self._run(final=True)
        self._closed = True
        return out

    # -- state helpers ---------------------------------------------------------

    def _rebuild(self) -> None:
        """Recompute the expected lengths and the strong boundary words after
        the ids, description or byte order changed."""
        fixed = {i: d.fixed_length for i, d in self.description.items() if d.fixed_length}
        for data_id, length in ((self.ids.cmos, CMOS_WORDS), (self.ids.base, BASE_WORDS)):
            if data_id is not None and not data_id & SHORT_BIT and data_id not in fixed:
                fixed[data_id] = length
        self._fixed = {i: n for i, n in fixed.items() if i & LONG_ID_MASK and not i & SHORT_BIT}
        pack = _U32[self.byteorder].pack
        self._patterns = sorted({pack(i | n) for i, n in self._fixed.items() if n <= LONG_LENGTH_MASK})

    def _set_header(self, header: dict, order: str) -> None:
        """Adopt the ids, description and byte order of a new header (§1)."""
        self.header = header
        self.byteorder = order
        self.description = data_description(header)
        ids = xl3_data_ids(header)
        self.ids = ids if ids != (None, None) or self.description else self._preset
        self._rebuild()

    def _error(self, reason: str, index: int, message: str = "") -> None:
        err = OrcaError(reason, message, self._base + index)
        self.stats.errors[reason] += 1
        self.errors.append(err)
        if self.on_error is not None:
            self.on_error(err)

    def _start_resync(self, index: int) -> None:
        """Begin scanning for a strong boundary after an error at *index*."""
        self._resync_from = self._base + index
        self._pos = index + 1

    def _jump(self, index: int) -> None:
        """Resume normal parsing at the strong boundary *index*."""
        start = self._resync_from if self._resync_from is not None else self._base + self._pos
        self.stats.bytes_skipped += self._base + index - start
        self.stats.resyncs += 1
        self._resync_from = None
        self._pos = index

    def _compact(self) -> None:
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[:self._pos]
            self._base += self._pos
            for name in ("_legacy_scan", "_legacy_end"):
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, value - self._pos)
            self._pos = 0

    # -- main loop -------------------------------------------------------------

    def _run(self, final: bool) -> list[Record]:
        out: list[Record] = []
        while True:
            result = self._step(final)
            if result is _NEED:
                break
            if isinstance(result, Record):
                self.stats.records[result.kind] += 1
                out.append(result)
        if final:
            self._finish()
        self._compact()
        return out

    def _finish(self) -> None:
        """At close(): account for whatever could not be parsed."""
        rest = len(self._buf) - self._pos
        if self._resync_from is not None:
            self.stats.bytes_skipped += self._base + len(self._buf) - self._resync_from
            self._resync_from = None
        elif rest:
            self._error("truncated", self._pos, f"{rest} bytes left at end of stream")
            self.stats.bytes_skipped += rest
        self._pos = len(self._buf)

    def _step(self, final: bool):
        """Advance by one record, error or resync; return a Record, None
        (progress without a record) or _NEED."""
        if self._resync_from is not None:
            return self._resync(final)
        p = self._pos
        avail = len(self._buf) - p
        if avail == 0:
            return _NEED
        if self._base + p == 0 and self._legacy_end is None:
            head = bytes(self._buf[:5])
            if len(head) < 5 and b"<?xml".startswith(head) and not final:
                return _NEED
            if head == b"<?xml":
                return self._legacy(final)
        if self._skip_blank:
            return self._blank(final)
        word = self._classify(p, final)
        if word is None:
            return _NEED
        if word.status == _BAD:
            self._error(word.reason, p)
            self._start_resync(p)
            return None
        return self._take(p, word, final)

    def _take(self, p: int, word: _Word, final: bool):
        """Handle a plausible boundary word at *p*: wait for the record, check
        what follows, then return, skip or reject it."""
        end = p + 4 * word.nwords
        have = len(self._buf)
        if have < end and not final:
            if word.status == _UNKNOWN:
                inside = self._find_strong(p + 1, have, False)
                if isinstance(inside, int):
                    return self._garbage(p, inside)
            return _NEED
        if have < end:
            self._error("truncated", p, f"record of {word.nwords} words cut short")
            self._start_resync(p)
            return None
        if word.status == _UNKNOWN:
            inside = self._find_strong(p + 1, end, final)
            if inside is _NEED:
                return _NEED
            if inside is not None:
                return self._garbage(p, inside)
            self.stats.skipped_unknown += 1
            self._pos = end
            return None
        if word.kind == "header":
            return self._header_record(p, end, word.order)
        if self.lookahead:
            verdict = self._check_follower(p, end, final)
            if verdict is not True:
                return verdict
        self._pos = end
        return Record(word.kind, word.data_id, bytes(self._buf[p:end]), self._base + p, self.byteorder)

    def _check_follower(self, p: int, end: int, final: bool):
        """Look-ahead: True if the record at *p* may be returned, else the
        step result (_NEED, or None after dropping a truncated record)."""
        if (final or self._quiet) and end == len(self._buf):
            return True
        nxt = self._classify(end, final)
        if nxt is None:
            return _NEED
        if nxt.status in (_STRONG, _KNOWN):
            return True
        inside = self._find_strong(p + 1, end, final)
        if inside is _NEED:
            return _NEED
        if inside is None:
            return True  # the record is fine; garbage follows it
        self._error("truncated", p, "record overrun by the next record")
        self._resync_from = self._base + p
        self._jump(inside)
        return None

    def _garbage(self, p: int, inside: int):
        """An unknown-id word followed by a strong boundary inside its span."""
        self._error("garbage", p, "unknown id with a record boundary inside it")
        self._resync_from = self._base + p
        self._jump(inside)

    def _header_record(self, p: int, end: int, order: str):
        """Parse a complete header record and adopt it (§1, §4)."""
        raw = bytes(self._buf[p:end])
        self._pos = end
        try:
            header = parse_header_record(raw, order)
        except OrcaError as exc:
            self._error(exc.reason, p, str(exc))
            return None
        self._set_header(header, order)
        self.stats.headers += 1
        return Record("header", HEADER_ID, raw, self._base + p, order, header)

    # -- classification ---------------------------------------------------------

    def _classify(self, p: int, final: bool) -> _Word | None:
        """What the word at *p* announces, or None if more bytes are needed.

        Deterministic: it needs up to 13 bytes (for a header) and answers
        None rather than guess while they are missing, unless *final*.
        """
        buf = self._buf
        avail = len(buf) - p
        order = self.byteorder
        if avail < 4:
            return None if not final else _Word(_BAD, reason="truncated")
        w = _U32[order].unpack_from(buf, p)[0]
        ws = _U32[_OTHER_ORDER[order]].unpack_from(buf, p)[0]
        if not w & LONG_ID_MASK or not ws & LONG_ID_MASK:
            if avail < 13 and not final:
                return None
            for o in (order, _OTHER_ORDER[order]):
                geo = _header_geometry(buf, p, o, self.max_header_words)
                if geo is not None:
                    return _Word(_STRONG, "header", HEADER_ID, geo[0], o)
            if not w & LONG_ID_MASK:
                return _Word(_BAD, reason="zero_length" if w == 0 else "bad_header")
        if self._order_unsure:
            w = self._settle_order(p, w, ws)
        return self._classify_word(w)

    def _classify_word(self, w: int) -> _Word:
        """Classify a non-header boundary word in the current byte order."""
        if w & SHORT_BIT:
            data_id = w & SHORT_ID_MASK
            if data_id == INVALID_SHORT_ID:
                return _Word(_BAD, reason="bad_short_id")
            if self.description and data_id not in self.description:
                return _Word(_UNKNOWN, "short", data_id, 1, self.byteorder)
            return _Word(_KNOWN, "short", data_id, 1, self.byteorder)
        data_id, length = w & LONG_ID_MASK, w & LONG_LENGTH_MASK
        if length == 0:
            return _Word(_BAD, reason="zero_length")
        expected = self._fixed.get(data_id)
        if expected is not None and length != expected:
            return _Word(_BAD, reason="length_mismatch")
        if length > self.max_words:
            return _Word(_BAD, reason="too_long")
        kind = "cmos" if data_id == self.ids.cmos else "base" if data_id == self.ids.base else "other"
        if expected is not None:
            status = _STRONG
        elif not self.description or data_id in self.description:
            status = _KNOWN
        else:
            status = _UNKNOWN
        return _Word(status, kind, data_id, length, self.byteorder)

    def _settle_order(self, p: int, w: int, ws: int) -> int:
        """After a legacy header (no header word to tell the byte order),
        pick the order in which the first record word makes sense."""
        self._order_unsure = False
        if self._classify_word(w).status in (_STRONG, _KNOWN):
            return w
        other = _OTHER_ORDER[self.byteorder]
        saved = self.byteorder
        self.byteorder = other
        self._rebuild()
        if self._classify_word(ws).status in (_STRONG, _KNOWN):
            return ws
        self.byteorder = saved
        self._rebuild()
        return w

    # -- resynchronisation -------------------------------------------------------

    def _find_strong(self, start: int, stop: int, final: bool):
        """Index of the first strong boundary in ``[start, stop)``, None if
        there is none, or _NEED if the bytes needed to decide are missing.

        A candidate at c needs bytes up to c+13; a match is only accepted when
        every earlier candidate could be decided, so the answer never depends
        on how the input was chunked.
        """
        buf = self._buf
        limit = min(stop, len(buf) if final else len(buf) - 12)
        best = None
        if limit > start:
            for pat in self._patterns:
                c = buf.find(pat, start, limit + 3)
                if c != -1 and (best is None or c < best):
                    best = c
            bound = best if best is not None else limit
            h = buf.find(b"<?xml", start + 8, bound + 12)
            while h != -1:
                c = h - 8
                if any(_header_geometry(buf, c, o, self.max_header_words) for o in _U32):
                    best = c
                    break
                h = buf.find(b"<?xml", h + 1, bound + 12)
        if best is not None:
            return best
        return None if final or limit >= stop else _NEED

    def _resync(self, final: bool):
        """Scan for the next strong boundary after an error."""
        found = self._find_strong(self._pos, len(self._buf), final)
        if isinstance(found, int):
            self._jump(found)
            return None
        if final:
            return _NEED  # _finish() accounts for the rest
        self._pos = max(self._pos, len(self._buf) - 12)
        return _NEED

    # -- legacy bare header (§4) -------------------------------------------------

    def _legacy(self, final: bool):
        """A file starting with the XML itself, from before the header was
        wrapped in a record (§4).  The records follow at the next word
        boundary after ``</plist>``, possibly after blank words."""
        buf = self._buf
        scan = self._legacy_scan or 0
        e = buf.find(b"</plist>", scan)
        if e == -1:
            if len(buf) > 4 * self.max_header_words:
                self._error("bad_header", 0, "legacy header too long")
                self._legacy_end = 0
                self._start_resync(0)
                return None
            if final:
                self._legacy_end = 0
                self._error("truncated", 0, "legacy header without </plist>")
                self._start_resync(0)
                return None
            self._legacy_scan = max(0, len(buf) - 8)
            return _NEED
        end = e + 8
        aligned = (end + 3) // 4 * 4
        if aligned > len(buf) and not final:
            return _NEED
        aligned = min(aligned, len(buf))
        self._legacy_end = aligned
        raw = bytes(buf[:end])
        self._pos = aligned
        try:
            header = parse_plist(raw)
        except OrcaError as exc:
            self._error(exc.reason, 0, str(exc))
            return None
        self._set_header(header, self.byteorder)
        self._skip_blank = True
        self._order_unsure = True
        self.stats.headers += 1
        return Record("header", HEADER_ID, raw, self._base, self.byteorder, header)

    def _blank(self, final: bool):
        """Skip whole words of whitespace/NUL after a legacy header."""
        p = self._pos
        if len(self._buf) - p < 4:
            if final:
                self._skip_blank = False
                return None
            return _NEED
        if set(self._buf[p:p + 4]) <= _BLANK:
            self._pos = p + 4
        else:
            self._skip_blank = False
        return None


def iter_records(chunks: Iterable[bytes], **parser_options) -> Iterator[Record]:
    """Parse an iterable of byte chunks into records (see OrcaStreamParser)."""
    parser = OrcaStreamParser(**parser_options)
    for chunk in chunks:
        yield from parser.feed(chunk)
    yield from parser.close()


def read_file(path, chunk_size: int = 1 << 20, **parser_options) -> Iterator[Record]:
    """The records of an ORCA run file (parser options as OrcaStreamParser)."""

    def chunks():
        with open(path, "rb") as fh:
            while block := fh.read(chunk_size):
                yield block

    return iter_records(chunks(), **parser_options)


# --------------------------------------------------------------------------
# Vectorised decoders (§5, §6)
# --------------------------------------------------------------------------


@dataclass
class CmosBatch:
    """CMOS records decoded together.  Per good record (length R): ``index``
    (position in the input), ``crate``, ``slot_mask``, ``channel_masks``
    (R×16), ``delay``, ``error_flags``, ``time_us`` (int Unix µs) and
    ``timestamp`` (float Unix s).  Per channel of every card in the slot mask
    (length C): ``record`` (row in the per-record arrays), ``lcn``
    (crate*512 + card*32 + channel), ``count`` (low 31 bits), ``flagged``
    (bit 31: count not valid) and ``masked`` (channel-mask bit is 0).
    Per card (length C/32; channel entries come as whole cards): ``card``
    (crate*16 + slot, so lcn = card*32 + channel) and ``card_record`` (its
    row in the per-record arrays; ``record`` gives the same per channel).
    ``errors`` lists ``(input position, OrcaError)`` of rejected records."""

    index: np.ndarray
    crate: np.ndarray
    slot_mask: np.ndarray
    channel_masks: np.ndarray
    delay: np.ndarray
    error_flags: np.ndarray
    time_us: np.ndarray
    timestamp: np.ndarray
    lcn: np.ndarray
    count: np.ndarray
    flagged: np.ndarray
    masked: np.ndarray
    card: np.ndarray
    card_record: np.ndarray
    errors: list = field(default_factory=list)

    @property
    def record(self) -> np.ndarray:
        """Per channel: its row in the per-record arrays (computed on use)."""
        return np.repeat(self.card_record, NCHANNELS)

    @property
    def channel_time_us(self) -> np.ndarray:
        """The reading time of every channel entry (µs)."""
        return np.repeat(self.time_us[self.card_record], NCHANNELS)


@dataclass
class BaseBatch:
    """Base-current records decoded together.  Per good record: ``index``,
    ``crate``, ``slot_mask``, ``channel_masks``, ``error_flags``, ``time_us``,
    ``timestamp``.  Per channel of every slot in the slot mask: ``record``,
    ``lcn``, ``current`` (byte − 127, int16), ``busy`` (busy byte non-zero)
    and ``masked``.  ``errors`` as in :class:`CmosBatch`."""

    index: np.ndarray
    crate: np.ndarray
    slot_mask: np.ndarray
    channel_masks: np.ndarray
    error_flags: np.ndarray
    time_us: np.ndarray
    timestamp: np.ndarray
    record: np.ndarray
    lcn: np.ndarray
    current: np.ndarray
    busy: np.ndarray
    masked: np.ndarray
    errors: list = field(default_factory=list)


def _stack(records: Sequence, nwords: int, byteorder: str):
    """Stack records of *nwords* words into ``(index, u8 rows, uint32 rows,
    timestamp texts, errors)``.  Integer words are read in each record's byte
    order; the ``u8`` rows keep the bytes as they are for the byte arrays, and
    the texts are each record's last 24 bytes (§2)."""
    nbytes = 4 * nwords
    raws, big, index, errors = _split_records(records, nbytes, byteorder)
    joined = b"".join(raws)
    u8 = np.frombuffer(joined, dtype=np.uint8).reshape(len(raws), nbytes)
    if True not in big:
        words = np.frombuffer(joined, dtype="<u4").reshape(len(raws), nwords).astype(np.uint32, copy=False)
    else:
        big_rows = np.array(big, dtype=bool)
        words = np.empty((len(raws), nwords), dtype=np.uint32)
        words[~big_rows] = u8[~big_rows].view("<u4")
        words[big_rows] = u8[big_rows].view(">u4")
    return index, u8, words, [raw[-TIMESTAMP_BYTES:] for raw in raws], errors


def _split_records(records: Sequence, nbytes: int, byteorder: str):
    """``(raw bytes, is-big-endian flags, input positions, errors)`` of the
    records of the right size; the others become errors."""
    if set(map(type, records)) == {bytes} and set(map(len, records)) == {nbytes} and byteorder in _U32:
        n = len(records)  # fast path: raw records as received from a queue (checked in C)
        return list(records), [byteorder == "big"] * n, np.arange(n, dtype=np.int64), []
    raws, big, index, errors = [], [], [], []
    for i, rec in enumerate(records):
        if isinstance(rec, Record):
            raw, order = rec.raw, rec.byteorder
        elif isinstance(rec, (bytes, bytearray, memoryview)):
            raw, order = bytes(rec), byteorder
        else:
            errors.append((i, OrcaError("bad_type", f"not a record: {type(rec).__name__}")))
            continue
        if order not in _U32:
            errors.append((i, OrcaError("bad_type", f"unknown byte order {order!r}")))
        elif len(raw) != nbytes:
            errors.append((i, OrcaError("bad_length", f"{len(raw)} bytes, expected {nbytes}")))
        else:
            raws.append(raw)
            index.append(i)
            big.append(order == "big")
    return raws, big, np.array(index, dtype=np.int64), errors


#: Words 0-2 of both XL3 records (§5, §6): length, crate, slot mask; a
#: record is good if ``(word & _HEAD_MASK) - lowest < span`` (unsigned) for all three.
_HEAD_MASK = np.array([LONG_LENGTH_MASK, 0xFFFFFFFF, 0xFFFFFFFF], dtype=np.uint32)
_HEAD_SPAN = np.array([1, NCRATES, 0x10000], dtype=np.uint32)


def _check_common(words, texts: list[bytes], nwords: int):
    """Per-record checks shared by both decoders; returns ``(reasons, time_us)``
    where reasons[r] is None for a good record.  A handful of numpy calls
    whatever the number of records (each call costs microseconds)."""
    n = len(words)
    reasons: list[tuple[str, str] | None] = [None] * n
    head = words[:, :3] & _HEAD_MASK
    head[:, 0] -= np.uint32(nwords)  # wraps: anything but nwords is >= 1
    bad = head >= _HEAD_SPAN
    if bad.any():
        for r in np.flatnonzero(bad.any(axis=1)).tolist():
            length, crate, slots = int(words[r, 0]) & LONG_LENGTH_MASK, int(words[r, 1]), int(words[r, 2])
            if length != nwords:
                reasons[r] = ("bad_length", f"length word says {length}, expected {nwords}")
            elif crate >= NCRATES:
                reasons[r] = ("bad_crate", f"crate {crate}")
            else:
                reasons[r] = ("bad_slot_mask", f"slot mask {slots:#x}")
    # The parser is cached, and the records of one poll share their text.
    parsed = {text: _try_timestamp(text) for text in set(texts)}
    if all(type(v) is int for v in parsed.values()):
        if len(parsed) == 1:
            return reasons, np.full(n, next(iter(parsed.values())), dtype=np.int64)
        return reasons, np.fromiter(map(parsed.__getitem__, texts), dtype=np.int64, count=n)
    time_us = np.zeros(n, dtype=np.int64)
    for r, text in enumerate(texts):
        value = parsed[text]
        if type(value) is int:
            time_us[r] = value
        elif reasons[r] is None:
            reasons[r] = (value.reason, str(value))
    return reasons, time_us


def _try_timestamp(text: bytes) -> int | OrcaError:
    """parse_timestamp_us, returning the error instead of raising it."""
    try:
        return parse_timestamp_us(text)
    except OrcaError as exc:
        return exc


def _slot_bits(slot_mask: np.ndarray) -> np.ndarray:
    """(R, 16) bool: bit s of each slot mask (only the low 16 bits are used)."""
    as_bytes = np.ascontiguousarray(slot_mask, dtype="<u4").view(np.uint8).reshape(-1, 4)[:, :2]
    return np.unpackbits(as_bytes, axis=1, bitorder="little").view(bool)


def _masked_bits(mask_words: np.ndarray) -> np.ndarray:
    """Flat bool, True where bit ch of a channel-mask word is 0 (channel
    masked), ch = 0..31 in order for each word."""
    as_bytes = np.ascontiguousarray(~mask_words, dtype="<u4").view(np.uint8)
    return np.unpackbits(as_bytes, bitorder="little").view(bool)


def _good(reasons: list) -> np.ndarray:
    """Bool per record: not rejected (the usual all-good case without a loop)."""
    if reasons.count(None) == len(reasons):
        return np.ones(len(reasons), dtype=bool)
    return np.array([why is None for why in reasons], dtype=bool)


def _errors_list(index, reasons, earlier):
    """Merge the per-record rejections with the stacking errors, by position."""
    if not earlier and reasons.count(None) == len(reasons):
        return []
    errs = list(earlier)
    errs += [(int(index[r]), OrcaError(*why)) for r, why in enumerate(reasons) if why is not None]
    return sorted(errs, key=lambda item: item[0])


def _keep(good: np.ndarray, *arrays):
    """The rows of *arrays* where *good* (no copy when all are good)."""
    return arrays if good.all() else tuple(a[good] for a in arrays)


def decode_cmos(records: Sequence, byteorder: str = "little") -> CmosBatch:
    """Decode CMOS-rate records (Record objects, or raw bytes in *byteorder*)
    into a :class:`CmosBatch`, without a loop over channels.

    §5: counts are PACKED: block i (32 words from w[21]) belongs to the i-th
    set bit of the slot mask, ascending; blocks past the last card are
    ignored.  Channel masks are indexed by absolute slot.  Records with a bad
    length, crate ≥ 19, a slot mask above 16 bits or with more than 8 cards,
    or an unparsable timestamp go to ``errors``.

    Speed: a readout is ~10k channels but each numpy call costs microseconds,
    so what depends only on the records' header words (which cards, their
    channel numbers and masks: :class:`_CmosLayout`) is computed once per
    detector configuration and reused; per call there remain the checks, the
    timestamps and the counts.  The per-card and per-channel arrays of the
    layout are shared between batches and read-only.
    """
    index, _, words, texts, errors = _stack(records, CMOS_WORDS, byteorder)
    reasons, time_us = _check_common(words, texts, CMOS_WORDS)
    lay = _cmos_layout(words, reasons)
    for r, why in lay.too_many:
        reasons[r] = why
    raw = _count_words(words, lay)
    kept = (index, words, time_us) if lay.rows is None else (index[lay.rows], words[lay.rows], time_us[lay.rows])
    return CmosBatch(
        index=kept[0], crate=lay.crate, slot_mask=lay.slot_mask, channel_masks=lay.channel_masks,
        delay=kept[1][:, _C_DELAY], error_flags=kept[1][:, _C_ERR], time_us=kept[2], timestamp=kept[2] / 1e6,
        lcn=lay.lcn, count=(raw & 0x7FFFFFFF).astype(np.int64), flagged=raw.view(np.int32) < 0,
        masked=lay.masked, card=lay.card, card_record=lay.card_record,
        errors=_errors_list(index, reasons, errors),
    )


class _CmosLayout(NamedTuple):
    """What decoding CMOS records takes from their header words alone (crate,
    slot mask, channel masks) and from the rows the common checks rejected.

    ``rows``: the records kept (None: all); ``too_many``: ``(row, reason)``
    of the records with more than 8 cards; per kept record ``crate``,
    ``slot_mask``, ``channel_masks``; per card ``card_record`` and ``card``;
    per channel ``lcn`` and ``masked``; ``blocks``: ``(row, block)`` of each
    card's count block, or None when every record is kept and holds 8 cards
    (the usual half-crate record), so that the counts are all the blocks.
    """

    rows: np.ndarray | None
    too_many: list
    crate: np.ndarray
    slot_mask: np.ndarray
    channel_masks: np.ndarray
    card_record: np.ndarray
    card: np.ndarray
    lcn: np.ndarray
    masked: np.ndarray
    blocks: tuple[np.ndarray, np.ndarray] | None


#: Recently used CMOS layouts: a detector configuration gives the same layout
#: every readout (a consumer's batches, cut by size and time, a few more).
_LAYOUTS: OrderedDict[tuple, _CmosLayout] = OrderedDict()
_LAYOUTS_MAX = 32


def _cmos_layout(words: np.ndarray, reasons: list) -> _CmosLayout:
    """The layout of these records, from a small LRU cache keyed by their
    header words 1-18 (crate, slot mask, channel masks: all a layout depends
    on) and the rows already rejected."""
    rejected = () if reasons.count(None) == len(reasons) else \
        tuple(r for r, why in enumerate(reasons) if why is not None)
    key = (words[:, _C_CRATE:_C_CHMASK + NCARDS].tobytes(), rejected)
    lay = _LAYOUTS.get(key)
    if lay is None:
        lay = _LAYOUTS[key] = _make_cmos_layout(words, rejected)
        if len(_LAYOUTS) > _LAYOUTS_MAX:
            _LAYOUTS.popitem(last=False)
    else:
        _LAYOUTS.move_to_end(key)
    return lay


def _make_cmos_layout(words: np.ndarray, rejected: tuple) -> _CmosLayout:
    """Compute a :class:`_CmosLayout` (§5: card k of a record is the k-th set
    bit of its slot mask, ascending, and owns count block k)."""
    n = len(words)
    bits = _slot_bits(words[:, _C_SLOTS])
    ncards = bits.sum(axis=1)
    too_many = [(r, ("too_many_cards", f"{int(ncards[r])} cards in slot mask {int(words[r, _C_SLOTS]):#x}"))
                for r in np.flatnonzero(ncards > CMOS_MAX_CARDS).tolist() if r not in rejected]
    keep = np.ones(n, dtype=bool)
    keep[[*rejected, *(r for r, _ in too_many)]] = False
    rows = np.flatnonzero(keep)
    bits, ncards = bits[rows], ncards[rows]
    crate = words[rows, _C_CRATE].astype(np.int64)
    chmasks = words[rows, _C_CHMASK:_C_CHMASK + NCARDS]
    rr, ss = np.nonzero(bits)  # row-major: ascending slot within each record
    card = crate[rr] * NCARDS + ss
    full = len(rows) == n and bool((ncards == CMOS_MAX_CARDS).all())
    blocks = None if full else (rows[rr], np.arange(len(rr)) - (np.cumsum(ncards) - ncards)[rr])
    lay = _CmosLayout(None if len(rows) == n else rows, too_many, crate, words[rows, _C_SLOTS], chmasks,
                      rr, card, _card_channels(card), _masked_bits(chmasks[rr, ss]), blocks)
    for array in (lay.rows, lay.crate, lay.slot_mask, lay.channel_masks, lay.card_record, lay.card,
                  lay.lcn, lay.masked, *(blocks or ())):
        if array is not None:
            array.flags.writeable = False  # shared by every batch of this layout
    return lay


def _count_words(words: np.ndarray, lay: _CmosLayout) -> np.ndarray:
    """The raw count words of every card of *lay*, flat (32 per card): all
    blocks in one copy when every record is full, else one row gather."""
    counts = words[:, _C_COUNTS:_C_COUNTS + CMOS_MAX_CARDS * NCHANNELS]
    if lay.blocks is None:
        return counts.ravel()
    row, block = lay.blocks
    return counts.reshape(len(words), CMOS_MAX_CARDS, NCHANNELS)[row, block].ravel()


#: Channel numbers 0..31 repeated card after card (a whole detector), grown on demand.
_TILE = {"channels": np.tile(_CHANNEL, NCARDS * NCRATES)}


def _card_channels(card: np.ndarray) -> np.ndarray:
    """``card*32 + channel`` for channels 0..31 of each card, flat."""
    n = len(card) * NCHANNELS
    tile = _TILE["channels"]
    if len(tile) < n:
        tile = _TILE["channels"] = np.tile(_CHANNEL, 2 * len(card))
    lcn = np.repeat(card * NCHANNELS, NCHANNELS)
    lcn += tile[:n]
    return lcn


def decode_base(records: Sequence, byteorder: str = "little") -> BaseBatch:
    """Decode PMT base-current records into a :class:`BaseBatch`.

    §6: current and busy bytes are UNPACKED: byte ``slot*32 + channel`` for
    each slot in the slot mask; positions of absent slots are ignored.  The
    byte arrays are read as bytes in either stream byte order (§2).
    """
    index, u8, words, texts, errors = _stack(records, BASE_WORDS, byteorder)
    reasons, time_us = _check_common(words, texts, BASE_WORDS)
    good = _good(reasons)
    words, u8, time_us = _keep(good, words, u8, time_us)
    crate = words[:, _B_CRATE].astype(np.int64)
    chmasks = words[:, _B_CHMASK:_B_CHMASK + NCARDS]
    rr, ss = np.nonzero(_slot_bits(words[:, _B_SLOTS]))
    cards = NCARDS * NCHANNELS
    current = u8[:, _B_CURRENT_BYTE:_B_CURRENT_BYTE + cards].reshape(-1, NCARDS, NCHANNELS)[rr, ss].ravel()
    busy = u8[:, _B_BUSY_BYTE:_B_BUSY_BYTE + cards].reshape(-1, NCARDS, NCHANNELS)[rr, ss].ravel()
    first = crate[rr] * cards + ss * NCHANNELS
    return BaseBatch(
        index=index[good], crate=crate, slot_mask=words[:, _B_SLOTS], channel_masks=chmasks,
        error_flags=words[:, _B_ERR], time_us=time_us, timestamp=time_us / 1e6,
        record=np.repeat(rr, NCHANNELS), lcn=(first[:, None] + _CHANNEL).ravel(),
        current=current.astype(np.int16) - np.int16(127), busy=busy != 0,
        masked=_masked_bits(chmasks[rr, ss]), errors=_errors_list(index, reasons, errors),
    )


# --------------------------------------------------------------------------
# CMOS rates (§5, §8)
# --------------------------------------------------------------------------

_STATE_MAGIC = b"MCRS"
_STATE_HEAD = struct.Struct("<4sHHdI")
_STATE_VERSION = 1
_NO_TIME = -(1 << 62)


class CmosRateState:
    """Last valid count and time of every channel, turning CMOS readings into
    rates.  ``update(batch)`` returns ``(lcn, rate_hz)`` arrays.

    Rules, for successive readings of one channel (in batch order):

    * A reading that is *masked* (channel-mask bit 0) or *flagged* (bit 31:
      count not valid, §5) gives no rate and breaks the sequence: the next
      valid reading only becomes the new baseline.  (So no rate is ever
      computed against a flagged count, nor across it.)
    * Every other reading becomes the new baseline.  It gives a rate
      ``(count − previous) / Δt`` only if there is a previous valid reading,
      ``0 < Δt ≤ max_dt`` (out-of-order, duplicated or stale pairs give
      none) and ``count ≥ previous`` (a smaller count is a counter reset or a
      wrap at 2^31: no rate, re-baseline).
    * An unchanged count gives **0.0 Hz**.  The original minard emitted
      nothing (§8, strict ``>``); a 0 Hz point lets the shift crew see dead
      channels.
    * Δt comes from integer microseconds of the record timestamps, so it is
      exact to the centisecond resolution of the text.

    The state serialises with :meth:`to_bytes` / :meth:`from_bytes` (compact,
    for Redis) or :meth:`to_dict` / :meth:`from_dict` (JSON-able), so a
    restarted consumer resumes without spurious rates: a stale baseline is
    caught by the Δt bound.
    """

    def __init__(self, max_dt: float = 10.0, size: int = NCHANNELS_TOTAL):
        if not max_dt > 0:
            raise ValueError("max_dt must be positive")
        self.max_dt = float(max_dt)
        self.size = size
        self.last_count = np.zeros(size, dtype=np.int64)
        #: _NO_TIME marks "no baseline": Δt from it exceeds any max_dt, so
        #: the hot path needs no separate flag array.
        self.last_time_us = np.full(size, _NO_TIME, dtype=np.int64)
        self._scratch = np.empty((2, 0), dtype=np.int64)  # see _work
        self._plan_memo: tuple | None = None  # see _card_plan

    @property
    def have(self) -> np.ndarray:
        """Bool per channel: a valid baseline reading is held."""
        return self.last_time_us != _NO_TIME

    def update(self, batch: CmosBatch) -> tuple[np.ndarray, np.ndarray]:
        """Apply a batch of readings; return ``(lcn, rate_hz)`` of the rates it
        yields.  A channel read several times in one batch is handled in
        order (one vectorised pass per repetition)."""
        lcn = np.asarray(batch.lcn, dtype=np.int64)
        if len(lcn) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        invalid = batch.flagged | batch.masked
        cards = self._card_plan(batch.card, len(lcn))
        if cards is not None:
            # Fast path: whole distinct cards (every batch decode_cmos makes of
            # a readout), so the state is read and written by rows of 32.
            return self._apply_cards(cards, lcn, batch.count, batch.time_us[batch.card_record], invalid)
        count, times = batch.count, batch.channel_time_us
        if lcn.min() < 0 or lcn.max() >= self.size:
            keep = (lcn >= 0) & (lcn < self.size)
            lcn, count, times, invalid = lcn[keep], count[keep], times[keep], invalid[keep]
        if len(lcn) < 2 or np.bincount(lcn, minlength=self.size).max() <= 1:
            return self._apply(lcn, lcn, count, times, invalid)
        rank = _occurrence_rank(lcn)
        outs = [self._apply(lcn[sel], lcn[sel], count[sel], times[sel], invalid[sel])
                for sel in (np.flatnonzero(rank == r) for r in range(int(rank.max()) + 1))]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def _card_plan(self, card: np.ndarray, nchannels: int) -> slice | np.ndarray | None:
        """How :meth:`_apply_cards` addresses the state rows of *card*: a slice
        when the cards are consecutive (a whole readout, or a batch of whole
        crates), the card numbers when they are distinct and in range, None
        when the fast path does not apply (partial or repeated cards).

        decode_cmos hands out the same read-only card array for every batch
        of one layout, so the answer for the last such array is kept.
        """
        memo = self._plan_memo
        if memo is not None and memo[0] is card:
            return memo[1]
        plan = self._make_card_plan(card, nchannels)
        if not card.flags.writeable:
            self._plan_memo = (card, plan)
        return plan

    def _make_card_plan(self, card: np.ndarray, nchannels: int) -> slice | np.ndarray | None:
        """See :meth:`_card_plan` (decode_cmos guarantees lcn == card*32 + channel)."""
        ncards = len(card)
        if self.size % NCHANNELS or ncards == 0 or ncards * NCHANNELS != nchannels:
            return None
        first, last = int(card.min()), int(card.max())
        if first < 0 or last >= self.size // NCHANNELS:
            return None
        if last - first + 1 == ncards and (ncards == 1 or bool((np.diff(card) == 1).all())):
            return slice(first, last + 1)
        return card if np.bincount(card).max() <= 1 else None

    def _apply_cards(self, cards: slice | np.ndarray, lcn, count, t_card, invalid):
        """One vectorised pass over distinct whole cards (the hot path).

        *cards* addresses the state rows (see :meth:`_card_plan`); *t_card*
        is per card; *lcn*, *count* and *invalid* per channel, 32 per card.
        The same rules as :meth:`_apply`.  A readout is ~10k channels, but
        each numpy call costs microseconds and each fresh 80 kB temporary a
        trip to memory, so: few calls, Δt and Δcount in two reused work
        arrays, consecutive cards as slices, and the division only for the
        channels that give a rate.
        """
        rows = (-1, NCHANNELS)
        counts, times = self.last_count.reshape(rows), self.last_time_us.reshape(rows)
        dt, inc = self._work(len(lcn))
        t = np.repeat(t_card, NCHANNELS)
        if isinstance(cards, slice):
            np.subtract(t, times[cards].ravel(), out=dt)
            np.subtract(count, counts[cards].ravel(), out=inc)
        else:
            np.take(times, cards, axis=0, out=dt.reshape(rows), mode="clip")  # in range: _card_plan
            np.subtract(t, dt, out=dt)
            np.take(counts, cards, axis=0, out=inc.reshape(rows), mode="clip")
            np.subtract(count, inc, out=inc)
        counts[cards] = count.reshape(rows)  # an invalid reading's count is never used:
        t[invalid] = _NO_TIME  # its time says "no baseline",
        inc[invalid] = -1  # and it gives no rate
        times[cards] = t.reshape(rows)
        emit = self._emits(dt, inc)
        return lcn[emit], inc[emit] * 1e6 / dt[emit]

    def _work(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Two int64 work arrays of length *n*, reused from call to call."""
        if self._scratch.shape[1] < n:
            self._scratch = np.empty((2, n), dtype=np.int64)
        return self._scratch[0, :n], self._scratch[1, :n]

    def _emits(self, dt: np.ndarray, inc: np.ndarray) -> np.ndarray:
        """Where a pair gives a rate: 0 < Δt ≤ max_dt and the count did not go down."""
        emit = dt > 0
        emit &= dt <= round(self.max_dt * 1e6)
        emit &= inc >= 0
        return emit

    def _apply(self, index, lcn, count, t_us, invalid):
        """One vectorised pass over distinct channels (*index* = *lcn*)."""
        dt = t_us - self.last_time_us[index]
        inc = count - self.last_count[index]
        emit = self._emits(dt, inc)
        self.last_count[index] = count  # an invalid reading's count is never used:
        self.last_time_us[index] = t_us  # its time is _NO_TIME
        bad = np.flatnonzero(invalid)
        if len(bad):
            emit[bad] = False
            self.last_time_us[lcn[bad]] = _NO_TIME
        return lcn[emit], inc[emit] * 1e6 / dt[emit]

    # -- serialisation ----------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Compact binary form: a header then the three arrays, little-endian."""
        head = _STATE_HEAD.pack(_STATE_MAGIC, _STATE_VERSION, 0, self.max_dt, self.size)
        return (head + self.last_count.astype("<i8").tobytes()
                + self.last_time_us.astype("<i8").tobytes() + self.have.astype(np.uint8).tobytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> CmosRateState:
        """Inverse of :meth:`to_bytes`; raises OrcaError on anything else."""
        data = bytes(data)
        if len(data) < _STATE_HEAD.size:
            raise OrcaError("bad_state", "too short")
        magic, version, _, max_dt, size = _STATE_HEAD.unpack_from(data)
        if magic != _STATE_MAGIC or version != _STATE_VERSION:
            raise OrcaError("bad_state", "not a CmosRateState")
        if len(data) != _STATE_HEAD.size + 17 * size or not max_dt > 0:
            raise OrcaError("bad_state", "inconsistent size")
        state = cls(max_dt, size)
        o = _STATE_HEAD.size
        state.last_count = np.frombuffer(data, "<i8", size, o).astype(np.int64)
        times = np.frombuffer(data, "<i8", size, o + 8 * size).astype(np.int64)
        have = np.frombuffer(data, np.uint8, size, o + 16 * size).astype(bool)
        state.last_time_us = np.where(have & (times != _NO_TIME), times, _NO_TIME)
        return state

    def to_dict(self) -> dict:
        """JSON-able form listing only channels with a baseline."""
        idx = np.nonzero(self.have)[0]
        return {"version": _STATE_VERSION, "max_dt": self.max_dt, "size": self.size,
                "lcn": idx.tolist(), "count": self.last_count[idx].tolist(),
                "time_us": self.last_time_us[idx].tolist()}

    @classmethod
    def from_dict(cls, d: Mapping) -> CmosRateState:
        """Inverse of :meth:`to_dict`; raises OrcaError on malformed input."""
        try:
            state = cls(float(d["max_dt"]), int(d["size"]))
            idx = np.asarray(d["lcn"], dtype=np.int64)
            count = np.asarray(d["count"], dtype=np.int64)
            t_us = np.asarray(d["time_us"], dtype=np.int64)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise OrcaError("bad_state", str(exc)) from None
        if d.get("version") != _STATE_VERSION or not (idx.shape == count.shape == t_us.shape) \
                or idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= state.size)):
            raise OrcaError("bad_state", "inconsistent arrays")
        state.last_count[idx] = count
        state.last_time_us[idx] = t_us
        return state


def _occurrence_rank(values: np.ndarray) -> np.ndarray:
    """For each element, how many equal elements precede it (0 for the first)."""
    n = len(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - first
    return rank


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------


def _check_order(byteorder: str) -> str:
    if byteorder not in _U32:
        raise ValueError(f"byteorder must be 'little' or 'big', not {byteorder!r}")
    return byteorder


def _words(values, byteorder: str) -> bytes:
    """Integers as 32-bit words in *byteorder*."""
    arr = np.asarray(values, dtype=np.int64).ravel() & 0xFFFFFFFF
    return arr.astype("<u4" if byteorder == "little" else ">u4").tobytes()


def _check_long_id(data_id: int) -> None:
    if data_id & ~LONG_ID_MASK or data_id & SHORT_BIT or data_id == 0:
        raise ValueError(f"{data_id:#x} is not a long-form data id (n << 18, n ≥ 1)")


def encode_long(data_id: int, payload_words: Iterable[int] | np.ndarray, byteorder: str = "little") -> bytes:
    """A long record: word 0 = ``data_id | (len(payload)+1)`` then the payload (§3)."""
    _check_long_id(data_id)
    values = payload_words if isinstance(payload_words, np.ndarray) else list(payload_words)
    payload = _words(np.asarray(values, dtype=np.int64), _check_order(byteorder))
    nwords = len(payload) // 4 + 1
    if nwords > LONG_LENGTH_MASK:
        raise ValueError("record too long for the 18-bit length field")
    return _U32[byteorder].pack(data_id | nwords) + payload


def encode_short(data_id: int, value: int, byteorder: str = "little") -> bytes:
    """A short record: one word ``data_id | (value & 0x3FFFFFF)`` (§3)."""
    if not data_id & SHORT_BIT or data_id & ~SHORT_ID_MASK or data_id == INVALID_SHORT_ID:
        raise ValueError(f"{data_id:#x} is not a short-form data id (n << 26, 32 ≤ n ≤ 62)")
    return _U32[_check_order(byteorder)].pack(data_id | (value & SHORT_DATA_MASK))


def encode_header(plist: Mapping, byteorder: str = "little") -> bytes:
    """A header record (§4): ``0 | total_words``, XML length n, the XML, and
    ORCA's padding quirk of ``4*(n//4 + 1) - n`` NUL bytes (1–4, 4 when n is a
    multiple of 4)."""
    xml = plistlib.dumps(dict(plist), fmt=plistlib.FMT_XML)
    n = len(xml)
    padded = 4 * (n // 4 + 1)
    total = 2 + padded // 4
    if total > LONG_LENGTH_MASK:
        raise ValueError("header too long")
    order = _check_order(byteorder)
    return _U32[order].pack(total) + _U32[order].pack(n) + xml + b"\0" * (padded - n)


def _timestamp_field(timestamp) -> bytes:
    """The 24-byte timestamp field from float seconds or ready text."""
    text = timestamp if isinstance(timestamp, (bytes, bytearray)) else (
        timestamp.encode("ascii") if isinstance(timestamp, str) else format_timestamp(timestamp))
    if len(text) > TIMESTAMP_BYTES:
        raise ValueError("timestamp text longer than 24 bytes")
    return bytes(text).ljust(TIMESTAMP_BYTES, b"\0")


def _channel_mask_words(channel_masks) -> np.ndarray:
    """16 channel-mask words from one int (same for every slot) or 16 ints."""
    if isinstance(channel_masks, (int, np.integer)):
        return np.full(NCARDS, int(channel_masks) & 0xFFFFFFFF, dtype=np.int64)
    arr = np.asarray(channel_masks, dtype=np.int64).ravel()
    if arr.shape != (NCARDS,):
        raise ValueError("channel_masks must be one int or 16 ints")
    return arr


def encode_cmos(data_id: int, crate: int, slot_mask: int, channel_masks, counts, timestamp,
                error_flags: int = 0, byteorder: str = "little", delay: int = 0) -> bytes:
    """An Xl3CmosRate record (§5, 283 words).  *counts* is (k, 32) with k ≤ 8,
    PACKED: row i is the i-th card of *slot_mask*; missing rows are zero.
    Values are written as given (set bit 31 for a flagged count)."""
    _check_long_id(data_id)
    block = np.zeros((CMOS_MAX_CARDS, NCHANNELS), dtype=np.int64)
    given = np.asarray(counts, dtype=np.int64).reshape(-1, NCHANNELS)
    if len(given) > CMOS_MAX_CARDS:
        raise ValueError("a CMOS record holds at most 8 cards")
    block[:len(given)] = given
    head = [crate, slot_mask, *_channel_mask_words(channel_masks), delay, error_flags]
    payload = _words(np.concatenate([np.asarray(head, dtype=np.int64), block.ravel()]), _check_order(byteorder))
    return _U32[byteorder].pack(data_id | CMOS_WORDS) + payload + _timestamp_field(timestamp)


def encode_base(data_id: int, crate: int, slot_mask: int, channel_masks, currents, busy, timestamp,
                error_flags: int = 0, byteorder: str = "little") -> bytes:
    """An Xl3PmtBaseCurrent record (§6, 282 words).  *currents* and *busy* are
    16×32 uint8 arrays indexed by absolute slot (UNPACKED), written as bytes."""
    _check_long_id(data_id)
    cur = np.asarray(currents, dtype=np.uint8).reshape(NCARDS * NCHANNELS)
    bsy = np.asarray(busy).astype(np.uint8).reshape(NCARDS * NCHANNELS)
    head = [crate, slot_mask, *_channel_mask_words(channel_masks), error_flags]
    return (_U32[_check_order(byteorder)].pack(data_id | BASE_WORDS) + _words(head, byteorder)
            + cur.tobytes() + bsy.tobytes() + _timestamp_field(timestamp))


#: §7 run-control flag bits (w1).
RUN_START, RUN_QUICK, RUN_REMOTE, RUN_HEARTBEAT, RUN_END_SUBRUN, RUN_START_SUBRUN = 1, 2, 4, 8, 0x10, 0x20


def encode_run_control(data_id: int, flags: int, run_number: int, ut_time: int,
                       subrun: int = 0, byteorder: str = "little") -> bytes:
    """A run-control record (§7, 4 words): flags | subrun << 16, run number
    (or seconds to the next heartbeat), UT time."""
    return encode_long(data_id, [(flags & 0xFFFF) | (subrun & 0xFFFF) << 16, run_number, ut_time], byteorder)


#: §4.1: the XL3 records, in ORXL3Model's id request order, with lengths.
XL3_RECORDS = (
    ("Xl3MegaBundle", "ORXL3DecoderForXL3MegaBundle", -1, True),
    ("Xl3PmtBaseCurrent", BASE_DECODER, BASE_WORDS, False),
    ("Xl3CmosRate", CMOS_DECODER, CMOS_WORDS, False),
    ("Xl3Fifo", "ORXL3DecoderForFifo", 19, False),
    ("Xl3Hv", "ORXL3DecoderForHv", 12, False),
    ("Xl3Vlt", "ORXL3DecoderForVlt", 16, False),
    ("FecVlt", "ORXL3DecoderForFecVlt", 30, False),
)


def make_header_plist(cmos_id: int, base_id: int, *, run: int = 1, subrun: int = 0,
                      start_time: int = 0, run_id: int | None = None,
                      extra_models: Mapping | None = None) -> dict:
    """A realistic header plist (§4): Document Info, Run Control and a
    dataDescription with the 7 ORXL3Model records and ORRunModel/Run.

    Ids not given are handed out as ORCA does, ``n << 18`` counting up from 1,
    skipping ids already taken.  *extra_models* is merged into
    dataDescription (``{model: {record: {decoder, dataId, length, variable}}}``).
    """
    taken = {cmos_id, base_id}
    for records in (extra_models or {}).values():
        taken.update(_as_id(e.get("dataId")) for e in records.values())
    free = (n << 18 for n in range(1, 0x1FFF) if (n << 18) not in taken)
    run_id = run_id if run_id is not None else next(free)
    xl3 = {}
    for name, decoder, length, variable in XL3_RECORDS:
        data_id = {"Xl3CmosRate": cmos_id, "Xl3PmtBaseCurrent": base_id}.get(name) or next(free)
        xl3[name] = {"decoder": decoder, "dataId": data_id, "length": length, "variable": variable}
    description = {
        "ORXL3Model": xl3,
        "ORRunModel": {"Run": {"decoder": "ORRunDecoderForRun", "dataId": run_id,
                               "length": 4, "variable": False}},
    }
    for model, records in (extra_models or {}).items():
        description.setdefault(model, {}).update(records)
    return {
        "Document Info": {"dataVersion": 3, "OrcaVersion": "minard-simulated",
                          "documentName": f"run{run}.Orca"},
        "Run Control": {"RunNumber": run, "SubRunNumber": subrun, "startTime": int(start_time),
                        "quickStart": False, "RunType": 0},
        "dataDescription": description,
        "ObjectInfo": {"Crates": [{"ClassName": "ORXL3Model", "Crate": c} for c in range(NCRATES)]},
    }


# --------------------------------------------------------------------------
# Dumping
# --------------------------------------------------------------------------


def _card_lists(batch_lcn, values) -> dict[str, list[int]]:
    """``{slot: [32 values]}`` from flat per-channel arrays of one record."""
    out = {}
    for start in range(0, len(batch_lcn), NCHANNELS):
        slot = int(batch_lcn[start] // NCHANNELS % NCARDS)
        out[str(slot)] = [int(v) for v in values[start:start + NCHANNELS]]
    return out


def record_to_dict(record: Record, ids: XL3Ids | None = None) -> dict:
    """A JSON-able description of one record for ``minard dump``.

    With *ids*, CMOS/base records are classified by their data id instead of
    ``record.kind``.  A record that does not decode gives ``{"error",
    "reason", "offset", ...}``.
    """
    kind = record.kind
    if ids is not None and kind in ("cmos", "base", "other"):
        kind = "cmos" if record.data_id == ids.cmos else "base" if record.data_id == ids.base else "other"
    out = {"offset": record.offset, "kind": kind, "data_id": record.data_id, "words": record.nwords}
    if kind == "header":
        header = record.header if record.header is not None else {}
        found = xl3_data_ids(header)
        control = header.get("Run Control", {})
        control = control if isinstance(control, Mapping) else {}
        out.update(cmos_id=found.cmos, base_id=found.base, run=control.get("RunNumber"),
                   subrun=control.get("SubRunNumber"), byteorder=record.byteorder, keys=sorted(map(str, header)))
    elif kind == "short":
        out["data"] = record.short_data
    elif kind in ("cmos", "base"):
        batch = decode_cmos([record]) if kind == "cmos" else decode_base([record])
        if batch.errors:
            err = batch.errors[0][1]
            return {"offset": record.offset, "kind": kind, "error": str(err), "reason": err.reason}
        out.update(crate=int(batch.crate[0]), slot_mask=int(batch.slot_mask[0]),
                   timestamp=float(batch.timestamp[0]), error_flags=int(batch.error_flags[0]),
                   masked=batch.lcn[batch.masked].tolist())
        if kind == "cmos":
            out["counts"] = _card_lists(batch.lcn, batch.count)
            out["flagged"] = batch.lcn[batch.flagged].tolist()
        else:
            out["currents"] = _card_lists(batch.lcn, batch.current)
            out["busy"] = batch.lcn[batch.busy].tolist()
    return out
