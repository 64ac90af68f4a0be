"""Data-quality commands: ``minard dq``, ``minard runs sign|type|reference|registry``,
``minard channels``, and the live checker ``minard dq-live``.

``minard dq RUN [--reference REF] --json`` judges a run from the aggregates in
Redis (it needs nothing else running), stores the report and prints
``{"run", "reference", "status", "checks": [...]}``; it exits 0 whatever the
run's status.  Sign-offs and channel flags are made in the name of a
shift-crew login of ``minard keys`` (``--user``, password from
``MINARD_PASSWORD`` or a prompt).

``minard dq-live`` judges the current run every ``dq_interval`` seconds from
its summary (updated by every pull worker's flush) and once more, as final,
when the run ends (an ENDTAPE seen by the push, or a new run starting).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time

import click
import redis as redis_py

from minard import config as config_mod
from minard import metrics
from minard.analysis.dq import FLAGS
from minard.ops.keys import KeyStore
from minard.store import alarms, connection, registry, schema
from minard.store import channel_status as channels_store
from minard.store import dq as store_dq
from minard.store import status as status_store
from minard.store.runs import END_KEY, run_key, runs_cli

log = logging.getLogger("minard.dq")
COMPONENT = "dq_live"  # its heartbeat status:dq_live (the program name of the stack)


def redis_client(cfg):
    """The admin role's Redis client (minard.store.connection)."""
    return connection.redis(cfg, "admin")


def load_cfg(obj) -> dict:
    """The configuration the root command passed down (``ctx.obj``, see minard.cli)."""
    if isinstance(obj, dict) and "redis_url" in obj:
        return obj
    raise click.UsageError("run this command through minard (its root loads the configuration)")


@contextlib.contextmanager
def clear_errors(cfg):
    """Turn Redis failures and refused changes into one-line CLI errors (password redacted)."""
    try:
        yield
    except redis_py.RedisError as exc:
        raise click.ClickException(f"Redis {config_mod.redact(str(cfg['redis_url']))}: {exc}") from None
    except (registry.SignError, channels_store.FlagError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def authenticate(cfg, user: str | None) -> str:
    """The shift-crew login *user* after checking its password (MINARD_PASSWORD or a prompt)."""
    user = user or os.environ.get("MINARD_USER") or ""
    if not user:
        raise click.ClickException("give --user NAME (a login of `minard keys add NAME --user`)")
    password = os.environ.get("MINARD_PASSWORD")
    if password is None:
        password = click.prompt(f"password for {user}", hide_input=True, err=True)
    if not KeyStore.from_config(cfg).verify(user, password, kind="user"):
        raise click.ClickException(f"wrong user name or password for {user!r}")
    return user


def is_expert(cfg, user: str) -> bool:
    """True if *user* may sign pass/fail (``dq_experts``; empty = every login)."""
    experts = str(cfg.get("dq_experts") or "").split()
    return not experts or user in experts


# ------------------------------------------------------------------ minard dq

def _print_report(report: dict) -> None:
    click.echo(f"run {report['run']}  reference {report['reference']}  status {report['status'].upper()}")
    for c in report["checks"]:
        value = "-" if c["value"] is None else f"{c['value']:.4g}"
        expected = "-" if c["expected"] is None else f"{c['expected']:.4g}"
        listed = c["detail"].get("channels") or c["detail"].get("cards") or c["detail"].get("crates") or ""
        click.echo(f"  {c['status']:<8} {c['name']:<24} value {value:>10}  expected {expected:>10}  {listed}")


@click.command("dq")
@click.argument("run", type=click.IntRange(0, 2**32 - 1))
@click.option("--reference", type=click.IntRange(0, 2**32 - 1), default=None,
              help="Reference run (default: the expert's choice for the run type, else the latest run signed pass).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--final", is_flag=True, help="Mark the stored report as the run's final one.")
@click.pass_obj
def dq_cmd(obj, run, reference, as_json, final):
    """Judge RUN's data quality against a reference run, store and print the report.

    Exits 0 whatever the run's status (the status is in the output).
    """
    cfg = load_cfg(obj)
    with clear_errors(cfg):
        report = store_dq.compute(redis_client(cfg), run, store_dq.load_config(cfg), reference, final=final)
    if report is None:
        raise click.ClickException(f"run {run} is not known")
    if as_json:
        click.echo(json.dumps(report))
    else:
        _print_report(report)


# ------------------------------------------------------------- minard runs …

@runs_cli.command("sign")
@click.argument("run", type=click.IntRange(0, 2**32 - 1))
@click.option("--state", "new_state", required=True, type=click.Choice(registry.SHIFTER_STATES + registry.EXPERT_STATES),
              help="good / bad / unsure (shifter), pass / fail (expert).")
@click.option("--comment", required=True, help="Why (required, kept in the run's history).")
@click.option("--user", default=None, help="Your login (default: $MINARD_USER); password: $MINARD_PASSWORD or prompt.")
@click.pass_obj
def sign_cmd(obj, run, new_state, comment, user):
    """Sign RUN off in the run registry (every change is kept with who, when and why)."""
    cfg = load_cfg(obj)
    who = authenticate(cfg, user)
    with clear_errors(cfg):
        entry = registry.sign(redis_client(cfg), run, new_state, who, comment, is_expert(cfg, who))
    click.echo(f"run {run}: {entry['from']} -> {entry['to']} by {who}")


@runs_cli.command("registry")
@click.argument("run", type=click.IntRange(0, 2**32 - 1))
@click.option("--json", "as_json", is_flag=True, help="Print state and history as one JSON object.")
@click.pass_obj
def registry_cmd(obj, run, as_json):
    """Show RUN's sign-off state and its whole history."""
    cfg = load_cfg(obj)
    with clear_errors(cfg):
        r = redis_client(cfg)
        out = {"run": run, **registry.state(r, run), "history": registry.history(r, run)}
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"run {run}: {out['state']}")
    for h in out["history"]:
        click.echo(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h['when']))} {h['who']}: "
                   f"{h['from']} -> {h['to']}  {h['comment']}")


