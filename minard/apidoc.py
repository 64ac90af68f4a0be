"""OpenAPI documents generated from the views themselves (apispec).

Documenting a route is one decorator on its view, under the route decorator::

    @bp.get("/api/alarms")
    @doc("Alarms, newest first, and the summary", params=[q("limit", "integer", "at most this many")],
         ok="AlarmList")
    def alarms_json(): ...

:func:`build` walks an app's ``url_map`` and turns every documented view into
an operation: path parameters come from the rule's converters (``<int:id>`` is
an integer), error responses from the status codes named in ``errors``.  A
view without :func:`doc` is not in the document, and the route-coverage test
(``tests/web/test_openapi.py``) fails on such a route unless it is an HTML page.
This module imports only apispec (no Flask), so both apps' layers may use it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from apispec import APISpec

OPENAPI_VERSION = "3.0.3"
#: Standard error responses by status code (all ``{"error": "..."}``).
ERRORS = {
    400: ("BadParameter", "a bad or missing parameter; error says which and why"),
    401: ("Unauthorized", "no or invalid credentials"),
    403: ("Forbidden", "not allowed (e.g. a missing or wrong CSRF token)"),
    404: ("NotFound", "no such item"),
    409: ("Conflict", "the item is not in a state that allows this"),
    413: ("TooLarge", "the request body is too large"),
    429: ("TooManyRequests", "rate limit reached; Retry-After says when to try again"),
    503: ("Unavailable", "Redis does not answer"),
}
_CONVERTERS = {"int": {"type": "integer"}, "float": {"type": "number"}, "path": {"type": "string"}}
_RULE_ARG = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")


def q(name: str, type: str = "string", description: str = "", *, required: bool = False,
      where: str = "query", **schema) -> dict:
    """A parameter (a query parameter unless *where* says otherwise)."""
    out = {"name": name, "in": where, "schema": {"type": type, **schema}}
    if description:
        out["description"] = description
    if required or where == "path":
        out["required"] = True
    return out


def ref(kind: str, name: str) -> dict:
    """``{"$ref": "#/components/<kind>/<name>"}``."""
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(spec: object) -> dict:
    """A schema from a component name, a dict, or None (any object)."""
    if spec is None:
        return {"type": "object"}
    return ref("schemas", spec) if isinstance(spec, str) else dict(spec)


def doc(summary: str, *, params: Iterable[dict | str] = (), body: object = None, ok: object = None,
        ok_description: str = "OK", content: str = "application/json", status: int = 200, csv: bool = False,
        errors: Iterable[int] = (), description: str = "", methods: Iterable[str] = (),
        responses: Mapping[str, dict] | None = None, **extra) -> Callable:
    """Attach one OpenAPI operation to a view.

    *params*: dicts from :func:`q`, or names of ``components/parameters``.
    *body*: the JSON request body's schema (a component name or a dict), or
    ``("application/x-www-form-urlencoded", schema)`` for forms.  *ok*: the
    schema of the *status* response in *content* (``None``: no schema for
    non-JSON content, any object for JSON); *csv*: ``format=csv`` offers the same as a
    CSV download.  *errors*: status codes of
    :data:`ERRORS`.  *methods* (default: every method of the route) lets a
    view that serves GET and POST carry one decorator per method.
    """
    op: dict = {"summary": summary}
    if description:
        op["description"] = description
    op["parameters"] = list(params)  # apispec turns a name into a components/parameters $ref
    if body is not None:
        kind, schema = body if isinstance(body, tuple) else ("application/json", body)
        op["requestBody"] = {"required": True, "content": {kind: {"schema": _schema(schema)}}}
    media = {} if ok is None and content != "application/json" else {"schema": _schema(ok)}
    contents = {content: media, **({"text/csv": {}} if csv else {})}
    op["responses"] = {str(status): {"description": ok_description, "content": contents}
                       if status != 303 else {"description": ok_description}}
    for code in errors:
        op["responses"][str(code)] = ref("responses", ERRORS[code][0])
    op["responses"].update(responses or {})
    op.update(extra)

    def attach(view: Callable) -> Callable:
        table = dict(getattr(view, "__openapi__", {}))
        for method in [m.lower() for m in methods] or ["*"]:
            table[method] = op
        view.__openapi__ = table
        return view

    return attach


def openapi_path(rule: str) -> str:
    """``/api/runs/<int:run>`` -> ``/api/runs/{run}``."""
    return _RULE_ARG.sub(lambda m: "{" + m.group(2) + "}", rule)


def _path_params(rule: str, given: list[dict]) -> list[dict]:
    """The rule's arguments as path parameters (typed by their converter), unless given."""
    named = {p.get("name") for p in given if isinstance(p, dict) and p.get("in") == "path"}
    out = []
    for conv, name in _RULE_ARG.findall(rule):
        if name not in named:
            out.append({"name": name, "in": "path", "required": True,
                        "schema": dict(_CONVERTERS.get(conv, {"type": "string"}))})
    return out


def documented(view: Callable, method: str) -> dict | None:
    """The operation a view documents for *method*, or None."""
    table = getattr(view, "__openapi__", None) or {}
    return table.get(method.lower(), table.get("*"))


def _methods(rule) -> list[str]:
    return sorted(m for m in rule.methods if m not in ("HEAD", "OPTIONS"))


def build(app, title: str, description: str, components: Mapping[str, Mapping[str, dict]] | None = None,
          version: str = "1.0.0") -> dict:
    """The OpenAPI document of every documented route of a Flask *app*."""
    spec = APISpec(title=title, version=version, openapi_version=OPENAPI_VERSION,
                   info={"description": description})
    comps = {"schemas": {"Error": {"type": "object", "required": ["error"],
                                   "properties": {"error": {"type": "string"}}}},
             "responses": {name: {"description": text, "content": {"application/json": {
                 "schema": ref("schemas", "Error")}}} for name, text in ERRORS.values()},
             "parameters": {}}
    for kind, items in (components or {}).items():
        comps.setdefault(kind, {}).update(items)
    for name, schema in comps["schemas"].items():
        spec.components.schema(name, schema)
    for name, resp in comps["responses"].items():
        spec.components.response(name, resp)
    for name, param in comps["parameters"].items():
        spec.components.parameter(name, param.get("in", "query"), {k: v for k, v in param.items() if k != "in"})
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions.get(rule.endpoint)
        operations = {}
        for method in _methods(rule):
            op = documented(view, method) if view is not None else None
            if op is not None:
                op = dict(op)
                op["parameters"] = _path_params(rule.rule, op["parameters"]) + list(op["parameters"])
                operations[method.lower()] = op
        if operations:
            spec.path(path=openapi_path(rule.rule), operations=operations)
    return spec.to_dict()


def undocumented(app, needs_doc: Callable[[object, str], bool]) -> list[str]:
    """``METHOD rule`` of every route of *app* that *needs_doc* and has no operation."""
    out = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        view = app.view_functions.get(rule.endpoint)
        for method in _methods(rule):
            if documented(view, method) is None and needs_doc(rule, method):
                out.append(f"{method} {rule.rule}")
    return sorted(out)
