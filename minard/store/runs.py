"""Run summaries in Redis: written by the pull workers, read by the CLI and the site.

One summary per run, kept :data:`RUN_KEEP` seconds (400 days) after its last
update.  Workers add to it with atomic commands, so any number of workers
combine exactly (see docs/storage.md):

* ``{run:<run>}`` hash: ``events``, ``orphans``, ``hits`` and ``trig:<NAME>``
  (HINCRBY);
* ``{run:<run>}:nhit`` hash: NPmtHit value -> events (HINCRBY, nonzero only);
* ``{run:<run>}:channels`` string: 10240 big-endian uint32 hit counts, index
  ``crate*512 + card*32 + channel`` (added by :class:`minard.store.channels.ChannelWriter`,
  as the per-channel time series);
* ``{run:<run>}:subruns`` set of sub-run numbers;
* ``{run:<run>}:acct`` hash: the run's event accounting, written by the
  dispatcher (:func:`add_accounting`): ``source_events`` (events received from
  the data source), ``dispatched`` (handed to the monitoring analyzer) and
  ``dropped:<reason>`` (counted losses, e.g. ``dispatcher_queue``,
  ``no_analyzer``, ``analyzer_lost``; added by the push and the pull pool
  for records they drop, :func:`add_drops`: ``push_backlog_full``,
  ``push_backlog_at_exit``, ``pull_worker_lost``, ``pull_bad_batch``,
  ``pull_handler_error``, ``pull_retry_full``, ``pull_retry_at_exit``,
  ``pull_redis_error``);
* ``{run:<run>}:intervals`` hash: the same accounting per interval of a long
  run (``dispatcher_accounting_interval`` seconds, by the dispatcher's clock),
  fields ``<start>:<length>:source_events``, ``<start>:<length>:sent:<analyzer>``
  (events handed to that analyzer's queue, every analyzer) and
  ``<start>:<length>:dropped:<reason>`` (the dispatcher's own losses);
  :func:`intervals` reads it;
* ``{run:<run>}:nhit_trig`` hash: ``<NAME>:<lo>`` -> events of that trigger
  with ``lo <= nhit < lo+5`` (the bins of the ``nhit`` time series), and the
  fields ``dq:<counter>`` of ``{run:<run>}`` (``gtid_gaps``, ``gtid_missing``,
  ``gtid_jumps``, ``corrupt``, ``bad_hits``, ``gtid_mismatch``): what the
  data-quality checks read (docs/dq.md);
* ``runs:clock_start`` / ``runs:clock_end`` sorted sets: run -> lowest /
  highest 10 MHz clock of its events (ZADD LT / GT): the span the trigger
  rates of the data-quality checks are taken over;
* ``runs:start`` / ``runs:end`` sorted sets: run -> arrival time of its first
  / last event (ZADD LT / GT, so the earliest start and latest end win
  whatever the order in which workers flush).

:func:`get_run` returns the one JSON object that ``minard runs show RUN --json``
prints and the website's ``/api/runs/<run>`` returns.
"""

from __future__ import annotations

import contextlib
import json
import time

import click
import numpy as np
import redis as redis_py

from minard import config as config_mod
from minard.analysis.aggregate import NAMES, RunAgg, nhit_bin_label
from minard.formats.pmt import TRIGGER_NAMES
from minard.store import connection, schema
from minard.store import timeseries as ts
from minard.store.channels import ChannelWriter

RUN_KEEP = 400 * 86400
START_KEY, END_KEY = schema.RUNS_START, schema.RUNS_END
CLOCK_START_KEY, CLOCK_END_KEY = schema.RUNS_CLOCK_START, schema.RUNS_CLOCK_END


#: The part of a run's summary that holds its event accounting (``{run:<run>}:acct``).
ACCT = "acct"
#: The part holding the dispatcher journal's epochs of the run (``{run:<run>}:epochs``, minard.dispatcher.journal).
EPOCHS = "epochs"
DROPPED_PREFIX = "dropped:"
#: The part holding the accounting per interval (``{run:<run>}:intervals``).
INTERVALS = "intervals"
#: Accounting deltas named ``interval:<start>:<field>`` go to the intervals part as ``<start>:<field>``.
INTERVAL_PREFIX = "interval:"