@runs_cli.command("type")
@click.argument("run", type=click.IntRange(0, 2**32 - 1))
@click.argument("run_type", default="")
@click.pass_obj
def type_cmd(obj, run, run_type):
    """Set RUN's run type (physics, calibration, ...); no RUN_TYPE removes it."""
    cfg = load_cfg(obj)
    with clear_errors(cfg):
        store_dq.set_run_type(redis_client(cfg), run, run_type.strip())
    click.echo(f"run {run}: type {run_type or '(none)'}")


@runs_cli.command("reference")
@click.argument("run_type")
@click.argument("run", type=click.IntRange(0, 2**32 - 1), required=False)
@click.option("--user", default=None, help="Your login (an expert of dq_experts).")
@click.pass_obj
def reference_cmd(obj, run_type, run, user):
    """Make RUN the reference of runs of RUN_TYPE ("none" = runs without a type);
    without RUN, go back to the latest run signed pass."""
    cfg = load_cfg(obj)
    who = authenticate(cfg, user)
    if not is_expert(cfg, who):
        raise click.ClickException(f"{who} is not an expert (dq_experts)")
    with clear_errors(cfg):
        store_dq.set_reference(redis_client(cfg), "" if run_type == "none" else run_type, run)
    log.info("reference of %s set to %s by %s", run_type, run, who)
    click.echo(f"reference of {run_type}: {run if run is not None else 'automatic'}")


# ------------------------------------------------------------ minard channels

@click.group("channels")
@click.pass_context
def channels_cli(ctx):
    """The channel-status database: flags per channel with reason, who, when and history."""
    load_cfg(ctx.obj)


@channels_cli.command("flag")
@click.argument("lcn", type=click.IntRange(0, 9727))
@click.argument("flag", type=click.Choice(FLAGS))
@click.option("--reason", required=True, help="Why (kept in the history).")
@click.option("--user", default=None, help="Your login (default: $MINARD_USER).")
@click.pass_obj
def flag_cmd(cfg, lcn, flag, reason, user):
    """Set FLAG on channel LCN (crate*512 + card*32 + channel)."""
    who = authenticate(cfg, user)
    with clear_errors(cfg):
        channels_store.change(redis_client(cfg), lcn, flag, "flag", reason, who)
    click.echo(f"channel {lcn}: flagged {flag}")


