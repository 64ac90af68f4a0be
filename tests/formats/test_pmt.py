"""PmtEventRecord encoding, batch decoding and dispatch framing (minard.formats.pmt)."""

from __future__ import annotations

import struct
from datetime import UTC

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minard.formats import pmt
from minard.formats.pmt import RecordError

#: The demo event's PmtEventRecord sits at byte 120 of Demo_Events.zdab, ND = 1103 words (§8).
DEMO_RECORD_SLICE = slice(120, 120 + 1103 * 4)


@pytest.fixture
def demo_record(demo_zdab) -> bytes:
    return demo_zdab.read_bytes()[DEMO_RECORD_SLICE]


def random_hits(rng: np.random.Generator, n: int, crates: int = 19) -> dict[str, np.ndarray]:
    """Random but valid hit arrays for encode_event."""
    return {
        "crate": rng.integers(0, crates, n),
        "card": rng.integers(0, 16, n),
        "channel": rng.integers(0, 32, n),
        "cell": rng.integers(0, 16, n),
        "qhs": rng.integers(0, 4096, n),
        "qhl": rng.integers(0, 4096, n),
        "qlx": rng.integers(0, 4096, n),
        "tac": rng.integers(0, 4096, n),
        "flags": rng.integers(0, 64, n),
    }


def make_event(i: int = 0, nhit: int = 5, seed: int = 0, **kw) -> bytes:
    rng = np.random.default_rng(seed + i)
    args = {"run": 100, "evnum": i, "gtid": 1000 + i, "trigger_word": 1, "hits": random_hits(rng, nhit)}
    args.update(kw)
    return pmt.encode_event(**args)


# ---------------------------------------------------------------------------
# Constants and small helpers
# ---------------------------------------------------------------------------


def test_trigger_names_are_the_27_sno_plus_bits_in_order():
    assert len(pmt.TRIGGER_NAMES) == 27
    assert pmt.TRIGGER_NAMES[:4] == ("100L", "100M", "100H", "20")
    assert pmt.TRIGGER_NAMES[12] == "PED" and pmt.TRIGGER_NAMES[-1] == "MISS"
    assert pmt.trigger_names(0x400000F) == ["100L", "100M", "100H", "20", "MISS"]
    assert pmt.trigger_word("PULGT", "EXTA") == (1 << 10) | (1 << 15)


def test_lcn_is_crate_times_512_plus_card_times_32_plus_channel():
    assert pmt.lcn(0, 1, 20) == 52
    assert pmt.lcn(18, 15, 31) == 9727
    assert pmt.PMT_RECORD_ID == 0x504D5420 and pmt.PTK0 == 0x50544B30 and pmt.MAX_NHIT == 10240


def test_record_error_is_a_value_error_with_a_reason():
    err = RecordError("truncated", "too short")
    assert isinstance(err, ValueError) and err.reason == "truncated" and str(err) == "too short"


# ---------------------------------------------------------------------------
# The demo event (§8)
# ---------------------------------------------------------------------------


def test_demo_record_decodes_to_the_documented_values(demo_record):
    event = pmt.decode_event(demo_record)
    assert (event["run"], event["evnum"], event["gtid"], event["nhit"]) == (3510, 0, 56981, 364)
    assert event["trigger_word"] == 0x400000F
    assert event["triggers"] == ["100L", "100M", "100H", "20", "MISS"]
    assert event["subrun"] == 10  # DaqStatus: the SNO builders' constant 0xA (§8)
    assert event["hits"][0] == [0, 1, 20, 14, 535, 533, 543, 1498]
    assert len(event["hits"]) == 364
    assert event["orphan"] is False and event["subfields"] == [] and event["gtid_mismatch"] == 0
    assert event["cal_type"] == 1 and event["version"] == 23 and event["record_type"] == 10


