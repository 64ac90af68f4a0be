"""`minard demo` (the main job before the whole stack): decodes and summarises real and synthetic data."""

from click.testing import CliRunner

from minard import config
from minard.demo import demo


def test_demo_summarises_recorded_and_synthetic_data(tmp_path, demo_zdab):
    cfg = config.load({"var_dir": str(tmp_path)}, env={})
    result = CliRunner().invoke(demo, ["--events", "2000", "--dir", str(tmp_path)], obj=cfg)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "runs/subruns {'3510/10': 1}  GTID 56981 .. 56981  max nhit 364" in out
    assert "events 2000" in out
    assert "CMOS rates for" in out and "base currents: mean" in out
    assert (tmp_path / "synthetic-1-2000.zdab").exists()
