"""Terminal output: the comparison table and the progress line shown while planning."""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from lynxpipe.plan.types import Plan
from lynxpipe.report.tables import headline, plans_table, setup_line
from lynxpipe.specs.cluster import ClusterSpec
from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec


def stdout_console(wide: bool = True) -> Console:
    """A console on stdout; piped output is 100 columns wide (200 for `wide` tables) rather
    than folded to 80."""
    console = Console()
    return console if console.is_terminal else Console(width=200 if wide else 100)


def planning_progress(quiet: bool) -> Progress:
    """A transient progress line on stderr, so stdout stays clean for tables and JSON."""
    console = Console(stderr=True)
    # Off the terminal a progress bar is noise in logs (and an extra stderr line).
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    console=console, transient=True, disable=quiet or not console.is_terminal)


def print_comparison(plans: Sequence[Plan], model: ModelSpec, cluster: ClusterSpec,
                     par: ParallelSpec, budget_bytes: int, wide: bool = False) -> None:
    """The table of every plan (100 columns; `wide`: every column), then the headline: the
    fastest fitting policy against the strongest baseline and full recompute."""
    console = stdout_console(wide)
    # the setup line above the table, not as its title: a title wraps at the table's width
    console.print(setup_line(model, cluster, par, budget_bytes), highlight=False)
    console.print(plans_table(plans, wide=wide))
    line = headline(plans)
    if line is not None:
        console.print(line, highlight=False)
