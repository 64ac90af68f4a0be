"""Data-quality pages and API: report card, run registry, golden runs, channel status.

Pages: ``/runs/<run>/dq`` (report card, overlays of run vs reference,
sign-off with history), ``/dq/runs`` (runs with their DQ status and sign-off
state, filtered by either), ``/channels`` (the channel-status database).
Changes (sign-off, channel flags) need a shift-crew login
(:func:`minard.web.auth.login_required`) and the form's CSRF token.

JSON: ``/api/runs/<run>/dq`` (the ``minard dq --json`` object),
``/api/runs/<run>/dq/overlay``, ``/api/runs/<run>/registry``,
``/api/runs/golden`` (``format=csv`` for CSV), ``/api/channels/status``.
"""

from __future__ import annotations

import time

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)

from minard.analysis.dq import FLAGS, STATES
from minard.apidoc import doc, q
from minard.store import channel_status as channels_store
from minard.store import dq as store_dq
from minard.store import registry
from minard.store.runs import list_runs
from minard.web.api import csv_response, json_response
from minard.web.auth import current_user, login_required
from minard.web.params import ParamError, choice, parse_int

bp = Blueprint("dq", __name__)
MAX_RUN = 2**32 - 1


@bp.errorhandler(ParamError)
def bad_parameter(exc: ParamError):
    """A bad parameter: 400 with the reason (JSON under /api/, the error page elsewhere)."""
    if request.path.startswith("/api/"):
        return jsonify(error=str(exc)), 400
    return render_template("error.html", code=400, title="Bad Request", message=str(exc)), 400


def _redis():
    return current_app.extensions["minard_redis"]


def _cfg():
    return current_app.config["MINARD"]


def _dq_config():
    """conf/dq.cfg, parsed once per process (restart to reload)."""
    cached = current_app.extensions.get("minard_dq_config")
    if cached is None:
        cached = current_app.extensions["minard_dq_config"] = store_dq.load_config(_cfg())
    return cached


def _run_number(text: str) -> int:
    try:
        return parse_int("run", text, 0, MAX_RUN)
    except ParamError as exc:
        abort(400, str(exc))


def _only(*allowed: str) -> None:
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        abort(400, f"unknown parameter {unknown[0][:40]!r}; this endpoint takes: {', '.join(allowed)}")


def _expert(user: str | None) -> bool:
    experts = str(_cfg().get("dq_experts") or "").split()
    return bool(user) and (not experts or user in experts)


def report_for(run: int, reference: int | None = None) -> dict | None:
    """The stored report of *run*, or one computed now (not stored) if there is none
    or another *reference* is asked for."""
    r = _redis()
    stored = store_dq.result(r, run) if reference is None else None
    if stored is not None:
        return stored
    try:
        return store_dq.compute(r, run, _dq_config(), reference, store=False)
    except ValueError as exc:
        abort(404, str(exc))


# ------------------------------------------------------------------ API

@bp.get("/api/runs/<run>/dq")
@doc("The run's data-quality report, as `minard dq RUN --json`: run, reference, status, checks",
     params=[q("run", "integer", where="path", minimum=0),
             q("reference", "integer", "judge against this run instead (computed now, not stored)", minimum=0)],
     errors=(400, 404, 503))
def api_dq(run: str):
    """The run's data-quality report: ``{"run", "reference", "status", "checks": [...]}``
    (as ``minard dq RUN --json``); ``reference=REF`` judges against another run."""
    _only("reference")
    number = _run_number(run)
    ref = request.args.get("reference")
    reference = _run_number(ref) if ref not in (None, "") else None
    report = report_for(number, reference)
    if report is None:
        abort(404, f"run {number} is not known")
    return json_response(report)


@bp.get("/api/runs/<run>/dq/overlay")
@doc("Run against its reference for the overlays: trigger rates, normalized nhit histograms, occupancy ratio",
     params=[q("run", "integer", where="path", minimum=0), q("reference", "integer", "another reference run", minimum=0)],
     errors=(400, 404, 503))
def api_overlay(run: str):
    """Run against its reference: trigger rates, normalized nhit histogram, occupancy ratio."""
    _only("reference")
    number = _run_number(run)
    ref = request.args.get("reference")
    reference = _run_number(ref) if ref not in (None, "") else (report_for(number) or {}).get("reference")
    out = store_dq.overlay(_redis(), number, reference)
    if out is None:
        abort(404, f"run {number} is not known")
    return json_response(out)


@bp.get("/api/runs/<run>/registry")
@doc("The run's sign-off state (state, who, when, comment) and its whole history",
     params=[q("run", "integer", where="path", minimum=0)], errors=(400, 503))
def api_registry(run: str):
    """The run's sign-off state and its whole history (oldest first)."""
    _only()
    number = _run_number(run)
    r = _redis()
    return json_response({"run": number, **registry.state(r, number), "history": registry.history(r, number)})


@bp.get("/api/runs/golden")
@doc("The golden run list: runs signed pass, with run type, DQ status, who, when and comment",
     params=["format", "download"], csv=True, errors=(400, 503))
def api_golden():
    """The golden run list: runs signed ``pass`` (JSON, or CSV with ``format=csv``)."""
    _only("format", "download")
    fmt = choice("format", request.args.get("format"), ("json", "csv"), "json") \
        if request.args.get("format") else "json"
    r = _redis()
    rows = registry.golden(r)
    types = {int(k): v.decode() for k, v in r.hgetall(store_dq.RUN_TYPE_KEY).items()}
    status = store_dq.statuses(r)
    for row in rows:
        row["run_type"] = types.get(row["run"], "")
        row["dq_status"] = status.get(row["run"])
    if fmt == "csv":
        cols = ["run", "run_type", "dq_status", "signed_by", "signed_at", "comment"]
        return csv_response(cols, ([row[c] if row[c] is not None else "" for c in cols] for row in rows),
                            "minard-golden-runs")
    return json_response(rows, "minard-golden-runs")


