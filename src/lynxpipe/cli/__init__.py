"""Command-line interface: `lynxpipe plan | simulate | compare | profile | train | export |
cluster`.

One module per verb group (`planning`, `profile`, `train`, `cluster`), shared flags and error
handling in `common`; the commands are registered here, explicitly, and nothing below the CLI
imports it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from lynxpipe.cli import export, planning, profile, train
from lynxpipe.cli.cluster import cluster_app
from lynxpipe.cli.common import DEFAULTS
from lynxpipe.cli.shell import LynxGroup, version_callback

__all__ = ["DEFAULTS", "app", "main"]

app = typer.Typer(
    cls=LynxGroup,
    help="Plan, simulate and compare activation recomputation overlapped with communication.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=version_callback, is_eager=True,
        help="Print the version and exit.")] = False) -> None:
    """Plan, simulate and compare activation recomputation overlapped with communication."""


app.command("simulate")(planning.simulate)
app.command("compare")(planning.compare)
app.command("plan")(planning.plan)
app.command("profile")(profile.profile_command)
app.command("train", help=train.HELP)(train.train_command)
app.command("export")(export.export_command)
app.add_typer(cluster_app, name="cluster")


def main() -> None:
    """Console-script entry point (errors: `shell.LynxGroup`, one line each)."""
    app()
