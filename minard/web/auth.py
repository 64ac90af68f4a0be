"""Shift-crew login, logout and CSRF protection for the website.

Logins are the ``user`` entries of the key store (``minard keys add NAME
--user``).  A login lasts ``web_session_hours`` in a signed HttpOnly cookie
and ends at once when the user's credentials are revoked.  Every POST must
carry the session's CSRF token (form field ``csrf_token`` or header
``X-CSRF-Token``); read-only pages need no login.
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

log = logging.getLogger("minard.web.auth")
bp = Blueprint("auth", __name__)


def csrf_token() -> str:
    """This session's CSRF token (created on first use)."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def current_user() -> str | None:
    """The logged-in user, if their login is still active in the key store."""
    if "user" not in g:
        name = session.get("user")
        keys = current_app.extensions["minard_keys"]
        entry = keys.entries().get(name) if name else None
        g.user = name if entry and entry.get("kind") == "user" and not entry.get("revoked") else None
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
            return redirect(url_for("auth.login", next=back))
        return view(*args, **kwargs)

    return wrapper


def _safe_next(target: str | None) -> str:
    """Only redirect to a path of this site (no //host or scheme)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for(current_app.config["HOME_ENDPOINT"])


@bp.route("/login", methods=["GET", "POST"])
def login():
    """Log a shift-crew member in with name and password."""
    if request.method == "GET":
        return render_template("login.html", next=request.args.get("next", ""))
    name = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    keys = current_app.extensions["minard_keys"]
    if not keys.verify(name, password, kind="user"):
        log.warning("failed login for %r from %s", name[:64], request.remote_addr)
        return render_template("login.html", next=request.form.get("next", ""),
                               error="Wrong user name or password."), 401
    session.clear()
    session.permanent = True
    session["user"] = name
    session["csrf"] = secrets.token_urlsafe(32)
    log.info("login: %s from %s", name, request.remote_addr)
    flash(f"Logged in as {name}.", "success")
    return redirect(_safe_next(request.form.get("next")))


@bp.post("/logout")
def logout():
    """End the session."""
    user = session.get("user")
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


def init_app(app) -> None:
    """Register login/logout, the CSRF check and the template helpers."""
    app.register_blueprint(bp)
    app.before_request(_check_csrf)

    @app.context_processor
    def helpers():
        return {"csrf_token": csrf_token, "current_user": current_user,
                "nav": app.config.get("MINARD_NAV", [])}