def run_key(run: int, part: str = "") -> str:
    """Key of one part of run *run*'s summary (``""``, nhit, channels, subruns, acct)."""
    return schema.RUN_PART.key(run=int(run), part=part) if part else schema.RUN.key(run=int(run))


def add_accounting(pipe, run: int, deltas) -> None:
    """Add counter *deltas* (``source_events``, ``dispatched``, ``dropped:<reason>``) to run *run*.

    Deltas named ``interval:<start>:<field>`` go to the run's per-interval
    accounting instead (same hash slot, so one transaction holds both).
    """
    key, per_interval = run_key(run, ACCT), run_key(run, INTERVALS)
    touched = set()
    for name, value in deltas.items():
        if not value:
            continue
        if name.startswith(INTERVAL_PREFIX):
            pipe.hincrby(per_interval, name[len(INTERVAL_PREFIX):], int(value))
            touched.add(per_interval)
        else:
            pipe.hincrby(key, name, int(value))
            touched.add(key)
    for k in touched or (key,):
        pipe.expire(k, RUN_KEEP)


def interval_field(start: int, length: int, field: str) -> str:
    """The accounting delta name of *field* in the interval [*start*, *start* + *length*) (see add_accounting).

    The length travels in the name, so a changed ``dispatcher_accounting_interval``
    never misreads the intervals already stored.
    """
    return f"{INTERVAL_PREFIX}{int(start)}:{int(length)}:{field}"


def intervals(fields: dict[str, int]) -> list[dict]:
    """The rows of a run's per-interval accounting from its ``intervals`` hash, oldest first.

    Each row: ``start``, ``stop`` (Unix seconds, the dispatcher's clock),
    ``source_events``, ``sent`` (analyzer -> events handed to its queue),
    ``dropped`` and ``dropped_by`` (the dispatcher's own losses in the interval).
    """
    rows: dict[tuple[int, int], dict] = {}
    for name, value in fields.items():
        start, length, field = (name.split(":", 2) + ["", ""])[:3]
        try:
            row = rows.setdefault((int(start), int(length)), {"source_events": 0, "sent": {}, "dropped_by": {}})
        except ValueError:  # not written by add_accounting
            continue
        if field == "source_events":
            row["source_events"] += value
        elif field.startswith("sent:"):
            row["sent"][field[5:]] = row["sent"].get(field[5:], 0) + value
        elif field.startswith(DROPPED_PREFIX):
            row["dropped_by"][field[len(DROPPED_PREFIX):]] = value
    return [{"start": start, "stop": start + length, **row, "dropped": sum(row["dropped_by"].values())}
            for (start, length), row in sorted(rows.items())]


def add_drops(pipe, drops) -> None:
    """Add counted losses *drops* ({run: {reason: records}}) to each run's ``dropped:<reason>``.

    The push and the consumer pools call it (in the transaction that also
    writes their stage counters) for the records they drop, so that a run's
    ``dropped`` holds them and its ``unaccounted`` only what no counter saw.
    """
    for run, reasons in drops.items():
        add_accounting(pipe, run, {DROPPED_PREFIX + reason: n for reason, n in reasons.items()})


def records_seen(head: dict[str, int]) -> int:
    """Records of a run that reached Redis in any form: events, orphans and corrupt records.

    The dispatcher's ``source_events`` counts every record the source sent, so
    this (not ``events`` alone) is what accounting subtracts from it.
    """
    return (head.get("events", 0) + head.get("orphans", 0)
            + head.get(schema.RUN_DQ_FIELD.format(name="corrupt"), 0))


