"""The log server (port 8081): heartbeats and log records from every DAQ program.

``gunicorn -b 127.0.0.1:8081 -k gevent snoplus_log:app`` serves :func:`create_app`.

- ``POST /heartbeat``  name, status [, host, metrics]: the program is alive.
- ``POST /log``        name, level, message [, notify]: appended to the
  program's rotating log file; level >= 40 or notify raises an alarm.
- ``GET /programs``    every registered program with its state (no login).
- ``GET /healthz``     200 if Redis answers, else 503.
- ``GET /openapi.json`` this API as OpenAPI 3 (generated from the views' ``@doc``).

Both POSTs need the program's token: ``Authorization: Bearer TOKEN`` with
``name`` in the body, or HTTP basic auth with the program name as user.
Bodies are JSON or form-encoded.  Every error is JSON ``{"error": "..."}``
with a 4xx status and never repeats a secret.  See docs/operations.md.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import time
from pathlib import Path

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from minard import apidoc, config, metrics
from minard import log as minard_log
from minard.apidoc import doc
from minard.ops import programs
from minard.ops.keys import KeyStore, valid_name
from minard.ops.safefile import UnsafeFile, open_in
from minard.store import alarms, connection

log = logging.getLogger("minard.ops.logserver")

MAX_STATUS = 64
MAX_HOST = 255
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class ApiError(Exception):
    """A client error answered as JSON with *status*."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# -- log files -----------------------------------------------------------------


