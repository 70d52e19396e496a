"""PNG plots: the pipeline timeline with its memory curve, and the policy comparison bars."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display, works on headless machines

import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from lynxpipe.errors import LynxError  # noqa: E402
from lynxpipe.sim.result import SimResult  # noqa: E402
from lynxpipe.units import format_ms, format_size, size_unit  # noqa: E402

COLORS: dict[str, str] = {
    "forward": "#4c72b0",
    "backward": "#55a868",
    "tp_comm": "#b39ddb",
    "p2p": "#8c6d31",
    "recompute_hidden": "#64b5cd",
    "recompute_exposed": "#d62728",
    "idle": "#d9d9d9",
    "tail": "#ccb974",
}

# F and B boxes span their whole action, collectives and recompute included: draw them
# underneath, and what happens inside them on top.
_BACKGROUND = frozenset({"forward", "backward"})

# Row layout of one rank: the compute stream is the thick bar, the comm stream a thin one below.
_LANES = {"compute": (0.0, 0.6), "comm": (0.65, 0.25)}
# TP waits come by the hundred inside each F/B: a half-height strip keeps the F/B color visible
# underneath instead of aliasing into one solid block.
_TP_LANE = (0.3, 0.3)


def _lane(stream: str, cat: str) -> tuple[float, float]:
    if stream == "compute" and cat == "tp_comm":
        return _TP_LANE
    return _LANES.get(stream, _LANES["comm"])


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    except OSError as exc:
        raise LynxError(f"cannot write plot {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path


_MARKED = {"recompute_hidden": "v", "recompute_exposed": "v"}
"""Categories also marked above their rank: a 24 ms recompute on a 3 s axis is a sliver
narrower than a pixel, and the marker shows where it is."""


def _draw_timeline(ax: Any, sim: SimResult) -> None:
    boxes: dict[tuple[int, str, str], list[tuple[float, float]]] = defaultdict(list)
    for ev in sim.events:
        boxes[(ev.rank, ev.stream, ev.cat)].append((ev.start_ms, ev.dur_ms))
    for (rank, stream, cat), spans in boxes.items():
        offset, height = _lane(stream, cat)
        below = cat in _BACKGROUND
        # a white edge on every box: back-to-back messages stay told apart instead of merging
        ax.broken_barh(spans, (rank + offset, height), facecolors=COLORS.get(cat, "#777777"),
                       edgecolor="white", linewidth=0.4 if below else 0.3,
                       zorder=1 if below else 2)
        if cat in _MARKED:
            ax.scatter([start + dur / 2 for start, dur in spans], [rank - 0.04] * len(spans),
                       marker=_MARKED[cat], s=14, color=COLORS[cat], edgecolors="black",
                       linewidths=0.3, zorder=3, clip_on=False)
    num_ranks = len(sim.ranks)
    ax.set_ylim(num_ranks, -0.2)
    ax.set_yticks([r + 0.45 for r in range(num_ranks)], [f"rank {r}" for r in range(num_ranks)])
    ax.set_xlim(0, sim.step_time_ms or 1.0)
    ax.tick_params(axis="x", labelbottom=True)  # sharex hides them: the top panel needs its own
    ax.set_xlabel("time (ms)", fontsize=8)
    present = {cat for (_, _, cat) in boxes}
    handles = [Patch(color=c, label=cat.replace("_", " ")) for cat, c in COLORS.items()
               if cat in present]
    if present & set(_MARKED):
        handles.append(Line2D([], [], marker="v", linestyle="none", color="#777777",
                              markeredgecolor="black", label="recompute (marker above rank)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8,
              frameon=False)
    ax.set_title("compute stream (thick; TP waits in its lower half) and p2p stream (thin)",
                 fontsize=9, loc="left")


def _draw_memory(ax: Any, sim: SimResult, budget_bytes: int | None, reserve_bytes: int) -> None:
    curves = []
    for rank, timeline in enumerate(sim.memory_timeline):
        base = sim.ranks[rank].static_bytes + reserve_bytes
        times = [0.0] + [t for t, _ in timeline] + [sim.step_time_ms]
        values = [base] + [base + b for _, b in timeline]
        values.append(values[-1])
        curves.append((rank, times, values))
    top = max([budget_bytes or 0, *(max(v) for _, _, v in curves)], default=0)
    unit, scale = size_unit(top)  # MiB for tiny models: never a flat line at 0.0 GiB
    for rank, times, values in curves:
        ax.plot(times, [v / scale for v in values], drawstyle="steps-post", linewidth=1.0,
                label=f"rank {rank}")
    if budget_bytes:
        ax.axhline(budget_bytes / scale, color="black", linestyle="--", linewidth=1.0,
                   label="budget")
    ax.set_ylabel(f"device memory ({unit})")
    ax.set_xlabel("time (ms)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    ax.set_title("static state + reserve + activations", fontsize=9, loc="left")


def plot_timeline(sim: SimResult, path: str | Path, title: str,
                  budget_bytes: int | None = None, reserve_bytes: int = 0,
                  costs: str = "") -> Path:
    """Timeline of every rank (boxes colored by category) over its memory curve, as a PNG;
    `costs` names where the times come from (`measured profile, cpu`)."""
    num_ranks = max(1, len(sim.ranks))
    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(14, 2.4 + 0.55 * num_ranks + 2.8),
        gridspec_kw={"height_ratios": [max(1.5, 0.55 * num_ranks), 2.8], "hspace": 0.35})
    _draw_timeline(top, sim)
    _draw_memory(bottom, sim, budget_bytes, reserve_bytes)
    source = f"; costs: {costs}" if costs else ""
    fig.suptitle(f"{title}\nstep {format_ms(sim.step_time_ms)} ms{source}", fontsize=10,
                 x=0.01, horizontalalignment="left")
    return _save(fig, path)


def plot_compare(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Bars of step time per policy; policies over the budget are hatched, red-edged, marked.

    `rows` are plan JSON summaries (keys policy, step_time_ms, fits_budget, peak_memory_bytes).
    """
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.2))
    names = [str(r["policy"]) for r in rows]
    times = [float(r["step_time_ms"]) for r in rows]
    bars = ax.bar(names, times, color="#4c72b0", edgecolor="#4c72b0")
    for bar, row in zip(bars, rows):
        peak = format_size(max(row.get("peak_memory_bytes") or [0]))
        label = f"{format_ms(bar.get_height())} ms\n{peak}"
        if not row["fits_budget"]:
            bar.set_facecolor("white")
            bar.set_edgecolor("#d62728")
            bar.set_hatch("//")
            label += "\nover budget"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("step time (ms)")
    ax.set_ylim(0, max(times, default=1.0) * 1.25)
    ax.legend(handles=[Patch(facecolor="#4c72b0", label="fits budget"),
                       Patch(facecolor="white", edgecolor="#d62728", hatch="//",
                             label="does not fit")], fontsize=8, loc="upper left",
              bbox_to_anchor=(1.005, 1.0), frameon=False)
    ax.set_title(title or "step time per policy", fontsize=9, loc="left")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    return _save(fig, path)
