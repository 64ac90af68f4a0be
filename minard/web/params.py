"""Parsing and validation of the website's query parameters.

Every helper raises :class:`ParamError` with a message naming the parameter;
the API blueprint turns it into ``400 {"error": "..."}``.  No request value
is ever used before passing through one of these functions.

Time parameters (``start``, ``stop``) accept

* Unix seconds (``1700000000`` or ``1700000000.5``),
* seconds relative to now when negative (``-600`` = ten minutes ago),
* ISO 8601 (``2024-05-01T12:00:00``, ``...Z`` or ``...+02:00``; no offset
  means UTC).

Durations (``window``, ``seconds``, ``step``) accept seconds or a number with
a unit ``s``, ``m``, ``h``, ``d``, ``w``, ``y`` (``10m``, ``1d``, ``1y``).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

from minard.formats.detector import NCARDS, NCHANNELS, NCHANNELS_TOTAL, NCRATES

#: Shortest and longest time window a view may show.
MIN_WINDOW = 10.0
MAX_WINDOW = 400 * 86400.0
#: Oldest data any level keeps (SCALAR_LEVELS' longest retention).
MAX_AGE = 800 * 86400.0
DEFAULT_WINDOW = 600.0
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
# ASCII digits only: Python's \d and int() also accept other scripts' digits ("²", "٣").
_DURATION = re.compile(r"^[ ]*([0-9]{1,12}(?:\.[0-9]{1,9})?)[ ]*([smhdwy]?)[ ]*$")
_NUMBER = re.compile(r"^[+-]?[0-9]{1,12}(?:\.[0-9]{1,9})?$")
_INTEGER = re.compile(r"[+-]?[0-9]{1,20}")


class ParamError(ValueError):
    """A missing or invalid request parameter (answered with HTTP 400)."""


def parse_duration(name: str, text: str, low: float = MIN_WINDOW, high: float = MAX_WINDOW) -> float:
    """Seconds from ``600``, ``10m``, ``1d``...; within [low, high]."""
    m = _DURATION.fullmatch(text or "")
    if not m:
        raise ParamError(f"{name} must be a duration such as 600, 10m, 2h, 1d or 1y (got {text!r})")
    seconds = float(m.group(1)) * UNITS[m.group(2) or "s"]
    if not low <= seconds <= high:
        raise ParamError(f"{name} must be between {fmt_duration(low)} and {fmt_duration(high)}")
    return seconds


def fmt_duration(seconds: float) -> str:
    """A duration in the largest unit that divides it (``600`` -> ``10m``)."""
    for unit in ("y", "d", "h", "m"):
        if seconds >= UNITS[unit] and seconds % UNITS[unit] == 0:
            return f"{int(seconds // UNITS[unit])}{unit}"
    return f"{seconds:g}s"


def parse_time(name: str, text: str, now: float) -> float:
    """Unix seconds from epoch seconds, negative relative seconds or ISO 8601."""
    text = (text or "").strip()
    if not text:
        raise ParamError(f"{name} is empty")
    if not text.isascii():
        raise ParamError(f"{name} must be written in ASCII (got {text[:40]!r})")
    if _NUMBER.fullmatch(text):
        value = float(text)
        t = now + value if value < 0 else value
    else:
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ParamError(f"{name} must be Unix seconds, negative seconds from now or ISO 8601"
                             f" (got {text[:40]!r})") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        t = dt.timestamp()
    if not math.isfinite(t) or t < now - MAX_AGE or t > now + 86400:
        raise ParamError(f"{name} is outside the data kept (the last {int(MAX_AGE // 86400)} days)")
    return t


def time_window(args, now: float, default: float = DEFAULT_WINDOW,
                low: float = MIN_WINDOW, high: float = MAX_WINDOW) -> tuple[float, float]:
    """(start, stop) from ``start``/``stop``/``window`` query parameters.

    ``start`` and ``stop`` give the window exactly; ``start`` alone runs to
    now (or ``window`` after it); otherwise ``window`` (default *default*)
    ends at ``stop`` (default now).
    """
    stop = parse_time("stop", args["stop"], now) if "stop" in args else None
    start = parse_time("start", args["start"], now) if "start" in args else None
    window = parse_duration("window", args["window"], low, high) if "window" in args else None
    if start is not None and stop is not None:
        if window is not None:
            raise ParamError("give at most two of start, stop and window")
    elif start is not None:
        stop = now if window is None else start + window
    else:
        stop = now if stop is None else stop
        start = stop - (window or default)
    if stop <= start:
        raise ParamError("stop must be after start")
    if not low <= stop - start <= high:
        raise ParamError(f"the window must be between {fmt_duration(low)} and {fmt_duration(high)}")
    if start < now - MAX_AGE:
        raise ParamError(f"start is outside the data kept (the last {int(MAX_AGE // 86400)} days)")
    return start, stop


def parse_int(name: str, text: str | None, low: int, high: int, default: int | None = None) -> int:
    """An integer parameter within [low, high]; *default* when absent."""
    if text is None or text == "":
        if default is None:
            raise ParamError(f"missing parameter {name}")
        return default
    text = text.strip(" ")
    if not _INTEGER.fullmatch(text):
        raise ParamError(f"{name} must be an integer written in ASCII digits (got {text[:40]!r})")
    value = int(text)
    if not low <= value <= high:
        raise ParamError(f"{name} must be between {low} and {high}")
    return value


def choice(name: str, text: str | None, allowed, default: str | None = None) -> str:
    """One of *allowed* (exact match); *default* when absent."""
    if text is None or text == "":
        if default is None:
            raise ParamError(f"missing parameter {name} (one of {', '.join(allowed)})")
        return default
    if text not in allowed:
        raise ParamError(f"{name} must be one of {', '.join(allowed)} (got {text[:40]!r})")
    return text


def names_list(name: str, text: str | None, allowed, default) -> list[str]:
    """A comma-separated subset of *allowed*, or *default* when absent."""
    if text is None or text == "":
        return list(default)
    out = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in out if t not in allowed]
    if bad or not out:
        raise ParamError(f"{name}: unknown name {bad[0][:40]!r}" if bad else f"{name} is empty")
    return list(dict.fromkeys(out))


def parse_lcn(text: str) -> int:
    """A channel index ``crate*512 + card*32 + channel`` (0..9727)."""
    return parse_int("channel", text, 0, NCHANNELS_TOTAL - 1)


def lcn_parts(lcn: int) -> dict[str, int]:
    """crate, card and channel of channel index *lcn*."""
    crate, rest = divmod(int(lcn), NCARDS * NCHANNELS)
    card, channel = divmod(rest, NCHANNELS)
    return {"lcn": int(lcn), "crate": crate, "card": card, "channel": channel}


def crate_card(args) -> tuple[int | None, int | None]:
    """Optional ``crate`` (0..19) and ``card`` (0..15, needs crate) selection."""
    crate = parse_int("crate", args.get("crate"), 0, NCRATES - 1, -1)
    card = parse_int("card", args.get("card"), 0, NCARDS - 1, -1)
    if card >= 0 and crate < 0:
        raise ParamError("card needs crate")
    return (crate if crate >= 0 else None), (card if card >= 0 else None)


def output_format(args) -> str:
    """``json`` (default) or ``csv``."""
    return choice("format", args.get("format"), ("json", "csv"), "json")


def local_path(text: str | None) -> str | None:
    r"""*text* if it is a path of this site to redirect to after a form, else None.

    Accepts only ``/something`` made of printable ASCII: no scheme, no host
    (``//host``, ``/\host``, ``/<TAB>/host``: browsers drop tabs and newlines and
    read a backslash as a slash), no control or non-ASCII characters.
    """
    if not text or not isinstance(text, str) or len(text) > 2000:
        return None
    if not text.isascii() or not text.isprintable() or any(c in text for c in "\\ "):
        return None
    if not text.startswith("/") or text.startswith("//"):
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme or parts.netloc:
        return None
    return text


def int_arg(args, name: str, low: int, high: int, default: int | None = None) -> int:
    """Integer query or form parameter *name* of *args* (a MultiDict) within [low, high].

    A repeated parameter is an error rather than a silent choice of one copy.
    """
    values = args.getlist(name) if hasattr(args, "getlist") else [args.get(name)]
    if len(values) > 1:
        raise ParamError(f"{name} is given {len(values)} times")
    return parse_int(name, values[0] if values else None, low, high, default)
