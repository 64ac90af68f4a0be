"""No 500 from any request: hypothesis over every route of both web apps (issue 14).

The routes are read from ``app.url_map`` of the dashboard (``minard:app``) and
of the log server (``snoplus_log:app``), so a route added later is fuzzed too.
The parameter names are read from the apps' source (every ``args``/``form``/
``body`` lookup), so new parameters are too.  Each route and method gets
generated path segments, query strings and form or JSON bodies: Unicode
digits, control characters, NaN/inf, huge and negative numbers, very long
strings, missing and repeated parameters; the requests go to the real apps
with a real Redis, logged in (with the CSRF token) or with a valid program
token, so that the checks behind the login are reached too.  Every answer
must be 2xx/3xx/4xx, and a JSON body wherever the route is an API.
"""

from __future__ import annotations

import inspect
import re
import tempfile
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict

from minard import config
from minard.ops import logserver
from minard.ops.keys import KeyStore
from minard.store import alarms
from minard.testing import supervisor as supervisor_harness
from minard.web import create_app

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent.parent
#: Sources whose request lookups name the parameters to fuzz.
SOURCES = [*sorted((ROOT / "minard" / "web").glob("*.py")), ROOT / "minard" / "ops" / "logserver.py"]
_LOOKUP = re.compile(r"""(?:args|form|body|_only|int_arg|_text_field|in request\.\w+)[^"'\n]{0,40}["']([A-Za-z_][A-Za-z0-9_]{0,30})["']""")
_ONLY = re.compile(r"_only\(([^)]*)\)")


def parameter_names() -> list[str]:
    """Every parameter name the apps look up (from their source) plus a few strangers."""
    names = {"start", "stop", "window", "step", "format", "download", "limit", "name", "next", "minutes",
             "comment", "csrf_token", "username", "password", "level", "message", "status", "metrics",
             "notify", "host", "path", "file", "ino", "pos", "unknown_param"}
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        names.update(_LOOKUP.findall(text))
        for group in _ONLY.findall(text):
            names.update(re.findall(r'"([A-Za-z_][A-Za-z0-9_]*)"', group))
    return sorted(names)


NAMES = parameter_names()
#: Values that broke or could break parsers: Unicode digits, controls, NaN/inf, extremes, paths.
NASTY = ["\u00b2", "\u0663", "\uff11\uff12", "\u00b9\u00b2\u00b3", "1\u00b2", "NaN", "nan", "inf", "-inf",
         "Infinity", "1e309", "-1e309", "1e-400", "-1", "0", "-0", "+5", "9" * 40, "-" + "9" * 40,
         "18446744073709551616", "0x10", "1_000", " 5", "5 ", "\x00", "\n", "\r\n", "\t", "%", "%00",
         "../../etc/passwd", "/etc/passwd", "//evil.example", "/\t/evil.example", "\\\\evil",
         "javascript:alert(1)", "<script>alert(1)</script>", "'\"", "a" * 5000, "", " ", "\ud7ff",
         "10m", "1y", "999999y", "2024-02-30T25:61:61", "2024-05-01T12:00:00Z", "-600", "600", "60",
         "TOTAL", "occupancy", "cmos", "csv", "json", "daq", "1", "15", "1000", "2147483648", ",", ",,,",
         "ts:*", "*", "\u202e", "\ufeff1", "１"]

#: Digits of other scripts and superscripts: Python's int() and str.isdigit() accept some of them.
#: str.isdigit() is true for all of these; int() takes the Nd ones ("٣", "１") and fails on the rest.
TRICKY_DIGITS = "\u00b9\u00b2\u00b3\u2070\u2074\u2079\u2080\u2082\u2460\u2469\u0663\uff11\u09670123456789"
unicode_digits = st.one_of(st.text(alphabet=st.sampled_from(TRICKY_DIGITS), min_size=1, max_size=4),
                           st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=4))
#: Values that pass the first checks (a registered program, a small count), so that later ones are reached.
GOOD = ["daq", "1", "15", "60", "10m", "json", "TOTAL", "occupancy"]
values = st.one_of(st.sampled_from(GOOD), st.sampled_from(NASTY), unicode_digits, unicode_digits, st.text(max_size=40),
                   st.integers(min_value=-(2**70), max_value=2**70).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))


def params(names: list[str]):
    """Query or form fields: mostly the route's own parameter names, sometimes any, repeats allowed."""
    own = st.lists(st.tuples(st.sampled_from(names), values), max_size=5) if names else st.just([])
    any_name = st.lists(st.tuples(st.sampled_from(NAMES), values), max_size=2)
    return st.tuples(own, any_name).map(lambda t: t[0] + t[1])


segment = st.one_of(st.sampled_from(NASTY).filter(lambda v: "/" not in v and v),
                    st.text(min_size=1, max_size=30).filter(lambda v: "/" not in v),
                    st.integers(min_value=-(2**70), max_value=2**70).map(str))


