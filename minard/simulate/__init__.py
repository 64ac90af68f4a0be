"""Deterministic synthetic data for volume tests, benchmarks and the demo stack.

``minard simulate zdab`` writes ZDAB files of PMT events (see ``events.py``);
``minard simulate orca`` writes ORCA streams of XL3 CMOS-rate and base-current
records (see ``orca.py``).  The same seed always gives the same bytes.
"""

import click


@click.group()
def simulate():
    """Write synthetic ZDAB files and ORCA streams (seeded, reproducible)."""


def _register() -> None:
    from minard.simulate.events import zdab_cmd
    from minard.simulate.orca import orca_cmd

    simulate.add_command(zdab_cmd, "zdab")
    simulate.add_command(orca_cmd, "orca")


_register()
