"""The ``minard`` command line, declared once.

Each subcommand lives in the module of its concept and is imported only when it
is run (so ``minard dump`` never imports Flask).  The table below is the only
place a new subcommand is registered.

The global options ``--config FILE`` and ``--log-level LEVEL`` are declared
once, in :func:`global_params`, for ``minard`` and the seed-named programs
``minard_dispatch``, ``data_producer`` and ``data_consumer``.  The root command
loads the configuration once (:func:`load_config`) and passes it down as
``ctx.obj``; a subcommand receives it with ``@minard.config.pass_config``.
"""

from __future__ import annotations

import importlib

import click

from minard import __version__, config
from minard import log as log_mod

#: subcommand name -> "module:attribute" of a click command.
COMMANDS = {
    "demo": ("minard.demo:demo", "Decode the bundled recorded data and print a summary."),
    "dump": ("minard.dump:dump", "Print the records of a ZDAB or ORCA file as JSON lines."),
    "simulate": ("minard.simulate:simulate", "Write synthetic ZDAB files and ORCA streams."),
    "dispatcher": ("minard.dispatcher.server:dispatcher_cmd", "Run the event dispatcher server."),
    "replay": ("minard.dispatcher.replay:replay_cmd", "Send ZDAB files to a dispatcher as its data source."),
    "record": ("minard.dispatcher.recorder:record_cmd", "Write every event from a dispatcher to ZDAB files."),
    "send": ("minard.dispatcher.client:send_cmd", "Send one text command to a dispatcher and print the reply."),
    "keys": ("minard.ops.keys:keys_cli", "Add, list and revoke program tokens and shift-crew logins."),
    "runs": ("minard.ops.dq:runs_cli", "List runs, show one run's summary, sign runs off, set run types and references."),
    "stats": ("minard.pipeline.cli:stats_cmd", "Print the pipeline's loss counters per stage."),
    "query": ("minard.store.query:query_cmd", "Print the latest per-channel CMOS rates, base currents or occupancy."),
    "orca-replay": ("minard.pipeline.orca_replay:orca_replay_cmd", "Serve a recorded ORCA stream file to clients as ORCA does."),
    "up": ("minard.stack:up_cmd", "Start the whole stack (Redis, pipeline, web, nginx) under supervisord."),
    "down": ("minard.stack:down_cmd", "Stop every process of the stack and check that none is left."),
    "status": ("minard.stack:status_cmd", "Show every process of the stack (state, pid, uptime)."),
    "pinger": ("minard.ops.pinger:pinger_cmd", "Post heartbeats to the log server for every pipeline component."),
    "monitors": ("minard.ops.monitors:monitors_cmd", "Run the monitors of conf/monitors.cfg (Redis, disk, lag, losses)."),
    "alarms": ("minard.ops.alarmreport:alarms_cli", "List alarms (--json), KPIs, suppression flags, out of service."),
    "shift": ("minard.ops.alarmreport:shift_cli", "Shift handover summary (--since, --markdown) and note."),
    "roster": ("minard.ops.notify:roster_cli", "Show or set the on-call roster (shifter, expert, supernova)."),
    "notifier": ("minard.ops.notify:notifier_cmd", "Send alarm notifications by email and webhook; escalate."),
    "bursts": ("minard.store.bursts:bursts_cmd", "List supernova burst candidates (--json)."),
    "dq": ("minard.ops.dq:dq_cmd", "Judge a run's data quality against a reference run (--json)."),
    "dq-live": ("minard.ops.dq:dq_live_cmd", "Judge the current run every dq_interval seconds and at its end."),
    "channels": ("minard.ops.dq:channels_cli", "Flag, unflag and show channels in the channel-status database."),
}


#: The seed-named console scripts: ``minard_dispatch push|pull`` is a group like
#: ``minard``; ``data_producer`` and ``data_consumer PORT`` are single commands.
#: Each takes the same global ``--config``/``--log-level`` as ``minard``.
DISPATCH_COMMANDS = {
    "push": ("minard.pipeline.dispatch_push:push_cmd", "Read events from the dispatcher and push them to ZMQ."),
    "pull": ("minard.pipeline.dispatch_pull:pull_cmd", "Run the consumer pool: decode, aggregate, write to Redis."),
}
DATA_PRODUCER = "minard.pipeline.orca_producer:producer_cli"
DATA_CONSUMER = "minard.pipeline.orca_consumer:consumer_cli"

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
CONTEXT = {"help_option_names": ["-h", "--help"]}


