"""The ORCA stream simulator: known rates recovered exactly through the codec."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from minard.formats import orca
from minard.formats.orca import OrcaStreamParser, XL3Ids
from minard.simulate import orca as sim_orca

OrcaSimulator = sim_orca.OrcaSimulator


def parse_all(chunks, **options):
    parser = OrcaStreamParser(**options)
    records = []
    for chunk in chunks:
        records += parser.feed(chunk)
    return records + parser.close(), parser


def rates_per_poll(records, poll_groups):
    """Run CMOS records through a CmosRateState one poll at a time."""
    state = orca.CmosRateState()
    cmos = [r for r in records if r.kind == "cmos"]
    out = []
    for start in range(0, len(cmos), poll_groups):
        batch = orca.decode_cmos(cmos[start:start + poll_groups])
        assert not batch.errors
        out.append(state.update(batch))
    return out


def test_same_seed_gives_same_bytes_and_other_seed_differs():
    a = b"".join(sim_orca.generate_stream(3, 5))
    assert a == b"".join(sim_orca.generate_stream(3, 5))
    assert a != b"".join(sim_orca.generate_stream(4, 5))


@pytest.mark.parametrize("order", ["little", "big"])
def test_rates_are_recovered_exactly_with_non_default_ids(order):
    sim = OrcaSimulator(7, cmos_id=0x77 << 18, base_id=0x1ABC << 18, byteorder=order, flag_probability=2e-3)
    npolls = 8
    records, parser = parse_all(sim.stream(npolls))
    assert not parser.stats.errors and parser.ids == XL3Ids(0x77 << 18, 0x1ABC << 18)
    per_crate = 37  # 17 full crates x 2 records + crate 5 (gap: 2) + crate 11 (8 cards: 1)
    results = rates_per_poll(records, per_crate)
    assert len(results) == npolls

    # Which (poll, channel) pairs must give a rate: both readings valid,
    # not across the counter reset.
    valid = np.ones((npolls, len(sim.initial_counts)), dtype=bool)
    valid &= sim.present_channels() & ~sim.masked_channels()
    for k, lcn in sim.flagged_readings:
        valid[k, lcn] = False
    expect = valid[1:] & valid[:-1]
    (reset_poll, reset_crate), = sim.resets
    crate_of = np.arange(len(sim.initial_counts)) // 512
    before = sim.initial_counts + sim.counts_per_poll * (reset_poll - 1)
    expect[reset_poll - 1] &= ~((crate_of == reset_crate) & (before > 0))

    for k, (lcn, rate) in enumerate(results):
        if k == 0:
            assert len(lcn) == 0
            continue
        assert sorted(lcn.tolist()) == np.nonzero(expect[k - 1])[0].tolist()
        np.testing.assert_allclose(rate, sim.true_rates[lcn], rtol=1e-12, atol=0)
    assert sim.flagged_readings  # the fault was exercised


def test_full_crate_gives_two_cmos_records_with_half_masks_and_same_timestamp():
    sim = OrcaSimulator(1, crates=[2, 5, 11], extra_records=False)
    records, _ = parse_all(sim.stream(1))
    batch = orca.decode_cmos([r for r in records if r.kind == "cmos"])
    assert list(zip(batch.crate.tolist(), batch.slot_mask.tolist())) == [
        (2, 0x00FF), (2, 0xFF00), (5, 0x007F), (5, 0xFF00), (11, 0x0F0F)]
    assert batch.time_us[0] == batch.time_us[1] != batch.time_us[2]
    assert all(t % 10_000 == 0 for t in batch.time_us)  # centisecond grid


def test_base_currents_are_plausible_and_absent_slots_are_not_decoded():
    sim = OrcaSimulator(2, crates=[5], busy_probability=0.05)
    records, _ = parse_all(sim.stream(3))
    batch = orca.decode_base([r for r in records if r.kind == "base"])
    assert not batch.errors and len(batch.index) == 3
    assert not np.isin(5 * 512 + 7 * 32 + np.arange(32), batch.lcn).any()  # slot 7 is absent
    assert -30 < batch.current.min() and batch.current.max() < 30
    assert batch.busy.any()


@pytest.mark.parametrize("seed", [0, 5])
def test_garbage_injection_is_survived_without_losing_records(seed):
    clean, _ = parse_all(OrcaSimulator(seed).stream(6))
    sim = OrcaSimulator(seed, garbage=6)
    dirty, parser = parse_all(sim.stream(6))
    assert len(sim.garbage_offsets) == 6 and sum(parser.stats.errors.values()) >= 1
    # Every long record survives.  A garbage word that happens to carry a
    # described short id is a valid short record (§3: nothing to check it by).
    assert [r.raw for r in dirty if r.kind != "short"] == [r.raw for r in clean if r.kind != "short"]
    garbage_at = [(o, o + n) for o, n in sim.garbage_offsets]
    legit = [r for r in dirty if r.kind == "short" and not any(a <= r.offset < b for a, b in garbage_at)]
    assert len(legit) == sum(r.kind == "short" for r in clean)
    spurious = sum(r.kind == "short" for r in dirty) - len(legit)
    skipped = parser.stats.bytes_skipped + 4 * (parser.stats.skipped_unknown + spurious)
    assert skipped == sum(n for _, n in sim.garbage_offsets)


def test_subrun_headers_with_new_ids_are_followed_by_the_parser():
    sim = OrcaSimulator(6, crates=[0, 1], subrun_period=2.0, new_ids_on_subrun=True)
    records, parser = parse_all(sim.stream(6))
    assert len(sim.subruns) == 3 and len({ids for _, ids in sim.subruns}) == 3
    assert [r.kind for r in records].count("header") == 3
    cmos = [r for r in records if r.kind == "cmos"]
    assert len(cmos) == 6 * 2 * 2 and not parser.stats.errors
    assert {r.data_id for r in cmos} == {ids.cmos for _, ids in sim.subruns}
    # a parser that kept the first ids would see the later records as "other"
    assert parser.ids == sim.subruns[-1][1]


def test_written_file_reads_back_and_cli_has_help(tmp_path):
    out = tmp_path / "sim.orca"
    runner = CliRunner()
    result = runner.invoke(sim_orca.orca_cmd, [str(out), "--seconds", "3", "--seed", "9", "--cmos-id", "7<<18",
                                               "--base-id", "0x200000", "--big-endian", "--quiet"])
    assert result.exit_code == 0, result.output
    records = list(orca.read_file(out))
    assert records[0].byteorder == "big" and orca.xl3_data_ids(records[0].header) == (7 << 18, 0x200000)
    assert sum(r.kind == "cmos" for r in records) == 3 * 37
    help_text = runner.invoke(sim_orca.orca_cmd, ["--help"]).output
    for option in ("--seconds", "--seed", "--cmos-id", "--base-id", "--poll", "--big-endian", "--garbage"):
        assert option in help_text
    bad = runner.invoke(sim_orca.orca_cmd, [str(out), "--cmos-id", "12345"])
    assert bad.exit_code != 0 and "not a usable long data id" in bad.output
