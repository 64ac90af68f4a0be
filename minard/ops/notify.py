"""Alarm notifications: email (SMTP) and chat webhook to the on-call roster, with escalation.

``minard notifier`` scans the alarms every ``notify_period`` seconds.  An
alarm of a priority in ``notify_priorities`` that is unacknowledged (not
shelved, suppressed or out of service) notifies

* the **shifter** at once, again at most every ``notify_interval`` seconds
  while it stays unacknowledged;
* the **expert** once it has stayed unacknowledged ``notify_escalate_minutes``
  (escalation), with the same rate limit;
* the **supernova** expert too for ``supernova_burst``.

Each message goes by email to the person's address (SMTP ``smtp_host:port``,
STARTTLS whenever the server offers it, login with ``smtp_user`` and the
password in ``smtp_password_file`` only over TLS) and as one HTTP POST
``{"text": ...}`` to ``notify_webhook_url`` (Mattermost/Slack incoming
webhooks).  Every delivery is written to the alarm's transition log; a
failed delivery is logged and retried on the next scan, never fatal.

Redis: ``minard:notify:sent`` hash ``ALARM:ROLE`` -> time of the last message.
"""

from __future__ import annotations

import json
import logging
import signal
import smtplib
import ssl
import threading
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path

import click

from minard import config as config_mod
from minard.store import alarms, roster, schema

log = logging.getLogger("minard.ops.notify")

SENT = schema.NOTIFY_SENT
BURST = "supernova_burst"


def _priorities(cfg) -> set[str]:
    return {p.strip() for p in str(cfg["notify_priorities"]).split(",") if p.strip()}


def recipients(cfg, alarm: dict, now: float) -> list[str]:
    """Roles an unacknowledged alarm should reach now (before rate limiting)."""
    if alarm["state"] not in ("unacknowledged", "rtn_unacknowledged"):
        return []
    if alarm["priority"] not in _priorities(cfg) and alarm["name"] != BURST:
        return []
    roles = ["shifter"]
    if alarm["name"] == BURST:
        roles.append("supernova")
    raised = alarm["raised"] or now
    if now - raised >= float(cfg["notify_escalate_minutes"]) * 60:
        roles.append("expert")
    return roles


def text_of(alarm: dict, role: str, site: str = "") -> tuple[str, str]:
    """(subject, body) of the message about *alarm* to *role*."""
    title = roster.ROLE_TITLES[role]
    subject = f"[minard {alarm['priority'].upper()}] {alarm['name'] or alarm['source']}: {alarm['message'][:120]}"
    lines = [f"{title}: alarm {alarm['id']} is {alarm['state'].replace('_', ' ')}.",
             f"Priority: {alarm['priority']}", f"Message: {alarm['message']}",
             f"Raised: {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(alarm['raised'] or 0))}",
             f"Count: {alarm['count']}"]
    if role == "expert":
        lines.insert(0, "ESCALATED: nobody has acknowledged this alarm.")
    if alarm.get("guidance"):
        lines.append(f"What to do: {alarm['guidance']}")
    if site:
        lines.append(f"Alarms page: {site.rstrip('/')}/alarms")
    return subject, "\n".join(lines)


def send_email(cfg, to: str, subject: str, body: str) -> None:
    """One mail through smtp_host; STARTTLS when offered; raises OSError/SMTPException on failure."""
    msg = EmailMessage()
    msg["From"] = str(cfg["smtp_from"])
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    timeout = float(cfg["notify_timeout"])
    with smtplib.SMTP(str(cfg["smtp_host"]), int(cfg["smtp_port"]), timeout=timeout) as smtp:
        smtp.ehlo()
        tls = False
        if smtp.has_extn("starttls"):
            smtp.starttls(context=ssl.create_default_context())
            smtp.ehlo()
            tls = True
        if cfg["smtp_user"]:
            if not tls:
                raise smtplib.SMTPException("the server offers no STARTTLS: refusing to send the password in clear")
            smtp.login(str(cfg["smtp_user"]), _password(cfg))
        smtp.send_message(msg)


def _password(cfg) -> str:
    """The SMTP password from smtp_password_file (never logged)."""
    path = config_mod.Config(cfg).path("smtp_password_file")
    return Path(path).read_text(encoding="utf-8").strip()


