"""Notifications against a real SMTP server (aiosmtpd) and a real HTTP receiver on loopback.

The notifier runs its real loop in a thread; the tests assert delivery
within seconds, the per-alarm rate limit, escalation to the expert after the
configured time unacknowledged, the supernova role for bursts, and the CLI.
"""

from __future__ import annotations

import json
import threading
import time
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner
from conftest import wait_for

from minard.cli import main
from minard.ops import notify
from minard.store import alarms, roster, schema
from minard.testing import free_port


class Inbox:
    """aiosmtpd handler keeping every message received."""

    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        msg = message_from_bytes(envelope.content)
        self.messages.append({"to": envelope.rcpt_tos, "subject": msg["Subject"], "body": msg.get_payload()})
        return "250 OK"

    def to(self, addr):
        return [m for m in self.messages if addr in m["to"]]


@pytest.fixture
def smtp():
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller.port, inbox
    controller.stop()


@pytest.fixture
def webhook():
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hooks/abc", received
    server.shutdown()
    server.server_close()


@pytest.fixture
def notifier(cfg, redis_client, smtp, webhook):
    """The notifier loop in a thread: period 0.1 s, escalation after 3 s, interval 600 s."""
    cfg.update(smtp_host="127.0.0.1", smtp_port=smtp[0], notify_webhook_url=webhook[0], notify_period=0.1,
               notify_escalate_minutes=0.05, notify_interval=600.0)
    roster.set_person(redis_client, "shifter", "Alice", "alice@example.org")
    roster.set_person(redis_client, "expert", "Bob", "bob@example.org")
    roster.set_person(redis_client, "supernova", "Carol", "carol@example.org")
    n = notify.Notifier(cfg, redis_client)
    thread = threading.Thread(target=n.run)
    thread.start()
    yield n
    n.stop()
    thread.join(5)
    assert not thread.is_alive()


def test_critical_alarm_reaches_the_shifter_by_email_and_webhook_within_seconds(
        redis_client, smtp, webhook, notifier):
    _port, inbox = smtp
    t0 = time.monotonic()
    i = alarms.raise_alarm(redis_client, 40, "crate 3 HV trip", name="hv_trip", priority="critical")
    mail = wait_for(lambda: inbox.to("alice@example.org"), timeout=5, what="the shifter's mail")
    assert time.monotonic() - t0 < 3
    assert "[minard CRITICAL] hv_trip: crate 3 HV trip" == mail[0]["subject"]
    hook = wait_for(lambda: webhook[1], timeout=5, what="the webhook post")
    assert hook[0]["text"].startswith("@Alice [minard CRITICAL]")
    log = alarms.transitions(redis_client, i)
    assert any(e["action"] == "notified shifter" and "email, webhook" in e["comment"] for e in log)


def test_repeats_are_rate_limited_and_escalate_to_the_expert_when_unacknowledged(redis_client, smtp, notifier):
    _port, inbox = smtp
    t0 = time.monotonic()
    i = alarms.raise_alarm(redis_client, 40, "lag", name="lag", priority="high", key="k")
    wait_for(lambda: inbox.to("alice@example.org"), timeout=5)
    for _ in range(20):  # the same alarm again and again: no new mail within notify_interval
        assert alarms.raise_alarm(redis_client, 40, "lag", name="lag", priority="high", key="k") == i
    esc = wait_for(lambda: inbox.to("bob@example.org"), timeout=8, what="escalation to the expert")
    assert time.monotonic() - t0 >= 2.5
    assert "ESCALATED" in esc[0]["body"]
    scans = notifier.scans
    wait_for(lambda: notifier.scans >= scans + 5, timeout=10, what="five more scans")
    assert len(inbox.to("alice@example.org")) == 1 and len(inbox.to("bob@example.org")) == 1
    assert not inbox.to("carol@example.org")


def test_acknowledged_and_low_priority_alarms_notify_nobody(cfg, redis_client, smtp):
    cfg.update(smtp_host="127.0.0.1", smtp_port=smtp[0])
    roster.set_person(redis_client, "shifter", "Alice", "alice@example.org")
    i = alarms.raise_alarm(redis_client, 40, "x", name="x", priority="high")
    alarms.acknowledge(redis_client, i, "alice")
    alarms.raise_alarm(redis_client, 30, "y", name="y", priority="medium")
    k = alarms.raise_alarm(redis_client, 40, "s", name="s", priority="high")
    alarms.shelve(redis_client, k, "alice", time.time() + 600)
    j = alarms.raise_alarm(redis_client, 40, "z", name="z", priority="high")
    assert notify.notify_once(cfg, redis_client) == [(j, "shifter")]
    assert [m["subject"] for m in smtp[1].messages] == ["[minard HIGH] z: z"]


def test_supernova_burst_also_notifies_the_supernova_expert(redis_client, smtp, notifier):
    _port, inbox = smtp
    alarms.raise_alarm(redis_client, 40, "burst in run 5", name="supernova_burst", priority="critical",
                       source="burst")
    wait_for(lambda: inbox.to("carol@example.org") and inbox.to("alice@example.org"), timeout=5)


