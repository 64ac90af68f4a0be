"""The dashboard's JSON API (each view documented with ``@doc``; /openapi.json and docs/openapi.json).

Endpoints compatible with the original minard (``/metric``, ``/metric_hash``,
``/query``) and the ones the pages use (``/api/stream``, ``/api/detector``,
``/api/channel/<lcn>``, ``/api/nhit``, ``/api/runs``, ``/api/runs/<run>``),
plus ``/healthz`` and Prometheus ``/metrics``.  Every data endpoint takes
``format=csv`` to download what the matching page shows.

Every parameter goes through :mod:`minard.web.params`; a bad or missing one is
answered ``400 {"error": "..."}``.  Any other failure is a JSON error without
a stack trace (the trace goes to the site's log).
"""

from __future__ import annotations

import base64
import csv
import io
import math
import time
import weakref
from functools import wraps

import numpy as np
import orjson
from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from minard import metrics as metrics_mod
from minard.analysis.aggregate import NAMES
from minard.apidoc import doc, q
from minard.formats.detector import NCRATES
from minard.store import channel_status as channels_store
from minard.store import status
from minard.store import timeseries as ts
from minard.store.runs import get_run, list_runs
from minard.web import data
from minard.web.params import (
    ParamError,
    choice,
    crate_card,
    lcn_parts,
    names_list,
    output_format,
    parse_duration,
    parse_int,
    parse_lcn,
    time_window,
)

bp = Blueprint("api", __name__)
#: Seconds a rendered response of a heavy endpoint is reused for the same URL.
RESPONSE_TTL = 0.5
#: Seconds the window-independent part of a Stream answer is reused by a worker (:func:`_live`).
LIVE_TTL = RESPONSE_TTL


def _redis():
    """Redis with the app's cache of settled data (:class:`minard.web.data.Source`)."""
    return current_app.extensions["minard_source"]


def _responses() -> data.Cache:
    """The app's cache of rendered responses."""
    return current_app.extensions["minard_responses"]


# ------------------------------------------------------------------ errors

@bp.errorhandler(ParamError)
def bad_parameter(exc: ParamError):
    """A bad or missing parameter: 400 with the reason."""
    return jsonify(error=str(exc)), 400


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException):
    """Every HTTP error of this blueprint as JSON."""
    return jsonify(error=exc.description or exc.name), exc.code


@bp.errorhandler(Exception)
def internal_error(exc: Exception):
    """Anything else: logged with its trace, answered without it."""
    current_app.logger.exception("API error on %s", request.full_path)
    name = type(exc).__name__
    if name.startswith(("Redis", "Connection", "Timeout")):
        return jsonify(error="the database (Redis) is not answering"), 503
    return jsonify(error="internal server error"), 500


def _only(*allowed: str) -> None:
    """Refuse query parameters this endpoint does not know (typos would be silent)."""
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        raise ParamError(f"unknown parameter {unknown[0][:40]!r}; this endpoint takes: {', '.join(allowed)}")


def response_cache(view):
    """Reuse the response of the same URL for RESPONSE_TTL seconds (many screens, one view)."""

    @wraps(view)
    def wrapper(*args, **kwargs):
        key = (request.endpoint, request.full_path)
        responses = _responses()
        hit = responses.get(key)
        if hit is None:
            with responses.flight(key):  # one request renders a URL, the ones arriving meanwhile reuse it
                hit = responses.peek(key)
                if hit is None:
                    resp = view(*args, **kwargs)
                    if isinstance(resp, Response) and resp.status_code == 200:
                        responses.put(key, (resp.get_data(), resp.mimetype, _download_headers(resp)), RESPONSE_TTL)
                    return resp
        body, mimetype, headers = hit
        return Response(body, mimetype=mimetype, headers=headers)

    return wrapper


def _download_headers(resp: Response) -> dict:
    cd = resp.headers.get("Content-Disposition")
    return {"Content-Disposition": cd} if cd else {}


# ------------------------------------------------------------------ encoding

