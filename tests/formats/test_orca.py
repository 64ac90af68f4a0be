"""The ORCA codec (minard/orca.py): framing, header, ids, decoders, rates."""

from __future__ import annotations

import json
import plistlib
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minard.formats import orca
from minard.formats.orca import OrcaError, OrcaStreamParser, XL3Ids

CMOS_ID = 9 << 18  # deliberately not the historical defaults
BASE_ID = 2 << 18
T0 = 1_700_000_000.0
FULL = 0xFFFFFFFF
GAP_MASK = 0b1010_0000_0000_0101  # slots 0, 2, 13, 15


def header(cmos_id=CMOS_ID, base_id=BASE_ID, byteorder="little", **kw) -> bytes:
    return orca.encode_header(orca.make_header_plist(cmos_id, base_id, **kw), byteorder)


def cmos(crate=3, mask=GAP_MASK, t=T0, counts=None, chmask=FULL, data_id=CMOS_ID, byteorder="little", **kw):
    ncards = mask.bit_count()
    if counts is None:
        counts = np.arange(ncards * 32).reshape(ncards, 32) + 1000 * crate
    return orca.encode_cmos(data_id, crate, mask, chmask, counts, t, byteorder=byteorder, **kw)


def base(crate=4, mask=GAP_MASK, t=T0, currents=None, busy=None, chmask=FULL, data_id=BASE_ID,
         byteorder="little"):
    if currents is None:
        currents = (np.arange(512) % 200 + 20).reshape(16, 32)
    if busy is None:
        busy = np.zeros((16, 32), dtype=np.uint8)
    return orca.encode_base(data_id, crate, mask, chmask, currents, busy, t, byteorder=byteorder)


def parse(data: bytes, chunks: list[int] | None = None, **options):
    """All records of *data* fed in the given chunk sizes (default: at once)."""
    parser = OrcaStreamParser(**options)
    out, pos = [], 0
    for size in chunks or [len(data)]:
        out += parser.feed(data[pos:pos + size])
        pos += size
    out += parser.feed(data[pos:])
    out += parser.close()
    return out, parser


def kinds(records):
    return [r.kind for r in records]


def run_id_of(plist) -> int:
    return next(i for i, d in orca.data_description(plist).items() if d.model == "ORRunModel")


# -- header record (§4) ------------------------------------------------------


