"""The pure parts of ``minard replay``: chunks, vectorized header reading and pacing.

Each vectorized function is checked against the one-record-at-a-time
definition it replaces (``peek``, ``Pacer.due``, ``pmt.pack_dispatch``).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minard.dispatcher.replay import Chunk, Pacer, iter_chunks, peek
from minard.formats import framing, pmt
from minard.formats.zdab import write_events


def event(run: int, gtid: int, clock10: int) -> bytes:
    return pmt.encode_event(run=run, evnum=gtid, gtid=gtid, trigger_word=1, clock10=clock10,
                            hits={"crate": [1], "card": [2], "channel": [3]})


records_st = st.lists(
    st.one_of(st.builds(event, st.integers(0, 2**32 - 1), st.integers(1, 2**24 - 1), st.integers(0, 2**53 - 1)),
              st.binary(max_size=43)),  # records too short to read
    min_size=1, max_size=30)


@given(records_st, st.tuples(st.one_of(st.none(), st.integers(0, 2**32 - 1)), st.integers(0, 2**24 - 1),
                             st.integers(0, 2**53 - 1)))
@settings(max_examples=150, deadline=None)
def test_peek_many_agrees_with_peek_record_by_record(records, previous):
    chunk = Chunk(records)
    run, gtid, clock = chunk.header_fields(previous)
    expected, prev = [], previous
    for record in records:
        prev = peek(record, prev)
        expected.append(prev)
    assert [(None if r < 0 else r, g, c) for r, g, c in zip(run.tolist(), gtid.tolist(), clock.tolist())] == expected


@given(records_st, st.data())
@settings(max_examples=100, deadline=None)
def test_a_rawbatch_of_a_chunk_holds_exactly_the_dispatch_records(records, data):
    chunk = Chunk(records)
    i = data.draw(st.integers(0, len(records) - 1))
    j = data.draw(st.integers(i + 1, len(records)))
    frame = b"".join(bytes(p) for p in chunk.rawbatch(i, j))
    expected = framing.encode_frames("RAWDATA", [pmt.PMT_DISPATCH_HEADER + r for r in records[i:j]])
    assert framing.expand_rawbatches(frame) == expected


@given(st.integers(1, 10**9), st.lists(st.one_of(st.just(0), st.integers(1, 10**9)), max_size=40),
       st.sampled_from([0.5, 1.0, 7.0]), st.integers(1, 5))
@settings(max_examples=100, deadline=None)
def test_due_times_of_many_events_equal_those_computed_one_by_one(first, rest, speed, pieces):
    # (orphans before the first timed event are due "now", whenever that is)
    clocks = [first, *rest]
    one, many = Pacer(speed, None), Pacer(speed, None)
    t0 = time.monotonic()
    singles = [one.due(c) - t0 for c in clocks]
    parts = np.array_split(np.array(clocks, np.int64), pieces)
    batched = np.concatenate([many.due_many(p) for p in parts]) - t0
    # both are anchored at "now" of their first call: compare the offsets
    assert batched - batched[0] == pytest.approx(np.array(singles) - singles[0], abs=1e-6)
    assert np.all(np.diff(batched) >= 0)


def test_due_times_at_a_fixed_rate_continue_across_calls():
    pacer = Pacer(1.0, rate=1000)
    a = pacer.due_many(np.zeros(3, np.int64))
    b = pacer.due_many(np.zeros(2, np.int64))
    assert np.concatenate((a, b)) - a[0] == pytest.approx([0, 0.001, 0.002, 0.003, 0.004])


def test_a_looping_replay_parses_a_small_file_once_and_repeats_the_same_chunks(tmp_path):
    path = tmp_path / "f.zdab"
    write_events(path, [event(7, g, 100 * g) for g in range(1, 51)])
    chunks = iter_chunks([str(path)], loop=True, cache_bytes=1 << 20)
    first = [next(chunks) for _ in range(1)]
    again = next(chunks)
    assert again is first[0]  # from memory, not parsed again
    uncached = iter_chunks([str(path)], loop=True, cache_bytes=0)
    a, b = next(uncached), next(uncached)
    assert a is not b and bytes(a.records) == bytes(b.records)


def test_a_looping_replay_of_a_file_without_events_ends(tmp_path):
    path = tmp_path / "empty.zdab"
    write_events(path, [])
    assert list(iter_chunks([str(path)], loop=True, cache_bytes=1 << 20)) == []
    assert list(iter_chunks([str(path)], loop=True, cache_bytes=0)) == []  # not kept in memory either
