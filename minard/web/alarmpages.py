"""Alarm pages beyond the list: one alarm with guidance and history, KPIs,
suppression flags, the Bursts page, the on-call Roster and the Shift handover.

Reading needs no login; every change (reset, flags, out of service, roster,
test notification, handover note) does, with the session's CSRF token.
"""

from __future__ import annotations

import re

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

from minard.apidoc import doc, q
from minard.ops import alarmdefs, alarmreport, notify
from minard.store import alarms, bursts, roster
from minard.web.auth import current_user, login_required

bp = Blueprint("alarmpages", __name__)
_FLAG = re.compile(r"^(crate:(1[0-8]|[0-9])|run_type:[a-z0-9_-]{1,32})$")


def _cfg():
    return current_app.config["MINARD"]


def _redis():
    return current_app.extensions["minard_redis"]


def _history() -> float:
    return float(_cfg()["alarm_history_days"])


def _defs() -> dict:
    try:
        return alarmdefs.load(_cfg())
    except (OSError, ValueError):
        current_app.logger.exception("alarms_file cannot be read")
        return {}


def register(app) -> None:
    """Add the blueprint and its navigation entries."""
    from minard.web import register_nav

    app.register_blueprint(bp)
    register_nav(app, "alarmpages.bursts_page", "Bursts", 84)
    register_nav(app, "alarmpages.shift_page", "Shift", 85)
    register_nav(app, "alarmpages.roster_page", "Roster", 86)


@bp.get("/alarms/<int:alarm_id>")
def alarm_page(alarm_id: int):
    """One alarm: state, priority, guidance, link and its transition history."""
    a = alarms.get(_redis(), alarm_id)
    if a is None:
        abort(404, f"alarm {alarm_id} does not exist")
    d = _defs().get(a["name"])
    return render_template("alarm.html", a=a, d=d, history=alarms.transitions(_redis(), alarm_id))


@bp.get("/api/alarms/<int:alarm_id>")
@doc("One alarm with its guidance, link and transition history (who, when, comment)",
     ok={"type": "object", "properties": {"alarm": {"type": "object"}, "guidance": {"type": "string"},
         "link": {"type": "string"}, "history": {"type": "array", "items": {"type": "object"}}}}, errors=(404, 503))
def alarm_json(alarm_id: int):
    """One alarm with its guidance and transition history."""
    a = alarms.get(_redis(), alarm_id)
    if a is None:
        abort(404, f"alarm {alarm_id} does not exist")
    d = _defs().get(a["name"])
    return jsonify(alarm=a, guidance=d.guidance if d else "", link=d.link if d else "",
                   history=alarms.transitions(_redis(), alarm_id))


@bp.post("/alarms/<int:alarm_id>/reset")
@doc("Reset a latched alarm whose condition has cleared", status=303, ok_description="reset: redirect to /alarms",
     body=("application/x-www-form-urlencoded", {"type": "object", "required": ['csrf_token'], "properties": {"csrf_token": {"type": "string", "description": "the page's CSRF token"}, "comment": {"type": "string"}}}), errors=(403, 404, 409), responses={"302": {"description": "not logged in: redirect to /login"}})
@login_required
def reset(alarm_id: int):
    """Reset a latched alarm whose condition has cleared."""
    try:
        alarms.reset(_redis(), alarm_id, current_user(), request.form.get("comment", ""), history_days=_history())
    except LookupError as exc:
        abort(404, str(exc))
    except ValueError as exc:
        abort(409, str(exc))
    flash(f"Alarm {alarm_id} reset.", "success")
    return redirect(url_for("ops.alarms_page"), 303)


@bp.get("/api/alarms/kpi")
@doc("Alarm KPIs of the last 24 h against the EEMUA 191 targets",
     ok={"type": "object", "properties": {"per_10min": {"type": "number"}, "peak_10min": {"type": "integer"},
         "flood_fraction": {"type": "number"}, "time_in_flood_minutes": {"type": "integer"},
         "chattering": {"type": "array", "items": {"type": "object"}}, "standing": {"type": "array", "items": {"type": "object"}},
         "targets": {"type": "object"}, "ok": {"type": "object"}}}, errors=(503,))