@channels_cli.command("unflag")
@click.argument("lcn", type=click.IntRange(0, 9727))
@click.argument("flag", type=click.Choice(FLAGS))
@click.option("--reason", required=True, help="Why (kept in the history).")
@click.option("--user", default=None, help="Your login (default: $MINARD_USER).")
@click.pass_obj
def unflag_cmd(cfg, lcn, flag, reason, user):
    """Clear FLAG from channel LCN."""
    who = authenticate(cfg, user)
    with clear_errors(cfg):
        channels_store.change(redis_client(cfg), lcn, flag, "unflag", reason, who)
    click.echo(f"channel {lcn}: {flag} cleared")


@channels_cli.command("show")
@click.option("--json", "as_json", is_flag=True, help='Print {"<lcn>": {flag: {reason, who, when}}}.')
@click.option("--history", is_flag=True, help="Print the history of changes instead.")
@click.pass_obj
def show_cmd(cfg, as_json, history):
    """Print every flagged channel (or the history of changes)."""
    with clear_errors(cfg):
        r = redis_client(cfg)
        rows = channels_store.history(r) if history else channels_store.status(r)
    if as_json:
        click.echo(json.dumps(rows if history else {str(k): v for k, v in sorted(rows.items())}))
        return
    if history:
        for h in rows:
            click.echo(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h['when']))} {h['who']}: "
                       f"{h['action']} {h['flag']} on {h['lcn']}  {h['reason']}")
        return
    click.echo(f"{'LCN':>5} {'CRATE':>5} {'CARD':>4} {'CH':>3}  FLAGS")
    for lcn, flags in sorted(rows.items()):
        text = "; ".join(f"{f} ({v['who']}: {v['reason']})" for f, v in sorted(flags.items()))
        click.echo(f"{lcn:>5} {lcn // 512:>5} {lcn // 32 % 16:>4} {lcn % 32:>3}  {text}")


# -------------------------------------------------------------- minard dq-live

def raise_check_alarm(redis, run: int, check: dict) -> int:
    """Alarm for a check at warning/error (grouped per run and check, so a live
    re-check only counts a repeat).  Known-flagged channels are not in the
    check's list, so they never alarm."""
    detail = check["detail"]
    listed = detail.get("channels") or detail.get("cards") or detail.get("crates") or []
    if listed and isinstance(listed[0], dict):
        listed = [f"{x['crate']}/{x['card']}" for x in listed]
    what = f": {', '.join(map(str, listed[:20]))}{' ...' if len(listed) > 20 else ''}" if listed else ""
    level = alarms.DANGER if check["status"] == "error" else alarms.WARNING
    return alarms.raise_alarm(redis, level, f"run {run} data quality {check['name']} {check['status']}{what}",
                              source="dq", program=COMPONENT, key=f"dq:{run}:{check['name']}:{check['status']}")


