"""The OpenAPI documents of both apps, generated from their views (:mod:`minard.apidoc`).

``/openapi.json`` of the website serves :func:`document`, that of the log server
:func:`minard.ops.logserver.openapi_document`;
``docs/openapi.json`` and ``docs/openapi-logserver.json`` are the same documents
written by ``python -m minard.web.openapi`` (``tests/web/test_openapi.py``
fails when they are not current, or when a JSON route has no ``@doc``).
The shared pieces (schemas of the big responses, the window parameters) are
declared here once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from minard import apidoc
from minard.config import ROOT

#: Where the generated documents are kept (docs/web.md, docs/operations.md).
FILES = {"web": ROOT / "docs" / "openapi.json", "logserver": ROOT / "docs" / "openapi-logserver.json"}

WEB_TITLE = "minard monitoring API"
WEB_DESCRIPTION = (
    'JSON API of the minard website (served by `gunicorn minard:app`); the alarm actions, login and '
    'logout are form POSTs of the pages, with the CSRF token of the session. Every bad or missing'
    ' parameter is answered 400 with {"error": "..."}; every error is JSON, never a stack trace. '
    'Times are Unix seconds, negative seconds relative to now, or ISO 8601 (UTC when no offset). '
    'Durations are seconds or a number with s, m, h, d, w, y. Data endpoints take format=csv (a CSV '
    'download of what the page shows) and download=1 (the JSON as a download). See docs/web.md.')

#: Components of the website's document: the window parameters and the page schemas.
WEB_COMPONENTS = {
    "parameters": {   'start': {   'name': 'start',
                     'in': 'query',
                     'description': 'window start: Unix seconds, negative seconds from now, or ISO 8601',
                     'schema': {'type': 'string'}},
        'stop': {   'name': 'stop',
                    'in': 'query',
                    'description': 'window end (default now): Unix seconds, negative seconds from now, or ISO '
                                   '8601',
                    'schema': {'type': 'string'}},
        'window': {   'name': 'window',
                      'in': 'query',
                      'description': 'window length, 10 s to 400 days (default 10m); ends at stop, or starts at '
                                     'start',
                      'schema': {'type': 'string', 'example': '1h'}},
        'step': {   'name': 'step',
                    'in': 'query',
                    'description': 'coarsest acceptable resolution is chosen automatically (<= 3000 points); '
                                   'step asks for at least this bucket length',
                    'schema': {'type': 'string', 'example': '60s'}},
        'triggers': {   'name': 'triggers',
                        'in': 'query',
                        'description': 'comma-separated trigger names (27 names and TOTAL); default TOTAL and '
                                       'every trigger with data',
                        'schema': {'type': 'string'}},
        'format': {   'name': 'format',
                      'in': 'query',
                      'schema': {'type': 'string', 'enum': ['json', 'csv'], 'default': 'json'}},
        'download': {   'name': 'download',
                        'in': 'query',
                        'description': '1: send the JSON as an attachment',
                        'schema': {'type': 'string', 'enum': ['1']}}},
    "schemas": {   'Series': {'type': 'array', 'items': {'type': 'number', 'nullable': True}},
        'Stream': {   'type': 'object',
                      'properties': {   'start': {'type': 'number'},
                                        'stop': {'type': 'number'},
                                        'step': {'type': 'integer'},
                                        'now': {'type': 'number'},
                                        't': {'type': 'array', 'items': {'type': 'integer'}},
                                        'triggers': {'type': 'array', 'items': {'type': 'string'}},
                                        'rate': {   'type': 'object',
                                                    'additionalProperties': {   '$ref': '#/components/schemas/Series'}},
                                        'nhit': {   'type': 'object',
                                                    'additionalProperties': {   '$ref': '#/components/schemas/Series'}},
                                        'qhs': {   'type': 'object',
                                                   'additionalProperties': {   '$ref': '#/components/schemas/Series'}},
                                        'run': {'$ref': '#/components/schemas/Series'},
                                        'subrun': {'$ref': '#/components/schemas/Series'},
                                        'gtid': {'$ref': '#/components/schemas/Series'},
                                        'boundaries': {   'type': 'array',
                                                          'items': {   'type': 'object',
                                                                       'properties': {   't': {'type': 'number'},
                                                                                         'kind': {   'type': 'string',
                                                                                                     'enum': [   'run',
                                                                                                                 'subrun']},
                                                                                         'run': {   'type': 'integer'},
                                                                                         'subrun': {   'type': 'integer',
                                                                                                       'nullable': True}}}},
                                        'latest': {'type': 'object'},
                                        'heartbeat': {'type': 'array', 'items': {'type': 'object'}},
                                        'dispatcher': {'type': 'string', 'nullable': True}}},
        'Detector': {   'type': 'object',
                        'properties': {   'quantity': {'type': 'string'},
                                          'unit': {'type': 'string'},
                                          'start': {'type': 'number'},
                                          'stop': {'type': 'number'},
                                          'step': {'type': 'integer'},
                                          'events': {'type': 'number', 'nullable': True},
                                          'values': {'$ref': '#/components/schemas/Series'},
                                          'baseline': {'$ref': '#/components/schemas/Series'},
                                          'values_f32': {'type': 'string', 'format': 'byte'},
                                          'baseline_f32': {'type': 'string', 'format': 'byte'},
                                          'hot': {'type': 'array', 'items': {'type': 'integer'}},
                                          'dead': {'type': 'array', 'items': {'type': 'integer'}},
                                          'crate': {   'type': 'object',
                                                       'properties': {   'mean': {   '$ref': '#/components/schemas/Series'},
                                                                         'max': {   '$ref': '#/components/schemas/Series'}}},
                                          'card': {   'type': 'object',
                                                      'properties': {   'mean': {   'type': 'array',
                                                                                    'items': {   '$ref': '#/components/schemas/Series'}},
                                                                        'max': {   'type': 'array',
                                                                                   'items': {   '$ref': '#/components/schemas/Series'}}}}}},
        'Channel': {   'type': 'object',
                       'properties': {   'lcn': {'type': 'integer'},
                                         'crate': {'type': 'integer'},
                                         'card': {'type': 'integer'},
                                         'channel': {'type': 'integer'},
                                         't': {'type': 'array', 'items': {'type': 'integer'}},
                                         'occupancy': {'$ref': '#/components/schemas/Series'},
                                         'hits': {'$ref': '#/components/schemas/Series'},
                                         'cmos': {'$ref': '#/components/schemas/Series'},
                                         'base': {'$ref': '#/components/schemas/Series'}}},
        'Run': {   'type': 'object',
                   'required': [   'run',
                                   'events',
                                   'triggers',
                                   'nhit_histogram',
                                   'channel_hits',
                                   'start',
                                   'end',
                                   'subruns'],
                   'properties': {   'run': {'type': 'integer'},
                                     'events': {'type': 'integer'},
                                     'orphans': {'type': 'integer'},
                                     'hits': {'type': 'integer'},
                                     'triggers': {'type': 'object', 'additionalProperties': {'type': 'integer'}},
                                     'nhit_histogram': {   'type': 'object',
                                                           'additionalProperties': {'type': 'integer'}},
                                     'channel_hits': {   'type': 'object',
                                                         'additionalProperties': {'type': 'integer'}},
                                     'start': {'type': 'number', 'nullable': True},
                                     'end': {'type': 'number', 'nullable': True},
                                     'subruns': {'type': 'array', 'items': {'type': 'integer'}}}}},
}


def document(app) -> dict:
    """The website's OpenAPI document, built once per app."""
    if "minard_openapi" not in app.extensions:
        app.extensions["minard_openapi"] = apidoc.build(app, WEB_TITLE, WEB_DESCRIPTION, WEB_COMPONENTS)
    return app.extensions["minard_openapi"]


def text(doc: dict) -> str:
    """A document as the files keep it (sorted keys, indented, final newline)."""
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def generated(cfg=None) -> dict[str, str]:
    """The text of both documents, built from fresh apps."""
    from minard import config
    from minard.ops import logserver
    from minard.web import create_app

    cfg = config.load(env={}) if cfg is None else cfg
    return {"web": text(document(create_app(cfg))),
            "logserver": text(logserver.openapi_document(logserver.create_app(cfg)))}


def main(argv: list[str]) -> int:
    """Write docs/openapi*.json (``--check``: exit 1 if they are not current)."""
    import tempfile

    from minard import config

    with tempfile.TemporaryDirectory() as tmp:  # the apps write their secret key under var_dir
        docs = generated(config.load({"var_dir": tmp}, env={}))
    stale = [name for name, body in docs.items() if not FILES[name].exists() or FILES[name].read_text() != body]
    if "--check" in argv:
        for name in stale:
            print(f"{FILES[name]} is not current: run python -m minard.web.openapi", file=sys.stderr)
        return 1 if stale else 0
    for name in stale:
        Path(FILES[name]).write_text(docs[name], encoding="utf-8")
        print(f"wrote {FILES[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
