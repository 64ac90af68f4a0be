"""Alarm KPIs against EEMUA 191, the shift handover summary, and their CLIs.

KPIs (:func:`kpis`) over the alarms raised in a period (default 24 h):

=================== ======================================== ====================
KPI                 how                                      EEMUA 191 target
=================== ======================================== ====================
alarms per 10 min   raised / number of 10-minute intervals   <= 1 (steady state)
peak per 10 min     most raised in one 10-minute interval    <= 10 (no flood)
time in flood       share of 10-minute intervals with > 10   < 1 %
chattering          alarms by name, most repeats first       none repeating > 5
standing alarms     still open and raised more than 24 h ago < 10
=================== ======================================== ====================

The handover (:func:`shift_summary`) lists what happened since the shift
started (by default when the current shifter was put on the roster, else
8 hours ago): alarms raised, acknowledged and shelved; shelves that expire in
the next 4 hours; runs awaiting sign-off when a run registry is available;
and the free-text note of ``minard:shift:note``.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import click
import numpy as np

from minard import config as config_mod
from minard.store import alarms, roster, schema

NOTE = schema.SHIFT_NOTE
TEN_MIN = 600.0
TARGETS = {"per_10min": 1.0, "peak_10min": 10, "flood_fraction": 0.01, "chatter_repeats": 5, "standing": 10}


def kpis(items: list[dict], now: float | None = None, period: float = 86400.0) -> dict:
    """EEMUA 191 KPIs of *items* (alarm views) raised in the last *period* seconds."""
    now = time.time() if now is None else now
    start = now - period
    raised = np.array([a["raised"] for a in items if a["raised"] and a["raised"] >= start], float)
    nbins = max(1, int(np.ceil(period / TEN_MIN)))
    counts = np.bincount(((raised - start) // TEN_MIN).astype(int).clip(0, nbins - 1), minlength=nbins)
    by_name: dict[str, int] = defaultdict(int)
    for a in items:
        if a["raised"] and a["last"] and a["last"] >= start:
            by_name[a["name"] or a["source"] or "?"] += a["count"]
    chatter = sorted(by_name.items(), key=lambda kv: -kv[1])[:5]
    standing = [a for a in items if a["state"] in alarms.OPEN_STATES and a["raised"]
                and now - a["raised"] > 86400]
    per = float(counts.mean())
    flood = float((counts > 10).mean())
    return {
        "period_hours": period / 3600, "raised": len(raised),
        "per_10min": round(per, 3), "peak_10min": int(counts.max()), "flood_fraction": round(flood, 4),
        "time_in_flood_minutes": int((counts > 10).sum()) * 10,
        "chattering": [{"name": n, "repeats": c} for n, c in chatter],
        "standing": [{"id": a["id"], "name": a["name"], "message": a["message"], "raised": a["raised"]}
                     for a in standing],
        "targets": TARGETS,
        "ok": {"per_10min": per <= TARGETS["per_10min"], "peak_10min": int(counts.max()) <= 10,
               "flood_fraction": flood < TARGETS["flood_fraction"],
               "chattering": all(c <= TARGETS["chatter_repeats"] for _, c in chatter),
               "standing": len(standing) < TARGETS["standing"]},
    }


def shift_start(r, now: float) -> float:
    """When the shift started: the current shifter's roster time, else 8 hours ago."""
    shifter = roster.show(r).get("shifter")
    return float(shifter["at"]) if shifter and shifter.get("at") else now - 8 * 3600


def _awaiting_signoff(r) -> list[dict] | None:
    """Runs awaiting data-quality sign-off, or None when no run registry is installed."""
    try:
        from minard.store import registry  # type: ignore[attr-defined]  # the data-quality issue's module
    except ImportError:
        return None
    fn = getattr(registry, "awaiting_signoff", None)
    return fn(r) if fn else None


