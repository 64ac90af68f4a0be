"""Shift operations pages: Alarms, Status, Logs and Processes (and their JSON).

Read-only pages and JSON need no login; acknowledging and shelving do.  Data
shown comes from Redis (alarms, heartbeats, metrics), from the log files of
registered programs and from supervisord's XML-RPC; all of it is escaped by
Jinja on the server and set with ``textContent`` in the browser.
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

from markupsafe import Markup

from minard.apidoc import doc, q
from minard.ops import alarmreport, programs
from minard.ops.keys import valid_name
from minard.store import alarms
from minard.web import logtail, supervisor
from minard.web.auth import current_user, login_required
from minard.web.params import ParamError, int_arg

bp = Blueprint("ops", __name__)

#: Shelve durations offered on the Alarms page, in minutes.
SHELVE_MINUTES = (15, 60, 240, 480, 1440, 4320)


def _cfg():
    return current_app.config["MINARD"]


def _redis():
    return current_app.extensions["minard_redis"]


def _registry() -> programs.Registry:
    return current_app.extensions["minard_registry"]


def _history() -> float:
    return float(_cfg()["alarm_history_days"])


def _check(now: float) -> None:
    """Lazy heartbeat expiry: every read of status or alarms evaluates it."""
    programs.check_heartbeats(_redis(), _registry(), now, _history())


# -- template helpers -------------------------------------------------------------


@bp.app_template_filter("when")
def when(ts: float | None) -> str:
    """An epoch time as UTC 'YYYY-MM-DD HH:MM:SS' (24-hour), or '-'."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "-"


@bp.app_template_filter("timetag")
def timetag(ts: float | None) -> Markup:
    """A ``<time>`` element in UTC that the page rewrites when the browser shows local time."""
    if not ts:
        return Markup("-")
    t = float(ts)
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    return Markup('<time datetime="{}" data-t="{:.3f}">{}</time>').format(iso, t, when(t))


@bp.app_template_global("tz_label")
def tz_label() -> Markup:
    """The time-zone label of a table header (UTC; minard.js rewrites it for local time)."""
    return Markup('<span class="tz-label">UTC</span>')


