"""The dispatcher frame codec: layout, incremental decoding, limits and bad input."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minard.formats import framing
from minard.formats.framing import (
    Batch,
    Frame,
    FrameDecoder,
    FrameError,
    FrameTooLarge,
    TruncatedFrame,
)


def test_frame_layout_is_padded_tag_then_big_endian_length_then_payload():
    raw = framing.encode_frame("CMD", b"ANALYZERS?")
    assert raw == b"CMD\0\0\0\0\0" + b"\x00\x00\x00\x0a" + b"ANALYZERS?"
    assert framing.encode_header("RAWDATA", 0x01020304) == b"RAWDATA\0\x01\x02\x03\x04"


def test_worked_example_of_docs_decodes():
    # The hex dump in docs/protocol.md.
    raw = bytes.fromhex("48454c4c4f000000 00000010 616e616c797a65723a6d6f6e69746f72".replace(" ", ""))
    assert framing.decode_all(raw) == [Frame("HELLO", b"analyzer:monitor")]


def test_space_padded_tags_are_accepted_as_the_same_tag():
    decoder = FrameDecoder()
    decoder.feed(b"RECHDR  " + b"\0\0\0\x01" + b"x")
    assert decoder.next() == Frame("RECHDR", b"x")


@pytest.mark.parametrize("tag", ["", "lower", "TOOLONGTAG", "A B", "TAB\t"])
def test_invalid_tags_cannot_be_encoded(tag):
    with pytest.raises(ValueError):
        framing.encode_frame(tag, b"")


def test_frames_split_at_every_byte_come_out_whole_and_in_order():
    frames = [Frame("HELLO", b"source"), Frame("CMD", b"BEGINTAPE:1:2"),
              Frame("RAWDATA", bytes(range(200))), Frame("CMD", b"")]
    stream = b"".join(framing.encode_frame(f.tag, f.payload) for f in frames)
    decoder, out = FrameDecoder(), []
    for i in range(len(stream)):
        decoder.feed(stream[i:i + 1])
        out.extend(decoder.frames())
    assert out == frames
    assert decoder.pending == 0
    decoder.check_eof()


def test_half_frame_at_end_of_stream_is_reported_as_truncated():
    decoder = FrameDecoder()
    decoder.feed(framing.encode_frame("CMD", b"SCALERS?")[:-3])
    assert decoder.next() is None
    with pytest.raises(TruncatedFrame):
        decoder.check_eof()


def test_garbage_bytes_raise_frame_error():
    decoder = FrameDecoder()
    decoder.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(FrameError, match="invalid frame tag"):
        decoder.next()


def test_length_above_the_limit_is_rejected_before_the_payload_arrives():
    decoder = FrameDecoder(max_frame=1000)
    decoder.feed(framing.encode_header("RAWDATA", 1001))
    with pytest.raises(FrameTooLarge, match="1001"):
        decoder.next()
    ok = FrameDecoder(max_frame=1000)
    ok.feed(framing.encode_frame("RAWDATA", b"\0" * 1000))
    assert len(ok.next().payload) == 1000


def test_consecutive_data_frames_come_out_as_one_batch_of_original_bytes():
    data = [framing.encode_frame("RAWDATA", bytes([i]) * (i + 1)) for i in range(5)]
    other = framing.encode_frame("RECHDR", b"RUN ")
    cmd = framing.command_frame("ENDTAPE")
    decoder = FrameDecoder(batch_tags=framing.DATA_TAGS_RAW)
    decoder.feed(b"".join(data) + other + cmd + data[0] + data[1][:5])
    first = decoder.next_item()
    assert first == Batch(b"".join(data) + other, 6)
    assert list(framing.iter_batch(first.raw))[-1] == ("RECHDR", b"RUN ")
    assert decoder.next_item() == Frame("CMD", b"ENDTAPE")
    assert decoder.next_item() == Batch(data[0], 1)
    assert decoder.next_item() is None
    decoder.feed(data[1][5:])
    assert decoder.next_item() == Batch(data[1], 1)


def test_batch_stops_before_an_oversized_frame_and_the_error_follows():
    decoder = FrameDecoder(max_frame=100, batch_tags=framing.DATA_TAGS_RAW)
    decoder.feed(framing.encode_frame("RAWDATA", b"ok") + framing.encode_header("RAWDATA", 5000))
    assert decoder.next_item().count == 1
    with pytest.raises(FrameTooLarge):
        decoder.next_item()


def test_batches_are_capped_in_size():
    frame = framing.encode_frame("RAWDATA", b"x" * 100)
    decoder = FrameDecoder(batch_tags=framing.DATA_TAGS_RAW, batch_bytes=1000)
    decoder.feed(frame * 30)
    counts = []
    while (item := decoder.next_item()) is not None:
        counts.append(item.count)
    assert sum(counts) == 30 and max(counts) <= 9


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["CMD", "RAWDATA", "RECHDR", "HELLO", "X_1"]),
                          st.binary(max_size=300)), max_size=20),
       st.lists(st.integers(1, 97), max_size=30))
def test_any_frames_round_trip_through_any_chunking(frames, cuts):
    stream = b"".join(framing.encode_frame(t, p) for t, p in frames)
    decoder, out, pos = FrameDecoder(batch_tags=framing.DATA_TAGS_RAW), [], 0
    for step in cuts + [len(stream)]:
        decoder.feed(stream[pos:pos + step])
        pos += step
        while (item := decoder.next_item()) is not None:
            out.extend(framing.iter_batch(item.raw) if isinstance(item, Batch) else [item])
    assert [tuple(f) for f in out] == frames


# --------------------------------------------------------------------------
# RAWBATCH
# --------------------------------------------------------------------------

def rawbatch(records):
    return framing.encode_rawbatch([len(r) for r in records], b"".join(records))


def test_rawbatch_layout_is_count_then_lengths_then_records():
    raw = rawbatch([b"abcd", b"efghijkl"])
    assert raw == (b"RAWBATCH" + (4 + 8 + 12).to_bytes(4, "big") + (2).to_bytes(4, "big")
                   + (4).to_bytes(4, "big") + (8).to_bytes(4, "big") + b"abcdefghijkl")


def test_a_rawbatch_counts_as_its_records_in_a_data_batch():
    decoder = FrameDecoder(batch_tags=framing.DATA_TAGS_RAW)
    decoder.feed(framing.encode_frames("RAWDATA", [b"x"]) + rawbatch([b"a", b"bb", b"ccc"])
                 + framing.encode_frames("RECHDR", [b"y"]))
    batch = decoder.next_item()
    assert (batch.count, batch.packed) == (5, True)


@given(st.lists(st.binary(max_size=40), max_size=20), st.lists(st.binary(max_size=9), max_size=3))
@settings(max_examples=100, deadline=None)
def test_expanding_rawbatches_gives_exactly_the_rawdata_frames_of_the_same_records(records, before):
    raw = framing.encode_frames("RECHDR", before) + rawbatch(records) + framing.encode_frames("RAWDATA", before)
    expected = (framing.encode_frames("RECHDR", before) + framing.encode_frames("RAWDATA", records)
                + framing.encode_frames("RAWDATA", before))
    assert framing.expand_rawbatches(raw) == expected


@pytest.mark.parametrize("payload, reason", [
    (b"\0\0", "no record count"),
    ((5).to_bytes(4, "big") + b"\0" * 8, "says 5 records"),
    ((1).to_bytes(4, "big") + (9).to_bytes(4, "big") + b"abc", "add up to 9"),
])
def test_a_rawbatch_whose_lengths_do_not_add_up_is_returned_alone_after_the_good_frames(payload, reason):
    decoder = FrameDecoder(batch_tags=framing.DATA_TAGS_RAW)
    good = framing.encode_frames("RAWDATA", [b"ok"])
    decoder.feed(good + framing.encode_frame("RAWBATCH", payload) + good)
    assert decoder.next_item() == Batch(good, 1, False)
    bad = decoder.next_item()
    assert bad == Frame("RAWBATCH", payload)
    with pytest.raises(framing.RawBatchError, match=reason):
        framing.rawbatch_count(payload, 0, len(payload))
    assert decoder.next_item() == Batch(good, 1, False)  # the stream goes on


def test_rawbatch_example_of_docs_is_what_the_encoder_writes():
    from minard.formats import pmt

    one = pmt.encode_event(run=1, evnum=0, gtid=1, trigger_word=1, hits={"crate": [0], "card": [1], "channel": [2]})
    two = pmt.encode_event(run=1, evnum=1, gtid=2, trigger_word=1,
                           hits={"crate": [0, 1], "card": [1, 1], "channel": [2, 3]})
    records = [pmt.pack_dispatch(one), pmt.pack_dispatch(two)]
    assert rawbatch(records)[:36] == bytes.fromhex(
        "524157424154434800 0000a0 00000002 00000044 00000050 504d5420 0000002c 50544b30".replace(" ", ""))
