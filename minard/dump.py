"""``minard dump FILE``: one JSON object per record of a ZDAB or ORCA file.

The file type is recognised from its first bytes (the ZEBRA steering signature
for ZDAB, a header record for ORCA).  Bad records and reader problems are
printed as ``{"error": ...}`` objects where they occur; the dump goes on.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import click

from minard.formats import orca, pmt, zdab

ZEBRA_SIGNATURE = b"\x01\x23\xcd\xef"


def detect(head: bytes) -> str | None:
    """'zdab', 'orca' or None for the first bytes of a file."""
    if head.startswith(ZEBRA_SIGNATURE):
        return "zdab"
    if orca.sniff(head):
        return "orca"
    return None


def _event_object(bank: zdab.Bank, hits: bool) -> dict:
    """The dump object of one PMT event (a 'ZDAB' bank)."""
    try:
        ev = pmt.decode_event(bank.data)
    except pmt.RecordError as exc:
        return {"error": str(exc), "reason": exc.reason, "offset": bank.offset, "record": "PMT"}
    out = {"record": "PMT", "offset": bank.offset, "run": ev["run"], "subrun": ev["subrun"],
           "evnum": ev["evnum"], "gtid": ev["gtid"], "nhit": ev["nhit"],
           "triggers": ev["triggers"], "trigger_word": ev["trigger_word"],
           "clock10": ev["clock10"], "clock50": ev["clock50"], "orphan": ev["orphan"]}
    if ev["bad_hits"]:
        out["bad_hits"] = ev["bad_hits"]
    if ev["gtid_mismatch"]:
        out["gtid_mismatch"] = ev["gtid_mismatch"]
    if ev["subfields"]:
        out["subfields"] = ev["subfields"]
    if hits:
        out["hits"] = ev["hits"]
    return out


def zdab_objects(path: str, hits: bool = False) -> Iterator[dict]:
    """Dump objects of a ZDAB file, with reader problems where they were found."""
    with zdab.ZdabReader(path) as reader:
        reported = 0
        for bank in reader.banks():
            problems = reader.stats.problems
            for offset, reason in problems[reported:]:
                yield {"error": f"{reason} at byte {offset}", "reason": reason, "offset": offset}
            reported = len(problems)
            if bank.name == "ZDAB":
                yield _event_object(bank, hits)
            else:
                yield {"record": bank.name, "offset": bank.offset, "words": len(bank.data) // 4}
        for offset, reason in reader.stats.problems[reported:]:
            yield {"error": f"{reason} at byte {offset}", "reason": reason, "offset": offset}
        extra = reader.stats.n_errors - len(reader.stats.problems)
        if extra > 0:
            yield {"error": f"{extra} further problems not listed", "reason": "more"}


def orca_objects(path: str) -> Iterator[dict]:
    """Dump objects of an ORCA stream file, with parser errors where they occurred."""
    errors: list[orca.OrcaError] = []
    for record in orca.read_file(path, on_error=errors.append):
        while errors:
            err = errors.pop(0)
            yield {"error": str(err), "reason": err.reason, "offset": err.offset}
        yield orca.record_to_dict(record)
    for err in errors:
        yield {"error": str(err), "reason": err.reason, "offset": err.offset}


@click.command("dump")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, default=True,
              help="One JSON object per line (the default and only format).")
@click.option("--hits", is_flag=True, help="Include each PMT event's hits as "
              "[crate, card, channel, cell, qhs, qhl, qlx, tac].")
def dump(path, as_json, hits):
    """Print every record of a ZDAB or ORCA file as one JSON object per line.

    The type of PATH is detected from its first bytes.  Records that cannot be
    decoded are printed as {"error": ..., "reason": ..., "offset": ...}.
    """
    with open(path, "rb") as fh:
        kind = detect(fh.read(64))
    if kind is None:
        raise click.ClickException(f"{path}: neither a ZDAB file nor an ORCA stream")
    objects = zdab_objects(path, hits) if kind == "zdab" else orca_objects(path)
    out = sys.stdout
    try:
        for obj in objects:
            out.write(json.dumps(obj) + "\n")
    except BrokenPipeError:  # `minard dump f | head` is normal use
        sys.stderr.close()