def global_params() -> list[click.Parameter]:
    """The options every minard program takes before its subcommand, declared only here."""
    return [
        click.Option(["-c", "--config", "config_path"], type=click.Path(dir_okay=False), default=None,
                     metavar="FILE", help="Configuration file [$MINARD_CONFIG, else conf/minard.conf]."),
        click.Option(["--log-level"], type=click.Choice(LOG_LEVELS, case_sensitive=False), default=None,
                     help="Logging level of this process [log_level]."),
    ]


def load_config(ctx: click.Context, config_path: str | None, log_level: str | None) -> config.Config:
    """Load the configuration once, set up logging, and hand it to every subcommand as ``ctx.obj``."""
    overrides = {"log_level": log_level.upper()} if log_level else None
    try:
        cfg = config.load(overrides, path=config_path)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"configuration: {exc}") from None
    log_mod.setup(cfg["log_level"])
    ctx.obj = cfg
    return cfg


def _import(path: str):
    """The object named by ``module:attribute`` (a fixed name from the tables above)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


class LazyGroup(click.Group):
    """A click group whose subcommands (a ``name -> (path, help)`` table) are imported on first use."""

    def __init__(self, *args, commands: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.table = COMMANDS if commands is None else commands

    def list_commands(self, ctx):
        return sorted(self.table)

    def get_command(self, ctx, name):
        entry = self.table.get(name)
        return None if entry is None else _import(entry[0])

    def format_commands(self, ctx, formatter):
        # Use the table's one-line help so that --help imports nothing.
        rows = [(name, self.table[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _root_callback(config_path, log_level):
    load_config(click.get_current_context(), config_path, log_level)


main = LazyGroup(
    "minard", params=global_params(), callback=_root_callback, context_settings=CONTEXT,
    help="""minard: online monitoring of the detector's data streams.

    Data flows: data source (replay or DAQ) -> dispatcher -> producers (ZMQ)
    -> consumer pools -> Redis -> web dashboard.  Every address and port comes
    from conf/minard.conf (or --config FILE) and MINARD_* environment variables
    (docs/configuration.md).  --config and --log-level go before the subcommand:
    minard --config FILE --log-level DEBUG dispatcher.""")
click.version_option(__version__, prog_name="minard")(main)


def dispatch_group() -> click.Group:
    """``minard_dispatch push|pull``: the dispatch-stream producer and consumer pool."""
    return LazyGroup(
        "minard_dispatch", commands=DISPATCH_COMMANDS, params=global_params(), callback=_root_callback,
        context_settings=CONTEXT,
        help="The dispatch-stream monitoring: push (dispatcher -> ZMQ) and pull (ZMQ -> Redis).")


def seed_command(path: str) -> click.Command:
    """The command at *path* as a program of its own, taking the global options before its own."""
    cmd = _import(path)

    def callback(config_path, log_level, **kwargs):
        ctx = click.get_current_context()
        load_config(ctx, config_path, log_level)
        return ctx.invoke(cmd.callback, **kwargs)

    return click.Command(cmd.name, params=[*global_params(), *cmd.params], callback=callback,
                         help=cmd.help, context_settings={**CONTEXT, **cmd.context_settings})


def minard_dispatch_main():
    """Entry point of ``minard_dispatch``."""
    dispatch_group()()


def data_producer_main():
    """Entry point of ``data_producer`` (ORCA stream -> ZMQ)."""
    seed_command(DATA_PRODUCER)()


def data_consumer_main():
    """Entry point of ``data_consumer PORT`` (ZMQ -> Redis, CMOS 5557 or base 5558)."""
    seed_command(DATA_CONSUMER)()


if __name__ == "__main__":  # pragma: no cover
    main()
