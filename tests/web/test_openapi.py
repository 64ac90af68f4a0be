"""OpenAPI: generated from the views of both apps, served by each, kept current in docs/.

The route-coverage rule: every route of the log server, and every route of the
website except the HTML pages, carries an ``@doc`` (minard.apidoc).  A route is
an HTML page when a GET of it (with sample arguments) answers ``text/html``;
every other answer (JSON, CSV, text) and every non-GET route needs a document.
"""

from __future__ import annotations

import json

import pytest
from werkzeug.routing import IntegerConverter

from minard import apidoc
from minard.ops import logserver
from minard.web import create_app, openapi


@pytest.fixture
def web(registry_cfg, tmp_path):
    registry_cfg["supervisor_socket"] = str(tmp_path / "no-supervisor.sock")
    return create_app(registry_cfg)


@pytest.fixture
def logapp(registry_cfg):
    return logserver.create_app(registry_cfg)


def sample_url(app, rule) -> str:
    """A URL of *rule* with an integer 1 or the string ``x`` for each argument."""
    values = {name: 1 if isinstance(rule._converters.get(name), IntegerConverter) else "x"
              for name in rule.arguments}
    return app.url_map.bind("localhost").build(rule.endpoint, values)


def answers_html(app, rule) -> bool:
    """True if a GET of *rule* answers an HTML page."""
    resp = app.test_client().get(sample_url(app, rule))
    return resp.mimetype == "text/html"


def test_every_website_route_but_the_html_pages_is_documented(web):
    def needs_doc(rule, method):
        return method != "GET" or not answers_html(web, rule)

    assert apidoc.undocumented(web, needs_doc) == []


def test_the_classification_finds_json_routes_outside_api(web, registry_cfg):
    rules = {r.rule: r for r in web.url_map.iter_rules()}
    assert not answers_html(web, rules["/healthz"]) and not answers_html(web, rules["/api/runs/<run>"])
    assert answers_html(web, rules["/alarms"]) and answers_html(web, rules["/logs/<name>"])
    web = create_app(registry_cfg)  # a fresh app: routes are added before the first request

    @web.get("/undocumented.json")
    def undocumented():
        return {"x": 1}

    missing = apidoc.undocumented(web, lambda rule, method: method != "GET" or not answers_html(web, rule))
    assert missing == ["GET /undocumented.json"]


def test_every_log_server_route_is_documented(logapp):
    assert apidoc.undocumented(logapp, lambda rule, method: True) == []


@pytest.mark.parametrize("which", ["web", "logserver"])
def test_documented_paths_exist_and_every_reference_resolves(web, logapp, which):
    app = web if which == "web" else logapp
    doc = openapi.document(app) if which == "web" else logserver.openapi_document(app)
    assert doc["openapi"].startswith("3.")
    rules = {apidoc.openapi_path(r.rule) for r in app.url_map.iter_rules()}
    assert set(doc["paths"]) <= rules

    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for v in node.values():
                yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for target in set(refs(doc)):
        _, kind, name = target.removeprefix("#/").split("/")
        assert name in doc["components"][kind], target
    for path, ops in doc["paths"].items():
        for op in ops.values():
            declared = {p["name"] for p in op.get("parameters", []) if p.get("in") == "path"}
            assert declared == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}, path


def test_path_parameters_take_their_converter_type(web):
    doc = openapi.document(web)
    ack = doc["paths"]["/alarms/{alarm_id}/ack"]["post"]
    assert ack["parameters"][0] == {"name": "alarm_id", "in": "path", "required": True,
                                    "schema": {"type": "integer"}}
    assert "303" in ack["responses"] and "403" in ack["responses"]


def test_each_app_serves_its_document(web, logapp):
    assert web.test_client().get("/openapi.json").get_json() == json.loads(openapi.text(openapi.document(web)))
    assert logapp.test_client().get("/openapi.json").get_json() == \
        json.loads(openapi.text(logserver.openapi_document(logapp)))


def test_the_documents_in_docs_are_current(registry_cfg):
    """Regenerate with: python -m minard.web.openapi"""
    for name, text in openapi.generated(registry_cfg).items():
        assert openapi.FILES[name].read_text() == text, f"{openapi.FILES[name]}: run python -m minard.web.openapi"
