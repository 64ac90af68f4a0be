"""`minard dump` on real and synthetic files, including damaged ones."""

import json

from click.testing import CliRunner

from minard.dump import dump
from minard.simulate.events import generate_events, write_zdab
from minard.simulate.orca import write_stream


def _objects(args):
    result = CliRunner().invoke(dump, args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


def test_recorded_demo_event_is_dumped_exactly(demo_zdab):
    (event,) = _objects([str(demo_zdab), "--hits"])
    assert (event["run"], event["subrun"], event["evnum"], event["gtid"], event["nhit"]) == (3510, 10, 0, 56981, 364)
    assert event["triggers"] == ["100L", "100M", "100H", "20", "MISS"]
    assert event["hits"][0] == [0, 1, 20, 14, 535, 533, 543, 1498]
    assert len(event["hits"]) == 364


def test_damaged_zdab_gives_error_objects_and_keeps_the_good_events(tmp_path):
    path = tmp_path / "s.zdab"
    write_zdab(path, generate_events(3, 300), progress=False)
    data = bytearray(path.read_bytes())
    data[15360:15364] = b"\xde\xad\xbe\xef"  # corrupt the second block's steering signature
    path.write_bytes(bytes(data))
    objects = _objects([str(path)])
    errors = [o for o in objects if "error" in o]
    events = [o for o in objects if o.get("record") == "PMT"]
    assert errors and all(e["reason"] for e in errors)
    assert 0 < len(events) < 300
    assert events[0]["evnum"] == 0 and events[-1]["evnum"] == 299


def test_orca_stream_records_are_dumped_with_their_kind(tmp_path):
    path = tmp_path / "s.orca"
    write_stream(path, 1, 2.0, progress=False, cmos_id=7 << 18, base_id=9 << 18)
    objects = _objects([str(path)])
    assert objects[0]["kind"] == "header" and objects[0]["cmos_id"] == 7 << 18
    kinds = {o["kind"] for o in objects}
    assert {"cmos", "base"} <= kinds
    cmos = next(o for o in objects if o["kind"] == "cmos")
    assert 0 <= cmos["crate"] < 19 and cmos["counts"]


def test_unknown_file_type_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"hello world, not a detector file")
    result = CliRunner().invoke(dump, [str(path)])
    assert result.exit_code != 0
    assert "neither a ZDAB file nor an ORCA stream" in result.output