def test_demo_clock_is_1999_05_16_10_19_22(demo_record):
    from datetime import datetime, timedelta

    clock10 = pmt.decode_event(demo_record)["clock10"]
    when = datetime(1996, 1, 1, tzinfo=UTC) + timedelta(microseconds=clock10 // 10)
    expected = datetime(1999, 5, 16, 10, 19, 22, 187000, tzinfo=UTC)
    assert abs(when - expected) < timedelta(milliseconds=0.5)  # 22.1867... s


def test_demo_batch_decode_gives_pedestal_like_charges_and_consistent_gtids(demo_record):
    batch = pmt.decode_events([demo_record])
    assert len(batch) == 1 and batch.n_hits == 364 and not batch.errors
    assert batch.lcn[0] == 52 and batch.crate[0] == 0 and batch.card[0] == 1 and batch.channel[0] == 20
    assert 400 < np.median(batch.qhs) < 700
    assert np.all(batch.hit_gtid == 56981) and batch.n_gtid_mismatch == 0


def test_encode_event_reproduces_the_demo_record_byte_for_byte(demo_record):
    event = pmt.decode_event(demo_record)
    batch = pmt.decode_events([demo_record])
    hits = {name: getattr(batch, name) for name in
            ("crate", "card", "channel", "cell", "qhs", "qhl", "qlx", "tac", "flags")}
    hits["gtid"] = batch.hit_gtid
    rebuilt = pmt.encode_event(
        run=3510, evnum=0, gtid=56981, trigger_word=event["trigger_word"], clock10=event["clock10"],
        clock50=event["clock50"], subrun=10, hits=hits, cal_type=1, esum_peak=event["esum_peak"],
        esum_diff=event["esum_diff"], esum_int=event["esum_int"], error_flags=event["error_flags"])
    assert rebuilt == demo_record


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------

header_fields = st.fixed_dictionaries({
    "run": st.integers(0, 2**32 - 1),
    "evnum": st.integers(0, 2**32 - 1),
    "gtid": st.integers(0, 2**24 - 1),
    "trigger_word": st.integers(0, 2**27 - 1),
    "clock10": st.integers(0, 2**53 - 1),
    "clock50": st.integers(0, 2**43 - 1),
    "subrun": st.integers(0, 2**16 - 1),
    "esum_peak": st.integers(0, 1023),
    "esum_diff": st.integers(0, 1023),
    "esum_int": st.integers(0, 1023),
    "error_flags": st.integers(0, 4095),
    "mc": st.booleans(),
})


@settings(max_examples=60, deadline=None)
@given(fields=header_fields, nhit=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_encode_then_decode_event_round_trips_every_field(fields, nhit, seed):
    hits = random_hits(np.random.default_rng(seed), nhit)
    record = pmt.encode_event(hits=hits, **fields)
    assert len(record) == 44 + 12 * nhit
    event = pmt.decode_event(record)
    for name, value in fields.items():
        assert event[name] == value, name
    assert event["nhit"] == nhit and event["triggers"] == pmt.trigger_names(fields["trigger_word"])
    order = ("crate", "card", "channel", "cell", "qhs", "qhl", "qlx", "tac")
    expected = np.column_stack([hits[k] for k in order]).tolist() if nhit else []
    assert event["hits"] == expected
    batch = pmt.decode_events([record])
    assert np.array_equal(batch.flags, hits["flags"])
    assert batch.n_gtid_mismatch == 0 and batch.clock10[0] == fields["clock10"]


@settings(max_examples=25, deadline=None)
@given(nhits=st.lists(st.integers(0, 60), min_size=1, max_size=30), seed=st.integers(0, 1000))
def test_batch_decode_matches_single_decodes_and_keeps_hits_in_event_order(nhits, seed):
    records = [make_event(i, n, seed) for i, n in enumerate(nhits)]
    batch = pmt.decode_events(records)
    assert not batch.errors and list(batch.valid_index) == list(range(len(records)))
    assert list(batch.nhit) == nhits and batch.n_hits == sum(nhits)
    assert list(np.bincount(batch.hit_event, minlength=len(nhits))) == nhits
    for i, record in enumerate(records):
        single = pmt.decode_event(record)
        rows = batch.hit_event == i
        got = np.column_stack([batch.crate[rows], batch.card[rows], batch.channel[rows], batch.cell[rows],
                               batch.qhs[rows], batch.qhl[rows], batch.qlx[rows], batch.tac[rows]])
        assert got.tolist() == single["hits"]
        assert batch.gtid[i] == single["gtid"] and batch.evnum[i] == i


def test_decode_buffer_handles_gaps_unaligned_offsets_and_any_order():
    records = [make_event(i, n) for i, n in enumerate([3, 0, 7, 2])]
    buf = bytearray(b"\xee" * 3)
    offsets = []
    for r in records:
        offsets.append(len(buf))
        buf += r + b"\xff" * 5  # gaps and odd offsets
    lengths = [len(r) for r in records]
    order = [2, 0, 3, 1]
    batch = pmt.decode_buffer(bytes(buf), [offsets[i] for i in order], [lengths[i] for i in order])
    reference = pmt.decode_events([records[i] for i in order])
    assert not batch.errors
    for name in ("gtid", "nhit", "evnum", "lcn", "qhs", "tac", "hit_gtid", "hit_event"):
        assert np.array_equal(getattr(batch, name), getattr(reference, name)), name


def test_decode_buffer_accepts_numpy_and_memoryview_buffers():
    records = [make_event(i, 4) for i in range(3)]
    buf = b"".join(records)
    offsets = np.arange(3) * len(records[0])
    lengths = np.full(3, len(records[0]))
    for b in (np.frombuffer(buf, np.uint8), memoryview(buf), bytearray(buf)):
        assert pmt.decode_buffer(b, offsets, lengths).n_hits == 12
    assert pmt.decode_events([memoryview(r) for r in records]).n_hits == 12


def test_empty_inputs_give_an_empty_batch():
    for batch in (pmt.decode_events([]), pmt.decode_buffer(b"", [], [])):
        assert len(batch) == 0 and batch.n_hits == 0 and batch.errors == []
        assert batch.channel_counts().shape == (10240,)


def test_records_with_no_hits_decode():
    batch = pmt.decode_events([make_event(0, 0), make_event(1, 0)])
    assert len(batch) == 2 and batch.n_hits == 0 and list(batch.gtid) == [1000, 1001]


# ---------------------------------------------------------------------------
# Orphans, GTID mismatches, bad crates
# ---------------------------------------------------------------------------


def test_orphan_has_all_six_mtc_words_zero_and_is_flagged():
    record = pmt.encode_orphan(run=1, evnum=2, gtid=777, hits=random_hits(np.random.default_rng(1), 4))
    assert record[20:44] == bytes(24)
    batch = pmt.decode_events([record, make_event(0, 2)])
    assert list(batch.orphan) == [True, False]
    assert batch.gtid[0] == 0 and np.all(batch.hit_gtid[:4] == 777)
    assert batch.n_gtid_mismatch == 0 and not batch.hit_gtid_mismatch.any()  # orphans are not mismatches
    assert pmt.decode_event(record)["orphan"] is True


def test_hit_gtid_mismatches_are_counted_per_event_and_per_hit():
    gtids = np.array([1005, 1005, 42, 1005, 7])
    hits = random_hits(np.random.default_rng(2), 5)
    hits["gtid"] = gtids
    record = pmt.encode_event(run=1, evnum=0, gtid=1005, trigger_word=1, hits=hits)
    batch = pmt.decode_events([make_event(0, 3), record, make_event(2, 0)])
    assert list(batch.gtid_mismatch) == [0, 2, 0] and batch.n_gtid_mismatch == 2
    assert batch.hit_gtid_mismatch.tolist() == [False] * 3 + [False, False, True, False, True]
    assert pmt.decode_event(record)["gtid_mismatch"] == 2


def test_crate_19_hits_are_kept_and_only_crates_above_19_are_dropped_and_counted():
    # ZDAB_FORMAT.md section 6, H0: real SNO+ data uses crates 0-18 plus 19.
    hits = random_hits(np.random.default_rng(3), 6)
    hits["crate"] = np.array([0, 19, 18, 31, 5, 20])
    record = pmt.encode_event(run=1, evnum=0, gtid=5, trigger_word=1, hits=hits)
    batch = pmt.decode_events([make_event(0, 2), record])
    assert list(batch.nhit) == [2, 6] and list(batch.bad_hits) == [0, 2]
    assert list(batch.hit_counts) == [2, 4] and batch.n_hits == 6
    assert batch.crate[2:].tolist() == [0, 19, 18, 5] and batch.lcn.max() <= 10239
    assert batch.hit_event.tolist() == [0, 0, 1, 1, 1, 1]
    assert 19 * 512 + hits["card"][1] * 32 + hits["channel"][1] in batch.lcn.tolist()
    assert batch.channel_counts().shape == (10240,)
    assert pmt.decode_event(record)["bad_hits"] == 2


def test_hit_fields_read_on_demand_belong_to_the_kept_hits():
    hits = random_hits(np.random.default_rng(4), 7)
    hits["crate"] = np.array([0, 19, 18, 31, 5, 20, 2])
    record = pmt.encode_event(run=1, evnum=9, gtid=5, trigger_word=1, hits=hits, clock10=12345, clock50=678)
    batch = pmt.decode_events([make_event(0, 2), record])
    kept = np.concatenate(([True, True], hits["crate"] <= 19))
    first = random_hits(np.random.default_rng(0), 2)  # make_event(0, 2)'s hits
    for name in ("cell", "qhs", "qhl", "qlx", "tac", "flags"):
        want = np.concatenate((first[name], hits[name]))[kept]
        assert getattr(batch, name).tolist() == want.tolist(), name
    assert batch.hit_words.shape == (batch.n_hits, 3) == (7, 3)
    assert batch.evnum.tolist() == [0, 9] and batch.clock10[1] == 12345 and batch.clock50[1] == 678


def test_decoded_arrays_are_not_overwritten_by_the_next_decode():
    a = pmt.decode_events([make_event(i, 50, seed=1) for i in range(20)])
    saved = {k: getattr(a, k).copy() for k in ("lcn", "qhs", "hit_gtid", "gtid", "trigger")}
    pmt.decode_events([make_event(i, 80, seed=2) for i in range(30)])
    for name, value in saved.items():
        assert np.array_equal(getattr(a, name), value), name


def test_channel_and_trigger_counts_aggregate_the_batch():
    hits = {"crate": [0, 0, 18], "card": [1, 1, 15], "channel": [20, 20, 31]}
    records = [pmt.encode_event(run=1, evnum=i, gtid=i, trigger_word=pmt.trigger_word("100L", "PED"), hits=hits)
               for i in range(4)]
    batch = pmt.decode_events(records)
    counts = batch.channel_counts()
    assert counts[52] == 8 and counts[9727] == 4 and counts.sum() == 12
    trig = batch.trigger_counts()
    assert trig[0] == 4 and trig[12] == 4 and trig.sum() == 8


# ---------------------------------------------------------------------------
# Sub-fields (§7)
# ---------------------------------------------------------------------------


def test_subfields_are_walked_and_reported():
    record = make_event(0, 3, subfields=[(33, b"\0" * 8), (12, b"\1" * 4)])
    word4 = struct.unpack_from(">I", record, 16)[0]
    assert word4 & (1 << 23) and word4 & 0x7FFFFF == 7 + 3 * 3
    event = pmt.decode_event(record)
    assert event["subfields"] == [{"type": 33, "length": 3}, {"type": 12, "length": 2}]
    assert len(event["hits"]) == 3
    batch = pmt.decode_events([record, make_event(1, 2)])
    assert not batch.errors and batch.n_hits == 5 and list(batch.hit_counts) == [3, 2]


@pytest.mark.parametrize("subfields, why", [
    (struct.pack(">I", 33 << 24 | 0), "zero length"),
    (struct.pack(">I", 33 << 24 | 5) + bytes(4), "runs past the record"),
    (struct.pack(">I", 33 << 24 | 1 << 23 | 1), "announces a next one that is missing"),
])
def test_corrupt_subfield_chains_are_bad_subfield_errors(subfields, why):
    bad = make_event(0, 2, subfields=subfields)
    good = make_event(1, 2)
    batch = pmt.decode_events([good, bad, good])
    assert [i for i, _ in batch.errors] == [1], why
    assert batch.errors[0][1].reason == "bad_subfield"
    assert list(batch.valid_index) == [0, 2] and batch.n_hits == 4
    with pytest.raises(RecordError) as exc:
        pmt.decode_event(bad)
    assert exc.value.reason == "bad_subfield"


def test_subfield_offset_pointing_into_the_hits_is_rejected():
    record = bytearray(make_event(0, 4, subfields=[(33, b"\0" * 4)]))
    struct.pack_into(">I", record, 16, 1 << 23 | 5)  # offset 5 from word 4 = inside the hits
    batch = pmt.decode_events([bytes(record)])
    assert batch.errors[0][1].reason == "bad_subfield"


# ---------------------------------------------------------------------------
# Rejected records
# ---------------------------------------------------------------------------


def test_records_shorter_than_the_header_are_truncated():
    batch = pmt.decode_events([b"", b"\0" * 43, make_event(0, 1)[:40]])
    assert [e.reason for _, e in batch.errors] == ["truncated"] * 3 and len(batch) == 0


def test_hits_past_the_record_end_are_truncated():
    record = make_event(0, 10)
    batch = pmt.decode_events([record[:-12], record, record[:-1]])
    assert [(i, e.reason) for i, e in batch.errors] == [(0, "truncated"), (2, "truncated")]
    assert list(batch.valid_index) == [1] and batch.n_hits == 10


def test_nhit_above_10240_is_rejected():
    record = bytearray(make_event(0, 0))
    struct.pack_into(">H", record, 14, 10241)
    record += bytes(12 * 10241)
    batch = pmt.decode_events([bytes(record), make_event(1, 3)])
    assert batch.errors[0][0] == 0 and batch.errors[0][1].reason == "nhit_too_large"
    assert batch.n_hits == 3


def test_exactly_10240_hits_are_accepted():
    record = make_event(0, 10240)
    assert pmt.decode_events([record]).n_hits == 10240


def test_records_outside_the_buffer_are_bad_offsets():
    record = make_event(0, 2)
    batch = pmt.decode_buffer(record, [0, -4, 8], [len(record), 44, len(record)])
    assert [(i, e.reason) for i, e in batch.errors] == [(1, "bad_offset"), (2, "bad_offset")]
    assert len(batch) == 1


def test_trailing_words_after_the_hits_are_ignored():
    batch = pmt.decode_events([make_event(0, 2) + bytes(8)])
    assert not batch.errors and batch.n_hits == 2


def test_encode_rejects_out_of_range_values():
    with pytest.raises(ValueError):
        pmt.encode_event(run=1, evnum=0, gtid=2**24, trigger_word=0)
    with pytest.raises(ValueError):
        pmt.encode_event(run=1, evnum=0, gtid=1, trigger_word=2**27)
    with pytest.raises(ValueError):
        pmt.encode_event(run=1, evnum=0, gtid=1, trigger_word=1, hits={"crate": [0], "card": [16]})
    with pytest.raises(ValueError):
        pmt.encode_event(run=1, evnum=0, gtid=1, trigger_word=1, hits={"crate": [0, 1], "card": [1]})
    with pytest.raises(ValueError):
        pmt.encode_event(run=1, evnum=0, gtid=1, trigger_word=1, hits={"qhs": [4096]})


def test_encode_accepts_a_structured_array():
    hits = np.zeros(3, dtype=[("crate", "u1"), ("card", "u1"), ("channel", "u1"), ("qhs", "u2")])
    hits["crate"] = [1, 2, 3]
    hits["qhs"] = [600, 0, 4095]
    event = pmt.decode_event(pmt.encode_event(run=1, evnum=0, gtid=9, trigger_word=1, hits=hits))
    assert [h[0] for h in event["hits"]] == [1, 2, 3] and [h[4] for h in event["hits"]] == [600, 0, 4095]


# ---------------------------------------------------------------------------
# Dispatch framing (§9)
# ---------------------------------------------------------------------------


def test_pack_dispatch_adds_the_pmt_generic_header_and_round_trips():
    record = make_event(0, 7)
    payload = pmt.pack_dispatch(record)
    assert payload[:12] == bytes.fromhex("504D5420 0000002C 50544B30")
    assert len(payload) == 12 + 44 + 12 * 7
    assert pmt.unpack_dispatch(payload) == (pmt.PMT_RECORD_ID, record)
    assert pmt.unpack_dispatch(memoryview(payload)) == (pmt.PMT_RECORD_ID, record)


def test_pack_rechdr_renames_rhdr_to_run_and_uses_the_byte_length():
    words = struct.pack(">4I", 1, 2, 3, 4)
    payload = pmt.pack_rechdr("RHDR", words)
    assert payload[:4] == b"RUN " and struct.unpack_from(">I", payload, 4)[0] == 16
    assert pmt.unpack_dispatch(payload) == (pmt.RUN_RECORD_ID, words)
    rid, body = pmt.unpack_dispatch(pmt.pack_rechdr("TRIG", words))
    assert pmt.record_name(rid) == "TRIG" and body == words


@pytest.mark.parametrize("payload, reason", [
    (b"", "truncated"),
    (b"PMT \0\0\0\x2c", "truncated"),
    (b"PMT \0\0\0\x2cPTK0" + bytes(40), "truncated"),
    (b"\x00\x01\x02\x03\0\0\0\x2cPTK0" + bytes(44), "bad_header"),
    (b"PMT \0\0\0\x2cXXXX" + bytes(44), "bad_header"),
    (b"PMT \0\0\0\x30PTK0" + bytes(44), "bad_header"),
    (b"PMT \0\0\0\x2cPTK0" + bytes(46), "bad_length"),
    (b"TRIG\0\0\0\x10PTK0" + bytes(8), "truncated"),
    (b"TRIG\0\0\0\x0fPTK0" + bytes(16), "bad_length"),
])
def test_unpack_dispatch_rejects_short_and_garbled_messages(payload, reason):
    with pytest.raises(RecordError) as exc:
        pmt.unpack_dispatch(payload)
    assert exc.value.reason == reason


# ---------------------------------------------------------------------------
# Robustness: random and mutated bytes
# ---------------------------------------------------------------------------

GOOD = [make_event(i, n, seed=7) for i, n in enumerate([0, 1, 5, 40])]
GOOD += [make_event(9, 3, seed=7, subfields=[(33, b"\0" * 8)])]


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


mutations = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=st.binary(max_size=400))
def test_random_bytes_raise_nothing_but_record_errors(blob):
    for func in (pmt.decode_event, pmt.unpack_dispatch):
        try:
            func(blob)
        except RecordError:
            pass
    batch = pmt.decode_events([blob, GOOD[3]])
    assert len(batch) >= 1 and batch.valid_index[-1] == 1
    assert all(isinstance(e, RecordError) for _, e in batch.errors)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(GOOD) - 1), edits=mutations, cut=st.none() | st.integers(0, 600))
