"""The seed-named commands of the data plane: ``minard_dispatch push|pull`` and ``minard stats``.

``data_producer`` and ``data_consumer`` are the commands of
:mod:`minard.pipeline.orca_producer` and :mod:`minard.pipeline.orca_consumer`;
:mod:`minard.cli` maps every console script to its command.
"""

from __future__ import annotations

import json

import click
import redis as redis_py

from minard import config as config_mod
from minard.store import connection, status


# ``minard_dispatch push|pull`` is minard.cli.dispatch_group (with the global --config and
# --log-level): push_cmd of minard.pipeline.dispatch_push, pull_cmd of minard.pipeline.dispatch_pull.


@click.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--pools", "per_pool", is_flag=True,
              help="Per consumer pool instead: {\"pools\": {HOST:PID: heartbeat and counters}}.")
@click.option("--orca", "orca", is_flag=True,
              help="What became of each ORCA stream's records instead: received, stored, dropped, unaccounted.")
@config_mod.pass_config
def stats_cmd(cfg, as_json, per_pool, orca):
    """Print the loss counters of every pipeline stage (stats:<stage> in Redis), or per pool."""
    try:
        client = connection.redis(cfg, "admin")
    except connection.RedisConfigError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        data = {"pools": status.pools(client)} if per_pool else status.stats(client)
        if orca:
            data = status.orca_accounting(data if not per_pool else status.stats(client))
    except redis_py.RedisError as exc:
        raise click.ClickException(f"Redis {config_mod.redact(cfg['redis_url'])}: {exc}") from None
    if per_pool and not as_json:
        for ident, pool in data["pools"].items():
            state = "alive" if pool["alive"] else "silent"
            counts = " ".join(f"{stage}:{k}={v}" for stage, c in pool["counters"].items() for k, v in sorted(c.items()))
            click.echo(f"{ident:<24} {pool.get('component', '')} {state} {counts}".rstrip())
        return
    if as_json:
        click.echo(json.dumps(data))
        return
    if orca:
        for stream, acct in data.items():
            click.echo(f"{stream:<6} " + " ".join(f"{k}={v}" for k, v in acct.items()))
        return
    for stage, counters in data.items():
        main = " ".join(f"{k}={counters.get(k, 0)}" for k in status.COUNTERS)
        extra = " ".join(f"{k}={v}" for k, v in sorted(counters.items()) if k not in status.COUNTERS)
        click.echo(f"{stage:<14} {main} {extra}".rstrip())