def shift_summary(r, since: float | None = None, now: float | None = None, history_days: float = 30) -> dict:
    """What the next shift needs to know (see the module docstring)."""
    now = time.time() if now is None else now
    since = shift_start(r, now) if since is None else since
    items = alarms.list_alarms(r, now, limit=1000, history_days=history_days)
    brief = lambda a: {k: a[k] for k in ("id", "name", "priority", "state", "message", "raised", "acknowledged",
                                         "ack_by", "ack_comment", "shelved", "shelved_until", "shelved_by",
                                         "shelve_comment", "count")}
    raw = r.get(NOTE)
    return {
        "since": since, "now": now, "roster": roster.show(r),
        "raised": [brief(a) for a in items if a["raised"] and a["raised"] >= since],
        "acknowledged": [brief(a) for a in items if a["acknowledged"] and a["acknowledged"] >= since],
        "shelved": [brief(a) for a in items if a["shelved"] and a["shelved"] >= since],
        "shelves_expiring": [brief(a) for a in items if a["state"] == "shelved"
                             and a["shelved_until"] and a["shelved_until"] <= now + 4 * 3600],
        "open": [brief(a) for a in items if a["state"] in ("unacknowledged", "rtn_unacknowledged", "latched")],
        "awaiting_signoff": _awaiting_signoff(r),
        "note": json.loads(raw) if raw else None,
    }


def set_note(r, text: str, who: str, now: float | None = None) -> None:
    """The shift's free-text handover note (at most 5000 characters)."""
    r.set(NOTE, json.dumps({"text": str(text)[:5000], "by": who, "at": time.time() if now is None else now}))


