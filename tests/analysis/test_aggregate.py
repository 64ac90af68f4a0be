"""Pure per-second and per-run aggregation, checked against per-event decoding."""

from collections import Counter

import numpy as np
import pytest

from minard.analysis import aggregate as ag
from minard.formats.pmt import (
    TRIGGER_NAMES,
    decode_event,
    decode_events,
    encode_event,
    lcn,
)
from minard.testing.records import expected, make_records

T0 = 1_700_000_000.25


def test_trigger_counts_sums_and_channel_hits_match_per_event_decoding():
    records = make_records(300, orphans={5, 77})
    agg = ag.Aggregator()
    agg.add_batch(decode_events(records), T0)
    sec = agg.seconds[int(T0)]
    want = expected(records)
    for i, name in enumerate(ag.NAMES):
        assert sec.counts[i] == want["trig"][name], name
        assert sec.nhit_sum[i] == want["nhit"][name], name
        assert sec.qhs_sum[i] == want["qhs"][name], name
    assert sec.orphans == want["orphans"] == 2
    assert {i: int(c) for i, c in enumerate(sec.channel_hits) if c} == dict(want["channels"])
    assert sec.hits == sum(want["channels"].values())
    assert sec.records == 300 and sec.events == 298


def nhit_hist_per_trigger(records):
    """{(trigger name, bin): events} of the time-series nhit histogram, one event at a time."""
    out = Counter()
    for rec in records:
        ev = decode_event(rec)
        if not ev["orphan"]:
            b = min(ev["nhit"] // ag.NHIT_BIN, ag.NHIT_BINS - 1)
            for name in ev["triggers"] + ["TOTAL"]:
                out[name, b] += 1
    return out


@pytest.mark.parametrize("words", [(1, 2, 3, 8, 1 << 12, (1 << 26) | 1), None],
                         ids=["few trigger words", "a different word per event"])
def test_per_trigger_sums_and_nhit_histogram_match_per_event_decoding(words):
    records = make_records(400, seed=11, orphans={3}, mean_nhit=2, words=words)  # some events have no hits
    sec = ag.SecondAgg(0)
    sec.add_events(ag.select(decode_events(records)))
    want = expected(records)
    for i, name in enumerate(ag.NAMES):
        assert (sec.counts[i], sec.nhit_sum[i], sec.qhs_sum[i]) == (
            want["trig"][name], want["nhit"][name], want["qhs"][name]), name
    hist = nhit_hist_per_trigger(records)
    got = {(ag.NAMES[t], b): int(sec.nhit_hist[t, b]) for t, b in zip(*np.nonzero(sec.nhit_hist))}
    assert got == dict(hist)


def test_an_event_counts_once_per_trigger_bit_and_once_in_total():
    word = (1 << 0) | (1 << 3) | (1 << 26)
    rec = encode_event(run=1, evnum=0, gtid=5, trigger_word=word, hits={"crate": [1], "qhs": [7]})
    sec = ag.SecondAgg(0)
    sec.add_events(ag.select(decode_events([rec])))
    assert {ag.NAMES[i]: int(c) for i, c in enumerate(sec.counts) if c} == {
        "100L": 1, "20": 1, "MISS": 1, "TOTAL": 1}
    assert sec.scalar_fields()["MISS:qhs"] == 7


def test_nhit_histogram_bins_hold_every_event_per_trigger():
    records = make_records(200, seed=3, mean_nhit=40)
    sec = ag.SecondAgg(0)
    sec.add_events(ag.select(decode_events(records)))
    assert sec.nhit_hist.sum(axis=1)[ag.TOTAL] == 200
    assert np.array_equal(sec.nhit_hist.sum(axis=1), sec.counts)
    fields = sec.nhit_fields()
    assert sum(v for k, v in fields.items() if k.startswith("TOTAL:")) == 200


def test_run_summary_is_exact_and_splits_batches_by_run():
    a = make_records(50, seed=4, run=10, subrun=1)
    b = make_records(70, seed=5, run=11, subrun=2, gtid0=1050)
    agg = ag.Aggregator()
    agg.add_batch(decode_events(a + b), T0)
    for records, run in ((a, 10), (b, 11)):
        summary = agg.runs[run].as_dict()
        want = expected(records)
        assert summary["events"] == len(records)
        assert summary["triggers"] == {n: want["trig"][n] for n in TRIGGER_NAMES}
        assert summary["nhit_histogram"] == {str(k): v for k, v in sorted(want["nhist"].items())}
        assert summary["channel_hits"] == {str(k): v for k, v in sorted(want["channels"].items())}
        assert summary["start"] == summary["end"] == T0
    assert agg.runs[10].subruns == {1} and agg.runs[11].subruns == {2}


def test_aggregates_of_several_workers_combine_exactly():
    records = make_records(400, seed=6, orphans={1, 200})
    whole = ag.Aggregator()
    whole.add_batch(decode_events(records), T0)
    parts = [ag.Aggregator() for _ in range(3)]
    for k, i in enumerate(range(0, 400, 50)):  # batches dealt to workers round robin
        parts[k % 3].add_batch(decode_events(records[i:i + 50]), T0)
    sec = ag.SecondAgg(int(T0))
    run = ag.RunAgg(100)
    for p in parts:
        sec.merge(p.seconds[int(T0)])
        run.merge(p.runs[100])
    ref = whole.seconds[int(T0)]
    for name in ("counts", "nhit_sum", "qhs_sum", "nhit_hist", "channel_hits"):
        assert np.array_equal(getattr(sec, name), getattr(ref, name)), name
    assert sec.orphans == ref.orphans and sec.records == ref.records
    assert run.as_dict() == whole.runs[100].as_dict()


def test_batches_are_bucketed_by_arrival_second():
    agg = ag.Aggregator()
    agg.add_batch(decode_events(make_records(10)), T0)
    agg.add_batch(decode_events(make_records(5, seed=2)), T0 + 1.5)
    assert sorted(agg.seconds) == [int(T0), int(T0) + 1]
    assert agg.seconds[int(T0) + 1].events == 5
    seconds, runs, records = agg.take()
    assert records == 15 and not agg


def test_corrupt_records_are_counted_by_reason_and_the_rest_aggregated():
    records = make_records(20, seed=7)
    records[3] = records[3][:30]  # shorter than the header
    records[9] = records[9][:60]  # hits cut off
    agg = ag.Aggregator()
    agg.add_batch(decode_events(records), T0, corrupt=Counter(bad_header=2))
    sec = agg.seconds[int(T0)]
    assert sec.events == 18
    assert sec.corrupt == Counter(truncated=2, bad_header=2)
    assert sec.records == 22
    assert sec.stream_fields()["corrupt"] == 4


@pytest.mark.parametrize("gtids,prev,want", [
    ([1, 2, 3, 4], None, (0, 0, 0)),
    ([1, 2, 5, 6], None, (1, 2, 0)),
    ([7, 8], 4, (1, 2, 0)),
    ([0xFFFFFE, 0xFFFFFF, 1, 2], None, (0, 0, 0)),  # wrap skips GTID 0: no gap
    ([0xFFFFFF, 3], None, (1, 2, 0)),  # across the wrap, 1 and 2 missing
    ([0x00FFFF, 0x010001], None, (0, 0, 0)),  # low 16 bits zero: never issued
    ([0x01FFFE, 0x020002], None, (1, 2, 0)),  # 0x01FFFF and 0x020001 missing, 0x020000 skipped
    ([10, 10, 11], None, (0, 0, 1)),  # duplicate: a jump
    ([10, 500_000, 500_001], None, (0, 0, 1)),  # far forward: a jump
    ([100, 50], None, (0, 0, 1)),  # backwards: a jump
])
def test_gtid_gaps_handle_wrap_skipped_gtids_and_jumps(gtids, prev, want):
    assert ag.gtid_gaps(np.array(gtids), prev) == want


@pytest.mark.parametrize("gtids,runs,prev,prev_run,want", [
    ([20000, 56981], [1000, 3510], None, None, (0, 0, 0)),  # a run change is no gap
    ([56981, 1], [3510, 1000], None, None, (0, 0, 0)),  # ... and no jump
    ([5, 9, 10], [1, 2, 2], 4, 1, (0, 0, 0)),  # the run changes within the batch
    ([9, 10], [2, 2], 5, 1, (0, 0, 0)),  # ... or across the batch boundary
    ([9, 10], [2, 2], 5, 2, (1, 3, 0)),  # same run across the boundary: 6, 7, 8 missing
    ([5, 9, 10], [1, -1, 1], None, None, (1, 3, 0)),  # an unknown run does not hide a gap
    ([5, 5, 9], [1, 1, 1], None, None, (1, 3, 1)),  # within one run: as without runs
])
def test_gtid_gaps_are_looked_for_only_within_one_run(gtids, runs, prev, prev_run, want):
    assert ag.gtid_gaps(np.array(gtids), prev, np.array(runs), prev_run) == want


def test_a_batch_that_changes_run_counts_no_gap_for_either_run():
    """A looping replay: the last event of one run, then another run's events (and back)."""
    records = make_records(3, run=1000, gtid0=20000) + make_records(3, run=3510, gtid0=56981)
    agg = ag.Aggregator()
    agg.add_batch(decode_events(records), T0, prev_gtid=19999, prev_run=1000)
    agg.add_batch(decode_events(make_records(2, run=1000, gtid0=1)), T0, prev_gtid=56983, prev_run=3510)
    sec = agg.seconds[int(T0)]
    assert (sec.gtid_gaps, sec.gtid_missing, sec.gtid_jumps) == (0, 0, 0)
    assert not agg.runs[1000].integrity and not agg.runs[3510].integrity


def test_gtid_gaps_are_found_across_batches_with_prev_gtid():
    records = make_records(30, seed=8)
    del records[10:13]
    agg = ag.Aggregator()
    agg.add_batch(decode_events(records[:10]), T0)
    agg.add_batch(decode_events(records[10:]), T0, prev_gtid=decode_event(records[9])["gtid"])
    sec = agg.seconds[int(T0)]
    assert (sec.gtid_gaps, sec.gtid_missing, sec.gtid_jumps) == (1, 3, 0)


def test_latest_run_subrun_and_gtid_are_those_of_the_last_event():
    agg = ag.Aggregator()
    agg.add_batch(decode_events(make_records(5, run=42, subrun=3, gtid0=700)), T0)
    assert agg.seconds[int(T0)].last == (42, 3, 704)


def test_crate_and_card_hits_sum_the_channels():
    sec = ag.SecondAgg(0)
    sec.channel_hits[lcn(2, 3, 4)] = 5
    sec.channel_hits[lcn(2, 15, 31)] = 1
    assert sec.crate_hits[2] == 6 and sec.crate_hits.sum() == 6
    assert sec.card_hits[2 * 16 + 3] == 5 and sec.card_hits[2 * 16 + 15] == 1


def test_stream_gtids_take_orphans_from_their_hits_and_corrupt_records_from_the_header():
    from minard.formats.pmt import decode_buffer

    records = make_records(6, seed=9, gtid0=50, orphans={2}, mean_nhit=5)
    records[4] = records[4][:44] + b"\0" * 4  # truncated: 1 word of hits
    batch = decode_events(records)
    offsets = np.cumsum([0] + [len(r) for r in records[:-1]])
    lengths = np.array([len(r) for r in records])
    payload = b"".join(records)
    batch = decode_buffer(payload, offsets, lengths)
    assert [i for i, _ in batch.errors] == [4]
    assert ag.stream_gtids(batch, payload, offsets, lengths).tolist() == [50, 51, 52, 53, 54, 55]


def test_push_reads_the_same_gtid_as_the_workers():
    from minard.formats.pmt import pack_dispatch
    from minard.pipeline.dispatch_push import last_position

    records = make_records(4, seed=10, gtid0=0xFFFF00, orphans={1}, mean_nhit=3)
    got = []
    for r in records:
        body = pack_dispatch(r)
        got.append(last_position(np.array([len(body)], ">u4").tobytes(), body)[0])
    assert got == ag.stream_gtids(decode_events(records)).tolist() == [0xFFFF00 + i for i in range(4)]