@bp.get("/api/channels/status")
@doc("The channel-status database: every flagged channel's flags with reason, who and when",
     errors=(400, 503))
def api_channels():
    """Every flagged channel: ``{"<lcn>": {flag: {reason, who, when}}}``, and the flag set."""
    _only()
    return json_response({"flags": list(FLAGS),
                          "channels": {str(k): v for k, v in sorted(channels_store.status(_redis()).items())}})


# ------------------------------------------------------------------ pages

@bp.get("/runs/<run>/dq")
def run_page(run: str):
    """The run's report card, overlays against its reference, and its sign-off."""
    _only("reference")
    number = _run_number(run)
    ref = request.args.get("reference")
    reference = _run_number(ref) if ref not in (None, "") else None
    report = report_for(number, reference)
    if report is None:
        abort(404, f"Run {number} is not known to the monitoring.")
    r = _redis()
    user = current_user()
    states = registry.SHIFTER_STATES + (registry.EXPERT_STATES if _expert(user) else ())
    return render_template("dq_run.html", report=report, state=registry.state(r, number),
                           history=registry.history(r, number), states=states, user=user)


@bp.post("/runs/<run>/sign")
@doc("Sign a run off as the logged-in user (the run page's form)", status=303,
     ok_description="signed, or refused with a message: redirect to the run's DQ page",
     params=[q("run", "integer", where="path", minimum=0)],
     body=("application/x-www-form-urlencoded", {"type": "object", "required": ["csrf_token", "state", "comment"],
           "properties": {"csrf_token": {"type": "string", "description": "the page's CSRF token"},
                          "state": {"type": "string", "enum": list(registry.SHIFTER_STATES + registry.EXPERT_STATES)},
                          "comment": {"type": "string", "maxLength": registry.MAX_COMMENT}}}),
     errors=(400,), responses={"302": {"description": "not logged in: redirect to /login"}})
@login_required
def sign(run: str):
    """Sign the run off as the logged-in user (shifter states, or expert states for experts)."""
    number = _run_number(run)
    user = current_user()
    try:
        registry.sign(_redis(), number, request.form.get("state", ""), user,
                      request.form.get("comment", ""), _expert(user))
    except registry.SignError as exc:
        flash(f"Not signed: {exc}", "error")
    else:
        current_app.logger.info("run %d signed %s by %s", number, request.form.get("state"), user)
        flash(f"Run {number} signed {request.form.get('state')}.", "success")
    return redirect(url_for("dq.run_page", run=number), code=303)


@bp.get("/dq/runs")
def runs_page():
    """Runs with their DQ status and sign-off state, filtered by either."""
    _only("status", "state")
    want_status = request.args.get("status") or ""
    want_state = request.args.get("state") or ""
    if want_status and want_status not in STATES:
        abort(400, f"status must be one of {', '.join(STATES)}")
    if want_state and want_state not in registry.STATES:
        abort(400, f"state must be one of {', '.join(registry.STATES)}")
    r = _redis()
    dq_status = store_dq.statuses(r)
    signed = registry.states(r)
    rows = []
    for row in list_runs(r, 500):
        row["dq"] = dq_status.get(row["run"], "")
        row["state"] = signed.get(row["run"], {}).get("state", "unreviewed")
        if (not want_status or row["dq"] == want_status) and (not want_state or row["state"] == want_state):
            rows.append(row)
    return render_template("dq_runs.html", runs=rows, statuses=STATES, states=registry.STATES,
                           want_status=want_status, want_state=want_state, now=time.time())


@bp.get("/channels")
def channels_page():
    """The channel-status database: flagged channels, the form to change them, the history."""
    _only()
    r = _redis()
    return render_template("dq_channels.html", channels=sorted(channels_store.status(r).items()),
                           history=list(reversed(channels_store.history(r, limit=200))), flags=FLAGS,
                           user=current_user())


@bp.post("/channels")
@doc("Flag or unflag a channel as the logged-in user (the Channels page's form)", status=303,
     ok_description="changed, or refused with a message: redirect to /channels",
     body=("application/x-www-form-urlencoded", {"type": "object", "required": ["csrf_token", "lcn", "flag", "reason"],
           "properties": {"csrf_token": {"type": "string"}, "lcn": {"type": "integer", "minimum": 0, "maximum": 9727},
                          "flag": {"type": "string", "enum": list(FLAGS)},
                          "action": {"type": "string", "enum": ["flag", "unflag"], "default": "flag"},
                          "reason": {"type": "string"}}}),
     errors=(400,), responses={"302": {"description": "not logged in: redirect to /login"}})
@login_required
def change_channel():
    """Flag or unflag a channel as the logged-in user."""
    try:
        entry = channels_store.change(_redis(), request.form.get("lcn", ""), request.form.get("flag", ""),
                                      request.form.get("action", "flag"), request.form.get("reason", ""),
                                      current_user())
    except channels_store.FlagError as exc:
        flash(f"Not changed: {exc}", "error")
    else:
        flash(f"Channel {entry['lcn']}: {entry['action']} {entry['flag']}.", "success")
    return redirect(url_for("dq.channels_page"), code=303)


def register(app) -> None:
    """Add the blueprint and its navigation entries."""
    from minard.web import register_nav

    app.register_blueprint(bp)
    register_nav(app, "dq.runs_page", "Run registry", 14)
    register_nav(app, "dq.channels_page", "Channels", 15)
