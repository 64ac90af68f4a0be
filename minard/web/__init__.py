"""The monitoring website (port 8080): app factory, layout, navigation, security.

``gunicorn -b 127.0.0.1:8080 -k gevent minard:app`` serves :func:`create_app`.  Pages are
Flask blueprints; each adds itself to the navigation bar with
:func:`register_nav`, so later pages (stream, detector, runs) join the same
layout.  Every template extends ``base.html``.

Security defaults for every page: Jinja autoescaping, a Content-Security-Policy
allowing only the site's own scripts and styles (no inline code, no CDN), a
CSRF token checked on every POST, an HttpOnly SameSite session cookie signed
with a key generated at first start into a 0600 file that holds only the id of
a server-side session (:mod:`minard.web.auth`).  Behind nginx
(``web_proxy_hops``), the client's address and scheme come from nginx's
``X-Forwarded-For``/``-Proto``.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from datetime import timedelta
from pathlib import Path

import redis as redis_py
from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from minard import config, metrics
from minard import log as minard_log
from minard.config import ROOT
from minard.ops.programs import ops_path
from minard.store import connection

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'")


def secret_key(path: Path) -> bytes:
    """The site's session key: read from *path*, or generated there (mode 0600) once.

    Several gunicorn workers may start together: the key is written to a temp
    file and hard-linked into place, so exactly one key wins and all use it.
    """
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".secret-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    """The key in *path*; an empty or short file is an error, not a weak key."""
    key = path.read_text().strip()
    if len(key) < 32:
        raise RuntimeError(f"secret key file {path} is too short; delete it to generate a new one")
    return key.encode()


def register_nav(app: Flask, endpoint: str, label: str, order: int = 100) -> None:
    """Add a link to the navigation bar (sorted by *order*, then label)."""
    nav = app.config.setdefault("MINARD_NAV", [])
    nav.append({"endpoint": endpoint, "label": label, "order": order})
    nav.sort(key=lambda n: (n["order"], n["label"]))


def create_app(cfg: dict | None = None) -> Flask:
    """Build the website from *cfg* (default: ``minard.config.load()``).

    Nothing connects at creation; Redis is contacted by the first request.
    """
    from minard.ops.keys import KeyStore
    from minard.ops.programs import Registry
    from minard.web import auth, ops

    cfg = config.load() if cfg is None else cfg
    minard_log.setup(cfg["log_level"])
    app = Flask("minard.web", static_folder=str(ROOT / "static"), static_url_path="/static",
                template_folder=str(Path(__file__).parent / "templates"))
    app.config.update(
        MINARD=cfg,
        SECRET_KEY=secret_key(ops_path(cfg, "web_secret_key_file", "web_secret_key")),
        SESSION_COOKIE_NAME="minard_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=bool(cfg["web_secure_cookies"]),
        PERMANENT_SESSION_LIFETIME=timedelta(hours=float(cfg["web_session_hours"])),
        MAX_CONTENT_LENGTH=64 * 1024,
        HOME_ENDPOINT="ops.status",
    )
    app.extensions["minard_redis"] = connection.redis(cfg, "dashboard")
    from minard.web.data import Cache, Source

    # The web's caches live on the app (no module state): settled Redis data
    # shared by every request of this worker, and rendered answers of heavy
    # endpoints reused for RESPONSE_TTL seconds.  With web_redis_replica (and
    # Sentinels) the dashboards' data is read from a replica.
    reads = (connection.redis(cfg, "dashboard", replica=True) if cfg["web_redis_replica"]
             else app.extensions["minard_redis"])
    # 2048 entries: a day of settled Stream-page blocks (about 1100, 25 MB) plus baselines and heads.
    app.extensions["minard_source"] = Source(reads, Cache(2048))
    app.extensions["minard_responses"] = Cache(256)
    app.extensions["minard_encoded"] = {}  # packed encodings of shared read-only arrays (api._encoded)
    app.extensions["minard_keys"] = KeyStore.from_config(cfg)
    app.extensions["minard_registry"] = Registry.from_config(cfg)
    _behind_proxy(app, int(cfg["web_proxy_hops"]))
    auth.init_app(app)
    app.register_blueprint(ops.bp)
    register_nav(app, "ops.alarms_page", "Alarms", 80)
    register_nav(app, "ops.status", "Status", 81)
    register_nav(app, "ops.logs", "Logs", 82)
    register_nav(app, "ops.processes", "Processes", 83)
    from minard.web import api, dashboard

    app.register_blueprint(api.bp)
    dashboard.register(app)  # Stream, Detector, Nhit, Runs; Stream becomes the home page
    from minard.web import alarmpages

    alarmpages.register(app)  # alarm detail, KPIs, flags, Bursts, Shift, Roster
    from minard.web import dq

    dq.register(app)  # data quality: report cards, run registry, channel status
    _site(app)
    _warm_under_gunicorn(app)
    metrics.instrument(app, "web", request)  # requests per route, served by gunicorn's master
    return app


def _warm_under_gunicorn(app: Flask) -> None:
    """Under gunicorn, the worker's first request starts its warmer of the shared cache
    (:mod:`minard.web.warm`); never in tests' apps, which are not served by gunicorn."""
    if float(app.config["MINARD"]["web_warm_hours"]) <= 0:
        return
    from minard.web import warm

    @app.before_request
    def start_warmer():
        if "minard_warmer" not in app.extensions and "gunicorn.socket" in request.environ:
            warm.start(app)


def _behind_proxy(app: Flask, hops: int) -> None:
    """Trust *hops* proxies' X-Forwarded-For/-Proto (nginx on loopback): the client's
    address for the login limits and HTTPS for Secure cookies."""
    if hops > 0:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)


def _site(app: Flask) -> None:
    """Home page, security headers and error pages shared by all blueprints."""
    from flask import redirect, url_for

    @app.get("/")
    def home():
        """The first page of the site (later issues point HOME_ENDPOINT elsewhere)."""
        return redirect(url_for(app.config["HOME_ENDPOINT"]))

    @app.after_request
    def headers(resp):
        """Security headers on every response."""
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        return resp

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        """JSON errors under /api/, an HTML page elsewhere; never a stack trace."""
        message = exc.description or exc.name
        if request.path.startswith("/api/"):
            return jsonify(error=message), exc.code
        return render_template("error.html", code=exc.code, title=exc.name, message=message), exc.code

    @app.errorhandler(redis_py.RedisError)
    def redis_unavailable(exc: Exception):
        """503 while Redis cannot answer (e.g. during a Sentinel failover): the page says so."""
        app.logger.warning("Redis unavailable on %s %s: %s", request.method, request.path, type(exc).__name__)
        message = "The database is not reachable right now (it may be switching over); try again in a few seconds."
        if request.path.startswith("/api/"):
            resp = jsonify(error=message)
        else:
            resp = render_template("error.html", code=503, title="Service unavailable", message=message)
        return resp, 503, {"Retry-After": "5"}

    @app.errorhandler(Exception)
    def server_error(exc: Exception):
        app.logger.exception("internal error on %s %s", request.method, request.path)
        if request.path.startswith("/api/"):
            return jsonify(error="internal server error"), 500
        return render_template("error.html", code=500, title="Internal server error",
                               message="Something went wrong; the error is in the website's log."), 500