def accounting(acct: dict[str, int], seen: int) -> dict:
    """The accounting fields of a run summary from its ``acct`` hash and the records *seen*.

    *seen* is :func:`records_seen` of the run's summary.  ``unaccounted`` =
    ``source_events`` - *seen* - ``dropped``, never negative: the records that
    no counter saw lost.  All None for a run the dispatcher did not account
    (older data).
    """
    if not acct:
        return {"source_events": None, "dispatched": None, "dropped": None,
                "dropped_by": {}, "unaccounted": None}
    dropped_by = {k[len(DROPPED_PREFIX):]: v for k, v in sorted(acct.items())
                  if k.startswith(DROPPED_PREFIX) and v}
    dropped = sum(dropped_by.values())
    source = acct.get("source_events", 0)
    return {"source_events": source, "dispatched": acct.get("dispatched", 0), "dropped": dropped,
            "dropped_by": dropped_by, "unaccounted": max(0, source - seen - dropped)}


def write_run(pipe, agg: RunAgg, now: float | None = None, channels: ChannelWriter | None = None) -> None:
    """Add the pending summary *agg* of one run to Redis (in the caller's pipeline).

    The channel array goes through *channels* (the pull worker's writer, which
    the caller writes with the rest of its flush); without one it is added
    here with a writer of its own.
    """
    now = time.time() if now is None else now
    key = run_key(agg.run)
    counts = {"events": agg.events, "orphans": agg.orphans, "hits": agg.hits}
    counts.update({schema.RUN_TRIGGER_FIELD.format(name=n): int(c) for n, c in zip(TRIGGER_NAMES, agg.triggers) if c})
    counts.update({schema.RUN_DQ_FIELD.format(name=k): int(v) for k, v in agg.integrity.items() if v})
    for name, value in counts.items():
        pipe.hincrby(key, name, int(value))
    nz = np.flatnonzero(agg.nhit_counts)
    for nhit in nz.tolist():
        pipe.hincrby(run_key(agg.run, "nhit"), nhit, int(agg.nhit_counts[nhit]))
    if np.any(agg.channel_hits):
        writer = channels if channels is not None else ChannelWriter()
        writer.add_array(run_key(agg.run, "channels"), agg.channel_hits, RUN_KEEP)
        if channels is None:
            writer.add(pipe)
    trig, bins = np.nonzero(agg.nhit_hist)
    if len(trig):
        for t_i, b_i in zip(trig.tolist(), bins.tolist()):
            pipe.hincrby(run_key(agg.run, "nhit_trig"), f"{NAMES[t_i]}:{nhit_bin_label(b_i)}",
                         int(agg.nhit_hist[t_i, b_i]))
    if agg.subruns:
        pipe.sadd(run_key(agg.run, "subruns"), *sorted(agg.subruns))
    if agg.start is not None:
        pipe.zadd(START_KEY, {str(agg.run): agg.start}, lt=True)
        pipe.zadd(END_KEY, {str(agg.run): agg.end}, gt=True)
    if agg.clock_first is not None:  # < 2**53 ticks: exact as a sorted-set score
        pipe.zadd(CLOCK_START_KEY, {str(agg.run): agg.clock_first}, lt=True)
        pipe.zadd(CLOCK_END_KEY, {str(agg.run): agg.clock_last}, gt=True)
    for part in ("", "nhit", "channels", "subruns", "nhit_trig"):  # (acct: add_accounting)
        pipe.expire(run_key(agg.run, part), RUN_KEEP)
    for zkey in (START_KEY, END_KEY, CLOCK_START_KEY, CLOCK_END_KEY):
        pipe.zremrangebyscore(zkey, "-inf", now - RUN_KEEP)
        pipe.expire(zkey, RUN_KEEP)


def _int(raw) -> int:
    return int(raw) if raw is not None else 0


