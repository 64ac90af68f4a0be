"""Synthetic PMT events and the ``minard simulate zdab`` command (minard.simulate.events)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from minard.formats import pmt
from minard.formats.zdab import ReadStats, read_events
from minard.simulate.events import (
    Faults,
    generate_batches,
    generate_events,
    next_gtids,
    write_zdab,
    zdab_cmd,
)


def decode(n: int, seed: int = 1, **kw) -> pmt.EventBatch:
    return pmt.decode_buffer(*next(generate_batches(seed, n, batch_size=n, **kw)))


@pytest.fixture(scope="module")
def batch() -> pmt.EventBatch:
    return decode(20_000)


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not():
    a = list(generate_events(5, 300))
    assert a == list(generate_events(5, 300))
    assert a != list(generate_events(6, 300))


def test_events_and_batches_give_the_same_records():
    records = list(generate_events(3, 50))
    buf, offsets, lengths = next(generate_batches(3, 50))
    assert records == [buf[o:o + n] for o, n in zip(offsets, lengths)]


def test_every_record_decodes_and_hit_gtids_match(batch):
    assert len(batch) == 20_000 and not batch.errors
    assert batch.n_gtid_mismatch == 0 and np.all(batch.lcn < 10240)


def test_nhit_has_the_requested_mean_and_a_long_tail(batch):
    physics = (batch.trigger & 1) == 1
    assert 34 < batch.nhit[physics].mean() < 50
    assert batch.nhit.max() >= 500 and np.median(batch.nhit) < 45
    assert 15 < decode(5000, mean_nhit=20).nhit.mean() < 28


def test_trigger_mix_is_mostly_physics_with_some_pulser_pedestal_and_exta(batch):
    counts = dict(zip(pmt.TRIGGER_NAMES, batch.trigger_counts().tolist()))
    n = len(batch)
    assert counts["100L"] > 0.9 * n and counts["100M"] > 0.5 * n
    assert 0.02 * n < counts["PULGT"] < 0.08 * n
    assert 0.003 * n < counts["PED"] < 0.02 * n and 0 < counts["EXTA"] < 0.01 * n
    ped = (batch.trigger >> 12 & 1) == 1
    assert np.all(batch.nhit[ped] == 32)


def test_charges_look_like_pedestals_plus_signal(batch):
    assert 500 <= batch.qhl.min() and np.median(batch.qlx) < 660
    assert 540 < np.median(batch.qhs) < 660 and 1300 < np.median(batch.tac) < 1700


def test_clock10_advances_at_the_event_rate_and_clock50_follows(batch):
    clock10 = batch.clock10.astype(np.int64)
    assert np.all(np.diff(clock10[~batch.orphan]) > 0)
    seconds = (clock10[-1] - clock10[0]) / 1e7
    assert 18 < seconds < 22  # 20000 events at 1 kHz
    ok = ~batch.orphan
    assert np.all((batch.clock50[ok].astype(np.int64) - 5 * clock10[ok]) % 2**43 < 5)
    fast = decode(2000, rate_hz=1e5)
    assert 0.015 < (int(fast.clock10[-1]) - int(fast.clock10[0])) / 1e7 < 0.025


def test_gtid_counts_up_and_skips_low_16_bits_zero_at_the_wrap():
    assert list(next_gtids(0xFFFFFE, 4)) == [0xFFFFFE, 0xFFFFFF, 1, 2]
    assert list(next_gtids(0x1FFFF, 2)) == [0x1FFFF, 0x20001]
    assert list(next_gtids(0x30000, 1)) == [0x30001]
    b = decode(300, start_gtid=0xFFFF00, orphan_rate=0)
    assert b.gtid[0] == 0xFFFF00 and 0 not in b.gtid.tolist()
    assert np.all((b.gtid & 0xFFFF) != 0)
    assert b.gtid.tolist() == next_gtids(0xFFFF00, 300).tolist()


def test_orphans_have_zero_mtc_words_at_the_requested_rate(batch):
    assert 2 <= batch.orphan.sum() <= 60  # 0.1 % of 20000
    assert np.all(batch.gtid[batch.orphan] == 0) and np.all(batch.trigger[batch.orphan] == 0)
    assert decode(2000, orphan_rate=0).orphan.sum() == 0


def test_subruns_and_runs_change_at_the_requested_boundaries():
    b = decode(1000, run=50, subrun_every=100, run_every=400, orphan_rate=0)
    assert b.run.tolist() == [50] * 400 + [51] * 400 + [52] * 200
    assert b.evnum[:3].tolist() == [0, 1, 2] and b.evnum[400] == 0
    assert b.subrun[:400].tolist() == [i // 100 for i in range(400)] and b.subrun[400] == 0
    assert np.all(np.diff(b.gtid.astype(np.int64)) == 1)  # the GTID does not restart


def test_hot_channel_fires_in_about_half_the_events():
    b = decode(4000, faults=Faults(hot_channel=1234))
    counts = b.channel_counts()
    assert 1500 < counts[1234] < 2600 and counts[1234] > 20 * np.median(counts)


def test_dead_crate_and_dead_card_have_no_hits():
    b = decode(4000, faults=Faults(dead_crates=(4,), dead_cards=((7, 3),)))
    assert not np.any(b.crate == 4)
    assert not np.any((b.crate == 7) & (b.card == 3))
    assert np.any((b.crate == 7) & (b.card == 4))


def test_burst_packs_events_at_the_burst_rate():
    b = decode(20_000, orphan_rate=0, faults=Faults(burst=(5000, 0.01, 1e6)))  # 10000 events at 1 MHz
    gaps = np.diff(b.clock10.astype(np.int64))
    assert np.median(gaps[5000:14999]) < 20  # ~1 us = 10 ticks
    assert np.median(gaps[:4999]) > 1000 and np.median(gaps[15000:]) > 1000


def test_gtid_jump_skips_ahead():
    b = decode(500, orphan_rate=0, faults=Faults(gtid_jump=(200, 100_000)))
    steps = np.diff(b.gtid.astype(np.int64))
    assert steps[199] == 100_001 and np.all(np.delete(steps, 199) == 1)


def test_corrupt_records_are_rejected_by_the_decoder():
    b = decode(3000, faults=Faults(corrupt=9))
    assert len(b.errors) == 9 and len(b) == 3000 - 9
    assert {e.reason for _, e in b.errors} == {"truncated", "nhit_too_large", "bad_subfield"}


def test_write_zdab_round_trips_through_the_reader(tmp_path):
    records = list(generate_events(11, 2500, faults=Faults(corrupt=3)))
    path = tmp_path / "sim.zdab"
    assert write_zdab(path, iter(records), progress=False) == 2500
    stats = ReadStats()
    assert list(read_events(path, stats)) == records and stats.n_errors == 0


def test_zdab_command_help_lists_the_fault_options():
    result = CliRunner().invoke(zdab_cmd, ["--help"])
    assert result.exit_code == 0
    for option in ("--events", "--seed", "--run", "--mean-nhit", "--rate", "--hot-channel",
                   "--dead-crate", "--dead-card", "--burst", "--gtid-jump", "--corrupt"):
        assert option in result.output


def test_zdab_command_writes_a_readable_file(tmp_path):
    out = tmp_path / "cli.zdab"
    args = [str(out), "--events", "1500", "--seed", "4", "--run", "77", "--no-progress",
            "--hot-channel", "100", "--dead-crate", "2", "--dead-card", "5/6", "--burst", "100:0.001:1e6",
            "--gtid-jump", "700:5000", "--corrupt", "2"]
    result = CliRunner().invoke(zdab_cmd, args)
    assert result.exit_code == 0, result.output
    assert "wrote 1500 events" in result.output
    records = list(read_events(out))
    b = pmt.decode_events(records)
    assert len(records) == 1500 and len(b.errors) == 2 and set(b.run.tolist()) == {77}
    assert not np.any(b.crate == 2) and not np.any((b.crate == 5) & (b.card == 6))
    same = CliRunner().invoke(zdab_cmd, [str(tmp_path / "again.zdab")] + args[1:])
    assert same.exit_code == 0 and (tmp_path / "again.zdab").read_bytes() == out.read_bytes()


@pytest.mark.parametrize("args", [["--burst", "nonsense"], ["--dead-card", "99/1"], ["--gtid-jump", "x"]])
def test_zdab_command_rejects_bad_fault_options(tmp_path, args):
    result = CliRunner().invoke(zdab_cmd, [str(tmp_path / "x.zdab"), "--events", "5", *args])
    assert result.exit_code != 0


def test_trigger_scale_multiplies_that_trigger_types_rate_per_clock_second():
    from minard.formats import pmt
    from minard.simulate.events import DEFAULT_CLOCK10, generate_batches

    def rates(scale):
        counts, last = {}, 0
        for buf, offsets, lengths in generate_batches(5, 20000, trigger_scale=scale):
            b = pmt.decode_buffer(buf, offsets, lengths)
            for name in ("100L", "20LB", "EXTA"):
                counts[name] = counts.get(name, 0) + int(((b.trigger >> pmt.TRIGGER_BITS[name]) & 1).sum())
            pulser = b.trigger == (1 << pmt.TRIGGER_BITS["PULGT"])
            counts["pulser"] = counts.get("pulser", 0) + int(pulser.sum())
            last = int(b.clock10[-1])
        seconds = (last - DEFAULT_CLOCK10) / 1e7
        return {k: v / seconds for k, v in counts.items()}

    base, scaled = rates(None), rates({"PULGT": 3.0, "20LB": 0.5})
    assert scaled["pulser"] / base["pulser"] == pytest.approx(3.0, rel=0.12)
    assert scaled["20LB"] / base["20LB"] == pytest.approx(0.5, rel=0.06)
    assert scaled["100L"] / base["100L"] == pytest.approx(1.0, rel=0.04)  # the others keep their rate


def test_trigger_scale_refuses_unknown_names_and_bad_factors(tmp_path):
    from click.testing import CliRunner

    from minard.simulate.events import zdab_cmd

    for bad in ("NOPE=2", "PULGT", "PULGT=-1", "PULGT=x", "SOLGT=2"):
        result = CliRunner().invoke(zdab_cmd, [str(tmp_path / "x.zdab"), "--events", "10", "--trigger-scale", bad])
        assert result.exit_code == 2, (bad, result.output)