class LiveChecker:
    """Judge the current run every ``dq_interval`` s and once more when it ends."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.interval = float(cfg["dq_interval"])
        self.redis = redis_client(cfg)
        self.dq_cfg = store_dq.load_config(cfg)
        self.stopping = threading.Event()
        self.current: int | None = None
        self.last_events: dict[int, tuple[int, bool]] = {}  # run -> (events, final) last judged
        self.finished: set[int] = set()
        self.endtapes: int | None = None
        self.started = time.time()
        self.totals = {"checks": 0, "finals": 0, "errors": 0}

    def stop(self, *_args) -> None:
        self.stopping.set()

    def newest_run(self) -> tuple[int | None, float | None]:
        """The run with the latest event, and the arrival time of that event."""
        rows = self.redis.zrevrange(END_KEY, 0, 0, withscores=True)
        return (int(rows[0][0]), float(rows[0][1])) if rows else (None, None)

    def push_endtapes(self) -> int:
        raw = self.redis.hget(schema.STATUS.key(component="minard_dispatch_push"), "endtapes")
        return int(raw) if raw else 0

    def wait_settled(self, timeout: float = 15.0) -> bool:
        """Wait until the pull pool has accounted for every record the push handed on
        (``stats:push`` processed = ``stats:pull`` processed + errors + dropped), at most *timeout* s."""
        end = time.monotonic() + timeout
        while not self.stopping.is_set():
            counters = status_store.stats(self.redis)
            push, pull = counters.get("push", {}), counters.get("pull", {})
            done = pull.get("processed", 0) + pull.get("errors", 0) + pull.get("dropped", 0)
            if done >= push.get("processed", 0) or time.monotonic() > end:
                self.stopping.wait(1.1)  # the workers' flush of those records reaches Redis
                return done >= push.get("processed", 0)
            self.stopping.wait(0.2)
        return False

    def judge(self, run: int, final: bool) -> None:
        """Judge *run* and store the report, unless nothing changed since the last time.

        A run once judged final stays final: late events (a worker's last
        flush) make a new final report.
        """
        events = self.redis.hget(run_key(run), "events")
        events = int(events) if events else 0
        final = final or run in self.finished
        if self.last_events.get(run) == (events, final):
            return
        report = store_dq.compute(self.redis, run, self.dq_cfg, final=final)
        self.last_events[run] = (events, final)
        if final:
            self.finished.add(run)
        self.totals["finals" if final else "checks"] += 1
        if report is not None:
            bad = [c for c in report["checks"] if c["status"] in ("warning", "error")]
            log.info("run %d%s: %s %s", run, " (final)" if final else "", report["status"],
                     [c["name"] for c in bad])
            for c in bad:
                raise_check_alarm(self.redis, run, c)

    def tick(self) -> None:
        """One round: the run replaced by a newer one is judged final, the newest
        run live, or final if an ENDTAPE came since the last round; heartbeat."""
        run, _ = self.newest_run()
        endtapes = self.push_endtapes()
        ended = self.endtapes is not None and endtapes > self.endtapes
        self.endtapes = endtapes
        if ended:  # the ended run is the newest once the pool has stored everything handed to it
            self.wait_settled()
            run, _ = self.newest_run()
        if self.current is not None and run is not None and run != self.current:
            self.judge(self.current, final=True)
        if run is not None:
            self.judge(run, final=ended)
        self.current = run
        if len(self.last_events) > 1000:  # bounded memory over months of runs
            keep = sorted(self.last_events)[-100:]
            self.last_events = {r: self.last_events[r] for r in keep}
            self.finished &= set(keep)

    def beat(self) -> None:
        """Heartbeat ``status:dq_live`` (the pinger turns it into the Status page's)."""
        pipe = self.redis.pipeline(transaction=False)
        status_store.beat(pipe, COMPONENT, {"run": self.current if self.current is not None else "",
                                            "interval": self.interval, **self.totals}, started=self.started)
        pipe.execute()

    def run(self) -> None:
        """Loop until SIGTERM; Redis outages are logged once and retried."""
        failing = False
        next_full = 0.0
        while not self.stopping.is_set():
            try:
                now = time.monotonic()
                # ENDTAPE is looked for every second, the live check every interval.
                if now >= next_full or self.push_endtapes() != self.endtapes:
                    self.tick()
                    next_full = now + self.interval
                self.beat()
                if failing:
                    log.info("Redis is back")
                failing = False
            except redis_py.RedisError as exc:
                if not failing:
                    log.warning("Redis failed (%s); retrying every second", exc)
                failing = True
                self.totals["errors"] += 1
            except Exception:
                log.exception("data-quality check failed; continuing")
                self.totals["errors"] += 1
            self.stopping.wait(1.0)
        log.info("stopping: %d live checks, %d final", self.totals["checks"], self.totals["finals"])


@click.command("dq-live")
@click.pass_obj
def dq_live_cmd(obj):
    """Judge the current run every dq_interval seconds and once more when it ends."""
    cfg = load_cfg(obj)
    checker = LiveChecker(cfg)
    metrics.serve(cfg, "dq_live", metrics.Snapshot("minard_dq", lambda: {
        "judgements": {"live": checker.totals["checks"], "final": checker.totals["finals"]},
        "errors": checker.totals["errors"], "run": checker.current if checker.current is not None else -1},
        counters=("judgements", "errors"), labels={"judgements": "kind"},
        help={"judgements": "Runs judged, live or final.", "errors": "Rounds that failed (Redis away, bad data).",
              "run": "The run judged last (-1: none yet)."}))
    signal.signal(signal.SIGTERM, checker.stop)
    signal.signal(signal.SIGINT, checker.stop)
    log.info("checking the current run every %.0f s (%s)", checker.interval, cfg["dq_file"])
    checker.run()