@pytest.mark.parametrize("extra", range(4))
def test_header_padding_quirk_always_adds_one_to_four_nul_bytes(extra):
    plist = orca.make_header_plist(CMOS_ID, BASE_ID)
    for pad in range(8):  # find a value making the XML length ≡ extra (mod 4)
        plist["Note"] = "x" * pad
        if len(plistlib.dumps(plist)) % 4 == extra:
            break
    rec = orca.encode_header(plist)
    n = int.from_bytes(rec[4:8], "little")
    assert n % 4 == extra
    assert len(rec) == 8 + 4 * (n // 4 + 1)
    assert int.from_bytes(rec[:4], "little") == len(rec) // 4
    padding = rec[8 + n:]
    assert padding == b"\0" * (4 - extra)  # 4 NULs when n is a multiple of 4
    assert orca.parse_header_record(rec) == plist


@pytest.mark.parametrize("order", ["little", "big"])
def test_header_byte_order_is_detected_from_the_header_word(order):
    rec = header(byteorder=order)
    assert orca.detect_byteorder(rec) == order
    assert orca.sniff(rec)
    records, parser = parse(rec + cmos(byteorder=order))
    assert kinds(records) == ["header", "cmos"]
    assert records[0].byteorder == order and parser.byteorder == order
    assert orca.xl3_data_ids(records[0].header) == (CMOS_ID, BASE_ID)


def test_header_xml_length_comes_from_word_1_not_the_padding():
    plist = orca.make_header_plist(CMOS_ID, BASE_ID)
    xml = plistlib.dumps(plist)
    padded = xml + b"\0" * (-len(xml) % 4 + 8)  # not ORCA's quirk: extra words
    rec = (2 + len(padded) // 4).to_bytes(4, "little") + len(xml).to_bytes(4, "little") + padded
    records, _ = parse(rec + cmos())
    assert kinds(records) == ["header", "cmos"] and records[0].header == plist


@pytest.mark.parametrize("order", ["little", "big"])
def test_legacy_bare_xml_header_is_accepted_and_byte_order_found_from_next_record(order):
    xml = plistlib.dumps(orca.make_header_plist(CMOS_ID, BASE_ID))
    data = xml + b"\n" * (-len(xml) % 4) + b"\0\0\0\0" + cmos(byteorder=order) + base(byteorder=order)
    assert orca.sniff(data)
    records, parser = parse(data)
    assert kinds(records) == ["header", "cmos", "base"]
    assert parser.ids == (CMOS_ID, BASE_ID) and parser.byteorder == order
    assert not parser.stats.errors


def test_header_with_unparsable_plist_is_an_error_and_skipped():
    xml = b"<?xml version='1.0'?><plist><dict><key>a</key>"  # unterminated
    rec = orca.encode_long(1 << 18, [0])  # placeholder to get sizes right below
    padded = xml + b"\0" * (4 - len(xml) % 4)
    rec = (2 + len(padded) // 4).to_bytes(4, "little") + len(xml).to_bytes(4, "little") + padded
    records, parser = parse(header() + rec + cmos())
    assert kinds(records) == ["header", "cmos"]
    assert parser.stats.errors["bad_header_plist"] == 1
    with pytest.raises(OrcaError) as err:
        orca.parse_header_record(rec)
    assert err.value.reason == "bad_header_plist"


# -- data ids (§4.1) -----------------------------------------------------------


def test_xl3_ids_found_for_non_default_ids():
    plist = orca.make_header_plist(0x1234 << 18, 77 << 18)
    assert orca.xl3_data_ids(plist) == XL3Ids(0x1234 << 18, 77 << 18)


def test_xl3_ids_fall_back_to_decoder_names_in_any_model():
    plist = orca.make_header_plist(CMOS_ID, BASE_ID)
    desc = plist["dataDescription"]
    desc["SomeOtherXL3"] = {"Rates": desc["ORXL3Model"].pop("Xl3CmosRate"),
                            "Currents": desc["ORXL3Model"].pop("Xl3PmtBaseCurrent")}
    assert orca.xl3_data_ids(plist) == XL3Ids(CMOS_ID, BASE_ID)


def test_xl3_ids_mask_negative_plist_integers_and_absent_ids_are_none():
    plist = orca.make_header_plist(CMOS_ID, BASE_ID)
    plist["dataDescription"]["ORXL3Model"]["Xl3CmosRate"]["dataId"] = CMOS_ID - (1 << 32)
    del plist["dataDescription"]["ORXL3Model"]["Xl3PmtBaseCurrent"]
    assert orca.xl3_data_ids(plist) == XL3Ids(CMOS_ID, None)
    assert orca.xl3_data_ids({}) == XL3Ids(None, None)
    assert orca.xl3_data_ids({"dataDescription": "junk"}) == XL3Ids(None, None)


def test_data_description_lists_all_seven_xl3_records_and_run_control():
    desc = orca.data_description(orca.make_header_plist(CMOS_ID, BASE_ID))
    names = {d.name for d in desc.values() if d.model == "ORXL3Model"}
    assert names == {"Xl3MegaBundle", "Xl3CmosRate", "Xl3PmtBaseCurrent", "Xl3Fifo", "Xl3Hv", "Xl3Vlt", "FecVlt"}
    assert desc[CMOS_ID].fixed_length == 283 and desc[BASE_ID].fixed_length == 282
    assert len(desc) == 8 and all(i & orca.LONG_ID_MASK == i for i in desc)


# -- classification --------------------------------------------------------------


def test_unknown_ids_are_skipped_by_length_and_counted():
    data = header() + orca.encode_long(0x1000 << 18, [1, 2, 3]) + cmos() + orca.encode_short(40 << 26, 5) + base()
    records, parser = parse(data)
    assert kinds(records) == ["header", "cmos", "base"]
    assert parser.stats.skipped_unknown == 2 and not parser.stats.errors


def test_known_other_and_short_records_are_returned_with_their_kind():
    plist = orca.make_header_plist(CMOS_ID, BASE_ID, extra_models={
        "ORMTCModel": {"GTID": {"decoder": "G", "dataId": (40 << 26) - (1 << 32), "length": 1, "variable": False}}})
    data = (orca.encode_header(plist) + orca.encode_run_control(run_id_of(plist), orca.RUN_START, 7, 123)
            + orca.encode_short(40 << 26, 0x2ABCDEF))
    records, _ = parse(data)
    assert kinds(records) == ["header", "other", "short"]
    assert records[2].short_data == 0x2ABCDEF and records[2].data_id == 40 << 26
    assert list(records[1].words[1:]) == [orca.RUN_START, 7, 123]


def test_records_before_any_header_are_other_unless_ids_are_given():
    data = cmos() + base()
    assert kinds(parse(data)[0]) == ["other", "other"]
    assert kinds(parse(data, ids=XL3Ids(CMOS_ID, BASE_ID))[0]) == ["cmos", "base"]


def test_header_mid_stream_with_new_ids_switches_classification():
    swapped = header(cmos_id=BASE_ID, base_id=CMOS_ID)
    data = (header() + cmos() + base()
            + swapped + cmos(data_id=BASE_ID) + base(data_id=CMOS_ID))
    records, parser = parse(data)
    assert kinds(records) == ["header", "cmos", "base", "header", "cmos", "base"]
    assert [r.data_id for r in records if r.kind == "cmos"] == [CMOS_ID, BASE_ID]
    assert parser.ids == XL3Ids(BASE_ID, CMOS_ID) and not parser.stats.errors
    assert not orca.decode_cmos([r for r in records if r.kind == "cmos"]).errors


def test_header_mid_stream_may_change_byte_order():
    data = header() + cmos() + header(byteorder="big") + cmos(byteorder="big")
    records, _ = parse(data)
    assert [(r.kind, r.byteorder) for r in records] == [
        ("header", "little"), ("cmos", "little"), ("header", "big"), ("cmos", "big")]
    batch = orca.decode_cmos([r for r in records if r.kind == "cmos"])
    assert not batch.errors and np.array_equal(batch.count[:len(batch.count) // 2], batch.count[len(batch.count) // 2:])


# -- bad input and resynchronisation ----------------------------------------------


def good_stream():
    return header() + b"".join(cmos(crate=c) + base(crate=c) for c in range(3))


@pytest.mark.parametrize("junk", [b"\x01", b"abc", b"\xff" * 4, b"garbage!!", bytes(range(37)), b"\0" * 8])
def test_garbage_between_records_is_counted_and_good_records_after_it_returned(junk):
    h = header()
    recs = [cmos(crate=c) + base(crate=c) for c in range(3)]
    data = h + recs[0] + junk + recs[1] + recs[2]
    records, parser = parse(data)
    assert kinds(records) == ["header"] + ["cmos", "base"] * 3
    assert sum(parser.stats.errors.values()) + parser.stats.skipped_unknown >= 1
    assert parser.stats.bytes_skipped + 4 * parser.stats.skipped_unknown == len(junk)
    assert records[3].offset == len(h) + len(recs[0]) + len(junk)


def test_truncated_record_is_dropped_and_the_following_records_still_returned():
    h = header()
    first = cmos(crate=1)
    data = h + first[:500] + cmos(crate=2) + base(crate=2)
    records, parser = parse(data)
    assert kinds(records) == ["header", "cmos", "base"]
    assert orca.decode_cmos(records[1:2]).crate.tolist() == [2]
    assert parser.stats.errors["truncated"] == 1


def test_truncated_record_at_end_of_stream_is_counted():
    data = good_stream()
    records, parser = parse(data[:-100])
    assert kinds(records) == ["header"] + ["cmos", "base"] * 2 + ["cmos"]
    assert parser.stats.errors["truncated"] == 1


@pytest.mark.parametrize("word,reason", [
    (0, "zero_length"), ((3 << 18) | 70000, "too_long"), (CMOS_ID | 282, "length_mismatch"),
    (BASE_ID | 283, "length_mismatch"), (0xFC000001, "bad_short_id"), (17, "bad_header")])
def test_bad_record_words_are_typed_errors_and_parsing_resumes(word, reason):
    errors = []
    data = header() + cmos() + word.to_bytes(4, "little") + b"\x07" * 12 + base()
    records, parser = parse(data, on_error=errors.append)
    assert kinds(records) == ["header", "cmos", "base"]
    assert parser.stats.errors[reason] == 1 and parser.stats.resyncs == 1
    assert isinstance(errors[0], OrcaError) and isinstance(errors[0], ValueError)
    assert errors[0].reason == reason and errors[0].offset == len(header()) + len(cmos())


def test_configured_max_words_rejects_longer_records():
    plist = orca.make_header_plist(CMOS_ID, BASE_ID)
    bundle = next(i for i, d in orca.data_description(plist).items() if d.name == "Xl3MegaBundle")
    data = orca.encode_header(plist) + orca.encode_long(bundle, range(400)) + cmos()
    records, parser = parse(data, max_words=300)
    assert kinds(records) == ["header", "cmos"] and parser.stats.errors["too_long"] == 1
    assert kinds(parse(data)[0]) == ["header", "other", "cmos"]


def test_random_chunks_and_byte_by_byte_give_the_same_records():
    data = header() + cmos() + b"xyz" + base() + header(cmos_id=BASE_ID, base_id=CMOS_ID, byteorder="big") \
        + cmos(data_id=BASE_ID, byteorder="big")[:700] + base(data_id=CMOS_ID, byteorder="big") + b"\0\0"
    whole, p_whole = parse(data)
    rng = random.Random(1)
    chunks = []
    while sum(chunks) < len(data):
        chunks.append(rng.randint(1, 300))
    assert parse(data, chunks)[0] == whole
    bytewise, p_byte = parse(data, [1] * len(data))
    assert bytewise == whole and p_byte.stats == p_whole.stats
    assert kinds(whole) == ["header", "cmos", "base", "header", "base"]


def test_without_lookahead_records_are_returned_as_soon_as_complete():
    data = header() + cmos()
    parser = OrcaStreamParser(lookahead=False)
    assert kinds(parser.feed(data)) == ["header", "cmos"]
    parser = OrcaStreamParser()
    assert kinds(parser.feed(data)) == ["header"]
    assert kinds(parser.close()) == ["cmos"]


def test_read_file_gives_the_records_of_a_file(tmp_path):
    path = tmp_path / "run.orca"
    path.write_bytes(good_stream())
    assert kinds(orca.read_file(path, chunk_size=1000)) == ["header"] + ["cmos", "base"] * 3


# -- CMOS decoding (§5) -----------------------------------------------------------


def test_cmos_packed_layout_with_a_gap_slot():
    counts = np.arange(8 * 32).reshape(8, 32) + 10
    counts[4:] = 0x7FFFFFFE  # unused blocks past the 4th card must be ignored
    batch = orca.decode_cmos([cmos(crate=7, mask=GAP_MASK, counts=counts)])
    assert not batch.errors and batch.crate.tolist() == [7] and batch.slot_mask.tolist() == [GAP_MASK]
    slots = [0, 2, 13, 15]
    expected_lcn = [7 * 512 + s * 32 + ch for s in slots for ch in range(32)]
    assert batch.lcn.tolist() == expected_lcn
    assert batch.count.tolist() == counts[:4].ravel().tolist()


def test_cmos_masked_and_flagged_channels_are_marked():
    chmask = [FULL] * 16
    chmask[13] = FULL & ~(1 << 5)  # absolute slot 13 (the 3rd card of the record)
    counts = np.full((4, 32), 100)
    counts[1, 7] |= 1 << 31
    batch = orca.decode_cmos([cmos(crate=0, chmask=chmask, counts=counts)])
    assert batch.lcn[batch.masked].tolist() == [13 * 32 + 5]
    assert batch.lcn[batch.flagged].tolist() == [2 * 32 + 7]
    assert batch.count[batch.flagged].tolist() == [100]  # low 31 bits


def test_cmos_fields_and_timestamp_in_both_byte_orders():
    t = T0 + 12.34
    for order in ("little", "big"):
        rec = cmos(crate=18, mask=0xFF00, t=t, byteorder=order, error_flags=5, delay=9)
        batch = orca.decode_cmos([rec], byteorder=order)
        assert not batch.errors
        assert batch.timestamp[0] == pytest.approx(t, abs=1e-6) and batch.time_us[0] == 1_700_000_012_340_000
        assert batch.error_flags.tolist() == [5] and batch.delay.tolist() == [9]
        assert batch.lcn.min() == 18 * 512 + 8 * 32 and batch.lcn.max() == 19 * 512 - 1  # the last channel of XL3 crate 18
        assert rec[-24:-1] == b"2023-11-14T22:13:32.34Z"  # text is never swapped


def test_bad_cmos_records_are_reported_and_do_not_stop_the_others():
    good = cmos(crate=1)
    bad_time = good[:-24] + b"2023-13-45T99:00:00.00Z\0"
    bad_crate = cmos(crate=19)
    too_many = orca.encode_cmos(CMOS_ID, 2, 0x01FF, FULL, np.zeros((8, 32)), T0)
    batch = orca.decode_cmos([bad_time, good, bad_crate, good[:-4], too_many, "nonsense", good])
    assert batch.index.tolist() == [1, 6]
    assert [(i, e.reason) for i, e in batch.errors] == [
        (0, "bad_timestamp"), (2, "bad_crate"), (3, "bad_length"), (4, "too_many_cards"), (5, "bad_type")]
    assert all(isinstance(e, OrcaError) for _, e in batch.errors)
    assert len(batch.lcn) == 2 * 4 * 32 and set(batch.record.tolist()) == {0, 1}


@pytest.mark.parametrize("text,expected_us", [
    (b"2023-11-14T22:13:20.05Z\0", 1_700_000_000_050_000),
    (b"2023-11-14T22:13:20Z", 1_700_000_000_000_000),
    (b"2023-11-14T22:13:20.123456", 1_700_000_000_123_456),
    (b"2023-11-14T22:13:20.5Z\0junk", 1_700_000_000_500_000),
])
def test_timestamp_text_is_parsed_to_integer_microseconds(text, expected_us):
    assert orca.parse_timestamp_us(text) == expected_us


@pytest.mark.parametrize("text", [b"", b"\0" * 24, b"2023-11-14 22:13:20.05Z", b"2023-02-30T00:00:00.00Z",
                                  b"2023-11-14T24:00:00.00Z", b"\xff\xfe", b"2023-11-14T22:13:20.05ZZ"])
def test_bad_timestamp_text_raises_orca_error(text):
    with pytest.raises(OrcaError) as err:
        orca.parse_timestamp_us(text)
    assert err.value.reason == "bad_timestamp"


# -- base currents (§6) ------------------------------------------------------------


@pytest.mark.parametrize("order", ["little", "big"])
def test_base_unpacked_layout_indexed_by_absolute_slot(order):
    currents = np.full((16, 32), 0xFF)  # absent slots: must not be decoded
    busy = np.zeros((16, 32), dtype=np.uint8)
    for s in (0, 2, 13, 15):
        currents[s] = np.arange(32) + 100 + s
    busy[13, 4] = 1
    chmask = [FULL] * 16
    chmask[15] = FULL & ~1
    batch = orca.decode_base([base(crate=6, currents=currents, busy=busy, chmask=chmask, byteorder=order)],
                             byteorder=order)
    assert not batch.errors
    lcn = [6 * 512 + s * 32 + ch for s in (0, 2, 13, 15) for ch in range(32)]
    assert batch.lcn.tolist() == lcn
    assert batch.current.dtype == np.int16
    assert batch.current.tolist() == [100 + s + ch - 127 for s in (0, 2, 13, 15) for ch in range(32)]
    assert batch.lcn[batch.busy].tolist() == [6 * 512 + 13 * 32 + 4]
    assert batch.lcn[batch.masked].tolist() == [6 * 512 + 15 * 32]
    assert batch.timestamp[0] == T0


def test_bad_base_records_are_reported_and_do_not_stop_the_others():
    good = base()
    batch = orca.decode_base([good, good[:-24] + b"yesterday".ljust(24, b"\0"), cmos()])
    assert batch.index.tolist() == [0]
    assert [(i, e.reason) for i, e in batch.errors] == [(1, "bad_timestamp"), (2, "bad_length")]


# -- rates ------------------------------------------------------------------------


def readings(*entries, mask=FULL):
    """A CmosBatch of crate-0 slot-0 readings: entries of (t, {ch: count})."""
    recs = []
    for t, values in entries:
        counts = np.zeros((1, 32), dtype=np.int64)
        for ch, v in values.items():
            counts[0, ch] = v
        recs.append(orca.encode_cmos(CMOS_ID, 0, 1, mask, counts, t))
    return orca.decode_cmos(recs)


def rates_of(state, batch, channels=(0,)):
    lcn, rate = state.update(batch)
    return {int(c): float(r) for c, r in zip(lcn, rate) if c in channels}


def test_rate_is_count_difference_over_time_and_first_reading_gives_none():
    state = orca.CmosRateState()
    assert rates_of(state, readings((T0, {0: 1000}))) == {}
    assert rates_of(state, readings((T0 + 0.5, {0: 1600}))) == {0: 1200.0}
    assert rates_of(state, readings((T0 + 1.75, {0: 1600}))) == {0: 0.0}  # unchanged count: 0 Hz


def test_counter_reset_or_wrap_gives_no_rate_and_rebaselines():
    state = orca.CmosRateState()
    state.update(readings((T0, {0: 5000})))
    assert rates_of(state, readings((T0 + 1, {0: 10}))) == {}
    assert rates_of(state, readings((T0 + 2, {0: 110}))) == {0: 100.0}


@pytest.mark.parametrize("dt,expect", [(0.0, None), (-1.0, None), (10.0, 100.0), (10.01, None), (0.01, 100.0)])
def test_rate_needs_dt_in_zero_to_max_dt(dt, expect):
    state = orca.CmosRateState(max_dt=10.0)
    state.update(readings((T0, {0: 1000})))
    got = rates_of(state, readings((T0 + dt, {0: 1000 + round(100 * dt)})))
    assert got == ({} if expect is None else {0: pytest.approx(expect)})


def test_stale_pair_rebaselines_so_the_next_pair_gives_a_rate():
    state = orca.CmosRateState(max_dt=5.0)
    state.update(readings((T0, {0: 0})))
    assert rates_of(state, readings((T0 + 60, {0: 6000}))) == {}
    assert rates_of(state, readings((T0 + 61, {0: 6100}))) == {0: 100.0}


def test_flagged_reading_and_the_reading_after_it_give_no_rate():
    state = orca.CmosRateState()
    state.update(readings((T0, {0: 100})))
    assert rates_of(state, readings((T0 + 1, {0: 200 | 1 << 31}))) == {}
    assert rates_of(state, readings((T0 + 2, {0: 300}))) == {}
    assert rates_of(state, readings((T0 + 3, {0: 400}))) == {0: 100.0}


def test_masked_channel_gives_no_rate():
    state = orca.CmosRateState()
    state.update(readings((T0, {0: 100, 1: 100}), mask=FULL & ~1))
    got = rates_of(state, readings((T0 + 1, {0: 200, 1: 200}), mask=FULL & ~1), channels=(0, 1))
    assert got == {1: 100.0}


def test_a_channel_read_twice_in_one_batch_is_handled_in_order():
    state = orca.CmosRateState()
    lcn, rate = state.update(readings((T0, {0: 0}), (T0 + 1, {0: 50}), (T0 + 2, {0: 150})))
    assert sorted(rate[lcn == 0].tolist()) == [50.0, 100.0]
    assert state.last_count[0] == 150


def test_rate_state_serialisation_round_trip_resumes_without_spurious_rates():
    state = orca.CmosRateState(max_dt=7.0)
    state.update(readings((T0, {0: 100, 3: 7})))
    for restored in (orca.CmosRateState.from_bytes(state.to_bytes()),
                     orca.CmosRateState.from_dict(json.loads(json.dumps(state.to_dict())))):
        assert restored.max_dt == 7.0 and np.array_equal(restored.have, state.have)
        assert np.array_equal(restored.last_count, state.last_count)
        got = rates_of(restored, readings((T0 + 1, {0: 300, 3: 7, 4: 9})), channels=range(32))
        assert got == {ch: 0.0 for ch in range(32)} | {0: 200.0, 4: 9.0}
        # restarting long after the save gives no rate for the stale baselines
        late = orca.CmosRateState.from_bytes(state.to_bytes())
        assert rates_of(late, readings((T0 + 100, {0: 300})), channels=range(32)) == {}


@pytest.mark.parametrize("blob", [b"", b"MCRS", b"XXXX" + bytes(200), orca.CmosRateState().to_bytes()[:-1]])
def test_bad_rate_state_bytes_raise_orca_error(blob):
    with pytest.raises(OrcaError):
        orca.CmosRateState.from_bytes(blob)


def test_bad_rate_state_dict_raises_orca_error():
    good = orca.CmosRateState().to_dict()
    for bad in ({}, {**good, "lcn": [99999], "count": [1], "time_us": [1]}, {**good, "count": [1]}):
        with pytest.raises(OrcaError):
            orca.CmosRateState.from_dict(bad)


# -- writers and dump ----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(mask=st.integers(1, 0xFFFF).filter(lambda m: m.bit_count() <= 8),
       crate=st.integers(0, 18), seed=st.integers(0, 2**32 - 1), cs=st.integers(0, 10**11),
       order=st.sampled_from(["little", "big"]))
def test_cmos_encode_decode_round_trip_is_exact(mask, crate, seed, cs, order):
    rng = np.random.default_rng(seed)
    ncards = mask.bit_count()
    counts = rng.integers(0, 1 << 32, (ncards, 32))
    chmask = rng.integers(0, 1 << 32, 16)
    rec = orca.encode_cmos(CMOS_ID, crate, mask, chmask, counts, cs / 100, byteorder=order)
    batch = orca.decode_cmos([rec], byteorder=order)
    assert not batch.errors and batch.time_us[0] == cs * 10_000
    assert np.array_equal(batch.count | (batch.flagged.astype(np.int64) << 31), counts.ravel())
    assert np.array_equal(batch.channel_masks[0], chmask)
    slots = [s for s in range(16) if mask >> s & 1]
    masked = [not (chmask[s] >> ch & 1) for s in slots for ch in range(32)]
    assert batch.masked.tolist() == masked


@settings(max_examples=30, deadline=None)
@given(mask=st.integers(0, 0xFFFF), seed=st.integers(0, 2**32 - 1), order=st.sampled_from(["little", "big"]))
def test_base_encode_decode_round_trip_is_exact(mask, seed, order):
    rng = np.random.default_rng(seed)
    currents = rng.integers(0, 256, (16, 32))
    busy = rng.integers(0, 2, (16, 32))
    rec = orca.encode_base(BASE_ID, 9, mask, FULL, currents, busy, T0, byteorder=order)
    batch = orca.decode_base([rec], byteorder=order)
    slots = [s for s in range(16) if mask >> s & 1]
    assert batch.current.tolist() == (currents[slots] - 127).ravel().tolist()
    assert batch.busy.tolist() == busy[slots].astype(bool).ravel().tolist()


def test_writers_reject_invalid_ids():
    with pytest.raises(ValueError):
        orca.encode_long(5, [1])
    with pytest.raises(ValueError):
        orca.encode_short(5 << 18, 1)
    with pytest.raises(ValueError):
        orca.encode_cmos(CMOS_ID, 0, 0x1FF, FULL, np.zeros((9, 32)), T0)


def test_record_to_dict_describes_records_and_errors():
    records, _ = parse(header() + cmos(crate=2) + base(crate=2))
    head, c, b = (orca.record_to_dict(r) for r in records)
    assert head["kind"] == "header" and (head["cmos_id"], head["base_id"]) == (CMOS_ID, BASE_ID)
    assert c["crate"] == 2 and sorted(c["counts"], key=int) == ["0", "2", "13", "15"]
    assert c["counts"]["2"][0] == 2000 + 32 and c["timestamp"] == T0
    assert b["currents"]["0"][0] == 20 - 127 and b["busy"] == []
    bad = records[1]._replace(raw=records[1].raw[:-24] + b"x" * 24)
    out = orca.record_to_dict(bad)
    assert out["reason"] == "bad_timestamp" and out["offset"] == records[1].offset
    json.dumps([head, c, b, out])
    assert orca.record_to_dict(records[1], XL3Ids(None, CMOS_ID))["kind"] == "base"


# -- property tests: nothing but OrcaError escapes ------------------------------------


def _decode_all(records):
    cm = [r for r in records if r.kind == "cmos"]
    bs = [r for r in records if r.kind == "base"]
    for batch in (orca.decode_cmos(cm), orca.decode_base(bs)):
        assert all(isinstance(e, OrcaError) for _, e in batch.errors)
    for r in records:
        orca.record_to_dict(r)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000), cut=st.integers(1, 64))
def test_random_bytes_never_raise_from_the_parser_and_chunking_does_not_matter(data, cut):
    whole, p1 = parse(data)
    chunked, p2 = parse(data, [cut] * (len(data) // cut))
    assert whole == chunked and p1.stats == p2.stats
    _decode_all(whole)


VALID = (header() + cmos(crate=1) + base(crate=1) + orca.encode_short(40 << 26, 1)
         + header(cmos_id=BASE_ID, base_id=CMOS_ID, byteorder="big") + cmos(data_id=BASE_ID, byteorder="big"))


@st.composite
def mutated(draw):
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "zero"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=40))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 40))]
        elif op == "truncate":
            del data[pos:]
        else:
            data[pos:pos + 4] = b"\0\0\0\0"
        if not data:
            break
    return bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated(), cut=st.integers(1, 500))
