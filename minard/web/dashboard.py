"""The data pages: Stream, Detector, Nhit, Runs and one run.

The pages are thin: their scripts (static/js/*.js) read the view (window and
selection) from the URL query, fetch the JSON API (:mod:`minard.web.api`) and
write the view back into the URL, so every view is a permalink.  The Runs
pages render their tables on the server (Jinja escapes everything).
"""

from __future__ import annotations

import time

from flask import Blueprint, abort, current_app, render_template

from minard.analysis.aggregate import NAMES
from minard.store import dq as store_dq
from minard.store import registry
from minard.store.runs import get_run, list_runs
from minard.web import data
from minard.web.params import ParamError, parse_int

bp = Blueprint("dashboard", __name__)

#: Window presets offered by the time-window pickers (label, seconds).
WINDOWS = (("10 min", "10m"), ("1 hour", "1h"), ("6 hours", "6h"), ("1 day", "1d"),
           ("1 week", "1w"), ("30 days", "30d"), ("1 year", "1y"))
NHIT_SECONDS = (("10 s", "10"), ("1 min", "60"), ("5 min", "300"), ("1 hour", "3600"), ("1 day", "86400"))


def _redis():
    return current_app.extensions["minard_redis"]


def register(app) -> None:
    """Add the blueprint, its navigation entries and make Stream the home page."""
    from minard.web import register_nav

    app.register_blueprint(bp)
    for order, (endpoint, label) in enumerate((("dashboard.stream", "Stream"), ("dashboard.detector", "Detector"),
                                               ("dashboard.nhit", "Nhit"), ("dashboard.runs", "Runs"))):
        register_nav(app, endpoint, label, 10 + order)
    app.config["HOME_ENDPOINT"] = "dashboard.stream"


@bp.get("/stream")
def stream():
    """Live rates, average nhit and charge per trigger type, run/subrun/GTID, heartbeats."""
    return render_template("stream.html", windows=WINDOWS, triggers=NAMES)


@bp.get("/detector")
def detector():
    """The 19 x 16 x 32 channel map with drill-down and channel history."""
    return render_template("detector.html", windows=WINDOWS, quantities=data.CHANNEL_SOURCES)


@bp.get("/nhit")
def nhit():
    """The nhit distribution over the last N seconds per trigger type."""
    return render_template("nhit.html", seconds=NHIT_SECONDS, triggers=NAMES)


@bp.get("/runs")
def runs():
    """The runs seen by the monitoring, newest first."""
    rows = list_runs(_redis(), 500)
    # Data quality and sign-off of each run (docs/dq.md); filters on /dq/runs.
    dq_status, signed = store_dq.statuses(_redis()), registry.states(_redis())
    return render_template("runs.html", runs=rows, now=time.time(), dq_status=dq_status, signed=signed)


@bp.get("/runs/<run>")
def run(run: str):
    """One run: per-trigger counts, nhit histogram and occupancy map."""
    try:
        number = parse_int("run", run, 0, 2**31 - 1)
    except ParamError as exc:
        abort(400, str(exc))
    summary = get_run(_redis(), number)
    if summary is None:
        abort(404, f"Run {number} is not known to the monitoring.")
    active = sorted(((n, c) for n, c in summary["triggers"].items() if c), key=lambda x: -x[1])
    return render_template("run.html", run=summary, active=active,
                           channels_hit=len(summary["channel_hits"]))