def get_run(redis, run: int) -> dict | None:
    """One run's summary as a JSON-ready dict, or None if the run is unknown.

    Keys: ``run``, ``events``, ``orphans``, ``hits``, ``triggers`` (all 27
    names -> events), ``nhit_histogram`` (nhit as a string -> events, nonzero
    only), ``channel_hits`` (channel index as a string -> hits, nonzero only),
    ``start``, ``end`` (Unix seconds), ``subruns`` (sorted list) and the
    accounting of :func:`accounting` (``source_events``, ``dispatched``,
    ``dropped``, ``dropped_by``, ``unaccounted``) and ``intervals``, the
    dispatcher's accounting per interval (:func:`intervals`).
    """
    run = int(run)
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(run_key(run))
    pipe.hgetall(run_key(run, "nhit"))
    pipe.get(run_key(run, "channels"))
    pipe.smembers(run_key(run, "subruns"))
    pipe.zscore(START_KEY, str(run))
    pipe.zscore(END_KEY, str(run))
    pipe.hgetall(run_key(run, ACCT))
    pipe.hgetall(run_key(run, INTERVALS))
    head, nhit, channels, subruns, start, end, acct, per_interval = pipe.execute()
    if not head and start is None and not acct:
        return None
    head = {k.decode(): int(v) for k, v in head.items()}
    hits = ts._array(channels, ">u4")
    nz = np.flatnonzero(hits)
    return {
        "run": run,
        "events": head.get("events", 0),
        "orphans": head.get("orphans", 0),
        "hits": head.get("hits", 0),
        "triggers": {n: head.get(schema.RUN_TRIGGER_FIELD.format(name=n), 0) for n in TRIGGER_NAMES},
        "nhit_histogram": {str(k): v for k, v in sorted((int(k), int(v)) for k, v in nhit.items())},
        "channel_hits": {str(i): int(hits[i]) for i in nz.tolist()},
        "start": start,
        "end": end,
        "subruns": sorted(int(s) for s in subruns),
        **accounting({k.decode(): int(v) for k, v in acct.items()}, records_seen(head)),
        "intervals": intervals({k.decode(): int(v) for k, v in per_interval.items()}),
    }


def list_runs(redis, limit: int = 100) -> list[dict]:
    """The *limit* most recently started runs, newest first: run, start, end, events."""
    return _run_rows(redis, redis.zrevrange(START_KEY, 0, max(0, limit - 1), withscores=True))


def find_runs(redis, offset: int = 0, limit: int = 50, numbers: tuple[int, int] | None = None,
              started: tuple[float, float] | None = None) -> tuple[list[dict], int]:
    """One page of runs, newest first, and how many match: (rows, total).

    *numbers* keeps runs numbered lo..hi (inclusive), *started* runs that
    started in [t0, t1) (Unix seconds); without either, every run.
    """
    if started is not None:
        members = redis.zrevrangebyscore(START_KEY, f"({started[1]}", started[0], withscores=True)
    elif numbers is not None:
        lo, hi = numbers
        if hi - lo < 1000:  # a few numbers: ask for each
            pipe = redis.pipeline(transaction=False)
            for n in range(hi, lo - 1, -1):
                pipe.zscore(START_KEY, str(n))
            members = [(str(n).encode(), t) for n, t in zip(range(hi, lo - 1, -1), pipe.execute()) if t is not None]
            members.sort(key=lambda m: -m[1])
        else:
            members = [(m, t) for m, t in redis.zrevrange(START_KEY, 0, -1, withscores=True) if lo <= int(m) <= hi]
    else:
        total = redis.zcard(START_KEY)
        return _run_rows(redis, redis.zrevrange(START_KEY, offset, offset + limit - 1, withscores=True)), total
    return _run_rows(redis, members[offset: offset + limit]), len(members)


def _run_rows(redis, rows) -> list[dict]:
    """run, start, end, events and subrun count of (member, start) pairs."""
    if not rows:
        return []
    pipe = redis.pipeline(transaction=False)
    for member, _ in rows:
        pipe.zscore(END_KEY, member)
        pipe.hget(run_key(int(member)), "events")
        pipe.scard(run_key(int(member), "subruns"))
    raw = pipe.execute()
    out = []
    for i, (member, start) in enumerate(rows):
        end, events, nsub = raw[3 * i: 3 * i + 3]
        out.append({"run": int(member), "start": start, "end": end,
                    "events": _int(events), "subruns": int(nsub)})
    return out


