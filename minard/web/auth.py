"""Shift-crew login, logout, sessions, login rate limits and CSRF protection.

Logins are the ``user`` entries of the key store (``minard keys add NAME
--user``).  A login is a server-side session in Redis
(:mod:`minard.store.sessions`); the signed HttpOnly cookie carries only its
random id and the CSRF token.  A session ends at logout (every copy of the
cookie dies with it), after ``web_session_idle_minutes`` without a request,
``web_session_hours`` after the login, and as soon as the user's credentials
are revoked or re-created (the session remembers which credentials it was
opened with).  The cookie is ``Secure`` whenever the site is reached over
HTTPS (nginx says so in ``X-Forwarded-Proto``) or ``web_secure_cookies`` is on.

``POST /login`` is rate limited per client address and per user name
(``web_login_limit_address``, ``web_login_limit_user``; Flask-Limiter with its
counters in Redis): only failed attempts count, and over the limit the answer
is 429 with ``Retry-After``.  An unknown user name costs the same scrypt
derivation as a wrong password (:meth:`KeyStore.verify`), so the answer time
does not tell which names exist.  Failed and limited logins are logged and
counted in ``minard:web:counters``.

Every POST must carry the session's CSRF token (form field ``csrf_token`` or
header ``X-CSRF-Token``); read-only pages need no login.
"""

from __future__ import annotations

import functools
import hmac
import logging
import secrets

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from redis.exceptions import RedisError

from minard.apidoc import doc
from minard.store import sessions
from minard.web.params import local_path

log = logging.getLogger("minard.web.auth")
bp = Blueprint("auth", __name__)


def _cfg():
    return current_app.config["MINARD"]


def _redis():
    return current_app.extensions["minard_redis"]


def _lifetimes() -> tuple[float, float]:
    """(absolute, idle) session lifetimes in seconds, from the configuration."""
    cfg = _cfg()
    return float(cfg["web_session_hours"]) * 3600, float(cfg["web_session_idle_minutes"]) * 60


def csrf_token() -> str:
    """This session's CSRF token (created on first use)."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def _generation(entry: dict | None) -> str | None:
    """The identity of one issue of a user's credentials (its creation time), or None."""
    if not entry or entry.get("kind") != "user" or entry.get("revoked"):
        return None
    return repr(entry.get("created"))


def current_user() -> str | None:
    """The logged-in user: a live server-side session of still-valid credentials, or None.

    Redis being unreachable logs the visitor out (fails closed) instead of
    failing the page.
    """
    if "user" not in g:
        g.user = None
        sid = session.get("sid")
        if sid:
            absolute, idle = _lifetimes()
            try:
                record = sessions.lookup(_redis(), sid, absolute, idle)
            except RedisError as exc:
                log.warning("session store unavailable (%s): treating the request as anonymous",
                            type(exc).__name__)
                record = None
            if record:
                entry = current_app.extensions["minard_keys"].entries().get(record.get("user", ""))
                gen = _generation(entry)
                if gen is not None and hmac.compare_digest(gen, record.get("generation", "")):
                    g.user = record["user"]
    return g.user


def login_required(view):
    """Refuse *view* to anonymous visitors: 401 for the API, the login page otherwise."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if current_user() is None:
            if request.path.startswith("/api/"):
                abort(401, "login required")
            flash("Please log in to do that.", "warning")
            back = request.full_path if request.method == "GET" else None
            return redirect(url_for("auth.login", next=local_path(back)))
        return view(*args, **kwargs)

    return wrapper


def _safe_next(target: str | None) -> str:
    """Only redirect to a path of this site (see :func:`minard.web.params.local_path`)."""
    return local_path(target) or url_for(current_app.config["HOME_ENDPOINT"])


def _count(reason: str) -> None:
    """Count a security event; a Redis failure must not turn it into a 500."""
    try:
        sessions.count(_redis(), reason)
    except RedisError:
        log.warning("could not count %s: Redis unavailable", reason)


@bp.route("/login", methods=["GET", "POST"])
@doc("Log a shift-crew member in (the login form); sets the session cookie", methods=["POST"], status=303,
     ok_description="logged in: redirect to next (a same-site path) or the home page",
     body=("application/x-www-form-urlencoded", {"type": "object", "required": ["username", "password", "csrf_token"],
                                                  "properties": {"username": {"type": "string"},
                                                                 "password": {"type": "string", "format": "password"},
                                                                 "csrf_token": {"type": "string"},
                                                                 "next": {"type": "string"}}}),
     errors=(403, 429, 503), responses={"401": {"description": "wrong user name or password (the form again)",
                                               "content": {"text/html": {}}}})
def login():
    """Log a shift-crew member in with name and password."""
    if request.method == "GET":
        return render_template("login.html", next=local_path(request.args.get("next")) or "")
    name = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    keys = current_app.extensions["minard_keys"]
    if not keys.verify(name, password, kind="user"):
        log.warning("failed login for %r from %s", name[:64], request.remote_addr)
        _count("login_failed")
        return render_template("login.html", next=local_path(request.form.get("next")) or "",
                               error="Wrong user name or password."), 401
    gen = _generation(keys.entries().get(name))
    idle = _lifetimes()[1]
    old = session.get("sid")
    try:
        if old:
            sessions.end(_redis(), old)
        sid = sessions.create(_redis(), name, gen or "", idle)
    except RedisError:
        log.error("login of %s failed: the session store (Redis) is unavailable", name)
        abort(503, "The session store is unavailable; try again in a moment.")
    session.clear()
    session.permanent = True
    session["sid"] = sid
    session["csrf"] = secrets.token_urlsafe(32)
    log.info("login: %s from %s", name, request.remote_addr)
    flash(f"Logged in as {name}.", "success")
    return redirect(_safe_next(request.form.get("next")))


@bp.post("/logout")
@doc("End the session (the server forgets it: no copy of the cookie works again)", status=303,
     ok_description="logged out: redirect to the home page",
     body=("application/x-www-form-urlencoded", {"type": "object", "required": ["csrf_token"],
                                                  "properties": {"csrf_token": {"type": "string"}}}),
     errors=(403,))
def logout():
    """End the session: the server forgets it, so no copy of the cookie works again."""
    user = current_user()
    sid = session.get("sid")
    try:
        sessions.end(_redis(), sid)
    except RedisError:
        log.warning("logout: the session store is unavailable; the session ends by expiry")
    session.clear()
    if user:
        log.info("logout: %s", user)
    flash("Logged out.", "info")
    return redirect(url_for(current_app.config["HOME_ENDPOINT"]))


def _check_csrf() -> None:
    """Abort with 400 unless an unsafe request carries this session's CSRF token."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    sent = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token") or ""
    expected = session.get("csrf") or ""
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        abort(400, "The form has expired or did not come from this site (CSRF token missing or wrong). "
                   "Reload the page and try again.")


class SessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie, marked ``Secure`` also whenever this request came over HTTPS.

    The signing serializer is built once per key, not per request as Flask's
    is (a sixth of a millisecond of every request, bench/web.py).
    """

    def __init__(self):
        self._serializers: dict = {}

    def get_cookie_secure(self, app) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"]) or request.is_secure

    def get_signing_serializer(self, app):
        """Flask's serializer for the app's current keys, made once per set of keys."""
        key = (id(app), app.secret_key, tuple(app.config.get("SECRET_KEY_FALLBACKS") or ()))
        serializer = self._serializers.get(key)
        if serializer is None:
            serializer = self._serializers[key] = super().get_signing_serializer(app)
        return serializer


def _login_user_key() -> str:
    """Rate-limit key of the user name a login attempt is for (known or not)."""
    return "user:" + request.form.get("username", "").strip().lower()[:64]


def _login_address_key() -> str:
    """Rate-limit key of the client address (nginx's, through ProxyFix)."""
    return "addr:" + (request.remote_addr or "unknown")


def _failed(response) -> bool:
    """Only failed logins count against the limits."""
    return response.status_code == 401


def _limit_login(app) -> None:
    """Rate-limit POST /login per address and per user (counters in Redis, shared by all workers)."""
    from flask_limiter import Limiter

    cfg = app.config["MINARD"]
    pool = app.extensions["minard_redis"].connection_pool
    limiter = Limiter(
        _login_address_key, app=app, storage_uri="redis://", headers_enabled=True,
        storage_options={"connection_pool": pool, "key_prefix": sessions.LIMITS_PREFIX},
        strategy="moving-window", swallow_errors=True, key_prefix="login",
    )

    def breached(limit) -> None:
        """Log and count every refused attempt."""
        log.warning("login rate limit %s reached (%s) from %s", limit.limit, limit.key.rsplit("/", 1)[-1][:80],
                    request.remote_addr)
        _count("login_limited")

    view = app.view_functions["auth.login"]
    view = limiter.limit(str(cfg["web_login_limit_user"]), key_func=_login_user_key, methods=["POST"],
                         deduct_when=_failed, on_breach=breached)(view)
    view = limiter.limit(str(cfg["web_login_limit_address"]), key_func=_login_address_key, methods=["POST"],
                         deduct_when=_failed, on_breach=breached)(view)
    app.view_functions["auth.login"] = view
    app.extensions["minard_limiter"] = limiter
    _hooks_for_login_only(app, limiter)


def _hooks_for_login_only(app, limiter) -> None:
    """Run Flask-Limiter's request hooks for the login view only.

    The limiter hooks every request of the app (before, after and teardown);
    only ``auth.login`` has limits, and the hooks cost about 0.3 ms of every
    data request (bench/web.py).  Each hook of *limiter* is wrapped so that it
    returns at once for any other endpoint; the login view still runs all.
    """
    def ours(f) -> bool:
        return getattr(f, "__self__", None) is limiter or (isinstance(f, functools.partial) and limiter in f.args)

    def login() -> bool:
        return request.endpoint == "auth.login"

    def before(f):
        return functools.wraps(f)(lambda: f() if login() else None)

    def after(f):
        return functools.wraps(f)(lambda response: f(response) if login() else response)

    def teardown(f):
        return functools.wraps(f)(lambda exc=None: f(exc) if login() else None)

    for hooks, guard in ((app.before_request_funcs, before), (app.after_request_funcs, after),
                         (app.teardown_request_funcs, teardown)):
        funcs = hooks.get(None, [])
        funcs[:] = [guard(f) if ours(f) else f for f in funcs]


def init_app(app) -> None:
    """Register login/logout, sessions, login limits, the CSRF check and the template helpers."""
    app.register_blueprint(bp)
    app.session_interface = SessionInterface()
    app.before_request(_check_csrf)
    _limit_login(app)

    @app.context_processor
    def helpers():
        return {"csrf_token": csrf_token, "current_user": current_user,
                "nav": app.config.get("MINARD_NAV", [])}