def _t(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def markdown(s: dict) -> str:
    """The summary as Markdown, paste-ready for the e-log."""
    out = [f"## Shift summary {_t(s['since'])} – {_t(s['now'])}", ""]
    people = [f"{role}: {p['name']}" for role, p in s["roster"].items() if p]
    if people:
        out += ["On duty: " + ", ".join(people), ""]

    def section(title, rows, fmt):
        out.append(f"### {title} ({len(rows)})")
        out.extend(f"- {fmt(a)}" for a in rows) if rows else out.append("- none")
        out.append("")

    clean = lambda text: str(text).replace("\n", " ")
    section("Alarms raised", s["raised"], lambda a: f"#{a['id']} {_t(a['raised'])} **{a['priority']}** "
            f"{a['name'] or ''} {clean(a['message'])} ({a['state'].replace('_', ' ')}, ×{a['count']})")
    section("Acknowledged", s["acknowledged"], lambda a: f"#{a['id']} {_t(a['acknowledged'])} by {a['ack_by']}"
            f"{': ' + clean(a['ack_comment']) if a['ack_comment'] else ''} — {clean(a['message'])}")
    section("Shelved", s["shelved"], lambda a: f"#{a['id']} by {a['shelved_by']} until {_t(a['shelved_until'])}"
            f"{': ' + clean(a['shelve_comment']) if a['shelve_comment'] else ''} — {clean(a['message'])}")
    section("Shelves expiring in the next 4 hours", s["shelves_expiring"],
            lambda a: f"#{a['id']} at {_t(a['shelved_until'])} — {clean(a['message'])}")
    section("Still open", s["open"], lambda a: f"#{a['id']} **{a['priority']}** {a['state'].replace('_', ' ')} — "
            f"{clean(a['message'])}")
    if s["awaiting_signoff"] is None:
        out += ["### Runs awaiting sign-off", "- (no run registry installed)", ""]
    else:
        section("Runs awaiting sign-off", s["awaiting_signoff"], lambda run: str(run.get("run", run)))
    out += ["### Note", s["note"]["text"] if s["note"] else "(none)", ""]
    return "\n".join(out)


def _redis(cfg):
    """The command-line tools' Redis client (role ``admin``)."""
    from minard.store import connection

    return connection.redis(cfg, "admin")


def _since(text: str | None, now: float) -> float | None:
    """``--since``: Unix seconds, ``YYYY-MM-DD HH:MM`` (local) or ``8h``/``90m`` ago."""
    if not text:
        return None
    t = text.strip()
    try:
        if t[-1] in "hm" and t[:-1].replace(".", "", 1).isdigit():
            return now - float(t[:-1]) * (3600 if t[-1] == "h" else 60)
        if t.replace(".", "", 1).isdigit():
            return float(t)
        return time.mktime(time.strptime(t, "%Y-%m-%d %H:%M"))
    except ValueError:
        raise click.BadParameter("use Unix seconds, 'YYYY-MM-DD HH:MM' or an age like 8h / 90m") from None


@click.group("shift")
def shift_cli():
    """Shift handover: summary of alarms since the shift started, and the handover note."""


@shift_cli.command("summary")
@click.option("--since", "since_text", default=None, help="Start: Unix s, 'YYYY-MM-DD HH:MM' or 8h (default: shift start).")
@click.option("--markdown", "as_markdown", is_flag=True, help="Markdown for the e-log instead of JSON.")
@config_mod.pass_config
def shift_summary_cmd(cfg, since_text, as_markdown):
    """Alarms raised, acknowledged and shelved since the shift started; shelves expiring soon."""
    r = _redis(cfg)
    now = time.time()
    s = shift_summary(r, _since(since_text, now), now, float(cfg["alarm_history_days"]))
    click.echo(markdown(s) if as_markdown else json.dumps(s))


@shift_cli.command("note")
@click.argument("text")
@config_mod.pass_config
def shift_note_cmd(cfg, text):
    """Set the handover note."""
    r = _redis(cfg)
    set_note(r, text, "cli")


@click.group("alarms")
def alarms_cli():
    """List alarms; set suppression flags; take alarm definitions out of service."""


@alarms_cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array of alarm objects.")
@click.option("--state", default=None, type=click.Choice(alarms.STATES), help="Only alarms in this state.")
@click.option("--limit", type=int, default=200, show_default=True)
@config_mod.pass_config
def alarms_list(cfg, as_json, state, limit):
    """Alarms, newest first: id, name, priority, state, raised/acknowledged/shelved times."""
    r = _redis(cfg)
    items = alarms.list_alarms(r, limit=limit, history_days=float(cfg["alarm_history_days"]))
    if state:
        items = [a for a in items if a["state"] == state]
    if as_json:
        click.echo(json.dumps(items))
        return
    for a in items:
        click.echo(f"{a['id']:>6} {a['priority']:<8} {a['state']:<18} {_t(a['raised'])} {a['name'] or a['source']:<18} "
                   f"{a['message'][:80]}")


@alarms_cli.command("kpi")
@click.option("--hours", type=float, default=24.0, show_default=True)
@config_mod.pass_config
def alarms_kpi(cfg, hours):
    """Alarm KPIs of the last HOURS against the EEMUA 191 targets (JSON)."""
    r = _redis(cfg)
    items = alarms.list_alarms(r, limit=5000, history_days=float(cfg["alarm_history_days"]))
    click.echo(json.dumps(kpis(items, period=hours * 3600)))


@alarms_cli.command("flag")
@click.argument("flag")
@click.option("--off", is_flag=True, help="Remove the flag instead of setting it.")
@click.option("--comment", default="")
@config_mod.pass_config
def alarms_flag(cfg, flag, off, comment):
    """Set a suppression flag (crate:N = crate N out of service, run_type:NAME)."""
    r = _redis(cfg)
    if not flag or len(flag) > 64 or not all(c.isalnum() or c in ":_-." for c in flag):
        raise click.BadParameter("flags are letters, digits and : _ - . (e.g. crate:3)")
    alarms.set_flag(r, flag, "cli", not off, comment)
    click.echo(f"{flag} {'removed' if off else 'set'}")


@alarms_cli.command("oos")
@click.argument("name")
@click.option("--off", is_flag=True, help="Back into service.")
@click.option("--comment", default="")
@config_mod.pass_config
def alarms_oos(cfg, name, off, comment):
    """Take the alarm definition NAME out of service (its alarms show as out_of_service)."""
    r = _redis(cfg)
    alarms.set_out_of_service(r, name, "cli", not off, comment)
    click.echo(f"{name} {'in service' if off else 'out of service'}")