def kpi_json():
    """Alarm KPIs of the last 24 h against the EEMUA 191 targets."""
    items = alarms.list_alarms(_redis(), limit=5000, history_days=_history())
    return jsonify(alarmreport.kpis(items))


@bp.get("/alarms/kpi")
def kpi_page():
    """KPIs, suppression flags and out-of-service definitions."""
    items = alarms.list_alarms(_redis(), limit=5000, history_days=_history())
    return render_template("alarm_kpi.html", k=alarmreport.kpis(items), flags=alarms.flags(_redis()),
                           oos=alarms.out_of_service(_redis()), defs=_defs())


@bp.post("/alarms/flags")
@doc("Set or clear a suppression flag (crate:N out of service, run_type:NAME)", status=303,
     ok_description="redirect to /alarms/kpi",
     body=("application/x-www-form-urlencoded", {"type": "object", "required": ['csrf_token', 'flag'], "properties": {"csrf_token": {"type": "string", "description": "the page's CSRF token"}, "flag": {"type": "string", "description": "crate:0..18 or run_type:NAME"}, "on": {"type": "string", "enum": ["0", "1"]}, "comment": {"type": "string"}}}), errors=(400, 403), responses={"302": {"description": "not logged in: redirect to /login"}})
@login_required
def set_flag():
    """Set or clear a suppression flag: crate:N (out of service) or run_type:NAME."""
    flag = request.form.get("flag", "").strip().lower()
    if not _FLAG.match(flag):
        abort(400, "flag must be crate:0..18 or run_type:NAME")
    on = request.form.get("on", "1") == "1"
    alarms.set_flag(_redis(), flag, current_user(), on, request.form.get("comment", ""))
    flash(f"{flag} {'set' if on else 'cleared'}.", "success")
    return redirect(url_for("alarmpages.kpi_page"), 303)


@bp.post("/alarms/oos")
@doc("Take an alarm definition out of service, or back into service", status=303,
     ok_description="redirect to /alarms/kpi",
     body=("application/x-www-form-urlencoded", {"type": "object", "required": ['csrf_token', 'name'], "properties": {"csrf_token": {"type": "string", "description": "the page's CSRF token"}, "name": {"type": "string", "description": "a definition of conf/alarms.cfg"}, "on": {"type": "string", "enum": ["0", "1"]}, "comment": {"type": "string"}}}), errors=(400, 403), responses={"302": {"description": "not logged in: redirect to /login"}})
@login_required
def set_oos():
    """Take an alarm definition out of service (or back)."""
    name = request.form.get("name", "")
    if name not in _defs():
        abort(400, "unknown alarm definition")
    on = request.form.get("on", "1") == "1"
    alarms.set_out_of_service(_redis(), name, current_user(), on, request.form.get("comment", ""))
    flash(f"{name} {'out of service' if on else 'back in service'}.", "success")
    return redirect(url_for("alarmpages.kpi_page"), 303)


# -- bursts -----------------------------------------------------------------------


@bp.get("/bursts")
def bursts_page():
    """Supernova burst candidates, newest first."""
    return render_template("bursts.html", rows=bursts.list_bursts(_redis()))


@bp.get("/api/bursts")
@doc("Supernova burst candidates, newest first",
     ok={"type": "array", "items": {"type": "object", "properties": {"run": {"type": "integer"},
         "gtid_first": {"type": "integer"}, "gtid_last": {"type": "integer"}, "start": {"type": "number"},
         "end": {"type": "number"}, "count": {"type": "integer"}, "window": {"type": "number"}}}}, errors=(503,))
def bursts_json():
    """Burst records (run, gtid_first, gtid_last, start, end, count, window, ...)."""
    return jsonify(bursts.list_bursts(_redis()))


@bp.get("/api/bursts/<int:burst_id>")
@doc("One burst record with every event's GTID and nhit (the export)",
     params=[q("download", "string", "any value: send as an attachment burst-ID.json")],
     ok={"type": "object"}, errors=(404, 503))
def burst_json(burst_id: int):
    """One burst record with its events' GTIDs and nhits (the export)."""
    rec = bursts.get_burst(_redis(), burst_id)
    if rec is None:
        abort(404, f"burst {burst_id} does not exist")
    resp = jsonify(rec)
    if request.args.get("download"):
        resp.headers["Content-Disposition"] = f'attachment; filename="burst-{burst_id}.json"'
    return resp