def format_line(level: int, message: str, now: float, host: str = "") -> str:
    """One log file entry: local time, level name, [host,] message.

    Control characters are dropped and continuation lines are indented, so a
    message cannot forge a line that looks like another entry.
    """
    text = _CONTROL.sub("", message.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.replace("\n", "\n    ")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
    where = f" [{host}]" if host else ""
    return f"{stamp} {alarms.level_name(level).upper():<7}{where} {text}\n"


def _rotate(path: Path, backups: int) -> None:
    """Shift ``path.1 .. path.N-1`` up by one and move *path* to ``path.1``."""
    if backups <= 0:
        path.unlink(missing_ok=True)
        return
    for i in range(backups - 1, 0, -1):
        src = path.with_name(f"{path.name}.{i}")
        if src.exists():
            os.replace(src, path.with_name(f"{path.name}.{i + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


def append_line(path: Path, line: str, max_bytes: int, backups: int) -> None:
    """Append *line* to *path*, rotating first if it would exceed *max_bytes*.

    An flock on a side file serialises writers, so several gunicorn workers
    can share one log file and rotate it safely.  Neither the lock nor the log
    is ever opened through a symlink (:func:`minard.ops.safefile.open_in`
    raises :class:`UnsafeFile`); new files get mode 0640.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    data = line.encode("utf-8")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    lock = open_in(path.with_name(f".{path.name}.lock"), path.parent, flags)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fd = open_in(path, path.parent, flags)
        try:
            size = os.fstat(fd).st_size
            if max_bytes > 0 and size > 0 and size + len(data) > max_bytes:
                os.close(fd)
                fd = -1
                _rotate(path, backups)
                fd = open_in(path, path.parent, flags)
            os.write(fd, data)
        finally:
            if fd >= 0:
                os.close(fd)
    finally:
        os.close(lock)


# -- requests -------------------------------------------------------------------


def _body() -> dict:
    """The request's fields from JSON or a form; 400 if neither parses to an object."""
    if request.is_json:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data
    return request.form.to_dict()


def _credentials(body: dict) -> tuple[str, str]:
    """(program name, token) from Basic or Bearer auth; 401 if absent."""
    auth = request.authorization
    if auth is None:
        raise ApiError(401, "credentials required: send 'Authorization: Bearer TOKEN' "
                            "or HTTP basic auth with the program name and its token")
    if auth.type == "basic":
        name, token = auth.username or "", auth.password or ""
        if body.get("name") not in (None, "", name):
            raise ApiError(400, "field 'name' does not match the user of the basic credentials")
        return name, token
    if auth.type == "bearer":
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "missing field 'name'")
        return name, auth.token or ""
    raise ApiError(401, "unsupported authorization scheme: use Bearer or Basic")


def _authenticate(app: Flask, body: dict):
    """The registered program the request's valid credentials belong to (or 401/404)."""
    name, token = _credentials(body)
    shown = name if valid_name(name) else "(invalid name)"
    if not app.extensions["minard_keys"].verify(name, token, kind="program"):
        log.warning("rejected credentials for program %s from %s", shown, request.remote_addr)
        raise ApiError(401, f"invalid, unknown or revoked token for program {shown}")
    program = app.extensions["minard_registry"].get(name)
    if program is None:
        raise ApiError(404, f"program {shown} is not registered in programs.cfg")
    return program


def _text_field(body: dict, name: str, limit: int, required: bool = True) -> str:
    """A string field of at most *limit* characters (413 if longer)."""
    value = body.get(name)
    if value is None or value == "":
        if required:
            raise ApiError(400, f"missing field '{name}'")
        return ""
    if not isinstance(value, str):
        raise ApiError(400, f"field '{name}' must be a string")
    if len(value) > limit:
        raise ApiError(413, f"field '{name}' is {len(value)} characters; the limit is {limit}")
    return value


def _flag(value: object) -> bool:
    """A boolean from JSON or a form value ('1', 'true', 'yes', 'on')."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    return str(value).strip().lower() in ("1", "true", "yes", "on")


# -- the app --------------------------------------------------------------------


def create_app(cfg: dict | None = None) -> Flask:
    """Build the log server app from *cfg* (default: ``minard.config.load()``).

    Nothing connects at creation: Redis is contacted on the first request and
    the log directory is created on the first record.
    """
    cfg = config.load() if cfg is None else cfg
    minard_log.setup(cfg["log_level"])
    app = Flask("minard.ops.logserver")
    app.config["MAX_CONTENT_LENGTH"] = int(cfg["log_max_message"]) * 4 + 16384
    app.config["MINARD"] = cfg
    app.extensions["minard_redis"] = connection.redis(cfg, "logserver")
    app.extensions["minard_keys"] = KeyStore.from_config(cfg)
    app.extensions["minard_registry"] = programs.Registry.from_config(cfg)
    app.extensions["minard_last_check"] = 0.0
    _routes(app, cfg)
    _errors(app)
    metrics.instrument(app, "snoplus_log", request)  # requests per route, served by gunicorn's master
    return app


def _maybe_check(app: Flask, now: float) -> None:
    """Evaluate heartbeat expiry at most once a second per process."""
    if now - app.extensions["minard_last_check"] >= 1.0:
        app.extensions["minard_last_check"] = now
        programs.check_heartbeats(app.extensions["minard_redis"], app.extensions["minard_registry"],
                                  now, float(app.config["MINARD"]["alarm_history_days"]))


def _routes(app: Flask, cfg) -> None:
    """Attach the endpoints."""
    history = float(cfg["alarm_history_days"])
    r = app.extensions["minard_redis"]

    @app.post("/heartbeat")
    @doc("A program says it is alive (optionally with numeric metrics)",
         description="name and token in the body, `Authorization: Bearer TOKEN` with name in the body, or HTTP Basic with the program name as user",
         body={"type": "object", "required": ["name", "status"], "properties": {
             "name": {"type": "string"}, "token": {"type": "string"}, "status": {"type": "string"},
             "host": {"type": "string"},
             "metrics": {"type": "object", "additionalProperties": {"type": "number"},
                         "description": "at most 32 name -> number"}}},
         ok={"type": "object", "properties": {"ok": {"type": "boolean"}, "name": {"type": "string"},
                                              "state": {"type": "string"}, "was": {"type": "string"},
                                              "timeout": {"type": "number"}}},
         errors=(400, 401, 413, 503))
    def heartbeat():
        """A program says it is alive (and optionally reports metrics)."""
        body = _body()
        program = _authenticate(app, body)
        status = _text_field(body, "status", MAX_STATUS)
        host = _text_field(body, "host", MAX_HOST, required=False) or (request.remote_addr or "")
        try:
            metrics = programs.validate_metrics(body.get("metrics"))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        now = time.time()
        _maybe_check(app, now)
        was = programs.record_heartbeat(r, program, status, host, metrics, now, history)
        if was != programs.UP:
            log.info("heartbeat: %s is up (was %s)", program.name, was)
        return jsonify(ok=True, name=program.name, state=programs.UP, was=was, timeout=program.timeout)

    @app.post("/log")
    @doc("Append a record to the program's log file; level >= 40 or notify raises an alarm",
         description="name and token in the body, `Authorization: Bearer TOKEN` with name in the body, or HTTP Basic with the program name as user",
         body={"type": "object", "required": ["name", "level", "message"], "properties": {
             "name": {"type": "string"}, "token": {"type": "string"},
             "level": {"description": "10-50 or DEBUG, INFO, WARNING, ERROR, CRITICAL",
                       "oneOf": [{"type": "integer"}, {"type": "string"}]},
             "message": {"type": "string"}, "notify": {"type": "boolean"}}},
         ok={"type": "object", "properties": {"ok": {"type": "boolean"}, "name": {"type": "string"},
                                              "level": {"type": "integer"},
                                              "alarm": {"type": "integer", "nullable": True}}},
         errors=(400, 401, 413, 503))
    def post_log():
        """Append a record to the program's log file; alarm on level >= 40 or notify."""
        body = _body()
        program = _authenticate(app, body)
        limit = int(cfg["log_max_message"])
        message = _text_field(body, "message", limit)
        if "level" not in body or body["level"] in ("", None):
            raise ApiError(400, "missing field 'level'")
        try:
            level = alarms.parse_level(body["level"])
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        notify = _flag(body.get("notify", False))
        now = time.time()
        path = programs.log_path(cfg, program)
        try:
            append_line(path, format_line(level, message, now), int(cfg["log_max_bytes"]), int(cfg["log_backups"]))
        except UnsafeFile:
            log.error("refusing to append to %s: a symlink or not a regular file was planted there", path)
            raise ApiError(409, f"the log file of {program.name} is not a regular file in the log "
                                "directory; nothing was written (the administrator is told)") from None
        alarm_id = None
        if level >= alarms.DANGER or notify:
            alarm_id = alarms.raise_alarm(r, level, message, source="log", program=program.name,
                                          now=now, history_days=history, name="log")
        return jsonify(ok=True, name=program.name, level=level, alarm=alarm_id)

    @app.get("/programs")
    @doc("Every registered program with heartbeat state, uptime and metrics (no token needed)",
         ok={"type": "object", "properties": {"programs": {"type": "array", "items": {"type": "object"}},
                                              "time": {"type": "number"}}},
         errors=(503,))
    def list_programs():
        """Every registered program with heartbeat state, uptime and metrics."""
        now = time.time()
        _maybe_check(app, now)
        return jsonify(programs=programs.statuses(r, app.extensions["minard_registry"], now), time=now)

    @app.get("/healthz")
    @doc("Liveness: 200 {ok: true} if Redis answers, else 503",
         ok={"type": "object", "properties": {"ok": {"type": "boolean"}}}, errors=(503,))
    def healthz():
        """Liveness for supervisord and nginx: Redis must answer."""
        try:
            r.ping()
        except Exception as exc:  # noqa: BLE001 - any Redis failure means "not healthy"
            return jsonify(ok=False, error=f"redis: {type(exc).__name__}"), 503
        return jsonify(ok=True)

    @app.get("/")
    @doc("What this server offers", ok={"type": "object", "properties": {
        "service": {"type": "string"}, "endpoints": {"type": "array", "items": {"type": "string"}}}})
    def index():
        """What this server offers."""
        return jsonify(service="minard log server", endpoints=[
            "POST /heartbeat", "POST /log", "GET /programs", "GET /healthz", "GET /openapi.json"])

    @app.get("/openapi.json")
    @doc("This server's OpenAPI 3 document (docs/openapi-logserver.json)", ok={"type": "object"})
    def openapi():
        """The OpenAPI document generated from these views."""
        return jsonify(openapi_document(app))


#: The log server's OpenAPI title and description (minard.apidoc builds the rest from the views).
OPENAPI_TITLE = "minard log server API"
OPENAPI_DESCRIPTION = (
    "JSON API of the log server (`gunicorn snoplus_log:app`, docs/operations.md): programs post heartbeats "
    "and log records with their token; reads need none. Bodies are JSON or form-encoded. Every error is "
    'JSON {"error": "..."} and never repeats a secret.')


def openapi_document(app: Flask) -> dict:
    """The log server's OpenAPI document, built once per app from the views' ``@doc``."""
    if "minard_openapi" not in app.extensions:
        app.extensions["minard_openapi"] = apidoc.build(app, OPENAPI_TITLE, OPENAPI_DESCRIPTION)
    return app.extensions["minard_openapi"]


def _errors(app: Flask) -> None:
    """Answer every error as JSON with a clear message and no stack trace."""

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        resp = jsonify(error=exc.message)
        resp.status_code = exc.status
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="minard", Basic realm="minard"'
        return resp

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        messages = {413: "request body too large", 405: "method not allowed", 404: "no such endpoint"}
        resp = jsonify(error=messages.get(exc.code, exc.name))
        resp.status_code = exc.code or 500
        return resp

    @app.errorhandler(Exception)
    def server_error(exc: Exception):
        log.exception("internal error on %s %s", request.method, request.path)
        return jsonify(error="internal server error (see the log server's log)"), 500
