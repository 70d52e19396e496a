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
from lynxpipe.report.tables import best_fitting, plans_table, setup_line
from lynxpipe.specs.cluster import ClusterSpec
from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec


def stdout_console() -> Console:
    """A console on stdout; piped output gets a wide table rather than one folded to 80."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def planning_progress(quiet: bool) -> Progress:
    """A transient progress line on stderr, so stdout stays clean for tables and JSON."""
    console = Console(stderr=True)
    # Off the terminal a progress bar is noise in logs (and an extra stderr line).
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    console=console, transient=True, disable=quiet or not console.is_terminal)


def print_comparison(plans: Sequence[Plan], model: ModelSpec, cluster: ClusterSpec,
                     par: ParallelSpec, budget_bytes: int) -> None:
    """The table of every plan, then which fitting policy is fastest and by how much."""
    console = stdout_console()
    console.print(plans_table(plans, setup_line(model, cluster, par, budget_bytes)))
    best = best_fitting(plans)
    if best is None:
        return
    full = next((p for p in plans if p.policy == "full"), None)
    speedup = ""
    if full is not None and best.predicted.step_time_ms > 0:
        ratio = full.predicted.step_time_ms / best.predicted.step_time_ms
        speedup = f", {ratio:.2f}x faster than full recompute"
    console.print(f"fastest within the budget: {best.policy} "
                  f"({best.predicted.step_time_ms:,.1f} ms{speedup})", highlight=False)
