"""Frame codec of the dispatcher protocol (pure: no sockets, no clock).

Every message on a dispatcher connection is one *frame*::

    +----------------+----------------------+-----------------+
    | tag: 8 bytes   | length: 4 bytes      | payload         |
    | ASCII, padded  | unsigned big-endian  | `length` bytes  |
    +----------------+----------------------+-----------------+

The tag is 1-8 characters from ``A-Z 0-9 _ -`` padded on the right with NUL
or space bytes (ControlHost tags are 8 characters, so ``RAWDATA`` is sent as
``b"RAWDATA\\0"``).  ``docs/protocol.md`` describes the tags and a worked
example.

:class:`FrameDecoder` is incremental: feed it whatever the socket returned and
take out complete frames; a frame split over several reads is kept until its
last byte arrives.  A bad tag or a length above the limit raises
:class:`FrameError`; the stream cannot be resynchronised after that (there is
no frame marker to search for), so the connection has to be closed.
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

import numpy as np

#: 8-byte tag + 4-byte big-endian payload length.
HEADER = struct.Struct(">8sI")
HEADER_SIZE = HEADER.size
TAG_SIZE = 8

#: Default largest payload accepted (``dispatcher_max_frame``).
DEFAULT_MAX_FRAME = 16 * 1024 * 1024

# Tags used by minard (docs/protocol.md).
RAWDATA = "RAWDATA"   # a 'PMT ' dispatch record (ZDAB_FORMAT.md section 9)
RAWBATCH = "RAWBATCH"  # many 'PMT ' dispatch records in one frame (docs/protocol.md)
RECHDR = "RECHDR"     # any other dispatch record (RUN, TRIG, EPED, ...)
CMD = "CMD"           # a text command or the reply to one
HELLO = "HELLO"       # role identification, the first frame of a client
AUTH = "AUTH"         # handshake challenge (server) and response (client), docs/protocol.md 2.1

#: Tags that carry data records, as they appear on the wire.
DATA_TAGS_RAW = frozenset({b"RAWDATA\0", b"RECHDR\0\0", b"RAWBATCH"})
RAWBATCH_RAW = b"RAWBATCH"
RAWDATA_RAW = b"RAWDATA\0"
_COUNT = struct.Struct(">I")

_TAG_RE = re.compile(rb"[A-Z0-9_\-]{1,8}[\x00 ]*")
_TAG_CACHE_LIMIT = 256
_INITIAL_BUFFER = 64 * 1024


class FrameError(ValueError):
    """The byte stream is not a valid sequence of frames."""


class FrameTooLarge(FrameError):
    """A frame header announced a payload above the configured limit."""


class TruncatedFrame(FrameError):
    """The stream ended in the middle of a frame."""


class Frame(NamedTuple):
    """One decoded frame: its tag (str, padding removed) and its payload."""

    tag: str
    payload: bytes

    @property
    def text(self) -> str:
        """The payload as text (commands are ASCII; bad bytes are replaced)."""
        return self.payload.decode("utf-8", "replace")


class Batch(NamedTuple):
    """Consecutive data frames kept as their original bytes, headers included.

    The dispatcher forwards data frames without re-encoding them; a batch is
    what it writes to each client in one call.  ``count`` is the number of
    records (a RAWBATCH frame counts for the records it holds); ``packed``
    says whether any RAWBATCH frame is inside.
    """

    raw: bytes
    count: int
    packed: bool = False


class RawBatchError(FrameError):
    """A RAWBATCH frame whose record count or lengths do not add up."""


def rawbatch_count(buf, start: int, length: int) -> int:
    """Records in the RAWBATCH payload ``buf[start:start+length]``, checked.

    The payload is ``count`` (uint32 BE), ``count`` record lengths (uint32 BE)
    and the records back to back; the lengths must add up to the rest.
    Raises RawBatchError otherwise.
    """
    if length < 4:
        raise RawBatchError(f"RAWBATCH of {length} bytes has no record count")
    (count,) = _COUNT.unpack_from(buf, start)
    if 4 + 4 * count > length:
        raise RawBatchError(f"RAWBATCH says {count} records but has {length} bytes")
    lengths = np.frombuffer(buf, ">u4", count, start + 4)
    if int(lengths.sum(dtype=np.int64)) != length - 4 - 4 * count:
        raise RawBatchError(f"RAWBATCH record lengths add up to {int(lengths.sum(dtype=np.int64))},"
                            f" not the {length - 4 - 4 * count} bytes that follow them")
    return count


def rawbatch_parts(lengths: np.ndarray, records) -> list:
    """The buffers of one RAWBATCH frame: header, count, *lengths*, *records* (not copied)."""
    lengths = np.asarray(lengths, ">u4")
    size = 4 + 4 * len(lengths) + memoryview(records).nbytes
    return [HEADER.pack(RAWBATCH_RAW, size), _COUNT.pack(len(lengths)), lengths.tobytes(), records]


def encode_rawbatch(lengths: np.ndarray, records: bytes) -> bytes:
    """One RAWBATCH frame from record *lengths* and the *records* back to back."""
    return b"".join(rawbatch_parts(lengths, records))


def split_rawbatch(payload) -> tuple[memoryview, memoryview, int]:
    """(lengths as uint32 BE bytes, records, count) of a checked RAWBATCH payload (no copy)."""
    view = memoryview(payload)
    count = rawbatch_count(view, 0, len(view))
    return view[4:4 + 4 * count], view[4 + 4 * count:], count


def expand_rawbatches(raw: bytes) -> bytes:
    """*raw* data frames with every RAWBATCH replaced by one RAWDATA frame per record.

    For clients that did not ask for RAWBATCH (docs/protocol.md section 2):
    the result is byte for byte what a source sending RAWDATA would have sent.
    Vectorized: the 12-byte frame headers are inserted with numpy, not a loop
    over records.
    """
    parts, pos, size = [], 0, len(raw)
    view = memoryview(raw)
    while pos < size:
        tag, length = HEADER.unpack_from(raw, pos)
        start = pos + HEADER_SIZE
        if tag == RAWBATCH_RAW:
            lengths_b, records, count = split_rawbatch(view[start:start + length])
            lengths = np.frombuffer(lengths_b, ">u4")
            heads = np.empty((count, HEADER_SIZE), np.uint8)
            heads[:, :TAG_SIZE] = np.frombuffer(RAWDATA_RAW, np.uint8)
            heads[:, TAG_SIZE:] = np.frombuffer(lengths_b, np.uint8).reshape(count, 4)
            at = np.cumsum(lengths, dtype=np.int64) - lengths
            body = np.frombuffer(records, np.uint8)
            parts.append(np.insert(body, np.repeat(at, HEADER_SIZE), heads.ravel()).tobytes())
        else:
            parts.append(view[pos:start + length])
        pos = start + length
    return b"".join(parts)


def tag_bytes(tag: str | bytes) -> bytes:
    """The 8-byte wire form of *tag* (NUL padded), validated."""
    raw = tag.encode("ascii") if isinstance(tag, str) else bytes(tag)
    raw = raw.ljust(TAG_SIZE, b"\0")
    if len(raw) != TAG_SIZE or not _TAG_RE.fullmatch(raw):
        raise ValueError(f"invalid frame tag {tag!r}")
    return raw


def encode_header(tag: str | bytes, length: int) -> bytes:
    """The 12-byte header of a frame of *length* payload bytes."""
    return HEADER.pack(tag_bytes(tag), length)


def encode_frame(tag: str | bytes, payload: bytes | str) -> bytes:
    """One complete frame.  A str payload is encoded as UTF-8."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return encode_header(tag, len(payload)) + payload


