"""Command-line interface: `lynxpipe plan | simulate | compare | profile | train | export |
cluster`.

One module per verb group (`planning`, `profile`, `train`, `cluster`), shared flags and error
handling in `common`; the commands are registered here, explicitly, and nothing below the CLI
imports it.
"""

from __future__ import annotations

import sys

import typer

from lynxpipe.cli import export, planning, profile, train
from lynxpipe.cli.cluster import cluster_app
from lynxpipe.cli.common import DEFAULTS, print_error
from lynxpipe.errors import LynxError

__all__ = ["DEFAULTS", "app", "main"]

app = typer.Typer(
    help="Plan, simulate and compare activation recomputation overlapped with communication.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.command("simulate")(planning.simulate)
app.command("compare")(planning.compare)
app.command("plan")(planning.plan)
app.command("profile")(profile.profile_command)
app.command("train", help=train.HELP)(train.train_command)
app.command("export")(export.export_command)
app.add_typer(cluster_app, name="cluster")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except LynxError as exc:  # raised outside a command (e.g. by a sub-app): same contract
        print_error(str(exc))
        sys.exit(2)
