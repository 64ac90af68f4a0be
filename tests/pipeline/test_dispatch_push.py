"""The push's pending records: pieces from RAWBATCH and RAWDATA frames, taken in order."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from minard.formats import pmt, wire
from minard.pipeline.dispatch_push import Pending, last_position


def packed(records):
    return np.array([len(r) for r in records], ">u4").tobytes(), b"".join(records)


@given(st.lists(st.lists(st.binary(max_size=12), max_size=8), max_size=8), st.integers(1, 10))
@settings(max_examples=200, deadline=None)
def test_taking_batches_gives_every_record_once_in_order_and_at_most_the_limit(groups, limit):
    pending = Pending()
    for i, group in enumerate(groups):
        if i % 2:
            pending.add_packed(*packed(group))
        else:
            pending.add_records([memoryview(r) for r in group])
    taken = []
    while pending.count:
        lengths, payload, n = pending.take(limit)
        assert 0 < n <= limit
        batch = wire.decode(wire.encode_packed("pmt", lengths, bytes(payload)))
        taken += batch.records()
    assert taken == [r for group in groups for r in group]


def test_last_position_skips_trailing_records_that_have_no_gtid_and_gives_their_run():
    good = pmt.pack_dispatch(pmt.encode_event(run=7, evnum=0, gtid=0x1234, trigger_word=1))
    bad = pmt.PMT_DISPATCH_HEADER + b"\0" * 8  # too short to hold a GTID
    assert last_position(*packed([good, bad, bad])) == (0x1234, 7)
    assert last_position(*packed([bad])) is None