def encode_frames(tag: str | bytes, payloads) -> bytes:
    """Many frames of the same tag joined into one buffer (one send call)."""
    raw_tag = tag_bytes(tag)
    pack = HEADER.pack
    parts = []
    for payload in payloads:
        parts.append(pack(raw_tag, len(payload)))
        parts.append(payload)
    return b"".join(parts)


def command_frame(text: str) -> bytes:
    """A ``CMD`` frame carrying *text*."""
    return encode_frame(CMD, text.encode("utf-8"))


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes, take frames with ``next``/``frames``.

    ``batch_tags`` (wire-form tags) makes :meth:`next_item` return runs of
    consecutive frames with those tags as one :class:`Batch` (at most
    ``batch_bytes`` long) instead of one :class:`Frame` each.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME,
                 batch_tags: frozenset[bytes] = frozenset(),
                 batch_bytes: int = 1 << 20, initial_buffer: int = _INITIAL_BUFFER):
        self.max_frame = int(max_frame)
        self.batch_tags = frozenset(batch_tags)
        self.batch_bytes = batch_bytes
        # Bytes live in self._buf[self._pos:self._end]; the buffer is reused and
        # only ever replaced by a larger one, so a busy connection does not
        # allocate (and page-fault) fresh memory on every read.
        self._buf = bytearray(initial_buffer)
        self._pos = 0
        self._end = 0
        self._tags: dict[bytes, str] = {}

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return self._end - self._pos

    def feed(self, data: bytes) -> None:
        """Append bytes read from the stream."""
        n = len(data)
        self.writable(n)[:n] = data
        self._end += n

    def writable(self, size: int) -> memoryview:
        """At least *size* bytes of free buffer to read into; then call :meth:`commit`.

        Lets a reader ``recv_into`` the decoder's own buffer (one copy less).
        """
        if self._end + size > len(self._buf):
            self._make_room(size)
        return memoryview(self._buf)[self._end:]

    def commit(self, n: int) -> None:
        """*n* bytes were written at the start of the last :meth:`writable` buffer."""
        self._end += n

    def _make_room(self, n: int) -> None:
        """Move the unread bytes to the front, in a larger buffer if *n* more do not fit."""
        live = self._end - self._pos
        if live + n > len(self._buf):
            new = bytearray(max(2 * len(self._buf), live + n))
            new[:live] = memoryview(self._buf)[self._pos:self._end]
            self._buf = new
        elif live:
            with memoryview(self._buf) as view:
                view[:live] = bytes(view[self._pos:self._end])
        self._pos, self._end = 0, live

    def _tag(self, raw: bytes) -> str:
        """The str form of a wire tag, raising FrameError if it is garbage."""
        tag = self._tags.get(raw)
        if tag is None:
            if not _TAG_RE.fullmatch(raw):
                raise FrameError(f"invalid frame tag {raw!r}")
            tag = raw.rstrip(b"\0 ").decode("ascii")
            if len(self._tags) < _TAG_CACHE_LIMIT:
                self._tags[raw] = tag
        return tag

    def _header_at(self, pos: int) -> tuple[bytes, int] | None:
        """The (raw tag, length) at *pos*, None if incomplete; validates both."""
        if self._end - pos < HEADER_SIZE:
            return None
        raw, length = HEADER.unpack_from(self._buf, pos)
        self._tag(raw)
        if length > self.max_frame:
            raise FrameTooLarge(
                f"frame {raw.rstrip(bytes([0, 32]))!r} announces {length} bytes,"
                f" above the limit of {self.max_frame}")
        return raw, length

    def next(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        head = self._header_at(self._pos)
        if head is None:
            return None
        raw, length = head
        start = self._pos + HEADER_SIZE
        end = start + length
        if end > self._end:
            return None
        self._pos = end
        return Frame(self._tags.get(raw) or self._tag(raw), bytes(self._buf[start:end]))

    def next_item(self) -> Frame | Batch | None:
        """Like :meth:`next`, but consecutive batch-tag frames come as a Batch.

        A RAWBATCH frame whose contents do not add up is returned on its own
        as a Frame (the caller rejects it; the stream itself is still intact).
        """
        head = self._header_at(self._pos)
        if head is None:
            return None
        if head[0] not in self.batch_tags:
            return self.next()
        return self._batch()

    def _batch(self) -> Frame | Batch | None:
        """Collect complete consecutive data frames starting at the cursor."""
        buf, start = self._buf, self._pos
        pos, count, frames, packed = start, 0, 0, False
        size = self._end
        last = min(size, start + self.batch_bytes) - HEADER_SIZE
        tags, unpack, max_frame = self.batch_tags, HEADER.unpack_from, self.max_frame
        # The hot loop of the dispatcher: one header unpack per frame.
        while pos <= last:
            raw, length = unpack(buf, pos)
            end = pos + HEADER_SIZE + length
            if end > size or length > max_frame or raw not in tags:
                break
            if raw == RAWBATCH_RAW:
                try:
                    count += rawbatch_count(buf, pos + HEADER_SIZE, length)
                except RawBatchError:
                    if frames:
                        break  # hand over the good frames first
                    return self.next()
                packed = True
            else:
                count += 1
            frames += 1
            pos = end
        if not frames:
            # Only reached for an oversized or incomplete first frame.
            self._header_at(pos)
            return None
        self._pos = pos
        with memoryview(buf) as view:
            return Batch(bytes(view[start:pos]), count, packed)

    def frames(self) -> list[Frame]:
        """Every complete frame available now."""
        out = []
        while (frame := self.next()) is not None:
            out.append(frame)
        return out

    def check_eof(self) -> None:
        """Call when the stream ended: raise TruncatedFrame if a frame is cut."""
        if self.pending:
            raise TruncatedFrame(f"stream ended inside a frame ({self.pending} bytes left)")


def decode_all(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> list[Frame]:
    """Decode a complete byte string into frames (raises on trailing bytes)."""
    decoder = FrameDecoder(max_frame)
    decoder.feed(data)
    frames = decoder.frames()
    decoder.check_eof()
    return frames


def iter_batch(raw: bytes):
    """Yield the (tag, payload) frames inside a Batch's bytes."""
    pos, size, unpack = 0, len(raw), HEADER.unpack_from
    view = memoryview(raw)
    while pos < size:
        tag, length = unpack(raw, pos)
        start = pos + HEADER_SIZE
        yield tag.rstrip(b"\0 ").decode("ascii"), bytes(view[start:start + length])
        pos = start + length