def floats(values, digits: int = 4) -> np.ndarray:
    """A float array for a JSON answer: rounded to *digits* decimals, NaN (written null).

    Arrays go to :func:`json_response` as numpy arrays: orjson writes them
    natively (NaN and infinities as null), ten times faster than a list.
    """
    arr = np.asarray(values, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.ascontiguousarray(np.round(arr, digits))


def floats_by_name(series: dict, digits: int) -> dict:
    """:func:`floats` of every series of *series* ({name: array}), rounded together in one numpy call."""
    if not series:
        return {}
    rounded = floats(np.vstack(list(series.values())), digits)
    return dict(zip(series, rounded))


with np.errstate(over="ignore"):
    #: 10.0 ** k for k in -400..400 (every exponent a float64 can need), by the same numpy power
    #: as an array would be: looking the scale up is a third faster than raising 10 to it.
    _POW10 = 10.0 ** np.arange(-400, 401, dtype=float)


def sigfigs(values, digits: int = 5) -> np.ndarray:
    """A float array rounded to *digits* significant figures (small occupancies keep theirs)."""
    arr = np.asarray(values, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mag = np.floor(np.log10(np.abs(arr)))
        scale = _POW10[np.where(np.isfinite(mag), digits - 1 - mag, 0).astype(np.int64) + 400]
        return np.ascontiguousarray(np.round(arr * scale) / scale)


def packed_f32(values) -> str:
    """*values* as base64 of little-endian float32 (NaN = no data) for ``encoding=f32``.

    Writing 10240 numbers as text was the largest single cost of a map answer
    (orjson's shortest float formatting); this is a copy and a base64 pass.
    Values already rounded to 5 significant figures keep them exactly: float32
    holds 6, so the browser recovers each with ``toPrecision(5)``.
    """
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


def packed_f64(values) -> str:
    """*values* as base64 of little-endian float64 (NaN = no data) for ``encoding=f64``: the exact
    doubles the plain JSON's numbers parse to, without formatting each as text."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f8").tobytes()).decode("ascii")


def packed_sigfigs(values) -> str:
    """:func:`packed_f32` of :func:`sigfigs`: the map's values as the Detector page asks for them."""
    return packed_f32(sigfigs(values))


def ints(values):
    """An array of (possibly NaN) integers: int64 when complete, else a list with null for NaN."""
    arr = np.asarray(values, dtype=float)
    ok = np.isfinite(arr)
    if ok.all():
        return np.ascontiguousarray(arr.astype(np.int64))
    out = np.where(ok, arr, 0).astype(np.int64).tolist()
    for i in np.flatnonzero(~ok).tolist():  # only the gaps are visited in Python
        out[i] = None
    return out


def json_response(obj, filename: str | None = None) -> Response:
    """Compact JSON (orjson; numpy arrays written natively, NaN as null); with *filename*, a download."""
    body = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    resp = Response(body, mimetype="application/json")
    if filename and request.args.get("download") == "1":
        resp.headers["Content-Disposition"] = f'attachment; filename="{filename}.json"'
    return resp


def csv_response(header: list[str], rows, filename: str) -> Response:
    """A CSV download (values with NaN written empty)."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(header)
    for row in rows:
        out.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    resp = Response(buf.getvalue(), mimetype="text/csv")
    resp.headers["Content-Disposition"] = f'attachment; filename="{filename}.csv"'
    return resp


def _stamp(t: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


# ------------------------------------------------------------------ stream

@bp.get("/api/stream")
@doc('Stream page: rates, average nhit and charge per trigger type, run/subrun/GTID, boundaries, heartbeats',
     params=['start', 'stop', 'window', 'step', 'triggers', 'format', 'download',
             q('encoding', 'string', 'JSON only: f64 sends `rate`, `nhit` and `qhs` as `rate_f64`, `nhit_f64` and `qhs_f64`: per trigger, base64 of little-endian float64 (NaN = no data), each value the plain answer\'s (rounded alike); the Stream page asks for it', enum=['json', 'f64'], default='json')],
     ok='Stream',
     ok_description='Series on a common time axis `t` (bucket start times); `rate` in Hz, `nhit` and `qhs` averages per event; null where no data. `boundaries` are run (exact, from the run summaries) and subrun starts. Only complete buckets are returned (`complete_until` is the end of the last one); `headline` is the mean rate per trigger over the last complete seconds with the interval it covers (`rates`, `start`, `stop`, `seconds`).',
     csv=True,
     errors=(400,))
@response_cache
def stream():
    """Rates, average nhit and charge per trigger, run/subrun/GTID over a window."""
    _only("start", "stop", "window", "step", "triggers", "format", "download", "encoding")
    now = time.time()
    packed = choice("encoding", request.args.get("encoding"), ("json", "f64"), "json") == "f64"
    start, stop = time_window(request.args, now)
    step = parse_duration("step", request.args["step"], 1, 86400) if "step" in request.args else None
    triggers = names_list("triggers", request.args.get("triggers"), NAMES, []) or None
    view = data.stream_view(_redis(), start, stop, now, step, triggers)
    name = f"minard-stream-{_stamp(start)}-{_stamp(stop)}"
    if output_format(request.args) == "csv":
        return _stream_csv(view, name)
    out = {"start": start, "stop": stop, "step": view["step"], "now": now, "t": ints(view["t"]),
           "complete_until": view["complete_until"],
           "triggers": view["triggers"],
           "run": ints(view["run"]), "subrun": ints(view["subrun"]), "gtid": ints(view["gtid"]),
           "boundaries": view["boundaries"], **_live(_redis(), now)}
    for key, digits in (("rate", 3), ("nhit", 2), ("qhs", 1)):
        rounded = floats_by_name(view[key], digits)
        if packed:  # writing ~30000 numbers as text was a third of a day's answer (bench/web.py)
            out[f"{key}_f64"] = {n: packed_f64(a) for n, a in rounded.items()}
        else:
            out[key] = rounded
    return json_response(out, name)


def _live(redis, now: float) -> dict:
    """The part of a Stream answer that does not depend on the window (headline, latest
    run/GTID, heartbeats, dispatcher), shared by every request of this worker for LIVE_TTL s.

    Every client polls a different window but the same present: four round trips
    and a third of a warm answer's time, once per LIVE_TTL instead of per request.
    """
    return data.cached(redis, ("live", math.floor(now / LIVE_TTL)), LIVE_TTL, lambda: {
        "headline": data.headline(redis, now), "latest": data.latest_state(redis, now),
        "heartbeat": heartbeat(redis, now), "dispatcher": data.dispatcher_name(redis)})


def _stream_csv(view: dict, name: str) -> Response:
    names = view["triggers"]
    header = ["time", "run", "subrun", "gtid"] + [f"rate_{n}" for n in names] + \
        [f"nhit_{n}" for n in names] + [f"qhs_{n}" for n in names]
    cols = [view["t"], view["run"], view["subrun"], view["gtid"]] + \
        [view["rate"][n] for n in names] + [view["nhit"][n] for n in names] + [view["qhs"][n] for n in names]
    ints_at = {0, 1, 2, 3}
    rows = ([_cell(c[i], j in ints_at) for j, c in enumerate(cols)] for i in range(len(view["t"])))
    return csv_response(header, rows, name)


def _cell(x, integer: bool = False):
    x = float(x)
    if math.isnan(x):
        return ""
    return int(x) if integer else round(x, 4)


def heartbeat(redis, now: float) -> list[dict]:
    """Pipeline components' heartbeats: name, alive, age, state, host, lag."""
    out = []
    for name, f in status.components(redis, now).items():
        t = float(f.get("time", 0) or 0)
        out.append({"name": name, "alive": bool(f.get("alive")), "age": round(now - t, 1) if t else None,
                    "state": f.get("state", "gone") if f.get("time") else "gone", "host": f.get("host"),
                    "lag": f.get("lag_seconds")})
    return out


@bp.get("/api/banner")
@doc("The status banner of every page: run and elapsed time, run state, total rate, data age, active alarms",
     ok_description="`run`, `subrun`, `gtid`, `run_start`, `elapsed` (s); `state` is `running`, `stalled` or `no data` "
                    "from the data age; `rate` (Hz, TOTAL) is the mean over `rate_start`..`rate_stop` (the last "
                    "`rate_seconds` complete seconds); `data_age` (s) with `data_class` `ok`, `amber` (past "
                    "`amber_seconds`) or `red` (past `red_seconds`); `alarms` has `active` (unacknowledged), "
                    "`worst` and `worst_level`.",
     errors=(400, 503))
@response_cache
def banner_json():
    """The status banner of every page: run and elapsed time, run state, total rate, data age, alarms."""
    from minard.web.banner import banner

    _only()
    history = float(current_app.config["MINARD"].get("alarm_history_days", 30))
    return json_response(banner(_redis(), time.time(), history))


# ------------------------------------------------------------------ detector

@bp.get("/api/detector")
@doc('Detector page: per-channel occupancy, CMOS rate or base current with rolling baseline, hot/dead channels and crate/card mean and max',
     params=[q('quantity', 'string', enum=['occupancy', 'cmos', 'base'], default='occupancy'), 'start', 'stop', 'window', q('crate', 'integer', 'CSV only: just this crate (0-18)', minimum=0, maximum=18), q('card', 'integer', 'CSV only: just this card (0-15) of crate', minimum=0, maximum=15), 'format', 'download',
             q('encoding', 'string', 'JSON only: f32 sends `values` and `baseline` as `values_f32` and `baseline_f32`, base64 of 10240 little-endian float32 (NaN = no data; each value to 5 significant figures, as in the plain answer); the Detector page asks for it', enum=['json', 'f32'], default='json')],
     ok='Detector',
     ok_description='`values` and `baseline` have 10240 entries indexed by lcn = crate*512 + card*32 + channel (null = no data); `hot` and `dead` list lcns. With encoding=f32 they come as `values_f32` and `baseline_f32` instead.',
     csv=True,
     errors=(400,))
@response_cache
def detector():
    """The channel map of one quantity over a window, with baseline, hot/dead and crate/card stats."""
    _only("quantity", "start", "stop", "window", "crate", "card", "format", "download", "encoding")
    now = time.time()
    quantity = choice("quantity", request.args.get("quantity"), data.QUANTITIES, "occupancy")
    packed = choice("encoding", request.args.get("encoding"), ("json", "f32"), "json") == "f32"
    start, stop = time_window(request.args, now)
    crate, card = crate_card(request.args)
    view = data.detector_view(_redis(), quantity, start, stop, now)
    name = f"minard-{quantity}-{_stamp(start)}-{_stamp(stop)}"
    if output_format(request.args) == "csv":
        return _detector_csv(view, crate, card, name)
    st = view["stats"]
    out = {"quantity": quantity, "unit": view["unit"], "start": start, "stop": stop, "step": view["step"],
           "now": now, "events": view["events"], "hot": view["hot"].tolist(), "dead": view["dead"].tolist(),
           "crate": {"mean": sigfigs(st["crate_mean"]), "max": sigfigs(st["crate_max"])},
           "card": {"mean": sigfigs(st["card_mean"]), "max": sigfigs(st["card_max"])},  # nested lists in JSON
           "selection": {"crate": crate, "card": card},
           "flags": _channel_flags(_redis(), now)}
    for key in ("values", "baseline"):
        if packed:
            out[f"{key}_f32"] = _encoded(view[key], packed_sigfigs)
        else:
            out[key] = _encoded(view[key], sigfigs)
    return json_response(out, name)


def _encoded(array: np.ndarray, encode):
    """``encode(array)``, computed once per encoder for a read-only array the worker's cache shares.

    A settled slot's baseline is the same array for every map of that slot
    (:func:`minard.web.data.baseline` returns the cached one read-only);
    rounding and packing its 10240 values was a tenth of a map answer's CPU.
    Writable arrays (computed for this request) are encoded every time.
    """
    if array.flags.writeable:
        return encode(array)
    # On the app like the other caches: id -> (weak reference to the array, {encoder: encoded}).
    encoded = current_app.extensions["minard_encoded"]
    entry = encoded.get(id(array))
    if entry is None or entry[0]() is not array:
        if len(encoded) >= 4 * data.CHANNEL_SUMS_CACHED:
            encoded.clear()
        entry = encoded[id(array)] = (weakref.ref(array), {})
    done = entry[1]
    if encode not in done:
        done[encode] = encode(array)
    return done[encode]


def _channel_flags(redis, now: float) -> dict:
    """``{lcn: [flag, ...]}`` of the channel-status database, shared by every map request of
    this worker for LIVE_TTL s (its round trip was a third of a warm map answer's wall time)."""
    return data.cached(redis, ("channel flags", math.floor(now / LIVE_TTL)), LIVE_TTL, lambda: {
        str(k): sorted(v) for k, v in channels_store.status(redis).items()})


def _detector_csv(view: dict, crate, card, name: str) -> Response:
    hot, dead = set(view["hot"].tolist()), set(view["dead"].tolist())
    lcns = range(len(view["values"]))
    if crate is not None:
        lo = crate * 512 + (card * 32 if card is not None else 0)
        lcns = range(lo, lo + (32 if card is not None else 512))
    hits = view["hits"]
    rows = ([*lcn_parts(i).values(), _cell(view["values"][i]), _cell(view["baseline"][i]),
             int(hits[i]) if hits is not None else "", int(i in hot), int(i in dead)] for i in lcns)
    header = ["lcn", "crate", "card", "channel", view["quantity"], "baseline", "hits", "hot", "dead"]
    return csv_response(header, rows, name)


@bp.get("/api/channel/<lcn>")
@doc("One channel's history of occupancy, CMOS rate and base current together",
     params=[q('lcn', 'integer', where='path', minimum=0, maximum=9727), 'start', 'stop', 'window', 'format', 'download'],
     ok='Channel',
     ok_description='Series on a common time axis `t` (default window 1 hour).',
     csv=True,
     errors=(400,))
def channel(lcn: str):
    """One channel's history of occupancy, CMOS rate and base current."""
    _only("start", "stop", "window", "format", "download")
    now = time.time()
    index = parse_lcn(lcn)
    start, stop = time_window(request.args, now, default=3600)
    view = data.channel_view(_redis(), index, start, stop, now)
    name = f"minard-channel-{index}-{_stamp(start)}-{_stamp(stop)}"
    if output_format(request.args) == "csv":
        rows = ([int(view["t"][i]), _cell(view["occupancy"][i]), _cell(view["hits"][i], True),
                 _cell(view["cmos"][i]), _cell(view["base"][i])] for i in range(len(view["t"])))
        return csv_response(["time", "occupancy", "hits", "cmos", "base"], rows, name)
    out = {**lcn_parts(index), "start": start, "stop": stop, "step": view["step"], "now": now,
           "t": ints(view["t"]), "occupancy": floats(view["occupancy"], 5), "hits": ints(view["hits"]),
           "cmos": floats(view["cmos"], 3), "base": floats(view["base"], 3)}
    return json_response(out, name)


# ------------------------------------------------------------------ nhit

@bp.get("/api/nhit")
@doc('nhit distribution per trigger type over the last N seconds',
     params=[q('seconds', 'string', 'duration, 10 s to 30 days', default='60'), 'triggers', 'format', 'download'],
     ok={'type': 'object'},
     ok_description='`nhit` lists the lowest nhit of each bin (`bin` hits wide, the last bin is overflow); `counts` maps trigger -> events per bin.',
     csv=True,
     errors=(400,))
def nhit():
    """nhit distribution per trigger type over the last N seconds."""
    _only("seconds", "triggers", "format", "download")
    now = time.time()
    seconds = parse_duration("seconds", request.args.get("seconds", "60"), 10, 30 * 86400)
    triggers = names_list("triggers", request.args.get("triggers"), NAMES, []) or None
    view = data.nhit_view(_redis(), seconds, now, triggers)
    name = f"minard-nhit-{int(seconds)}s-{_stamp(now)}"
    if output_format(request.args) == "csv":
        names = view["triggers"]
        rows = ([int(e)] + [int(view["counts"][n][i]) for n in names] for i, e in enumerate(view["nhit"]))
        return csv_response(["nhit"] + names, rows, name)
    out = {"seconds": seconds, "start": view["start"], "stop": view["stop"], "step": view["step"],
           "bin": view["bin"], "nhit": view["nhit"].tolist(), "triggers": view["triggers"],
           "counts": {n: c.tolist() for n, c in view["counts"].items()}, "now": now}
    return json_response(out, name)


# ------------------------------------------------------------------ runs

@bp.get("/api/runs")
@doc('The most recent runs, newest first (`minard runs --json`)',
     params=[q('limit', 'integer', minimum=1, maximum=1000, default=100), 'format', 'download'],
     ok={'type': 'array', 'items': {'type': 'object'}},
     ok_description='run, start, end, events, subruns (count)',
     csv=True,
     errors=(400,))
def runs():
    """The most recent runs, newest first."""
    _only("limit", "format", "download")
    limit = parse_int("limit", request.args.get("limit"), 1, 1000, 100)
    rows = list_runs(_redis(), limit)
    if output_format(request.args) == "csv":
        return csv_response(["run", "start", "end", "events", "subruns"],
                            ([r["run"], r["start"], r["end"], r["events"], r["subruns"]] for r in rows),
                            "minard-runs")
    return json_response(rows, "minard-runs")


RUN_PARTS = ("triggers", "nhit", "channels")


@bp.get("/api/runs/<run>")
@doc("One run's summary, exactly `minard runs show RUN --json`",
     params=[q('run', 'integer', where='path', minimum=0), q('part', 'string', 'CSV only: which table', enum=['triggers', 'nhit', 'channels'], default='triggers'), 'format', 'download'],
     ok='Run',
     ok_description='The run summary',
     csv=True,
     errors=(400, 404))
def run(run: str):
    """One run's summary: exactly ``minard runs show RUN --json``."""
    _only("format", "part", "download")
    number = parse_int("run", run, 0, 2**31 - 1)
    fmt = output_format(request.args)
    part = choice("part", request.args.get("part"), RUN_PARTS, "triggers")
    summary = get_run(_redis(), number)
    if summary is None:
        return jsonify(error=f"run {number} is not known"), 404
    if fmt == "json":
        return json_response(summary, f"minard-run-{number}")
    if part == "triggers":
        rows = list(summary["triggers"].items())
        header = ["trigger", "events"]
    elif part == "nhit":
        rows = [(int(k), v) for k, v in summary["nhit_histogram"].items()]
        header = ["nhit", "events"]
    else:
        occ = data.run_occupancy(summary)
        rows = [(i, i // 512, i // 32 % 16, i % 32, summary["channel_hits"].get(str(i), 0), round(float(occ[i]), 6))
                for i in range(len(occ))]
        header = ["lcn", "crate", "card", "channel", "hits", "occupancy"]
    return csv_response(header, rows, f"minard-run-{number}-{part}")


# ------------------------------------------------------------------ original minard

#: expr of /metric: trigger names (rate, Hz), "<trigger>:nhit"/":qhs" (averages),
#: run/subrun/gtid (last value) and stream counters (per second).
STREAM_COUNTERS = ("records", "events", "orphans", "gtid_gaps", "gtid_missing", "corrupt", "hits")
LAST_VALUES = ("run", "subrun", "gtid")
HASH_GROUPS = {"crate": tuple(f"c{i}" for i in range(NCRATES)), "trig": data.TRIG_FIELDS,
               "stream": LAST_VALUES + STREAM_COUNTERS}
#: Names the original minard's stream page asks for, as expressions of this one
#: (docs/web.md): "<TRIGGER>-nhit"/"-charge" are averages per event,
#: DISPATCH_ORPHANS orphans per second, heartbeat 1 where data arrived in the step.
ALIAS_SUFFIXES = {"-nhit": ":nhit", "-charge": ":qhs"}
ALIASES = {"DISPATCH_ORPHANS": "orphans", "heartbeat": "heartbeat"}
#: Most values one /metric answer holds on an explicit step grid.
METRIC_MAX_VALUES = 20000


def metric_expr(expr: str) -> str:
    """The expression of this minard for *expr*, original aliases resolved (ParamError if unknown)."""
    for suffix, kind in ALIAS_SUFFIXES.items():
        if expr.endswith(suffix) and expr[: -len(suffix)] in NAMES:
            return expr[: -len(suffix)] + kind
    expr = ALIASES.get(expr, expr)
    trig, _, kind = expr.partition(":")
    if (trig in NAMES and kind in ("", "nhit", "qhs")) or expr in LAST_VALUES + STREAM_COUNTERS + ("heartbeat",):
        return expr
    raise ParamError(f"expr {expr[:40]!r} is not known: use a trigger name (e.g. TOTAL, 100L), "
                     "TRIGGER:nhit, TRIGGER:qhs (or the original TRIGGER-nhit, TRIGGER-charge), run, subrun, "
                     "gtid, heartbeat, DISPATCH_ORPHANS or one of " + ", ".join(STREAM_COUNTERS))


def _metric_fields(expr: str) -> tuple[str, tuple[str, ...]]:
    """(group, fields) a /metric expression is computed from."""
    trig, _, kind = expr.partition(":")
    if trig in NAMES:
        return "trig", (trig,) if not kind else (trig, expr)
    return "stream", ("records",) if expr == "heartbeat" else (expr,)


def _metric_reduce(expr: str, rows: dict, seconds, last=None) -> np.ndarray:
    """Values of *expr* from summed *rows* over steps of *seconds* (``last``: last values)."""
    trig, _, kind = expr.partition(":")
    if trig in NAMES:
        if kind:
            return data.safe_ratio(np.nan_to_num(rows[expr]), np.nan_to_num(rows[trig]))
        return rows[trig] / seconds
    if expr in LAST_VALUES:
        return last
    if expr == "heartbeat":
        return np.where(np.isnan(rows["records"]), 0.0, (rows["records"] > 0).astype(float))
    return rows[expr] / seconds


def _metric_values(expr: str, start: float, stop: float, now: float, step):
    """(times, values, step) of one /metric expression at the stored resolution."""
    group, fields = _metric_fields(expr)
    t, rows, level = data.series(_redis(), group, fields, start, stop, now, step)
    return t, _metric_reduce(expr, rows, level.step, rows.get(expr)), level.step


def _metric_grid(expr: str, start: float, stop: float, now: float, step: float):
    """(times, values) on the grid start, start+step, ... < stop, as the original minard answered.

    Read at the coarsest stored level whose buckets tile the grid exactly
    (else the finest one at least *step* long), and combined per grid step: counts summed, averages as sum/sum, last values last.
    """
    n = math.ceil((stop - start) / step)
    if n > METRIC_MAX_VALUES:
        raise ParamError(f"start..stop holds {n} steps of {step:g} s; at most {METRIC_MAX_VALUES} per request")
    fits = [lv for lv in ts.SCALAR_LEVELS if lv.step <= step and step % lv.step == 0 and start % lv.step == 0
            and (stop - start) / lv.step <= 20 * METRIC_MAX_VALUES and now - start <= lv.keep]
    group, fields = _metric_fields(expr)
    t, rows, level = data.series(_redis(), group, fields, start, stop - 1e-6, now,
                                 step=fits[-1].step if fits else step, max_points=10**7)
    grid = np.arange(n, dtype=float) * step + start
    # the grid step each stored bucket falls in (by its middle); buckets outside are dropped
    idx = np.floor((t + level.step / 2 - start) / step).astype(np.int64)
    ok = (idx >= 0) & (idx < n)
    summed, seen = {}, np.zeros(n)
    for f in fields:
        v = rows[f][ok]
        have = ~np.isnan(v)
        summed[f] = np.bincount(idx[ok][have], v[have], minlength=n)[:n]
        seen = np.maximum(seen, np.bincount(idx[ok][have], minlength=n)[:n])
    for f in fields:
        summed[f] = np.where(seen > 0, summed[f], np.nan)
    last = None
    if expr in LAST_VALUES:
        last = np.full(n, np.nan)
        v = rows[expr][ok]
        have = ~np.isnan(v)
        last[idx[ok][have]] = v[have]  # later buckets overwrite earlier ones
    values = _metric_reduce(expr, summed, step, last)
    return grid, values


@bp.get("/metric")
@doc('Original minard: one series per step',
     params=[q('expr', 'string', 'A trigger name (rate in Hz, e.g. TOTAL, 100L), TRIGGER:nhit or TRIGGER:qhs (averages per event), run, subrun, gtid (last value), or a stream counter per second: records, events, orphans, gtid_gaps, gtid_missing, corrupt, hits. The original minard\'s names are aliases: TRIGGER-nhit (= TRIGGER:nhit), TRIGGER-charge (= TRIGGER:qhs), DISPATCH_ORPHANS (= orphans), heartbeat (1 where data arrived in the step, else 0)', required=True), 'start', 'stop', 'window', 'step', q('now', 'string', 'accepted and ignored (original minard)')],
     ok={'type': 'object', 'properties': {'values': {'type': 'array', 'items': {'type': 'number', 'nullable': True}}}},
     ok_description='`values` per step (null where no data), `t` the step start times, `step` the resolution used. With `step`, exactly one value per step from `start` to `stop` (the original clients\' grid), combined from the stored buckets.',
     errors=(400,))
@response_cache
def metric():
    """Original minard: one series, ``values`` per step (null where no data).

    With ``step`` the answer has exactly one value per step from ``start``
    (the original clients' grid); the original names (``TOTAL-nhit``,
    ``TOTAL-charge``, ``heartbeat``, ...) are accepted as aliases.
    """
    _only("expr", "start", "stop", "window", "step", "now")
    raw = request.args.get("expr")
    if not raw:
        raise ParamError("missing parameter expr")
    expr = metric_expr(raw)
    now = time.time()
    start, stop = time_window(request.args, now)
    if "step" in request.args:
        step = parse_duration("step", request.args["step"], 1, 86400)
        t, values = _metric_grid(expr, start, stop, now, step)
        used = step
    else:
        t, values, used = _metric_values(expr, start, stop, now, None)
    integer = expr in LAST_VALUES or expr == "heartbeat"
    return json_response({"expr": raw, "start": start, "stop": stop, "step": used,
                          "t": ints(t), "values": ints(values) if integer else floats(values, 4)})


@bp.get("/metric_hash")
@doc('Original minard: every field of a hash series per step',
     params=[q('name', 'string', required=True, enum=['crate', 'trig', 'stream']), 'start', 'stop', 'window', 'step'],
     ok={'type': 'object'},
     ok_description='`values` maps field -> array per step (crate: hits per crate c0..c18 per bucket)',
     errors=(400,))
def metric_hash():
    """Original minard: every field of a hash series (``crate``, ``trig``, ``stream``) per step."""
    _only("name", "start", "stop", "window", "step")
    name = choice("name", request.args.get("name"), tuple(HASH_GROUPS))
    now = time.time()
    start, stop = time_window(request.args, now)
    step = parse_duration("step", request.args["step"], 1, 86400) if "step" in request.args else None
    t, rows, level = data.series(_redis(), name, HASH_GROUPS[name], start, stop, now, step)
    return json_response({"name": name, "start": start, "stop": stop, "step": level.step, "t": ints(t),
                          "values": {k: floats(v, 3) for k, v in rows.items()}})


QUERY_NAMES = ("occupancy", "cmos", "base", "nhit", "dispatcher")


@bp.get("/query")
@doc('Original minard: latest per-channel values, the nhit distribution, or the dispatcher read',
     params=[q('name', 'string', required=True, enum=['occupancy', 'cmos', 'base', 'nhit', 'dispatcher']), 'start', 'stop', q('window', 'string', 'occupancy/cmos/base: window ending now (default 60 s)'), q('seconds', 'string', 'nhit: last N seconds (default 60)'), q('trigger', 'string', 'nhit: trigger name (default TOTAL)')],
     ok={'type': 'object'},
     ok_description='occupancy/cmos/base: `values` maps lcn (string) -> value, channels without data absent (as `minard query NAME --json`); nhit: `values` per bin; dispatcher: `value` host:port or null',
     errors=(400,))
def query():
    """Original minard: latest per-channel values, the nhit distribution or the dispatcher name."""
    name = choice("name", request.args.get("name"), QUERY_NAMES)
    redis, now = _redis(), time.time()
    if name == "dispatcher":
        _only("name")
        return json_response({"name": name, "value": data.dispatcher_name(redis)})
    if name == "nhit":
        _only("name", "seconds", "trigger")
        seconds = parse_duration("seconds", request.args.get("seconds", "60"), 10, 30 * 86400)
        trig = choice("trigger", request.args.get("trigger"), NAMES, "TOTAL")
        view = data.nhit_view(redis, seconds, now, [trig])
        return json_response({"name": name, "trigger": trig, "seconds": seconds, "bin": view["bin"],
                              "nhit": view["nhit"].tolist(), "values": view["counts"][trig].tolist()})
    _only("name", "start", "stop", "window")
    start, stop = time_window(request.args, now, default=60)
    level = data.map_level(start, stop, now)
    values, _, _ = data.window_values(redis, name, start, stop, now, level)
    ok = np.flatnonzero(~np.isnan(values))
    vals = floats(values[ok], 5)
    return json_response({"name": name, "start": start, "stop": stop, "step": level.step,
                          "values": {str(i): v for i, v in zip(ok.tolist(), vals.tolist())}})


# ------------------------------------------------------------------ health, metrics, openapi

@bp.get("/healthz")
@doc('200 {ok: true, redis_ms, components} when Redis answers, else 503',
     ok={'type': 'object', 'properties': {'ok': {'type': 'boolean'}, 'redis_ms': {'type': 'number'}, 'components': {'type': 'object', 'additionalProperties': {'type': 'boolean'}}}},
     ok_description='healthy',
     errors=(503,))
def healthz():
    """200 if Redis answers (with the pipeline components alive), else 503."""
    redis = _redis()
    t0 = time.perf_counter()
    try:
        redis.ping()
    except Exception as exc:  # noqa: BLE001 - any Redis failure means "not healthy"
        return jsonify(ok=False, error=f"redis: {type(exc).__name__}"), 503
    ms = (time.perf_counter() - t0) * 1000
    comps = status.components(redis)
    return jsonify(ok=True, redis_ms=round(ms, 2),
                   components={n: bool(f.get("alive")) for n, f in comps.items()})


class PipelineCollector:
    """The pipeline as Redis shows it, for ``/metrics`` (built by the library at each scrape).

    Totals of every process (``stats:<stage>`` as ``minard_pipeline_*``),
    component heartbeats, trigger rates and the current run.  Each process's
    own counters are on its ``metrics_port_<program>`` (docs/operations.md).
    """

    def __init__(self, redis, now: float):
        self.redis, self.now = redis, now

    def collect(self):
        """The families; only ``minard_redis_up`` while Redis does not answer."""
        from prometheus_client.core import GaugeMetricFamily

        redis, now = self.redis, self.now
        try:
            redis.ping()
            up = 1
        except Exception:  # noqa: BLE001 - any Redis failure means "down"
            up = 0
        yield GaugeMetricFamily("minard_redis_up", "1 if Redis answers.", value=up)
        if not up:
            return
        yield from metrics_mod.stage_families("minard_pipeline", status.stats(redis))
        comps = status.components(redis, now)
        alive = GaugeMetricFamily("minard_component_up", "1 while the component's heartbeat is current.",
                                  labels=["component"])
        age = GaugeMetricFamily("minard_component_heartbeat_age_seconds", "Seconds since the last heartbeat.",
                                labels=["component"])
        for name, f in comps.items():
            alive.add_metric([name], int(bool(f.get("alive"))))
            if f.get("time"):
                age.add_metric([name], now - float(f["time"]))
        yield alive
        yield age
        rates = GaugeMetricFamily("minard_trigger_rate_hz", "Mean event rate per trigger type over the last 10 s.",
                                  labels=["trigger"])
        for name, rate in data.recent_rates(redis, now).items():
            rates.add_metric([name], rate)
        yield rates
        state = data.latest_state(redis, now)
        for key in ("run", "subrun", "gtid"):
            if state[key] is not None:
                yield GaugeMetricFamily(f"minard_current_{key}", f"The latest {key} seen.", value=state[key])


@bp.get("/metrics")
@doc('Prometheus text exposition of the pipeline in Redis (the totals of every process)',
     content='text/plain',
     ok_description='minard_redis_up, minard_pipeline_records_total{stage,outcome}, minard_pipeline_reason_records_total{stage,reason}, minard_pipeline_<unit>_total{stage}, minard_component_up{component}, minard_component_heartbeat_age_seconds{component}, minard_trigger_rate_hz{trigger}, minard_current_run/subrun/gtid; each process also serves its own on metrics_port_<program> (docs/operations.md)')
def metrics():
    """Prometheus text exposition of the pipeline in Redis: stage totals, heartbeats, trigger rates, run."""
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        generate_latest,
    )

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(_redis(), time.time()))
    return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


@bp.get("/openapi.json")
@doc('This document', ok=None, ok_description='OpenAPI 3')
def openapi():
    """The API's OpenAPI 3 document, generated from the views (docs/openapi.json is the same)."""
    from minard.web.openapi import document

    return json_response(document(current_app))
