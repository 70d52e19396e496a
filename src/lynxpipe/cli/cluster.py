"""`lynxpipe cluster up|down|status`: a persistent emulated cluster (see `testbed.netns`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lynxpipe.errors import LynxError
from lynxpipe.testbed import netns
from lynxpipe.testbed.spec import (
    DEFAULT_LATENCY_MS,
    EmulatedCluster,
    parse_latency,
    parse_rate,
    rank_address,
    rank_interface,
    rank_namespace,
)
from lynxpipe.units import parse_bytes

cluster_app = typer.Typer(help="Emulated cluster: a network namespace per rank, shaped links "
                               "(needs root).", no_args_is_help=True)
_out = Console()
_err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., None])


def _clean_errors(command: F) -> F:
    """LynxError -> one red line on stderr and exit code 2, no traceback."""
    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> None:
        try:
            command(*args, **kwargs)
        except LynxError as error:
            _err.print(Text(f"error: {error}", style="red"), soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper  # type: ignore[return-value]


@cluster_app.command("up")
@_clean_errors
def up_command(
    ranks: int = typer.Option(2, "--ranks", help="Ranks (one namespace each)."),
    rate: str = typer.Option("1gbit", "--rate", help="Link rate, e.g. 200mbit, 2gbit."),
    latency: str = typer.Option(f"{DEFAULT_LATENCY_MS:g}ms", "--latency",
                                help="tbf latency: the most a packet queues (adds no delay)."),
    tp_rate: Optional[str] = typer.Option(None, "--tp-rate", help="Rate towards TP peers."),
    pp_rate: Optional[str] = typer.Option(None, "--pp-rate", help="Rate towards PP peers."),
    tp: int = typer.Option(1, "--tp", help="TP degree (ranks laid out tp, dp, pp)."),
    pp: int = typer.Option(1, "--pp", help="PP degree."),
    burst: Optional[str] = typer.Option(None, "--burst", help="tbf burst, e.g. 16KiB "
                                        "(default: 0.5 ms of the rate, >= 8 KiB)."),
    cluster_id: int = typer.Option(0, "--id", help="Cluster id 0..255 (10.213.<id>.0/24)."),
) -> None:
    """Bring a cluster up (idempotent); it stays until `lynxpipe cluster down`."""
    cluster = EmulatedCluster(
        num_ranks=ranks, rate_mbit=parse_rate(rate, "--rate"),
        latency_ms=parse_latency(latency, "--latency"),
        burst_bytes=parse_bytes(burst, "--burst") if burst else None,
        tp_rate_mbit=parse_rate(tp_rate, "--tp-rate") if tp_rate else None,
        pp_rate_mbit=parse_rate(pp_rate, "--pp-rate") if pp_rate else None,
        tp_size=tp, pp_size=pp, cluster_id=cluster_id)
    handle = netns.up(cluster)
    verb = "created" if handle.created else "already up"
    _out.print(f"cluster {cluster_id} {verb}: {ranks} ranks, master {netns.master_addr(handle)}")
    _out.print(_rank_table(cluster))


def _rank_table(c: EmulatedCluster) -> Table:
    table = Table("rank", "namespace", "interface", "address", "rate to peers (Mbit/s)")
    for rank in range(c.num_ranks):
        rates = sorted({(c.link_kind(rank, p), c.rate_for(c.link_kind(rank, p)))
                        for p in range(c.num_ranks) if p != rank})
        table.add_row(str(rank), rank_namespace(c.cluster_id, rank), rank_interface(rank),
                      rank_address(c.cluster_id, rank),
                      ", ".join(f"{kind} {rate:g}" for kind, rate in rates) or "-")
    return table


@cluster_app.command("down")
@_clean_errors
def down_command(
    cluster_id: Optional[int] = typer.Option(None, "--id", help="The cluster to remove."),
    all_clusters: bool = typer.Option(False, "--all", help="Remove every lynx cluster."),
) -> None:
    """Tear a cluster down, killing what runs inside it (idempotent)."""
    if (cluster_id is None) == (not all_clusters):
        raise LynxError("give exactly one of --id N or --all")
    if all_clusters:
        removed = netns.down_all()
        _out.print(f"removed clusters: {', '.join(map(str, removed))}" if removed
                   else "no lynx clusters were up")
    elif netns.down(cluster_id):  # type: ignore[arg-type]
        _out.print(f"cluster {cluster_id} removed")
    else:
        _out.print(f"cluster {cluster_id} was not up")


@cluster_app.command("status")
@_clean_errors
def status_command() -> None:
    """List the lynx clusters on this machine."""
    found = netns.status()
    if not found:
        _out.print("no lynx clusters are up")
        return
    table = Table("id", "ranks", "rate (Mbit/s)", "owner", "processes", "namespaces")
    for st in found:
        c = st.cluster
        owner = "persistent" if st.owner is None else f"pid {st.owner}"
        table.add_row(str(st.cluster_id), str(c.num_ranks) if c else "?",
                      _rates(c) if c else "?",
                      "[red]stale[/red]" if st.stale else owner, str(st.num_processes),
                      " ".join(st.namespaces))
    _out.print(table)


def _rates(c: EmulatedCluster) -> str:
    extra = [f"{k} {r:g}" for k, r in (("tp", c.tp_rate_mbit), ("pp", c.pp_rate_mbit)) if r]
    return ", ".join([f"{c.rate_mbit:g}", *extra])