def test_mutated_streams_never_raise_and_chunking_does_not_matter(data, cut):
    whole, p1 = parse(data)
    chunked, p2 = parse(data, [cut] * (len(data) // cut))
    assert whole == chunked and p1.stats == p2.stats
    _decode_all(whole)


@settings(max_examples=100, deadline=None)
@given(blobs=st.lists(st.binary(min_size=1128, max_size=1132), max_size=5),
       order=st.sampled_from(["little", "big"]))
def test_decoders_on_random_records_only_report_orca_errors(blobs, order):
    for decode in (orca.decode_cmos, orca.decode_base):
        batch = decode(blobs, byteorder=order)
        assert len(batch.index) + len(batch.errors) == len(blobs)
        assert all(isinstance(e, OrcaError) for _, e in batch.errors)
        assert ((batch.lcn >= 0) & (batch.lcn < orca.NCHANNELS_TOTAL)).all()


@settings(max_examples=100, deadline=None)
@given(text=st.binary(max_size=30))
def test_timestamp_and_plist_and_state_parsers_only_raise_orca_error(text):
    for fn in (orca.parse_timestamp_us, orca.parse_plist, orca.CmosRateState.from_bytes):
        try:
            fn(text)
        except OrcaError:
            pass


# -- the vectorised CMOS path against a per-channel reference ------------------------
#
# decode_cmos caches what depends only on the header words (_CmosLayout) and
# CmosRateState.update has a whole-card fast path (slices or row gathers) beside
# the per-channel one; both must give exactly what a plain loop over channels
# gives, whatever the mix of layouts, masks, flags, resets, Δt and repeated cards.


def reference_decode(raw: bytes, order: str = "little"):
    """One record the straightforward way: ``(crate, time_us, [(lcn, count, flagged, masked)])``."""
    fmt = "<" if order == "little" else ">"
    w = struct.unpack_from(fmt + f"{orca.CMOS_WORDS}I", raw)
    crate, slots, chmasks = w[1], w[2], w[3:19]
    channels, block = [], 0
    for slot in range(16):
        if slots >> slot & 1:
            for ch in range(32):
                word = w[21 + block * 32 + ch]
                channels.append((crate * 512 + slot * 32 + ch, word & 0x7FFFFFFF, bool(word >> 31),
                                 not chmasks[slot] >> ch & 1))
            block += 1
    return crate, orca.parse_timestamp_us(raw[-24:]), channels


class ReferenceRates:
    """CmosRateState's rules one channel at a time (see its docstring)."""

    def __init__(self, max_dt: float):
        self.max_dt_us = round(max_dt * 1e6)
        self.last: dict[int, tuple[int, int]] = {}  # lcn -> (count, time_us)

    def update(self, records, order="little"):
        out = []
        for raw in records:
            _, t, channels = reference_decode(raw, order)
            for lcn, count, flagged, masked in channels:
                if flagged or masked:
                    self.last.pop(lcn, None)
                    continue
                prev = self.last.get(lcn)
                if prev and 0 < t - prev[1] <= self.max_dt_us and count >= prev[0]:
                    out.append((lcn, (count - prev[0]) * 1e6 / (t - prev[1])))
                self.last[lcn] = (count, t)
        return out


@st.composite
def cmos_streams(draw):
    """Readouts of random crates, each split into records of random slot masks;
    counts that mostly grow (sometimes reset or flagged); channel masks that
    sometimes change (a new layout); Δt of 0, negative, normal or too long;
    and batches that sometimes hold the same card twice."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    nreadouts = draw(st.integers(1, 6))
    crates = draw(st.lists(st.integers(0, 18), min_size=1, max_size=4, unique=True))
    masks = draw(st.lists(st.integers(1, 0xFFFF).filter(lambda m: m.bit_count() <= 8), min_size=1, max_size=3))
    counts = rng.integers(0, 1 << 30, (19, 16, 32))
    chmask = {c: FULL for c in crates}
    t, batches, batch = T0, [], []
    for _ in range(nreadouts):
        t += float(rng.choice([0.0, -0.5, 0.01, 1.0, 2.0, 30.0], p=[.05, .05, .1, .5, .2, .1]))
        counts += rng.integers(0, 5000, counts.shape)
        counts[rng.random(counts.shape) < 0.01] = 0  # counter resets
        for c in crates:
            if rng.random() < 0.2:
                chmask[c] = [int(x) for x in rng.integers(0, 1 << 32, 16)]
            for mask in masks:
                slots = [s for s in range(16) if mask >> s & 1]
                words = counts[c][slots] | (rng.random((len(slots), 32)) < 0.02).astype(np.int64) << 31
                batch.append(orca.encode_cmos(CMOS_ID, c, mask, chmask[c], words, t))
        if rng.random() < 0.6:
            batches.append(batch)
            batch = []
    return [b for b in batches + [batch] if b]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=cmos_streams(), order=st.sampled_from(["little", "big"]))
def test_decode_cmos_matches_a_per_channel_decode_with_and_without_its_layout_cache(stream, order):
    for records in stream:
        if order == "big":
            records = [swap_cmos(r) for r in records]
        want = [reference_decode(r, order) for r in records]
        for _ in range(2):  # the second decode of each layout comes from the cache
            batch = orca.decode_cmos(records, byteorder=order)
            assert not batch.errors and batch.index.tolist() == list(range(len(records)))
            assert batch.crate.tolist() == [w[0] for w in want] and batch.time_us.tolist() == [w[1] for w in want]
            channels = [ch for w in want for ch in w[2]]
            assert list(zip(batch.lcn.tolist(), batch.count.tolist(), batch.flagged.tolist(),
                            batch.masked.tolist())) == channels
            assert (batch.card * 32 + np.arange(32)[:, None]).T.ravel().tolist() == batch.lcn.tolist()
            assert batch.record.tolist() == [r for r, w in enumerate(want) for _ in w[2]]
            assert batch.count.dtype == np.int64 and batch.lcn.dtype == np.int64


def swap_cmos(raw: bytes) -> bytes:
    """The same CMOS record written by a big-endian ORCA (§2: the text is not swapped)."""
    words = np.frombuffer(raw[:-24], "<u4")
    return words.astype(">u4").tobytes() + raw[-24:]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=cmos_streams(), max_dt=st.sampled_from([1.0, 2.5, 10.0]))
def test_vectorised_rates_are_bit_identical_to_a_per_channel_loop(stream, max_dt):
    state, ref = orca.CmosRateState(max_dt), ReferenceRates(max_dt)
    for records in stream:
        lcn, rate = state.update(orca.decode_cmos(records))
        want = ref.update(records)
        # per channel the order is the stream order; between channels any order
        assert sorted(zip(lcn.tolist(), rate.tolist())) == sorted(want)
    have = {lcn: (int(state.last_count[lcn]), int(state.last_time_us[lcn])) for lcn in np.flatnonzero(state.have)}
    assert have == ref.last


def test_a_cached_layout_is_read_only_and_shared_but_counts_are_fresh():
    rec = cmos(crate=5, mask=0x00FF)
    a, b = orca.decode_cmos([rec]), orca.decode_cmos([rec])
    assert a.lcn is b.lcn and a.card is b.card and a.masked is b.masked
    assert a.count is not b.count and a.count.flags.writeable
    with pytest.raises(ValueError):
        a.lcn[0] = 1


def test_rates_are_the_same_through_the_slice_the_row_gather_and_the_per_channel_paths():
    counts = np.arange(8 * 32).reshape(8, 32) * 7
    first = [orca.encode_cmos(CMOS_ID, c, m, FULL, counts + 100 * c, T0) for c in (2, 3) for m in (0xFF, 0xFF00)]
    second = [orca.encode_cmos(CMOS_ID, c, m, FULL, counts * 2 + 100 * c, T0 + 2)
              for c in (2, 3) for m in (0xFF, 0xFF00)]
    results = []
    for order in ([0, 1, 2, 3], [3, 0, 2, 1]):  # consecutive cards: a slice; shuffled: a row gather
        state = orca.CmosRateState()
        state.update(orca.decode_cmos([first[i] for i in order]))
        batch = orca.decode_cmos([second[i] for i in order])
        plan = state._card_plan(batch.card, len(batch.lcn))
        assert isinstance(plan, slice if order == sorted(order) else np.ndarray)
        lcn, rate = state.update(batch)
        results.append(sorted(zip(lcn.tolist(), rate.tolist())))
    state = orca.CmosRateState()  # each card twice in one batch: the per-channel path, in order
    lcn, rate = state.update(orca.decode_cmos(first + second))
    results.append(sorted(zip(lcn.tolist(), rate.tolist())))
    assert results[0] == results[1] == results[2] and len(results[0]) == 4 * 8 * 32