def send_webhook(cfg, text: str) -> None:
    """POST ``{"text": text}`` to notify_webhook_url; raises OSError on failure or a non-2xx answer."""
    url = str(cfg["notify_webhook_url"])
    if not url.startswith(("http://", "https://")):
        raise OSError("notify_webhook_url must be an http(s) URL")
    req = urllib.request.Request(url, data=json.dumps({"text": text}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=float(cfg["notify_timeout"])) as resp:
        if not 200 <= resp.status < 300:
            raise OSError(f"webhook answered {resp.status}")


def deliver(cfg, role: str, person: dict | None, subject: str, body: str) -> list[str]:
    """Send one message by every configured channel; returns the channels that worked."""
    done = []
    if cfg["smtp_host"] and person and person.get("email"):
        try:
            send_email(cfg, person["email"], subject, body)
            done.append("email")
        except (OSError, smtplib.SMTPException) as exc:
            log.warning("email to %s (%s) failed: %s", role, person["name"], type(exc).__name__)
    if cfg["notify_webhook_url"]:
        who = f"@{person['name']} " if person else ""
        try:
            send_webhook(cfg, f"{who}{subject}\n{body}")
            done.append("webhook")
        except OSError as exc:
            log.warning("webhook for %s failed: %s", role, type(exc).__name__)
    return done


def notify_once(cfg, r, now: float | None = None, guidance: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """One scan: send what is due; returns (alarm id, role) of the messages sent."""
    now = time.time() if now is None else now
    interval = float(cfg["notify_interval"])
    people = roster.show(r)
    sent_at = {k.decode(): float(v) for k, v in r.hgetall(SENT).items()}
    out = []
    for a in alarms.list_alarms(r, now, limit=500, history_days=float(cfg["alarm_history_days"])):
        for role in recipients(cfg, a, now):
            key = f"{a['id']}:{role}"
            if now - sent_at.get(key, -1e18) < interval:
                continue  # rate limit: one message per alarm and role per interval
            a["guidance"] = (guidance or {}).get(a["name"], "")
            subject, body = text_of(a, role)
            channels = deliver(cfg, role, people.get(role), subject, body)
            if not channels:
                continue
            r.hset(SENT, key, repr(now))
            person = people.get(role)
            alarms.record(r, a["id"], "escalated to expert" if role == "expert" else f"notified {role}",
                          "notifier", f"{person['name'] if person else role} by {', '.join(channels)}", now,
                          float(cfg["alarm_history_days"]))
            out.append((a["id"], role))
    return out


def send_test(cfg, r, who: str) -> dict[str, list[str]]:
    """A test message to every role on the roster (and the webhook); role -> channels that worked."""
    result = {}
    for role, person in roster.show(r).items():
        if person is None:
            continue
        subject = f"[minard TEST] notification test by {who}"
        body = f"This is a test of minard's notifications for {roster.ROLE_TITLES[role]} {person['name']}."
        result[role] = deliver(cfg, role, person, subject, body)
    return result


def _guidance(cfg) -> dict[str, str]:
    from minard.ops import alarmdefs

    try:
        return {n: d.guidance for n, d in alarmdefs.load(cfg).items()}
    except (OSError, ValueError):
        return {}


class Notifier:
    """The ``minard notifier`` loop (SIGTERM stops it between scans)."""

    def __init__(self, cfg, redis=None):
        from minard.store import connection

        self.cfg = cfg
        self.redis = redis or connection.redis(cfg, "logserver")
        self.stop_event = threading.Event()
        self.failing = False
        self.started = time.time()
        self.sent = 0
        self.scans = 0  # completed scans (tests wait on it)

    def stop(self, *_args) -> None:
        self.stop_event.set()

    def run(self) -> None:
        from minard.store import status

        log.info("notifier started: priorities %s, interval %g s, escalation after %g min",
                 self.cfg["notify_priorities"], float(self.cfg["notify_interval"]),
                 float(self.cfg["notify_escalate_minutes"]))
        while not self.stop_event.is_set():
            try:
                self.sent += len(notify_once(self.cfg, self.redis, guidance=_guidance(self.cfg)))
                self.scans += 1
                pipe = self.redis.pipeline()
                status.beat(pipe, "notifier", {"sent": self.sent}, started=self.started)
                pipe.execute()
                if self.failing:
                    log.info("Redis is back")
                self.failing = False
            except Exception as exc:  # noqa: BLE001 - Redis down or a bad alarm: retry next period
                if not self.failing:
                    log.warning("notifier scan failed: %s: %s", type(exc).__name__, exc)
                self.failing = True
            self.stop_event.wait(float(self.cfg["notify_period"]))
        log.info("notifier stopped (%d messages sent)", self.sent)


@click.command("notifier")
@config_mod.pass_config
def notifier_cmd(cfg):
    """Send alarm notifications (email, webhook) to the on-call roster; escalate."""
    n = Notifier(cfg)
    from minard import metrics

    metrics.serve(cfg, "notifier", metrics.Snapshot("minard_notifier", lambda: {
        "messages": n.sent, "failing": n.failing}, counters=("messages",),
        help={"messages": "Notifications sent (email or webhook).", "failing": "1 while the alarm scan fails."}))
    signal.signal(signal.SIGTERM, n.stop)
    signal.signal(signal.SIGINT, n.stop)
    n.run()


def _redis(cfg):
    """The command-line tools' Redis client (role ``admin``)."""
    from minard.store import connection

    return connection.redis(cfg, "admin")


@click.group("roster")
def roster_cli():
    """Show or set the on-call roster (roles: shifter, expert, supernova)."""


@roster_cli.command("set")
@click.argument("role", type=click.Choice(roster.ROLES))
@click.argument("name")
@click.option("--email", default="", help="Address notifications are mailed to.")
@config_mod.pass_config
def roster_set(cfg, role, name, email):
    """Put NAME on duty as ROLE."""
    r = _redis(cfg)
    try:
        roster.set_person(r, role, name, email, who="cli")
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{role}: {name}{' <' + email + '>' if email else ''}")


@roster_cli.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object role -> {name, email} or null.")
@config_mod.pass_config
def roster_show(cfg, as_json):
    """Who is on duty in each role."""
    r = _redis(cfg)
    people = roster.show(r)
    if as_json:
        click.echo(json.dumps(people))
        return
    for role, p in people.items():
        click.echo(f"{role:<10} {(p['name'] + (' <' + p['email'] + '>' if p['email'] else '')) if p else '-'}")


@roster_cli.command("test")
@config_mod.pass_config
def roster_test(cfg):
    """Send a test notification to everyone on the roster."""
    r = _redis(cfg)
    for role, channels in send_test(cfg, r, "cli").items():
        click.echo(f"{role:<10} {', '.join(channels) or 'FAILED (see the log)'}")
