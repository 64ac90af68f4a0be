"""The ``minard`` command line, declared once.

Each subcommand lives in the module of its concept and is imported only when it
is run (so ``minard dump`` never imports Flask).  The table below is the only
place a new subcommand is registered.
"""

from __future__ import annotations

import importlib

import click

from minard import __version__

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


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        entry = COMMANDS.get(name)
        if entry is None:
            return None
        module, _, attr = entry[0].partition(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        # Use the table's one-line help so that --help imports nothing.
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="minard")
def main():
    """minard: online monitoring of the detector's data streams.

    Data flows: data source (replay or DAQ) -> dispatcher -> producers (ZMQ)
    -> consumer pools -> Redis -> web dashboard.  Every address and port comes
    from conf/minard.conf or MINARD_* environment variables.
    """


def _seed_alias(subcommand_path: str):
    """Build an entry point for one of the original site's command names."""

    def run():
        module, _, attr = subcommand_path.partition(":")
        getattr(importlib.import_module(module), attr)()

    return run


#: ``minard_dispatch push|pull`` (the dispatch-stream producer and consumers).
minard_dispatch_main = _seed_alias("minard.pipeline.cli:cli")
#: ``data_producer`` (ORCA stream -> ZMQ) and ``data_consumer PORT``.
data_producer_main = _seed_alias("minard.pipeline.orca_producer:producer_cli")
data_consumer_main = _seed_alias("minard.pipeline.orca_consumer:consumer_cli")

if __name__ == "__main__":  # pragma: no cover
    main()