def test_a_dead_mail_server_is_logged_and_retried_not_fatal(cfg, redis_client, webhook, caplog):
    cfg.update(smtp_host="127.0.0.1", smtp_port=free_port(), notify_webhook_url="", notify_timeout=1.0)
    roster.set_person(redis_client, "shifter", "Alice", "alice@example.org")
    alarms.raise_alarm(redis_client, 40, "x", priority="high")
    assert notify.notify_once(cfg, redis_client) == []
    assert "email to shifter (Alice) failed" in caplog.text
    cfg["notify_webhook_url"] = webhook[0]
    assert len(notify.notify_once(cfg, redis_client)) == 1  # retried on the next scan


def test_test_notification_reaches_everyone_on_the_roster(cfg, redis_client, smtp):
    cfg.update(smtp_host="127.0.0.1", smtp_port=smtp[0])
    roster.set_person(redis_client, "shifter", "Alice", "alice@example.org")
    roster.set_person(redis_client, "expert", "Bob", "bob@example.org")
    assert notify.send_test(cfg, redis_client, "alice") == {"shifter": ["email"], "expert": ["email"]}
    assert {m["to"][0] for m in smtp[1].messages} == {"alice@example.org", "bob@example.org"}


def test_roster_cli_sets_and_shows_json(redis_url, redis_client):
    env = {"MINARD_REDIS_URL": redis_url}
    r = CliRunner().invoke(main, ["roster", "set", "expert", "Bob Smith", "--email", "bob@example.org"], env=env)
    assert r.exit_code == 0, r.output
    bad = CliRunner().invoke(main, ["roster", "set", "expert", "Bob", "--email", "not-an-address"], env=env)
    assert bad.exit_code != 0 and "not an email address" in bad.output
    shown = json.loads(CliRunner().invoke(main, ["roster", "show", "--json"], env=env).output)
    assert shown["expert"]["name"] == "Bob Smith" and shown["expert"]["email"] == "bob@example.org"
    assert shown["shifter"] is None and set(shown) == {"shifter", "expert", "supernova"}


def test_starttls_is_used_when_offered_and_the_password_goes_only_over_tls(cfg, redis_client, tmp_path, monkeypatch):
    """aiosmtpd with STARTTLS (self-signed cert for 127.0.0.1, trusted via SSL_CERT_FILE) and AUTH."""
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    seen = {}

    def authenticator(server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult

        seen["tls"] = session.ssl is not None
        seen["login"] = (auth_data.login, auth_data.password)
        return AuthResult(success=auth_data.password == b"s3cret")

    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port(), tls_context=tls, require_starttls=True,
                            authenticator=authenticator, auth_require_tls=True)
    controller.start()
    try:
        pw = tmp_path / "smtp_password"
        pw.write_text("s3cret\n")
        pw.chmod(0o600)
        cfg.update(smtp_host="127.0.0.1", smtp_port=controller.port, smtp_user="minard",
                   smtp_password_file=str(pw))
        notify.send_email(cfg, "alice@example.org", "subject", "body")
        assert seen == {"tls": True, "login": (b"minard", b"s3cret")}
        assert inbox.to("alice@example.org")[0]["subject"] == "subject"
    finally:
        controller.stop()


def test_a_password_is_never_sent_to_a_server_without_starttls(cfg, smtp, tmp_path):
    import smtplib

    pw = tmp_path / "smtp_password"
    pw.write_text("s3cret\n")
    cfg.update(smtp_host="127.0.0.1", smtp_port=smtp[0], smtp_user="minard", smtp_password_file=str(pw))
    with pytest.raises(smtplib.SMTPException, match="no STARTTLS"):
        notify.send_email(cfg, "alice@example.org", "subject", "body")
    assert smtp[1].messages == []


def test_the_notifier_process_mails_serves_metrics_and_stops_on_sigterm(redis_url, redis_client, smtp, tmp_path):
    """``minard notifier`` as supervisord runs it: a real process, its log on stderr, /metrics."""
    import os
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    from minard.testing import stop_pid, wait_port

    port, inbox = smtp
    mport = free_port()
    roster.set_person(redis_client, "shifter", "Alice", "alice@example.org")
    env = {**os.environ, "MINARD_REDIS_URL": redis_url, "MINARD_SMTP_HOST": "127.0.0.1",
           "MINARD_SMTP_PORT": str(port), "MINARD_NOTIFY_PERIOD": "0.2", "MINARD_METRICS_PORT_NOTIFIER": str(mport),
           "MINARD_VAR_DIR": str(tmp_path)}
    err = open(tmp_path / "notifier.err", "wb")  # noqa: SIM115 - open while the process runs
    proc = subprocess.Popen([str(Path(sys.executable).parent / "minard"), "notifier"], env=env,
                            stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_port(mport, timeout=15)
        alarms.raise_alarm(redis_client, 40, "dispatcher down", name="dispatcher_down", priority="high")
        wait_for(lambda: inbox.to("alice@example.org"), timeout=10, what="the mail")

        def sent():
            text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
            return "minard_notifier_messages_total 1.0" in text
        wait_for(sent, timeout=10, what="the metrics")
        assert wait_for(lambda: redis_client.hget(schema.STATUS.key(component="notifier"), "sent") == b"1", timeout=5)
    finally:
        assert stop_pid(proc) == 0
        err.close()
    log = (tmp_path / "notifier.err").read_text()
    assert "notifier started" in log and "notifier stopped (1 messages sent)" in log
