"""Output directories of `simulate --out` and `compare --out`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from lynxpipe.artifact import write_json_atomic
from lynxpipe.errors import LynxError
from lynxpipe.plan.types import Plan
from lynxpipe.report.tables import (
    plan_json_summary,
    plans_markdown,
    setup_line,
    spec_header,
)
from lynxpipe.report.trace import write_trace
from lynxpipe.sim.result import SimResult


def _json(path: Path, payload: Any) -> Path:
    try:
        return write_json_atomic(path, payload)
    except OSError as exc:
        raise LynxError(f"cannot write {path}: {exc.strerror or exc}") from None


def _text(path: Path, text: str) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise LynxError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def result_payload(plan: Plan) -> dict[str, Any]:
    """result.json: what the plan was for and its predicted figures."""
    return {**spec_header(plan.model, plan.cluster, plan.parallel, plan.budget_bytes),
            **plan_json_summary(plan)}


def write_simulation(out_dir: str | Path, plan: Plan, sim: SimResult,
                     costs: str = "") -> list[Path]:
    """trace.json, timeline.png and result.json of one simulated plan (sim made with trace);
    `costs` names where its times come from (`CostTable.label`), for the plot's title."""
    from lynxpipe.report.plot import (
        plot_timeline,  # matplotlib only when files are wanted
    )

    out = Path(out_dir)
    title = f"{plan.policy}: " + setup_line(plan.model, plan.cluster, plan.parallel,
                                            plan.budget_bytes)
    return [
        write_trace(out / "trace.json", sim),
        plot_timeline(sim, out / "timeline.png", title, plan.budget_bytes,
                      plan.reserve_bytes, costs),
        _json(out / "result.json", result_payload(plan)),
    ]


def write_comparison(out_dir: str | Path, payload: dict[str, Any], plans: Sequence[Plan],
                     sims: Sequence[SimResult], costs: str = "") -> list[Path]:
    """compare.json/.md/.png, and each policy's simulation files under `<out>/<policy>/`."""
    from lynxpipe.report.plot import plot_compare

    out = Path(out_dir)
    title = ""
    if plans:
        first = plans[0]
        title = setup_line(first.model, first.cluster, first.parallel, first.budget_bytes)
    written = [
        _json(out / "compare.json", payload),
        _text(out / "compare.md", f"# lynxpipe compare\n\n{title}\n\n" + plans_markdown(plans)),
        plot_compare(payload["results"], out / "compare.png", title),
    ]
    for plan, sim in zip(plans, sims):
        written += write_simulation(out / plan.policy, plan, sim, costs)
    return written
