"""The data pages: Stream, Detector, Nhit, Runs and one run.

The pages are thin: their scripts (static/js/*.js) read the view (window and
selection) from the URL query, fetch the JSON API (:mod:`minard.web.api`) and
write the view back into the URL, so every view is a permalink.  The Runs
pages render their tables on the server (Jinja escapes everything).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

from flask import Blueprint, abort, current_app, render_template, request

from minard.analysis.aggregate import NAMES
from minard.store import dq as store_dq
from minard.store import registry
from minard.store.runs import find_runs, get_run
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
    """The 20 x 16 x 32 channel map with drill-down and channel history."""
    return render_template("detector.html", windows=WINDOWS, quantities=data.CHANNEL_SOURCES)


@bp.get("/nhit")
def nhit():
    """The nhit distribution over the last N seconds per trigger type."""
    return render_template("nhit.html", seconds=NHIT_SECONDS, triggers=NAMES)


#: Runs per page of the runs list.
RUNS_PER_PAGE = 50


def run_filter(q: str) -> dict:
    """find_runs arguments for the runs list's search box (ParamError if it is not one).

    ``3510`` one run, ``3500-3600`` a range of numbers, ``2026-12-05`` runs
    started that UTC day, ``2026-12`` that month.
    """
    q = q.strip()
    if not q:
        return {}
    mt = re.fullmatch(r"(\d{1,10})(?:\s*-\s*(\d{1,10}))?", q)
    if mt:
        lo = int(mt.group(1))
        hi = int(mt.group(2)) if mt.group(2) else lo
        return {"numbers": (min(lo, hi), max(lo, hi))}
    mt = re.fullmatch(r"(\d{4})-(\d{2})(?:-(\d{2}))?", q)
    if mt:
        y, mo, d = int(mt.group(1)), int(mt.group(2)), mt.group(3)
        try:
            t0 = datetime(y, mo, int(d or 1), tzinfo=UTC)
        except ValueError:
            raise ParamError(f"{q[:20]!r} is not a date") from None
        if d:
            t1 = t0 + timedelta(days=1)
        else:
            t1 = datetime(y + (mo == 12), mo % 12 + 1, 1, tzinfo=UTC)
        return {"started": (t0.timestamp(), t1.timestamp())}
    raise ParamError("search by run number (3510), a range (3500-3600) or a UTC date (2026-12-05 or 2026-12)")


@bp.get("/runs")
def runs():
    """The runs seen by the monitoring, newest first: search by number or date, 50 per page."""
    q = request.args.get("q", "")[:40]
    try:
        page = parse_int("page", request.args.get("page"), 1, 10**6, 1)
    except ParamError as exc:
        abort(400, str(exc))
    error = None
    try:
        where = run_filter(q)
    except ParamError as exc:
        error, where = str(exc), None
    rows, total = ([], 0) if where is None else find_runs(_redis(), (page - 1) * RUNS_PER_PAGE, RUNS_PER_PAGE, **where)
    pages = max(1, -(-total // RUNS_PER_PAGE))
    # Data quality and sign-off of each run (docs/dq.md); filters on /dq/runs.
    dq_status, signed = store_dq.statuses(_redis()), registry.states(_redis())
    return render_template("runs.html", runs=rows, now=time.time(), q=q, page=page, pages=pages, total=total,
                           error=error, per_page=RUNS_PER_PAGE, dq_status=dq_status, signed=signed)


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