def test_mutated_records_never_stop_the_good_ones_in_a_batch(which, edits, cut):
    bad = mutate(GOOD[which], edits, cut)
    for func in (pmt.decode_event, lambda b: pmt.unpack_dispatch(pmt.pack_dispatch(b) if len(b) >= 44 else b)):
        try:
            func(bad)
        except RecordError:
            pass
    records = [GOOD[3], bad, GOOD[2], bad, GOOD[4]]
    batch = pmt.decode_events(records)
    reference = pmt.decode_events([GOOD[3], GOOD[2], GOOD[4]])
    good_rows = [list(batch.valid_index).index(i) for i in (0, 2, 4)]
    assert batch.gtid[good_rows].tolist() == reference.gtid.tolist()
    assert batch.nhit[good_rows].tolist() == reference.nhit.tolist()
    for row, ref_row in zip(good_rows, range(3)):
        got = batch.lcn[batch.hit_event == row]
        assert got.tolist() == reference.lcn[reference.hit_event == ref_row].tolist()
    assert all(isinstance(e, RecordError) for _, e in batch.errors)


@settings(max_examples=60, deadline=None)
@given(edits=mutations, cut=st.none() | st.integers(0, 100))
def test_mutated_dispatch_messages_raise_only_record_errors(edits, cut):
    payload = mutate(pmt.pack_dispatch(GOOD[2]), edits, cut)
    try:
        _, body = pmt.unpack_dispatch(payload)
    except RecordError:
        return
    try:
        pmt.decode_event(body)
    except RecordError:
        pass