@bp.app_template_filter("duration")
def duration(seconds: float | None) -> str:
    """Seconds as '3 d 04:05:06' / '04:05:06', or '-'."""
    if seconds is None:
        return "-"
    s = int(max(0, seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d} d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


# -- alarms -------------------------------------------------------------------------


def _shelve_choices() -> list[int]:
    """Shelve durations allowed by alarm_max_shelve_hours."""
    limit = float(_cfg()["alarm_max_shelve_hours"]) * 60
    return [m for m in SHELVE_MINUTES if m <= limit]


def _alarms_page(error: str | None = None, status: int = 200):
    """Render the alarm list (with an optional error from a form)."""
    now = time.time()
    _check(now)
    items = alarms.list_alarms(_redis(), now, history_days=_history())
    state = request.args.get("state", "")
    if state in alarms.STATES:  # filter by ISA-18.2 state
        items = [a for a in items if a["state"] == state]
    kpi = alarmreport.kpis(alarms.list_alarms(_redis(), now, limit=5000, history_days=_history()), now)
    return render_template("alarms.html", alarms=items, error=error, now=now, states=alarms.STATES, kpi=kpi,
                           shelve_minutes=_shelve_choices()), status


@bp.get("/alarms")
def alarms_page():
    """The alarm list with acknowledge and shelve forms."""
    return _alarms_page()


@bp.get("/api/alarms")
@doc("Alarms (newest first) and their summary, as the Alarms page shows them",
     params=[q("limit", "integer", "at most this many alarms", minimum=1, maximum=1000, default=200),
             q("state", "string", "only alarms in this ISA-18.2 state", enum=list(alarms.STATES))],
     ok={"type": "object", "properties": {
         "alarms": {"type": "array", "items": {"type": "object"}}, "now": {"type": "number"},
         "logged_in": {"type": "boolean"}, "shelve_minutes": {"type": "array", "items": {"type": "integer"}},
         "summary": {"type": "object", "properties": {"active": {"type": "integer"},
                                                      "ringing": {"type": "integer"}}}}},
     errors=(400, 503))
def alarms_json():
    """Alarms (newest first) and the summary, for the page's live update."""
    now = time.time()
    _check(now)
    try:
        limit = int_arg(request.args, "limit", 1, 1000, 200)
    except ParamError as exc:
        abort(400, str(exc))
    items = alarms.list_alarms(_redis(), now, limit, _history())
    state = request.args.get("state", "")
    if state:
        if state not in alarms.STATES:
            abort(400, f"state must be one of {', '.join(alarms.STATES)}")
        items = [a for a in items if a["state"] == state]
    return jsonify(alarms=items, now=now, logged_in=current_user() is not None,
                   shelve_minutes=_shelve_choices(),
                   summary={"active": sum(a["state"] in ("unacknowledged", "rtn_unacknowledged") for a in items),
                            "ringing": sum(a["ringing"] for a in items)})


@bp.get("/api/alarms/summary")
@doc("Counts of active and ringing alarms (every page polls this to ring the bell)",
     ok={"type": "object", "properties": {"active": {"type": "integer"}, "ringing": {"type": "integer"}}},
     errors=(503,))
def alarms_summary():
    """Counts of active and ringing alarms: every page polls this to ring the bell."""
    now = time.time()
    _check(now)
    return jsonify(alarms.summary(_redis(), now, _history()))


def _alarm_action(alarm_id: int, action):
    """Run an alarm action; on a bad request show the page with the reason."""
    try:
        a = action()
    except LookupError as exc:
        return _alarms_page(str(exc), 404)
    except ValueError as exc:
        return _alarms_page(str(exc), 409 if "already" in str(exc) else 400)
    return a


@bp.post("/alarms/<int:alarm_id>/ack")
@doc("Acknowledge an alarm as the logged-in user (the Alarms page's form)", status=303,
     ok_description="acknowledged: redirect to /alarms", body=("application/x-www-form-urlencoded", {"type": "object", "required": ["csrf_token"], "properties": {
         "csrf_token": {"type": "string", "description": "the page's CSRF token"},
         "comment": {"type": "string"}}}),
     errors=(400, 403, 404, 409), responses={"302": {"description": "not logged in: redirect to /login"}})
@login_required
def acknowledge(alarm_id: int):
    """Acknowledge an alarm as the logged-in user."""
    comment = request.form.get("comment", "")
    result = _alarm_action(alarm_id, lambda: alarms.acknowledge(
        _redis(), alarm_id, current_user(), comment, history_days=_history()))
    if isinstance(result, tuple):
        return result
    flash(f"Alarm {alarm_id} acknowledged.", "success")
    return redirect(url_for("ops.alarms_page"), 303)


@bp.post("/alarms/<int:alarm_id>/shelve")
@doc("Shelve an alarm for one of the offered durations (the expiry is mandatory)", status=303,
     ok_description="shelved: redirect to /alarms",
     body=("application/x-www-form-urlencoded", {"type": "object", "required": ["csrf_token", "minutes"], "properties": {
         "csrf_token": {"type": "string"}, "minutes": {"type": "integer", "description": "one of the offered durations"},
         "comment": {"type": "string"}}}),
     errors=(400, 403, 404, 409), responses={"302": {"description": "not logged in: redirect to /login"}})
@login_required
def shelve(alarm_id: int):
    """Shelve an alarm for one of the offered durations (the expiry is mandatory)."""
    try:
        minutes = int_arg(request.form, "minutes", 1, max(SHELVE_MINUTES))
    except ParamError:
        minutes = None
    if minutes not in _shelve_choices():
        return _alarms_page("Choose how long to shelve the alarm (the expiry is mandatory).", 400)
    until = time.time() + minutes * 60
    comment = request.form.get("comment", "")
    result = _alarm_action(alarm_id, lambda: alarms.shelve(
        _redis(), alarm_id, current_user(), until, comment,
        max_hours=float(_cfg()["alarm_max_shelve_hours"]), history_days=_history()))
    if isinstance(result, tuple):
        return result
    flash(f"Alarm {alarm_id} shelved until {when(until)} UTC.", "success")
    return redirect(url_for("ops.alarms_page"), 303)


@bp.post("/alarms/<int:alarm_id>/unshelve")
@doc("End a shelve now", status=303, ok_description="active again: redirect to /alarms",
     body=("application/x-www-form-urlencoded", {"type": "object", "required": ["csrf_token"], "properties": {
         "csrf_token": {"type": "string", "description": "the page's CSRF token"},
         "comment": {"type": "string"}}}),
     errors=(400, 403, 404, 409), responses={"302": {"description": "not logged in: redirect to /login"}})
@login_required
def unshelve(alarm_id: int):
    """End a shelve now."""
    result = _alarm_action(alarm_id, lambda: alarms.unshelve(
        _redis(), alarm_id, current_user(), history_days=_history()))
    if isinstance(result, tuple):
        return result
    flash(f"Alarm {alarm_id} is active again.", "info")
    return redirect(url_for("ops.alarms_page"), 303)


# -- status --------------------------------------------------------------------------


def _supervised(timeout: float = 0.5) -> dict[str, dict]:
    """supervisord's processes by name and group:name, or {} when it is not running."""
    try:
        table = supervisor.process_table(_socket_path(), timeout)
    except supervisor.Unavailable:
        return {}
    out = {}
    for p in table["processes"]:
        out[p["name"]] = p
        out[f"{p['group']}:{p['name']}"] = p
    return out


def _status_rows(now: float) -> list[dict]:
    """Every registered program with heartbeat state, metrics and supervisord state."""
    _check(now)
    rows = programs.statuses(_redis(), _registry(), now)
    supervised = _supervised()
    for row in rows:
        p = supervised.get(row["name"])
        row["supervisor"] = p["state"] if p else None
    return rows


#: Fields of a pipeline heartbeat shown in their own columns (the rest go to "other").
_PIPELINE_FIELDS = ("time", "pid", "host", "started", "state", "alive")


def _pipeline(now: float) -> tuple[list[dict], list[dict]]:
    """Pipeline processes' own heartbeats and the loss counters per stage.

    Written by the pipeline processes through ``minard.store.status`` (Redis keys
    ``status:<component>`` and ``stats:<stage>``, see docs/storage.md).
    """
    from minard.store import status as pipeline_status

    r = _redis()
    procs = []
    for name, f in pipeline_status.components(r, now).items():
        started = float(f["started"]) if f.get("started") else None
        last = float(f["time"]) if f.get("time") else None
        procs.append({
            "name": name, "state": "up" if f.get("alive") else "down",
            "reported": f.get("state", ""), "host": f.get("host", ""), "pid": f.get("pid", ""),
            "uptime": (now - started) if started and f.get("alive") else None,
            "age": (now - last) if last else None,
            "lag": f.get("lag_seconds"),
            "other": {k: v for k, v in sorted(f.items()) if k not in _PIPELINE_FIELDS and k != "lag_seconds"},
        })
    stages = []
    for stage, counters in pipeline_status.stats(r).items():
        # Only what a stage dropped or failed on is lost; other counters are reasons or extras.
        lost = counters.get("dropped", 0) + counters.get("errors", 0)
        stages.append({"stage": stage, "counters": counters, "lost": lost})
    return procs, stages


def _pools(now: float) -> list[dict]:
    """Consumer pools one by one (``status:pool:<host>:<pid>``): state, workers, own counters.

    Pools on several hosts reading one push are listed separately, each with
    the records it received and lost (issue 18).
    """
    from minard.store import status as pipeline_status

    rows = []
    for ident, f in pipeline_status.pools(_redis(), now).items():
        last = float(f["time"]) if f.get("time") else None
        counters = f.get("counters", {})
        stage = counters.get("pull") or next(iter(counters.values()), {})
        received, processed = stage.get("received", 0), stage.get("processed", 0)
        uptime = now - float(f["started"]) if f.get("started") else None
        rows.append({
            "pool": ident, "component": f.get("component", ""), "host": f.get("host", ""),
            "pid": f.get("pid", ""), "state": "up" if f.get("alive") else "down",
            "age": (now - last) if last else None, "workers": f.get("workers", ""),
            "received": received, "processed": processed, "over": over_received(processed, received, uptime),
            "lost": stage.get("dropped", 0) + stage.get("errors", 0), "counters": counters,
        })
    return rows


#: Which program's row shows a stage's counters (stats:STAGE), when no row has the stage's own name.
STAGE_PROGRAMS = {"dispatcher": "dispatcher", "push": "minard_dispatch_push", "pull": "minard_dispatch_pull",
                  "redis": "minard_dispatch_pull", "orca_producer": "data_producer",
                  "cmos": "data_consumer_cmos", "base": "data_consumer_base"}
#: Loss counters shown in their own columns (the rest are reasons, listed under them).
STAGE_COUNTERS = ("received", "processed", "dropped", "errors")


def _readable(key: str) -> str:
    """A stored field name as a label: 'lag_seconds' -> 'lag seconds'."""
    return key.replace("_", " ").replace(":", " ")


def _value(v) -> str:
    """A stored value for display: numbers with at most 3 decimals."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return str(int(f)) if f.is_integer() else f"{f:.3f}".rstrip("0")


#: Seconds of a stage's mean rate by which its ``processed`` may lead its ``received``
#: without being flagged: the two are written by different processes at different
#: moments (a pool manager writes ``received`` with its heartbeat, its workers
#: ``processed`` with each flush), so a snapshot can catch a flush the manager has
#: not reported yet.  Counters that really disagree keep growing apart.
REPORT_SLACK = 5.0


def over_received(processed: int, received: int, uptime: float | None) -> bool:
    """Whether a stage processed more than it received, beyond :data:`REPORT_SLACK` s of its mean rate."""
    slack = REPORT_SLACK * received / uptime if uptime and uptime > 0 else 0.0
    return processed > received + slack


def _stage_view(stage: str, counters: dict, uptime: float | None = None) -> dict:
    """One stage's counters: the four columns, the other reasons, losses and the processed > received flag.

    *uptime* (s) of the program that owns the stage sets the flag's slack (:func:`over_received`).
    """
    main = {k: int(counters.get(k, 0)) for k in STAGE_COUNTERS}
    lost = main["dropped"] + main["errors"]
    return {"stage": stage, **main, "lost": lost,
            "other": {_readable(k): _value(v) for k, v in sorted(counters.items()) if k not in STAGE_COUNTERS},
            "over": over_received(main["processed"], main["received"], uptime),
            "pending": max(0, main["received"] - main["processed"] - lost)}


def status_rows(now: float) -> list[dict]:
    """One row per program: the registry, the pipeline's own heartbeats and stage counters merged.

    A name both registered (programs.cfg) and beating as a pipeline
    component is one row; its state is up if either heartbeat is current and
    its heartbeat age is the freshest.  Counters show under the program that
    owns the stage (:data:`STAGE_PROGRAMS`).
    """
    rows: dict[str, dict] = {}
    for p in _status_rows(now):
        rows[p["name"]] = {
            "name": p["name"], "state": p["state"], "reported": p["status"], "uptime": p["uptime"], "age": p["age"],
            "host": p["reported_host"] or p["host"], "pid": None, "lag": p["metrics"].get("lag"),
            "description": p["description"], "supervisor": p["supervisor"], "registered": True,
            "log": url_for("ops.log_page", name=p["name"]),
            "details": {_readable(k): _value(v) for k, v in p["metrics"].items() if k != "lag"}, "stages": []}
    procs, stages = _pipeline(now)
    for c in procs:
        row = rows.setdefault(c["name"], {
            "name": c["name"], "state": "unknown", "reported": "", "uptime": None, "age": None, "host": "",
            "pid": None, "lag": None, "description": "", "supervisor": None, "registered": False, "log": None,
            "details": {}, "stages": []})
        if c["state"] == "up" or row["state"] == "unknown":
            row["state"] = c["state"]
        row["reported"] = c["reported"] or row["reported"]
        if c["age"] is not None and (row["age"] is None or c["age"] < row["age"]):
            row["age"] = c["age"]
        row["uptime"] = c["uptime"] if c["uptime"] is not None else row["uptime"]
        row["host"] = c["host"] or row["host"]
        row["pid"] = c["pid"] or None
        row["lag"] = c["lag"] if c["lag"] is not None else row["lag"]
        row["details"].update({_readable(k): _value(v) for k, v in c["other"].items()})
    for st in stages:
        owner = st["stage"] if st["stage"] in rows else STAGE_PROGRAMS.get(st["stage"], st["stage"])
        row = rows.setdefault(owner, {
            "name": owner, "state": "unknown", "reported": "", "uptime": None, "age": None, "host": "", "pid": None,
            "lag": None, "description": "", "supervisor": None, "registered": False, "log": None,
            "details": {}, "stages": []})
        row["stages"].append(_stage_view(st["stage"], st["counters"], row["uptime"]))
    for row in rows.values():
        row["lost"] = sum(s["lost"] for s in row["stages"])
        row["flag"] = any(s["over"] for s in row["stages"])
        row["lag"] = _value(row["lag"]) if row["lag"] is not None else None
    return list(rows.values())


@bp.get("/status")
def status():
    """One table: every program with state, uptime, heartbeat age, host, lag, losses and a link to its log."""
    now = time.time()
    from minard.store.runs import UNACCOUNTED_AFTER, recent_accounting

    return render_template("status.html", rows=status_rows(now), now=now, pools=_pools(now),
                           accounting=recent_accounting(_redis(), now=now), unaccounted_after=UNACCOUNTED_AFTER)


@bp.get("/api/status")
@doc("The Status page's data: registered programs, pipeline processes and the loss counters per stage",
     ok={"type": "object", "properties": {
         "programs": {"type": "array", "items": {"type": "object"}},
         "pipeline": {"type": "array", "items": {"type": "object"}},
         "stages": {"type": "array", "items": {"type": "object"}}, "now": {"type": "number"},
         "pools": {"type": "array", "items": {"type": "object"}}}},
     errors=(503,))
def status_json():
    """The Status page's data: ``rows`` as shown, plus the registry (``programs``) and pipeline sources."""
    now = time.time()
    procs, stages = _pipeline(now)
    return jsonify(rows=status_rows(now), programs=_status_rows(now), pipeline=procs, stages=stages, now=now,
                   pools=_pools(now))


# -- logs ------------------------------------------------------------------------------


def _program_or_4xx(name: object) -> programs.Program:
    """The registered program *name*; 400 for anything path-like, 404 if unknown."""
    if not isinstance(name, str) or not valid_name(name):
        abort(400, "Invalid program name: logs are chosen by registered program name, never by path.")
    program = _registry().get(name)
    if program is None:
        abort(404, f"No program called {name} is registered.")
    return program


@bp.get("/logs")
def logs():
    """The registered programs whose logs can be followed."""
    return render_template("logs.html", programs=list(_registry()))


@bp.get("/logs/<name>")
def log_page(name: str):
    """The end of one program's log, followed live by the page."""
    program = _program_or_4xx(name)
    tail = logtail.initial(programs.view_path(_cfg(), program))
    return render_template("log.html", program=program, tail=tail)


@bp.get("/api/logs/tail")
@doc("New lines of a registered program's log since a cursor (the log page follows it)",
     params=[q("name", "string", "registered program name (never a path)", required=True),
             q("ino", "integer", "inode of the file the cursor is in (0: start)", minimum=0, default=0),
             q("pos", "integer", "byte offset of the cursor", minimum=0, default=0)],
     ok={"type": "object", "properties": {"name": {"type": "string"},
                                          "lines": {"type": "array", "items": {"type": "string"}},
                                          "ino": {"type": "integer"}, "pos": {"type": "integer"}}},
     errors=(400, 404))
def log_tail():
    """New lines of a program's log since a cursor: ?name=NAME&ino=INODE&pos=OFFSET."""
    if "path" in request.args or "file" in request.args:
        abort(400, "Files are chosen by registered program name only; 'path' and 'file' are not accepted.")
    program = _program_or_4xx(request.args.get("name"))
    try:
        ino = int_arg(request.args, "ino", 0, 2**64 - 1, 0)
        pos = int_arg(request.args, "pos", 0, 2**62, 0)
    except ParamError as exc:
        abort(400, str(exc))
    result = logtail.follow(programs.view_path(_cfg(), program), ino, pos)
    return jsonify(name=program.name, **result)


# -- processes --------------------------------------------------------------------------


def _socket_path() -> str:
    """supervisord's control socket (supervisor_socket, default var_dir/supervisor.sock)."""
    return str(programs.ops_path(_cfg(), "supervisor_socket", "supervisor.sock"))


def _process_table() -> tuple[dict | None, str | None]:
    """(table, None) or (None, reason supervisord cannot be asked)."""
    try:
        return supervisor.process_table(_socket_path()), None
    except supervisor.Unavailable as exc:
        return None, str(exc)


def _process_rows(table: dict) -> list[dict]:
    """supervisord's processes for the page: no repeated group, no pid/uptime text, log links not paths."""
    registry = _registry()
    out = []
    for p in table["processes"]:
        name = p["name"] if p["group"] == p["name"] else f"{p['group']}:{p['name']}"
        program = registry.get(p["name"]) or registry.get(p["group"])
        out.append({"name": name, "state": p["state"], "pid": p["pid"] or None, "uptime": p["uptime"],
                    "problem": p.get("spawnerr") or ("exit status " + str(p["exitstatus"])
                                                     if p.get("exitstatus") and p["state"] in ("EXITED", "FATAL") else ""),
                    "log": url_for("ops.log_page", name=program.name) if program else None})
    return out


@bp.get("/processes")
def processes():
    """supervisord's process table, read-only."""
    table, error = _process_table()
    rows = _process_rows(table) if table else []
    return render_template("processes.html", table=table, rows=rows, error=error)


@bp.get("/api/processes")
@doc("supervisord's process table (read-only)",
     ok={"type": "object", "properties": {"running": {"type": "boolean"},
                                          "processes": {"type": "array", "items": {"type": "object"}}}},
     responses={"503": {"description": "supervisord is not running",
                        "content": {"application/json": {"schema": {"type": "object", "properties": {
                            "running": {"type": "boolean"}, "error": {"type": "string"}}}}}}})
def processes_json():
    """supervisord's process table as JSON (503 when supervisord is not running)."""
    table, error = _process_table()
    if table is None:
        return jsonify(error=error, running=False), 503
    return jsonify(running=True, state=table["state"], processes=_process_rows(table))
