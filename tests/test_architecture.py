"""The layering rule of docs/architecture.md holds (import-linter contracts in .importlinter)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    """formats < analysis < store < processes < web: no layer imports one above it."""
    proc = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BROKEN" not in proc.stdout


def test_the_web_app_never_imports_zmq():
    """Building both web apps loads Flask and Redis clients only, not the data plane."""
    code = ("import sys; import minard; import snoplus_log; minard.app; snoplus_log.app; "
            "import minard.web.api, minard.web.dashboard, minard.web.ops; "
            "bad = sorted(m for m in sys.modules if m == 'zmq' or m.startswith(('zmq.', 'minard.pipeline', "
            "'minard.dispatcher'))); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