#: Seconds after a run's last event before its unaccounted events count as lost
#: (the pipeline stores a run's last events within a few seconds; until then they are in flight).
UNACCOUNTED_AFTER = 30.0


def recent_accounting(redis, limit: int = 5, now: float | None = None) -> list[dict]:
    """The event accounting of the *limit* most recent runs (newest first), for the Status page.

    Each row: ``run``, ``events``, the fields of :func:`accounting` and
    ``in_flight`` (the run's last event arrived less than
    :data:`UNACCOUNTED_AFTER` s ago, so its ``unaccounted`` are still on their
    way); runs the dispatcher did not account are left out.
    """
    now = time.time() if now is None else now
    rows = list_runs(redis, limit)
    if not rows:
        return []
    pipe = redis.pipeline(transaction=False)
    for r in rows:
        pipe.hgetall(run_key(r["run"], ACCT))
        pipe.hgetall(run_key(r["run"]))
    replies = pipe.execute()
    out = []
    for r, acct, head in zip(rows, replies[0::2], replies[1::2]):
        if acct:
            counts = {k.decode(): int(v) for k, v in acct.items()}
            seen = records_seen({k.decode(): int(v) for k, v in head.items()})
            in_flight = r.get("end") is not None and now - r["end"] < UNACCOUNTED_AFTER
            out.append({"run": r["run"], "events": r["events"], **accounting(counts, seen), "in_flight": in_flight})
    return out


# ------------------------------------------------------------------- CLI

def _redis(cfg):
    """A Redis client of the command-line tools (role ``admin``)."""
    return connection.redis(cfg, "admin")


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


@contextlib.contextmanager
def _clear_redis_errors(cfg):
    """Turn a Redis failure into a one-line CLI error (password redacted)."""
    try:
        yield
    except (redis_py.RedisError, connection.RedisConfigError) as exc:
        url = config_mod.redact(cfg["redis_url"])
        hint = ("; is MINARD_CONFIG set to the stack's minard.conf?"
                if isinstance(exc, redis_py.AuthenticationError) else "")
        raise click.ClickException(f"Redis {url}: {exc}{hint}") from None


@click.group("runs", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array instead of a table.")
@click.option("--limit", type=int, default=100, show_default=True, help="Most recent runs to list.")
@click.pass_context
@config_mod.pass_config
def runs_cli(cfg, ctx, as_json, limit):
    """List runs seen by the dispatch-stream monitoring, newest first.

    `minard runs show RUN --json` prints one run's summary.
    """
    if ctx.invoked_subcommand is not None:
        return
    with _clear_redis_errors(cfg):
        rows = list_runs(_redis(cfg), limit)
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"{'RUN':>8} {'START':<19} {'END':<19} {'EVENTS':>10} {'SUBRUNS':>7}")
    for r in rows:
        click.echo(f"{r['run']:>8} {_when(r['start']):<19} {_when(r['end']):<19}"
                   f" {r['events']:>10} {r['subruns']:>7}")


@runs_cli.command("show")
@click.argument("run", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@config_mod.pass_config
def show_cmd(cfg, run, as_json):
    """Print the summary of RUN (events, triggers, nhit histogram, channel hits)."""
    with _clear_redis_errors(cfg):
        summary = get_run(_redis(cfg), run)
    if summary is None:
        raise click.ClickException(f"run {run} is not known")
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"run {summary['run']}: {summary['events']} events, {summary['orphans']} orphans,"
               f" {summary['hits']} hits, subruns {summary['subruns']}")
    click.echo(f"start {_when(summary['start'])}  end {_when(summary['end'])}")
    for name, n in summary["triggers"].items():
        if n:
            click.echo(f"  {name:<8} {n}")
    click.echo(f"channels hit: {len(summary['channel_hits'])}")
    if summary["source_events"] is not None:
        click.echo(f"accounting: source {summary['source_events']}, dispatched {summary['dispatched']},"
                   f" stored {summary['events']}, dropped {summary['dropped']}"
                   f" {summary['dropped_by'] or ''}, unaccounted {summary['unaccounted']}")
