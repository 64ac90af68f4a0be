"""``minard demo``: decode the bundled recorded data and synthetic runs, print a summary.

This is what ``./manage.sh up`` ran before the whole stack existed, and it is
still the quickest way to see that the codecs work on a new machine: it reads
the real recorded ZDAB file from ``../shared/data``, generates (once, seeded)
a synthetic ZDAB run and a synthetic ORCA stream under ``var/demo``, decodes
all of them with the same vectorized code the consumers use, and prints what
it found.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import click
import numpy as np

from minard import config
from minard.formats import orca, pmt, zdab
from minard.formats.detector import NCHANNELS_TOTAL
from minard.simulate import events as sim_events
from minard.simulate import orca as sim_orca

BUNDLED = config.ROOT.parent / "shared" / "data" / "Demo_Events.zdab"


def summarize_zdab(path: Path, chunk: int = 20000) -> dict:
    """Decode every event of a ZDAB file in batches and summarise them."""
    totals = {"events": 0, "hits": 0, "orphans": 0, "errors": 0}
    triggers = np.zeros(len(pmt.TRIGGER_NAMES), np.int64)
    channels = np.zeros(NCHANNELS_TOTAL, np.int64)
    runs: Counter = Counter()
    nhit_max, gtids = 0, []
    start = time.perf_counter()
    with zdab.ZdabReader(path) as reader:
        records = []
        for record in reader.events():
            records.append(record)
            if len(records) == chunk:
                nhit_max = _add_batch(pmt.decode_events(records), totals, triggers, channels, runs, gtids, nhit_max)
                records = []
        if records:
            nhit_max = _add_batch(pmt.decode_events(records), totals, triggers, channels, runs, gtids, nhit_max)
        stats = reader.stats
    elapsed = time.perf_counter() - start
    return {**totals, "triggers": dict(zip(pmt.TRIGGER_NAMES, triggers.tolist())),
            "channels": channels, "runs": dict(runs), "nhit_max": nhit_max,
            "gtid_first": gtids[0] if gtids else None, "gtid_last": gtids[-1] if gtids else None,
            "reader_problems": stats.n_errors, "seconds": elapsed}


def _add_batch(batch, totals, triggers, channels, runs, gtids, nhit_max) -> int:
    """Fold one decoded batch into the running summary (all vectorized)."""
    totals["events"] += len(batch)
    totals["hits"] += batch.n_hits
    totals["orphans"] += int(batch.orphan.sum())
    totals["errors"] += len(batch.errors)
    triggers += batch.trigger_counts()
    channels += batch.channel_counts()
    for (run, subrun), n in Counter(zip(batch.run.tolist(), batch.subrun.tolist())).items():
        runs[f"{run}/{subrun}"] += n
    if len(batch):
        gtids.extend([int(batch.gtid[0]), int(batch.gtid[-1])])
        nhit_max = max(nhit_max, int(batch.nhit.max()))
    return nhit_max


def summarize_orca(path: Path) -> dict:
    """Parse an ORCA stream file, turn CMOS counts into rates, read base currents."""
    parser_records = list(orca.read_file(path))
    cmos = [r for r in parser_records if r.kind == "cmos"]
    base = [r for r in parser_records if r.kind == "base"]
    order = cmos[0].byteorder if cmos else "little"
    # update() handles repeated readings of a channel in order; the last rate wins.
    lcn, rate = orca.CmosRateState().update(orca.decode_cmos(cmos, order))
    rates = np.full(NCHANNELS_TOTAL, np.nan)
    rates[lcn] = rate
    currents = orca.decode_base(base, order)
    good = ~currents.masked & ~currents.busy
    return {"records": len(parser_records), "cmos_records": len(cmos), "base_records": len(base),
            "rates": rates, "base_mean": float(currents.current[good].mean()) if good.any() else None,
            "busy": int(currents.busy.sum())}


def _print_zdab(title: str, s: dict) -> None:
    click.echo(f"\n== {title}")
    click.echo(f"events {s['events']}  hits {s['hits']}  orphans {s['orphans']}  "
               f"decode errors {s['errors']}  reader problems {s['reader_problems']}")
    click.echo(f"runs/subruns {s['runs']}  GTID {s['gtid_first']} .. {s['gtid_last']}  "
               f"max nhit {s['nhit_max']}")
    fired = {k: v for k, v in s["triggers"].items() if v}
    click.echo("triggers " + ", ".join(f"{k} {v}" for k, v in sorted(fired.items(), key=lambda kv: -kv[1])))
    hot = np.argsort(s["channels"])[::-1][:5]
    click.echo("busiest channels (crate/card/channel: hits) " + ", ".join(
        f"{c // 512}/{c // 32 % 16}/{c % 32}: {s['channels'][c]}" for c in hot if s["channels"][c]))
    if s["seconds"] > 0 and s["hits"]:
        click.echo(f"decoded at {s['hits'] / s['seconds'] / 1e6:.1f} M hits/s (file reading included)")


@click.command("demo")
@click.option("--events", default=200_000, show_default=True, help="Events in the synthetic run.")
@click.option("--seed", default=1, show_default=True, help="Seed of the synthetic data.")
@click.option("--dir", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where the synthetic files go [var_dir/demo].")
@config.pass_config
def demo(cfg, events, seed, out_dir):
    """Decode the bundled recorded data and synthetic runs; print a summary."""
    out = Path(out_dir) if out_dir else cfg.path("var_dir") / "demo"
    out.mkdir(parents=True, exist_ok=True)
    if BUNDLED.exists():
        _print_zdab(f"recorded data {BUNDLED.name}", summarize_zdab(BUNDLED))
    else:
        click.echo(f"(no bundled data at {BUNDLED}; skipping it)")
    synth = out / f"synthetic-{seed}-{events}.zdab"
    if not synth.exists():
        gen = sim_events.generate_events(seed, events, run=1000, subrun_every=events // 4 or 1)
        sim_events.write_zdab(synth, gen, total=events)
    _print_zdab(f"synthetic run {synth.name}", summarize_zdab(synth))
    stream = out / f"synthetic-{seed}.orca"
    if not stream.exists():
        sim_orca.write_stream(stream, seed, 10.0)
    s = summarize_orca(stream)
    rates = s["rates"][~np.isnan(s["rates"])]
    click.echo(f"\n== synthetic ORCA stream {stream.name}")
    click.echo(f"records {s['records']} (CMOS {s['cmos_records']}, base currents {s['base_records']})")
    if len(rates):
        click.echo(f"CMOS rates for {len(rates)} channels: median {np.median(rates):.0f} Hz, "
                   f"max {rates.max():.0f} Hz")
    click.echo(f"base currents: mean {s['base_mean']:.1f} (ADC - 127), busy channels {s['busy']}")