# -- roster -----------------------------------------------------------------------


@bp.get("/roster")
def roster_page():
    """Who is on duty; editing needs a login."""
    return render_template("roster.html", people=roster.show(_redis()), titles=roster.ROLE_TITLES)


@bp.get("/api/roster")
@doc("The on-call roster: role (shifter, expert, supernova) -> name, email, by, at, or null",
     ok={"type": "object"}, errors=(503,))
def roster_json():
    """The roster: role -> {name, email, by, at} or null."""
    return jsonify(roster.show(_redis()))


@bp.post("/roster")
@doc("Put someone on duty in a role", status=303, ok_description="redirect to /roster",
     body=("application/x-www-form-urlencoded", {"type": "object", "required": ['csrf_token', 'role', 'name'], "properties": {"csrf_token": {"type": "string", "description": "the page's CSRF token"}, "role": {"type": "string", "enum": ["shifter", "expert", "supernova"]}, "name": {"type": "string"}, "email": {"type": "string"}}}), errors=(400, 403), responses={"302": {"description": "not logged in: redirect to /login"}})
@login_required
def roster_set():
    """Put someone on duty."""
    try:
        roster.set_person(_redis(), request.form.get("role", ""), request.form.get("name", ""),
                          request.form.get("email", ""), who=current_user())
    except ValueError as exc:
        abort(400, str(exc))
    flash("Roster updated.", "success")
    return redirect(url_for("alarmpages.roster_page"), 303)


@bp.post("/roster/test")
@doc("Send a test notification to everyone on the roster", status=303, ok_description="redirect to /roster",
     body=("application/x-www-form-urlencoded", {"type": "object", "required": ['csrf_token'], "properties": {"csrf_token": {"type": "string", "description": "the page's CSRF token"}}}), errors=(403,), responses={"302": {"description": "not logged in: redirect to /login"}})
@login_required
def roster_test():
    """Send a test notification to everyone on the roster."""
    result = notify.send_test(_cfg(), _redis(), current_user())
    if not result:
        flash("Nobody is on the roster.", "error")
    for role, channels in result.items():
        flash(f"Test to {role}: {', '.join(channels) if channels else 'FAILED (see the log; is smtp_host or notify_webhook_url set?)'}",
              "success" if channels else "error")
    return redirect(url_for("alarmpages.roster_page"), 303)


# -- shift handover --------------------------------------------------------------------


def _since() -> float | None:
    raw = request.args.get("since", "")
    if not raw:
        return None
    try:
        v = float(raw)
    except ValueError:
        abort(400, "since must be Unix seconds")
    if not 0 < v < 1e11:
        abort(400, "since must be Unix seconds")
    return v


@bp.get("/shift")
def shift_page():
    """Shift handover: what happened since the shift started."""
    s = alarmreport.shift_summary(_redis(), _since(), history_days=_history())
    return render_template("shift.html", s=s, md=alarmreport.markdown(s))


@bp.get("/api/shift")
@doc("Shift handover summary: alarms raised, acknowledged, shelved, expiring shelves, open alarms, note",
     params=[q("since", "number", "start (Unix s); default: when the shifter went on duty, else 8 h ago")],
     ok={"type": "object"}, errors=(400, 503))
def shift_json():
    """The handover summary as JSON (?since=UNIX)."""
    return jsonify(alarmreport.shift_summary(_redis(), _since(), history_days=_history()))


@bp.post("/shift/note")
@doc("Save the shift's handover note", status=303, ok_description="redirect to /shift",
     body=("application/x-www-form-urlencoded", {"type": "object", "required": ['csrf_token'], "properties": {"csrf_token": {"type": "string", "description": "the page's CSRF token"}, "note": {"type": "string", "maxLength": 5000}}}), errors=(403,), responses={"302": {"description": "not logged in: redirect to /login"}})
@login_required
def shift_note():
    """Save the handover note."""
    alarmreport.set_note(_redis(), request.form.get("note", ""), current_user())
    flash("Handover note saved.", "success")
    return redirect(url_for("alarmpages.shift_page"), 303)