def _cfg(tmp: str, redis_url: str) -> config.Config:
    """A configuration for route enumeration (nothing is contacted)."""
    return config.load({"redis_url": redis_url, "var_dir": tmp}, env={})


def view_names(view) -> list[str]:
    """The parameter names the source of *view* (unwrapped) looks up."""
    try:
        text = inspect.getsource(inspect.unwrap(view))
    except (OSError, TypeError):
        return []
    found = set(_LOOKUP.findall(text))
    for group in _ONLY.findall(text):
        found.update(re.findall(r'"([A-Za-z_][A-Za-z0-9_]*)"', group))
    return sorted(found)


def routes() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(app, rule, method, the view's parameter names, is it an API) for every route of both apps.

    API routes are the log server's, the dashboard's ``/api/`` and its ``api`` blueprint.
    """
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _cfg(tmp, "redis://127.0.0.1:1/0")
        apps = {"dashboard": create_app(cfg), "logserver": logserver.create_app(cfg)}
        out = []
        for name, app in apps.items():
            for rule in app.url_map.iter_rules():
                names = tuple(view_names(app.view_functions[rule.endpoint]))
                api = name == "logserver" or rule.rule.startswith("/api/") or rule.endpoint.startswith("api.")
                for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                    out.append((name, rule.rule, method, names, api))
    return sorted(set(out))


ROUTES = routes()


def test_both_apps_have_their_routes_enumerated():
    rules = {(a, r) for a, r, _, _, _ in ROUTES}
    assert ("dashboard", "/api/alarms") in rules and ("logserver", "/log") in rules
    assert ("dashboard", "/alarms/<int:alarm_id>/shelve") in rules and ("dashboard", "/login") in rules
    assert len(rules) >= 30


@pytest.fixture(scope="module")
def supervisord():
    """A real supervisord (one program) for the Processes routes; stopped by pid."""
    with supervisor_harness.supervisord() as sock:
        yield sock


@pytest.fixture
def apps(registry_cfg, redis_client, supervisord):
    """Both apps on a real Redis with one alarm, a logged-in shift user and a program token."""
    registry_cfg.update(web_login_limit_address="100000 per minute", web_login_limit_user="100000 per minute",
                        supervisor_socket=str(supervisord))
    store = KeyStore.from_config(registry_cfg)
    password = store.add("alice", kind="user")
    token = store.add("daq")
    alarms.raise_alarm(redis_client, 40, "fuzz target")
    dash = create_app(registry_cfg)
    client = dash.test_client()
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/login").get_data(as_text=True)).group(1)
    resp = client.post("/login", data={"username": "alice", "password": password, "csrf_token": csrf})
    assert resp.status_code == 302
    log_client = logserver.create_app(registry_cfg).test_client()
    return {"dashboard": (client, csrf), "logserver": (log_client, token)}


def _path(rule: str, draw) -> str:
    """*rule* with every ``<converter:name>`` replaced by a generated, quoted segment
    (mostly a valid one for ``int:``, so that the view behind it is reached)."""
    def one(m: re.Match) -> str:
        strategy = st.one_of(st.integers(0, 2**31).map(str), segment) if m.group(1) == "int:" else segment
        return urllib.parse.quote(draw(strategy), safe="")

    return re.sub(r"<([^:>]+:)?[^>]+>", one, rule)


#: Successful API answers that are data downloads or Prometheus text rather than JSON.
DATA_TYPES = ("text/csv", "text/plain")


@pytest.mark.parametrize(("app", "rule", "method", "names", "api"), ROUTES,
                         ids=[f"{a}:{m}:{r}" for a, r, m, _, _ in ROUTES])
@settings(max_examples=50, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_no_request_gets_a_500(apps, app, rule, method, names, api, data):
    client, secret = apps[app]
    path = _path(rule, data.draw)
    query = data.draw(params(list(names)))
    url = path + ("?" + urllib.parse.urlencode(query) if query else "")
    kwargs = {}
    if method != "GET":
        body = data.draw(params(list(names)))
        if app == "dashboard":
            if data.draw(st.integers(0, 3)):  # mostly with the token, to get past the CSRF check
                body.append(("csrf_token", secret))
            kwargs["data"] = MultiDict(body)
        else:
            kwargs["headers"] = {"Authorization": f"Bearer {secret}"} if data.draw(st.booleans()) else {}
            if data.draw(st.booleans()):
                kwargs["json"] = {k: v for k, v in body} | ({"name": "daq"} if data.draw(st.booleans()) else {})
            else:
                kwargs["data"] = MultiDict(body)
    resp = client.open(url, method=method, **kwargs)
    assert resp.status_code < 500, (method, url, kwargs.get("data") or kwargs.get("json"), resp.status_code,
                                    resp.get_data(as_text=True)[:300])
    if api and (resp.status_code >= 400 or 200 <= resp.status_code < 300 and resp.mimetype not in DATA_TYPES):
        assert resp.is_json and resp.get_json() is not None, (method, url, resp.status_code, resp.mimetype)
