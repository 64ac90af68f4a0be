"""ZEBRA layers of ZDAB files: reading, writing and recovery (minard.formats.zdab)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minard.formats import pmt, zdab
from minard.formats.pmt import RecordError
from minard.formats.zdab import (
    ReadStats,
    ZdabError,
    ZdabReader,
    ZdabWriter,
    iter_banks,
    read_events,
)


def make_event(i: int, nhit: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed * 100003 + i)
    hits = {
        "crate": rng.integers(0, 19, nhit), "card": rng.integers(0, 16, nhit),
        "channel": rng.integers(0, 32, nhit), "qhs": rng.integers(400, 700, nhit),
        "tac": rng.integers(0, 4096, nhit),
    }
    return pmt.encode_event(run=7, evnum=i, gtid=(100 + i) % 2**24, trigger_word=1, hits=hits)


def write(records, record_words=3840, banks=()) -> bytes:
    """A file image holding *records* (PmtEventRecords) then *banks*."""
    buf = io.BytesIO()
    with ZdabWriter(buf, record_words) as writer:
        for r in records:
            writer.write_event(r)
        for name, words in banks:
            writer.write_bank(name, words)
    return buf.getvalue()


def read(data: bytes) -> tuple[list[bytes], ReadStats]:
    stats = ReadStats()
    return list(read_events(data, stats)), stats


def words_of(data: bytes) -> np.ndarray:
    return np.frombuffer(data, ">u4")


def steering(data: bytes, block: int, size: int = 3840) -> tuple[int, ...]:
    return struct.unpack_from(">8I", data, 4 * size * block)


# ---------------------------------------------------------------------------
# The demo file (§8)
# ---------------------------------------------------------------------------


def test_demo_file_holds_exactly_one_event_with_the_documented_values(demo_zdab):
    with ZdabReader(demo_zdab) as reader:
        events = list(reader.events())
        stats = reader.stats
    assert len(events) == 1
    event = pmt.decode_event(events[0])
    assert (event["run"], event["evnum"], event["gtid"], event["nhit"]) == (3510, 0, 56981, 364)
    assert event["trigger_word"] == 0x400000F
    assert event["triggers"] == ["100L", "100M", "100H", "20", "MISS"]
    assert event["hits"][0] == [0, 1, 20, 14, 535, 533, 543, 1498]
    assert stats.blocks == 1 and stats.records == 1 and stats.padding == 1
    assert stats.end_of_data and stats.n_errors == 0 and stats.events == 1


def test_demo_file_stale_copies_in_padding_are_not_returned(demo_zdab):
    data = demo_zdab.read_bytes()
    w = words_of(data)
    assert list(np.flatnonzero(w == 0x5A444142)) == [25, 3865, 7705]  # the naive scan's 3 "events"
    banks = list(iter_banks(data))
    assert [(b.name, len(b.data), b.offset) for b in banks] == [("ZDAB", 1103 * 4, 32)]


def test_demo_file_reads_the_same_from_bytes_memoryview_and_path(demo_zdab):
    data = demo_zdab.read_bytes()
    expected = data[120:120 + 1103 * 4]
    assert list(read_events(demo_zdab)) == [expected]
    assert list(read_events(data)) == [expected]
    assert list(read_events(memoryview(data))) == [expected]


def test_writer_reproduces_the_demo_file_up_to_its_stale_padding(demo_zdab):
    data = demo_zdab.read_bytes()
    event = data[120:120 + 1103 * 4]
    written = write([event])
    assert len(written) == len(data) == 46080
    assert written[:4540] == data[:4540]  # steering, record, pilot, bank, event, padding header
    for block in (1, 2):  # end-of-run blocks: steering block and special record
        start = 15360 * block
        assert written[start:start + 32 + 8] == data[start:start + 32 + 8]


# ---------------------------------------------------------------------------
# Writer -> reader round trips
# ---------------------------------------------------------------------------


def test_many_events_round_trip_across_blocks():
    records = [make_event(i, n) for i, n in enumerate(np.random.default_rng(1).poisson(40, 3000))]
    data = write(records)
    got, stats = read(data)
    assert got == records
    assert stats.n_errors == 0 and stats.end_of_data and stats.blocks == len(data) // 15360 - 2
    # Straddling happened: some block's word 6 is past the steering block.
    assert any(steering(data, b)[6] > 8 for b in range(stats.blocks))


def test_straddling_records_in_small_blocks_round_trip():
    records = [make_event(i, n) for i, n in enumerate([0, 1, 30, 2, 200, 5, 0, 17])]
    for size in (16, 17, 23, 64, 100):
        data = write(records, record_words=size)
        got, stats = read(data)
        assert got == records, size
        assert stats.n_errors == 0 and stats.end_of_data


def test_a_5000_hit_event_uses_fast_blocks_and_round_trips():
    records = [make_event(0, 3), make_event(1, 5000), make_event(2, 4)]
    data = write(records)
    first = steering(data, 0)
    # 15033 words start at word 50: 3790 here, 2 full fast blocks, the rest straddles.
    assert first[7] == 2
    assert first[5] == 0 and steering(data, 3)[5] == 1  # fast blocks are not numbered
    assert 8 < steering(data, 3)[6] < 3840
    got, stats = read(data)
    assert got == records and stats.fast_blocks == 2 and stats.n_errors == 0


def test_record_filling_whole_blocks_without_a_record_beginning_round_trips():
    # With 64-word blocks a 30-hit event (101 data words) leaves continuation-only blocks.
    records = [make_event(0, 30), make_event(1, 1), make_event(2, 60)]
    for size in (64, 56, 120):
        data = write(records, record_words=size)
        assert read(data)[0] == records


def test_mast_and_rhdr_banks_share_a_logical_record_and_are_all_returned():
    rhdr = struct.pack(">4I", 20240101, 120000, 3510, 0)
    data = write([make_event(0, 3)], banks=[("RHDR", rhdr), ("TRIG", bytes(16))])
    banks = list(iter_banks(data))
    assert [b.name for b in banks] == ["ZDAB", "MAST", "RHDR", "MAST", "TRIG"]
    assert banks[2].data == rhdr and banks[1].offset == banks[2].offset
    assert list(read_events(data)) == [make_event(0, 3)]


def test_several_banks_in_one_logical_record_including_zdab():
    buf = io.BytesIO()
    with ZdabWriter(buf) as writer:
        writer.write_banks([("ZDAB", make_event(0, 2), 6), ("EPED", bytes(8), 2), ("ZDAB", make_event(1, 1), 6)])
    banks = list(iter_banks(buf.getvalue()))
    assert [b.name for b in banks] == ["MAST", "ZDAB", "EPED", "ZDAB"]
    assert len({b.offset for b in banks}) == 1


def handmade_file(logical_words: list[int], size: int = 256) -> bytes:
    """One physical record holding *logical_words*, padding, then an end-of-run block."""
    body = list(logical_words)
    body += [size - 8 - len(body) - 1, 5] + [0xABCDEF01] * (size - 8 - len(body) - 2)
    block = struct.pack(f">{size}I", *zdab.SIGNATURE, size, 0, 8, 0, *body)
    end = struct.pack(">8I", *zdab.SIGNATURE, (1 << 30) | size, 0, 8, 0)
    return block + end


def data_record_words(record: bytes) -> list[int]:
    """[L, 2, pilot..., i/o, header..., data...] of a single-ZDAB-bank record."""
    nd = len(record) // 4
    bank = [0x0002000C, 0, 327, 321, 6, 0x5A444142, 0, 0, nd, 0, *struct.unpack(f">{nd}I", record)]
    pilot = [0x4640E400, 37700, 0, 0, 0, 0, 0, len(bank), 0, 0]
    return [len(pilot) + len(bank), 2, *pilot, *bank]


def test_one_word_paddings_and_special_records_between_records_are_skipped():
    a, b = make_event(0, 2), make_event(1, 3)
    words = [0, 0, *data_record_words(a), 0, 1, 1, 0, *data_record_words(b), 0]
    got, stats = read(handmade_file(words))
    assert got == [a, b] and stats.n_errors == 0
    assert stats.padding == 4 + 1 and stats.special == 1 and stats.end_of_data  # + the final padding


def test_data_record_types_3_and_4_are_read_like_type_2():
    a = make_event(0, 2)
    for rtype in (3, 4):
        words = data_record_words(a)
        words[1] = rtype
        assert read(handmade_file(words))[0] == [a]


def test_flush_and_sync_make_everything_written_so_far_readable(tmp_path):
    path = tmp_path / "live.zdab"
    writer = ZdabWriter(path)
    writer.write_event(make_event(0, 4))
    writer.sync()
    assert list(read_events(path)) == [make_event(0, 4)]
    writer.write_event(make_event(1, 4))
    writer.close()
    writer.close()  # idempotent
    got = list(read_events(path))
    assert got == [make_event(0, 4), make_event(1, 4)]
    with pytest.raises(ValueError):
        writer.write_event(make_event(2, 1))


def test_empty_writer_still_writes_the_end_blocks(tmp_path):
    path = tmp_path / "empty.zdab"
    ZdabWriter(path).close()
    assert path.stat().st_size == 2 * 15360
    stats = ReadStats()
    assert list(read_events(path, stats)) == [] and stats.end_of_data


def test_reader_of_an_empty_file_returns_nothing(tmp_path):
    path = tmp_path / "nothing.zdab"
    path.write_bytes(b"")
    with ZdabReader(path) as reader:
        assert list(reader.events()) == [] and not reader.stats.end_of_data


def test_write_events_helper_and_reader_close_while_iterating(tmp_path):
    path = tmp_path / "x.zdab"
    records = [make_event(i, 3) for i in range(10)]
    assert zdab.write_events(path, records) == 10
    reader = ZdabReader(path)
    it = reader.events()
    assert next(it) == records[0]
    reader.close()  # an mmap in use is left for the garbage collector, not an error
    assert list(read_events(path)) == records


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nhits=st.lists(st.integers(0, 400), max_size=25), size=st.sampled_from([16, 40, 97, 512, 3840]))
def test_reader_of_writer_is_the_identity(nhits, size):
    records = [make_event(i, n, seed=3) for i, n in enumerate(nhits)]
    got, stats = read(write(records, record_words=size))
    assert got == records and stats.n_errors == 0


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

RECORDS = [make_event(i, n, seed=5) for i, n in enumerate(np.random.default_rng(5).poisson(60, 400))]
FILE = write(RECORDS)
BLOCK = 15360


def test_file_has_several_blocks_for_the_bad_input_tests():
    assert len(FILE) // BLOCK >= 8


@pytest.mark.parametrize("cut", [7, 100, BLOCK - 4, BLOCK + 3, 3 * BLOCK + 1000, len(FILE) - 2 * BLOCK - 10])
def test_truncated_file_returns_the_complete_records_before_the_cut(cut):
    got, stats = read(FILE[:cut])
    assert got == RECORDS[:len(got)]
    assert stats.errors["truncated"] >= 1 and not stats.end_of_data
    if cut > 2 * BLOCK:
        assert len(got) > 0


def test_file_cut_at_a_block_boundary_is_complete_but_has_no_end_of_run():
    got, stats = read(FILE[:2 * BLOCK])
    assert got == RECORDS[:len(got)] and not stats.end_of_data


def corrupt_word(data: bytes, word: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(">I", out, 4 * word, value)
    return bytes(out)


def records_in_block(data: bytes, block: int) -> set[bytes]:
    """Records that lie (at least partly) in physical record *block*."""
    got = set()
    for bank in iter_banks(data):
        if block * BLOCK <= bank.offset < (block + 1) * BLOCK:
            got.add(bank.data)
    return got


def test_corrupt_steering_signature_resynchronises_at_the_next_block():
    bad = corrupt_word(FILE, 3 * 3840 + 1, 0xDEADBEEF)
    got, stats = read(bad)
    assert stats.errors["bad_signature"] == 1 and stats.resyncs == 1 and stats.end_of_data
    lost = [r for r in RECORDS if r not in got]  # the records of block 3 (about 20)
    assert 0 < len(lost) < 30 and [r for r in RECORDS if r in got] == got
    assert RECORDS[0] in got and RECORDS[-1] in got


def test_signature_found_off_the_3840_word_grid_after_a_corrupt_block():
    # Drop 100 bytes from block 2: later blocks move off the grid; the scan still finds them.
    bad = FILE[:2 * BLOCK + 40] + FILE[2 * BLOCK + 140:]
    got, stats = read(bad)
    assert stats.resyncs >= 1 and stats.end_of_data
    assert RECORDS[-1] in got and RECORDS[0] in got


def test_physical_record_larger_than_3840_words_is_rejected_and_skipped():
    bad = corrupt_word(FILE, 2 * 3840 + 4, 3841)
    got, stats = read(bad)
    assert stats.errors["bad_block_size"] == 1 and stats.resyncs == 1
    assert RECORDS[-1] in got and len(got) < len(RECORDS)


def test_logical_record_length_past_the_end_of_data_is_reported():
    data = write(RECORDS[:3])
    bad = corrupt_word(data, 8, 0x00FFFFFF)  # L of the first record
    got, stats = read(bad)
    assert RECORDS[0] not in got
    assert stats.errors["truncated"] + stats.errors["length_mismatch"] >= 1


def test_logical_record_length_disagreeing_with_steering_word_6_drops_only_that_record():
    # Find a record that straddles into block 3 and make its length one word longer.
    first_in_3 = steering(FILE, 3)[6]
    assert first_in_3 > 8
    straddler = next(b for b in iter_banks(FILE) if b.offset < 3 * BLOCK < b.offset + len(b.data) + 100)
    length = struct.unpack_from(">I", FILE, straddler.offset)[0]
    bad = corrupt_word(FILE, straddler.offset // 4, length + 1)
    got, stats = read(bad)
    assert stats.errors["length_mismatch"] == 1
    assert straddler.data not in got and len(got) == len(RECORDS) - 1


def test_unknown_logical_record_type_loses_only_the_rest_of_its_block():
    banks = list(iter_banks(FILE))
    victim = next(b for b in banks if 4 * BLOCK + 2000 < b.offset < 5 * BLOCK - 2000)
    bad = corrupt_word(FILE, victim.offset // 4 + 1, 9)
    got, stats = read(bad)
    assert stats.errors["bad_record_type"] == 1
    assert victim.data not in got
    before = [b.data for b in banks if b.offset < victim.offset]
    after = [b.data for b in banks if b.offset >= 5 * BLOCK]
    assert got[:len(before)] == before and got[-len(after):] == after


def test_bank_nd_past_the_body_is_rejected():
    data = write(RECORDS[:3])
    bank = list(iter_banks(data))[1]
    nd_word = bank.offset // 4 + 2 + 10 + 1 + 7  # [L,T] + pilot + i/o word + header word 7
    assert struct.unpack_from(">I", data, 4 * nd_word)[0] == len(bank.data) // 4
    bad = corrupt_word(data, nd_word, len(bank.data) // 4 + 1)
    got, stats = read(bad)
    assert stats.errors["bank_past_body"] == 1 and got == [RECORDS[0], RECORDS[2]]


def test_bad_bank_io_word_and_bad_pilot_are_rejected():
    data = write(RECORDS[:2])
    first = next(iter_banks(data))
    bad = corrupt_word(data, first.offset // 4 + 2 + 10, 0x00020003)  # i/o word < 12
    got, stats = read(bad)
    assert stats.errors["bad_bank"] == 1 and got == [RECORDS[1]]
    bad = corrupt_word(data, first.offset // 4 + 2 + 6, 0xFFFF)  # R past the body
    got, stats = read(bad)
    assert stats.errors["bad_pilot"] == 1 and got == [RECORDS[1]]


def test_strict_mode_raises_a_typed_zdab_error():
    bad = corrupt_word(FILE, 3 * 3840 + 1, 0)
    with pytest.raises(ZdabError) as exc:
        list(iter_banks(bad, strict=True))
    assert exc.value.reason == "bad_signature" and exc.value.offset == 3 * BLOCK
    assert isinstance(exc.value, RecordError)


def test_emergency_stop_bit_ends_the_data():
    bad = corrupt_word(FILE, 2 * 3840 + 4, (1 << 31) | 3840)
    got, stats = read(bad)
    assert stats.end_of_data and 0 < len(got) < len(RECORDS) and got == RECORDS[:len(got)]


# ---------------------------------------------------------------------------
# Robustness: random and mutated files
# ---------------------------------------------------------------------------

SMALL = write([make_event(i, n, seed=9) for i, n in enumerate([3, 0, 50, 7, 120, 1])], record_words=64)
SMALL += b""  # keep bytes


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, len(SMALL) - 1), st.integers(0, 255)), max_size=8),
       cut=st.none() | st.integers(0, len(SMALL)))
def test_mutated_files_raise_nothing_and_yield_whole_banks(edits, cut):
    data = bytearray(SMALL)
    for pos, value in edits:
        data[pos] = value
    data = bytes(data[:cut] if cut is not None else data)
    stats = ReadStats()
    for bank in iter_banks(data, stats):
        assert isinstance(bank.name, str) and len(bank.data) % 4 == 0
        if bank.name == "ZDAB":
            try:
                pmt.decode_event(bank.data)
            except RecordError:
                pass
    try:
        list(iter_banks(data, strict=True))
    except RecordError:
        pass


@settings(max_examples=150, deadline=None)
@given(blob=st.binary(max_size=2000))
def test_random_bytes_raise_nothing(blob):
    list(iter_banks(blob))
    # Random words after a valid steering block.
    steering_block = struct.pack(">8I", *zdab.SIGNATURE, 64, 0, 8, 0)
    list(iter_banks(steering_block + blob))
    try:
        list(iter_banks(steering_block + blob, strict=True))
    except RecordError:
        pass
