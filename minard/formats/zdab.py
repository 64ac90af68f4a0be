"""ZDAB files: ZEBRA physical records, logical records and banks.

Section numbers (§) refer to ``shared/formats/ZDAB_FORMAT.md``.  A file is a
sequence of physical records (§1) whose payloads, concatenated, form a stream
of logical records (§2); data records hold banks (§3); a 'ZDAB' bank holds one
PmtEventRecord (§4, decoded by ``minard.formats.pmt``).

Reading (``iter_banks``, ``read_events``, ``ZdabReader``) never lets an
IndexError or struct.error escape: every problem is counted in ``ReadStats``
(or raised as ``ZdabError`` with ``strict=True``) and reading goes on with the
next good record.  Recovery rules, in order of use:

* **Steering word 6 is authoritative.**  Each physical record says where the
  first logical record that *begins* in it starts.  The words before that
  point must complete the record carried over from the previous block; if
  they do not (a corrupt length word), the carried record is dropped
  ("length_mismatch") and parsing restarts at word 6.  A corrupt logical
  record in the middle of a block ("bad_record_type") loses only the rest of
  that block.
* **Resynchronisation**: when a steering block has a bad signature or a
  physical record size outside 9..3840 words, the reader scans forward word
  by word for the next 4-word signature (not only at 3840-word boundaries,
  because fast blocks and other record sizes move them) and continues there,
  at that block's word 6.
* Stale words in padding are never looked at, so the stale event copies in
  ``Demo_Events.zdab`` (§8) are not returned.

``ZdabWriter`` writes files in the layout of ``PZdabWriter`` (§1-§3).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple, Self

import numpy as np

from minard.formats.pmt import HEADER_BYTES, RecordError

# §1 steering block
SIGNATURE = (0x0123CDEF, 0x80708070, 0x4321ABCD, 0x80618061)
STEERING_WORDS = 8
MAX_RECORD_WORDS = 3840  # a reader must reject larger physical records (§1)
SIZE_MASK = 0xFFFFFF  # steering word 4 bits 0-23
EMERGENCY_STOP = 1 << 31
END_OF_RUN = 1 << 30
START_OF_RUN = 1 << 29

# §2 logical record types
LR_SPECIAL = 1
LR_DATA = (2, 3, 4)
LR_PADDING = 5
END_OF_RUN_RECORD = (1, 1, 0)
END_OF_FILE_RECORD = (4, 1, 0xFFFFFFFF, 0, 0, 73)

# §2 pilot and §3 bank header
PILOT0 = 0x4640E400
ZEBRA_VERSION = 37700
PILOT_WORDS = 10
BANK_HEADER_WORDS = 9
UP_LINK = 327
MAST_LINKS = 25
MAX_LOGICAL_WORDS = 1 << 24  # a carried record longer than this is corrupt

_STEERING = struct.Struct(">8I")
_TWO = struct.Struct(">2I")
_PILOT = struct.Struct(">10I")
_BANK_HEADER = struct.Struct(">9I")
_WORD = struct.Struct(">I")
_ZDAB_ID = int.from_bytes(b"ZDAB", "big")


class ZdabError(RecordError):
    """A problem in the ZEBRA layers of a ZDAB file, at byte ``offset``."""

    def __init__(self, reason: str, message: str | None = None, offset: int = -1):
        super().__init__(reason, message)
        self.offset = offset


class Bank(NamedTuple):
    """One bank: its 4-character name, its ND data words as big-endian bytes,
    and the byte offset in the file of the logical record that holds it."""

    name: str
    data: bytes
    offset: int


@dataclass
class ReadStats:
    """Counters of one read, for logs and monitoring.

    ``blocks`` counts physical records (fast blocks separately), ``records``
    data logical records, ``banks`` and ``events`` ('ZDAB' banks) what was
    returned, ``skipped_records`` logical records dropped because of an
    error, ``errors`` the errors by reason, ``problems`` the first 100
    ``(byte offset, reason)``, and ``end_of_data`` whether the end-of-run
    steering block was reached.
    """

    blocks: int = 0
    fast_blocks: int = 0
    records: int = 0
    padding: int = 0
    special: int = 0
    banks: int = 0
    events: int = 0
    skipped_records: int = 0
    resyncs: int = 0
    end_of_data: bool = False
    errors: Counter = field(default_factory=Counter)
    problems: list[tuple[int, str]] = field(default_factory=list)

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())


@dataclass
class _Pending:
    """A logical record that continues in the next physical record."""

    offset: int  # file byte offset of its first word
    parts: list[bytes]
    have: int  # words collected so far
    total: int | None  # words in the whole record, once L and T are known


class _Reader:
    """State machine over physical records; see the module docstring."""

    def __init__(self, data, stats: ReadStats, strict: bool):
        if isinstance(data, memoryview) and (data.format != "B" or data.ndim != 1):
            data = data.cast("B")
        self.data = data
        self.size = len(data)
        self.stats = stats
        self.strict = strict
        self.pending: _Pending | None = None
        self.lost = False  # the stream position is unknown until the next word 6

    # -- bookkeeping ---------------------------------------------------------

    def error(self, reason: str, offset: int, message: str = "", skipped: bool = True) -> None:
        """Count (or, in strict mode, raise) one problem at byte *offset*."""
        text = f"{reason} at byte {offset}" + (f": {message}" if message else "")
        if self.strict:
            raise ZdabError(reason, text, offset)
        self.stats.errors[reason] += 1
        if skipped:
            self.stats.skipped_records += 1
        if len(self.stats.problems) < 100:
            self.stats.problems.append((offset, reason))

    # -- layer 1: physical records -------------------------------------------
    #
    # Layers 2 and 3 append the banks of one physical record to a list rather
    # than yielding them one by one: a chain of nested generators costs more
    # per event than reading the event itself (bench/pipeline.py, replay).

    def banks(self) -> Iterator[Bank]:
        """Walk the physical records and yield the banks of every good record."""
        pos = 0
        out: list[Bank] = []
        while True:
            if pos + 4 * STEERING_WORDS > self.size:
                if pos < self.size:
                    self.error("truncated", pos, "partial steering block", skipped=False)
                break
            steering = _STEERING.unpack_from(self.data, pos)
            size = steering[4] & SIZE_MASK
            if steering[:4] != SIGNATURE:
                self.error("bad_signature", pos, skipped=False)
            elif steering[4] & (EMERGENCY_STOP | END_OF_RUN):
                self.stats.end_of_data = True  # §1: stop, never look inside
                break
            elif not STEERING_WORDS < size <= MAX_RECORD_WORDS:
                self.error("bad_block_size", pos, f"size {size}", skipped=False)
            else:
                try:
                    pos = self._physical_record(pos, steering, out)
                finally:  # strict mode: the banks before the error still come out
                    yield from out
                    out.clear()
                continue
            pos = self._resync(pos + 4)
            if pos is None:
                break
        if self.pending is not None:
            self.error("truncated", self.pending.offset, "logical record runs past the end of data")
            self.pending = None

    def _resync(self, start: int) -> int | None:
        """Byte offset of the next 4-word signature at or after *start*, or None.

        The carried record is lost; parsing resumes at that block's word 6.
        """
        if self.pending is not None:
            self.error("resync", self.pending.offset, "record cut by a corrupt steering block")
            self.pending = None
        self.lost = True
        start += -start % 4
        chunk = 1 << 20
        while start + 16 <= self.size:
            nwords = min(chunk, (self.size - start) // 4)
            words = np.frombuffer(self.data, ">u4", count=nwords, offset=start)
            for hit in np.flatnonzero(words == SIGNATURE[0]).tolist():
                at = start + 4 * hit
                if at + 16 <= self.size and struct.unpack_from(">4I", self.data, at) == SIGNATURE:
                    del words
                    self.stats.resyncs += 1
                    return at
            del words
            start += 4 * max(nwords - 3, 1)
        return None

    def _physical_record(self, pos: int, steering, out: list[Bank]) -> int:
        """Append the banks of one physical record (+ fast blocks) to *out*; return the next offset."""
        size, nfast, first = steering[4] & SIZE_MASK, steering[7], steering[6]
        end = pos + 4 * size * (1 + nfast)
        if end > self.size:
            self.error("truncated", pos, "physical record runs past the end of the file", skipped=False)
            end = self.size - (self.size - pos) % 4
        else:
            self.stats.fast_blocks += nfast
        self.stats.blocks += 1
        begins = STEERING_WORDS <= first and pos + 4 * first < end
        start = pos + 4 * first if begins else end
        self._continuation(pos + 4 * STEERING_WORDS, start, begins, out)
        if begins:
            self.lost = False
            self._records(start, end, out)
        return end

    # -- layer 2: logical records ----------------------------------------------

    def _continuation(self, start: int, end: int, begins: bool, out: list[Bank]) -> None:
        """Handle the words before the first record that begins in this block."""
        nwords = (end - start) // 4
        pending = self.pending
        if pending is None:
            if nwords and not self.lost:
                self.error("length_mismatch", start, "steering word 6 skips words no record claims")
                self.lost = True
            return
        pending.parts.append(bytes(self.data[start:end]))
        pending.have += nwords
        if pending.total is None and pending.have >= 2:
            buf = b"".join(pending.parts)
            pending.parts = [buf]
            pending.total = self._total_words(*_TWO.unpack_from(buf, 0), pending.offset)
            if pending.total is None:
                self.pending = None
                return
        if pending.total is not None and pending.have >= pending.total:
            self.pending = None
            if pending.have > pending.total:
                self.error("length_mismatch", pending.offset, "record length disagrees with steering word 6")
                return
            buf = b"".join(pending.parts)
            self._logical(buf, 0, len(buf), pending.offset, out)
        elif begins:
            self.pending = None
            self.error("length_mismatch", pending.offset, "record shorter than its length word says")
        elif pending.total is not None and pending.total > MAX_LOGICAL_WORDS:
            self.pending = None
            self.error("length_mismatch", pending.offset, f"record of {pending.total} words")

    def _total_words(self, length: int, rtype: int, offset: int) -> int | None:
        """Total words of a logical record from its first two words (§2), or None."""
        if rtype == LR_PADDING:
            return length + 1
        if rtype == LR_SPECIAL or rtype in LR_DATA:
            return length + 2
        self.error("bad_record_type", offset, f"type {rtype}")
        return None

    def _records(self, pos: int, end: int, out: list[Bank]) -> None:
        """Parse the logical records from *pos* to the end of the payload."""
        data, unpack = self.data, _TWO.unpack_from
        while pos + 4 <= end:
            if pos + 8 > end:
                if not _WORD.unpack_from(data, pos)[0]:  # 1-word padding
                    self.stats.padding += 1
                    pos += 4
                    continue
                self.pending = _Pending(pos, [bytes(data[pos:end])], 1, None)
                return
            length, rtype = unpack(data, pos)
            if length == 0:  # 1-word padding
                self.stats.padding += 1
                pos += 4
                continue
            if rtype in LR_DATA:  # the common case, inlined
                total = length + 2
            else:
                total = self._total_words(length, rtype, pos)
                if total is None:
                    self.lost = True  # the rest of this block is unreadable
                    return
            if pos + 4 * total > end:
                have = (end - pos) // 4
                self.pending = _Pending(pos, [bytes(data[pos:end])], have, total)
                return
            self._logical(data, pos, pos + 4 * total, pos, out)
            pos += 4 * total

    def _logical(self, buf, start: int, end: int, offset: int, out: list[Bank]) -> None:
        """Handle one complete logical record held in ``buf[start:end]``."""
        rtype = _WORD.unpack_from(buf, start + 4)[0]
        if rtype == LR_PADDING:
            self.stats.padding += 1
        elif rtype == LR_SPECIAL:
            self.stats.special += 1
        else:
            self.stats.records += 1
            self._banks(buf, start + 8, end, offset, out)

    # -- layer 3: banks --------------------------------------------------------

    def _banks(self, buf, start: int, end: int, offset: int, out: list[Bank]) -> None:
        """Append every bank of a data-record body ``buf[start:end]`` (§2, §3)."""
        if end - start < 4 * PILOT_WORDS:
            self.error("bad_pilot", offset, "body shorter than the 10-word pilot")
            return
        pilot = _PILOT.unpack_from(buf, start)
        pos = start + 4 * (PILOT_WORDS + pilot[6] + pilot[9])  # skip R + U words
        if pos > end:
            self.error("bad_pilot", offset, f"R={pilot[6]} U={pilot[9]} past the body")
            return
        stats, header_unpack, word_unpack = self.stats, _BANK_HEADER.unpack_from, _WORD.unpack_from
        while pos < end:
            io = word_unpack(buf, pos)[0]
            if io & 0xFFFF < 12:
                self.error("bad_bank", offset, f"i/o word {io:#010x}")
                return
            header = pos + 4 * ((io & 0xFFFF) - 11)
            if header + 4 * BANK_HEADER_WORDS > end:
                self.error("bank_past_body", offset, "bank header past the body")
                return
            h = header_unpack(buf, header)
            data_start = header + 4 * BANK_HEADER_WORDS
            data_end = data_start + 4 * h[7]  # ND
            if data_end > end:
                self.error("bank_past_body", offset, f"ND={h[7]} past the body")
                return
            stats.banks += 1
            if h[4] == _ZDAB_ID:
                stats.events += 1
                name = "ZDAB"
            else:
                name = h[4].to_bytes(4, "big").decode("latin-1")
            out.append(Bank(name, bytes(buf[data_start:data_end]), offset))
            pos = data_end


def iter_banks(data, stats: ReadStats | None = None, *, strict: bool = False) -> Iterator[Bank]:
    """Yield every bank of the ZDAB file image *data* (bytes, memoryview, mmap).

    Problems are counted in *stats* (pass your own ``ReadStats`` to see
    them) and reading continues with the next good record; with
    ``strict=True`` the first problem raises ``ZdabError`` instead.
    """
    reader = _Reader(data, stats if stats is not None else ReadStats(), strict)
    return reader.banks()


def events_of(banks: Iterable[Bank]) -> Iterator[bytes]:
    """The PmtEventRecords (data of the 'ZDAB' banks) among *banks*."""
    for bank in banks:
        if bank.name == "ZDAB":
            yield bank.data


class ZdabReader:
    """Stream a ZDAB file through a read-only mmap (files may be GBs).

    ``with ZdabReader(path) as r: for record in r.events(): ...``;
    ``r.stats`` holds the counters of the reads so far.
    """

    def __init__(self, path: str | os.PathLike, *, strict: bool = False, stats: ReadStats | None = None):
        self.path = Path(path)
        self.strict = strict
        self.stats = stats if stats is not None else ReadStats()
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        size = os.fstat(self._file.fileno()).st_size
        self._data = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""

    def banks(self) -> Iterator[Bank]:
        """Every bank of the file, in order."""
        return iter_banks(self._data, self.stats, strict=self.strict)

    def events(self) -> Iterator[bytes]:
        """The PmtEventRecord of every 'ZDAB' bank, in order."""
        return events_of(self.banks())

    def close(self) -> None:
        """Unmap and close; an mmap still referenced by a live iterator is left to GC."""
        if isinstance(self._data, mmap.mmap):
            try:
                self._data.close()
            except BufferError:
                pass
        self._data = b""
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_events(source, stats: ReadStats | None = None) -> Iterator[bytes]:
    """PmtEventRecords of a ZDAB file given as a path or as bytes."""
    if isinstance(source, (bytes, bytearray, memoryview, mmap.mmap)):
        yield from events_of(iter_banks(source, stats))
        return
    with ZdabReader(source, stats=stats) as reader:
        yield from reader.events()


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _bank_words(name: str, data: bytes, numeric_id: int, io_char: int = 2, links: int = 0,
                up: int = UP_LINK) -> bytes:
    """i/o word, link words, 9-word header and data of one bank (§3)."""
    if len(name) != 4 or not name.isascii():
        raise ValueError(f"bank name must be 4 ASCII characters, not {name!r}")
    if len(data) % 4:
        raise ValueError("bank data must be whole 32-bit words")
    header = _BANK_HEADER.pack(0, up, up - numeric_id, numeric_id,
                               int.from_bytes(name.encode("ascii"), "big"),
                               links, links, len(data) // 4, 0)
    return struct.pack(">I", io_char << 16 | (12 + links)) + b"\0" * (4 * links) + header + bytes(data)


def _mast_bank() -> bytes:
    """The MAST bank that precedes non-ZDAB banks (§3): id 1, 25 links, 2 floats."""
    return _bank_words("MAST", struct.pack(">2f", 5.0, 0.0), 1, io_char=3, links=MAST_LINKS)


def _data_record(banks: bytes, with_mast: bool) -> bytes:
    """A type-2 logical record: [L, 2], pilot, relocation words, bank material (§2)."""
    reloc = struct.pack(">2I", 0, 0) if with_mast else b""
    material = len(banks) // 4
    pilot = _PILOT.pack(PILOT0, ZEBRA_VERSION, 0, 0, 0, 0, len(reloc) // 4, material,
                        UP_LINK if with_mast else 0, 0)
    body = pilot + reloc + banks
    return _TWO.pack(len(body) // 4, 2) + body


class ZdabWriter:
    """Write a ZDAB file the way PZdabWriter does (§1-§3).

    Logical records are packed back to back into ``record_words``-word
    physical records and straddle block boundaries; a record whose remainder
    does not fit in the next block goes into fast blocks (§1).  As in the
    reference writer the block buffer is never cleared, so padding holds
    stale words.  Steering word 6 of a block in which no record begins is
    the size of the physical record (past its end).  ``close()`` writes the
    end-of-run and end-of-ZEBRA blocks.  ``flush()`` pads and writes the
    current block so that everything written so far is readable; ``sync()``
    also fsyncs.
    """

    def __init__(self, target: str | os.PathLike | BinaryIO, record_words: int = MAX_RECORD_WORDS):
        if not 16 <= record_words <= MAX_RECORD_WORDS:
            raise ValueError(f"record_words must be 16..{MAX_RECORD_WORDS}")
        if isinstance(target, (str, os.PathLike)):
            self._fh: BinaryIO = open(target, "wb")  # noqa: SIM115 - closed by close()
            self._own = True
        else:
            self._fh, self._own = target, False
        self.size = record_words
        self._block = bytearray(4 * record_words)
        self._pos = STEERING_WORDS  # next free word of the block
        self._first: int | None = None  # first record beginning in this block
        self._number = 0  # physical record number (fast blocks not counted)
        self.events = 0
        self.blocks = 0
        self.closed = False

    # -- public API ----------------------------------------------------------

    def write_event(self, pmt_record: bytes) -> None:
        """Write one PmtEventRecord as a 'ZDAB' bank in its own logical record."""
        if len(pmt_record) < HEADER_BYTES or len(pmt_record) % 4:
            raise ValueError("a PmtEventRecord is whole words, at least 44 bytes")
        self._write_logical(_data_record(_bank_words("ZDAB", pmt_record, 6), with_mast=False))
        self.events += 1

    def write_bank(self, name: str, words: bytes, numeric_id: int = 1, *, mast: bool | None = None) -> None:
        """Write one bank in its own logical record.

        Non-ZDAB banks are preceded by a MAST bank (as PZdabWriter does) unless
        ``mast=False``.
        """
        self.write_banks([(name, words, numeric_id)], mast=name != "ZDAB" if mast is None else mast)

    def write_banks(self, banks: Sequence[tuple[str, bytes, int]], *, mast: bool = True) -> None:
        """Write several banks ``(name, words, numeric_id)`` in one logical record."""
        material = b"".join(_bank_words(n, w, i) for n, w, i in banks)
        if mast:
            material = _mast_bank() + material
        self._write_logical(_data_record(material, with_mast=mast))
        self.events += sum(1 for n, _, _ in banks if n == "ZDAB")

    def flush(self) -> None:
        """Pad and write the current block, then flush the file object."""
        self._check_open()
        self._pad_block()
        self._fh.flush()

    def sync(self) -> None:
        """``flush()`` and ``os.fsync``: everything written so far is on disk."""
        self.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Finish the last block, write the end-of-run and end-of-ZEBRA blocks."""
        if self.closed:
            return
        self._pad_block()
        for special in (END_OF_RUN_RECORD, END_OF_FILE_RECORD):
            self._end_block(special)
        self._fh.flush()
        if self._own:
            self._fh.close()
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- blocks ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("ZdabWriter is closed")

    def _put(self, data: bytes) -> None:
        """Copy whole words into the block at the current position."""
        start = 4 * self._pos
        self._block[start:start + len(data)] = data
        self._pos += len(data) // 4

    def _write_logical(self, record: bytes) -> None:
        """Append one logical record to the stream (§1, §2)."""
        self._check_open()
        if self.size - self._pos < 2:
            self._pad_block()  # keep L and T of a record in one block
        if self._first is None:
            self._first = self._pos
        n, done = len(record) // 4, 0
        while done < n:
            take = min(self.size - self._pos, n - done)
            self._put(record[4 * done:4 * (done + take)])
            done += take
            if self._pos < self.size:
                break
            rest = n - done
            nfast = rest // self.size if rest > self.size - STEERING_WORDS else 0
            self._emit(record[4 * done:4 * (done + nfast * self.size)], nfast)
            done += nfast * self.size

    def _pad_block(self) -> None:
        """Close the current block with a padding record and write it."""
        room = self.size - self._pos
        if self._pos == STEERING_WORDS:
            return  # nothing in this block yet
        if room:
            if self._first is None:
                self._first = self._pos
            if room == 1:
                self._put(b"\0\0\0\0")  # 1-word padding record
            else:
                struct.pack_into(">2I", self._block, 4 * self._pos, room - 1, LR_PADDING)
                self._pos = self.size
        self._emit(b"", 0)

    def _emit(self, fast: bytes, nfast: int) -> None:
        """Write the full block (steering words 0-7 filled in) and its fast blocks."""
        first = self._first if self._first is not None else self.size * (1 + nfast)
        _STEERING.pack_into(self._block, 0, *SIGNATURE, self.size, self._number, first, nfast)
        self._fh.write(self._block)
        if nfast:
            self._fh.write(fast)
        self._number += 1
        self.blocks += 1
        self._pos = STEERING_WORDS
        self._first = None

    def _end_block(self, special: tuple[int, ...]) -> None:
        """An end-of-run steering block holding one special record, then padding (§1)."""
        words = struct.pack(f">{len(special)}I", *special)
        self._put(words)
        room = self.size - self._pos
        struct.pack_into(">2I", self._block, 4 * self._pos, room - 1, LR_PADDING)
        _STEERING.pack_into(self._block, 0, *SIGNATURE, END_OF_RUN | self.size, 0, STEERING_WORDS, 0)
        self._fh.write(self._block)
        self.blocks += 1
        self._pos = STEERING_WORDS
        self._first = None


def write_events(path: str | os.PathLike, records: Iterable[bytes], record_words: int = MAX_RECORD_WORDS) -> int:
    """Write *records* (PmtEventRecords) to a new ZDAB file; return the count."""
    with ZdabWriter(path, record_words) as writer:
        for record in records:
            writer.write_event(record)
        return writer.events
