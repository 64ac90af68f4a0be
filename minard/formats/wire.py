"""The ZMQ wire format between producers and consumers (versioned, no pickle).

A batch of raw records travels as one ZMQ multipart message of five frames::

    0  b"minard/1"             protocol name and version
    1  kind                    ASCII record kind: b"pmt", b"cmos", b"base", ...
    2  meta                    UTF-8 JSON object (producer name, batch seq, send time)
    3  lengths                 uint32 big-endian, one per record
    4  payload                 the records' bytes, back to back

Records are passed through untouched, so the consumer can decode the payload in
one vectorized pass using the offsets that ``lengths`` give.  Anything that does
not follow this layout raises :class:`WireError` (with a ``reason``) and the
consumer counts and drops the message; it never evaluates what it received.

The meta fields the consumers read are typed (:data:`META_FIELDS`): a value of
the wrong type, NaN, infinite, negative or out of range is rejected with the
reason ``bad_meta_<field>``; ``count``, when present, must equal the number of
records (``count_mismatch``); a message without records is ``empty``.  Unknown
meta fields are ignored (producers may add some).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from minard.formats.pmt import dispatch_runs

MAGIC = b"minard/"
VERSION = 1
VERSION_FRAME = b"minard/1"
KINDS = frozenset({b"pmt", b"rechdr", b"cmos", b"base", b"orca"})
#: Defaults; processes pass the configured ``zmq_max_frame``.
MAX_PAYLOAD = 64 * 1024 * 1024
MAX_RECORDS = 1_000_000
MAX_META = 4096


class WireError(ValueError):
    """A message that is not a valid minard batch; ``reason`` names the fault."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Batch:
    """A decoded batch: records are ``payload[offsets[i]:offsets[i]+lengths[i]]``."""

    kind: str
    meta: dict
    payload: bytes
    lengths: np.ndarray
    offsets: np.ndarray = field(init=False)

    def __post_init__(self):
        ends = np.cumsum(self.lengths, dtype=np.int64)
        self.offsets = ends - self.lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def records(self) -> list[bytes]:
        """The records as separate bytes objects (for non-vectorized callers)."""
        view = memoryview(self.payload)
        return [bytes(view[o:o + n]) for o, n in zip(self.offsets.tolist(), self.lengths.tolist())]


def record_count(frames: Sequence[bytes]) -> int:
    """Records in a message as its lengths frame says, without decoding it (0 if malformed)."""
    return len(frames[3]) // 4 if len(frames) == 5 else 0


def pmt_runs(frames: Sequence[bytes]) -> dict[int, int]:
    """Records per run of a ``pmt`` message, read from its records without decoding it.

    What a producer or a pool counts a lost message against
    (:func:`minard.formats.pmt.dispatch_runs`); ``{}`` for any other kind or a
    message whose lengths do not describe its payload.
    """
    if len(frames) != 5 or bytes(frames[1]) != b"pmt" or len(frames[3]) % 4:
        return {}
    sizes = np.frombuffer(frames[3], dtype=">u4").astype(np.int64)
    if int(sizes.sum()) != len(frames[4]):
        return {}
    return dispatch_runs(frames[4], sizes)


def encode(kind: str, records: Sequence[bytes], meta: dict | None = None) -> list[bytes]:
    """Build the frames of one batch of *records* of *kind*."""
    lengths = np.fromiter((len(r) for r in records), dtype=">u4", count=len(records))
    return encode_packed(kind, lengths.tobytes(), b"".join(records), meta)


def encode_packed(kind: str, lengths: bytes, payload: bytes, meta: dict | None = None) -> list[bytes]:
    """Build the frames of one batch from its lengths frame (uint32 BE) and payload.

    For producers that already hold records back to back (a RAWBATCH).
    """
    kind_b = kind.encode("ascii")
    if kind_b not in KINDS:
        raise WireError("unknown_kind", kind)
    meta = dict(meta or {})
    meta.setdefault("sent", time.time())
    meta["count"] = len(lengths) // 4
    return [VERSION_FRAME, kind_b, json.dumps(meta).encode(), lengths, payload]


def decode(frames: Sequence[bytes], max_payload: int = MAX_PAYLOAD) -> Batch:
    """Check and decode the frames of one message; raise WireError if invalid."""
    if len(frames) != 5:
        raise WireError("frame_count", f"expected 5 frames, got {len(frames)}")
    version, kind, meta_raw, lengths_raw, payload = (bytes(f) for f in frames)
    if version != VERSION_FRAME:
        if version.startswith(MAGIC):
            raise WireError("version", f"unsupported version {version[len(MAGIC):]!r}")
        raise WireError("not_minard", "first frame is not a minard version frame")
    if kind not in KINDS:
        raise WireError("unknown_kind", repr(kind[:32]))
    if len(payload) > max_payload:
        raise WireError("oversize", f"payload of {len(payload)} bytes > {max_payload}")
    if len(meta_raw) > MAX_META:
        raise WireError("oversize", f"meta of {len(meta_raw)} bytes")
    if len(lengths_raw) % 4 or len(lengths_raw) // 4 > MAX_RECORDS:
        raise WireError("bad_lengths", f"lengths frame of {len(lengths_raw)} bytes")
    try:
        meta = json.loads(meta_raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError("bad_meta", str(exc)) from None
    if not isinstance(meta, dict):
        raise WireError("bad_meta", "meta is not a JSON object")
    lengths = np.frombuffer(lengths_raw, dtype=">u4").astype(np.int64)
    if int(lengths.sum()) != len(payload):
        raise WireError("bad_lengths", f"lengths sum to {int(lengths.sum())}, payload is {len(payload)}")
    _check_meta(meta, len(lengths))
    return Batch(kind.decode(), meta, payload, lengths)


def _no_constant(name: str):
    """JSON's non-standard NaN and Infinity are not numbers here."""
    raise WireError("bad_meta", f"{name} in meta")


def _int_in(lo: int, hi: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


#: Meta field -> check of its value (absent is fine; None only where the check allows).
META_FIELDS = {
    "sent": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e11,
    "seq": _int_in(0, 2**63 - 1),
    "count": _int_in(0, MAX_RECORDS),
    "prev_gtid": lambda v: v is None or _int_in(0, (1 << 24) - 1)(v),
    "prev_run": lambda v: v is None or _int_in(0, 2**32 - 1)(v),
    "byteorder": lambda v: v in ("little", "big"),
    "data_id": lambda v: v is None or _int_in(0, 2**32 - 1)(v),
    "producer": lambda v: isinstance(v, str) and len(v) <= 256,
}


def _check_meta(meta: dict, nrecords: int) -> None:
    """Raise WireError for a typed meta field with a bad value, a wrong count or no records."""
    for name, ok in META_FIELDS.items():
        if name in meta and not ok(meta[name]):
            raise WireError(f"bad_meta_{name}", repr(meta[name])[:64])
    if "count" in meta and meta["count"] != nrecords:
        raise WireError("count_mismatch", f"meta count {meta['count']}, {nrecords} records")
    if not nrecords:
        raise WireError("empty", "no records")
