"""Floors only look down (README, Architecture): an import graph of the package, read from the
source (every import statement, those inside functions included), checked against the data
flow specs -> schedule -> cost -> sim -> plan -> report -> cli; and the pure floors never
import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lynxpipe

ROOT = Path(lynxpipe.__file__).parent

FLOORS: dict[str, int] = {
    "lynxpipe": 0,  # errors, units, artifact
    "lynxpipe.specs": 1, "lynxpipe.testbed": 1,
    "lynxpipe.schedule": 2,
    "lynxpipe.cost": 3,
    "lynxpipe.sim": 4,
    "lynxpipe.plan": 5, "lynxpipe.runtime": 5,
    "lynxpipe.profile": 6, "lynxpipe.workflow": 6,
    "lynxpipe.report": 7, "lynxpipe.integrations": 7,
    "lynxpipe.cli": 8,
}
"""Floor of every top-level part; a module may import its own part or lower floors."""
SIBLING_ARTIFACTS = {("lynxpipe.runtime", "lynxpipe.plan.types")}
"""The runtime sits beside plan and sim: of them it reads only the Plan artifact."""
PURE_PARTS = ("lynxpipe.specs", "lynxpipe.schedule", "lynxpipe.cost", "lynxpipe.sim",
              "lynxpipe.plan", "lynxpipe.report", "lynxpipe.workflow", "lynxpipe.cli",
              "lynxpipe.testbed", "lynxpipe.runtime.train.job", "lynxpipe.runtime.train.result",
              "lynxpipe.runtime.limits", "lynxpipe.runtime.train.preflight", "lynxpipe.profile.run",
              "lynxpipe.integrations.megatron", "lynxpipe.integrations.flat",
              "lynxpipe.integrations.torch_export")
"""Modules that must import without torch (torch lives in the profiler and the runtime)."""


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _part(module: str) -> str:
    """The FLOORS key a module belongs to (longest prefix)."""
    keys = [k for k in FLOORS if module == k or module.startswith(k + ".")]
    return max(keys, key=len)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lynxpipe")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("lynxpipe"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if (ROOT.parent / f"{node.module}.{a.name}".replace(".", "/")).exists()
                      or (ROOT.parent / f"{node.module}.{a.name}.py".replace(".", "/")).exists()}
    return found


def import_graph() -> dict[str, set[str]]:
    """Every module of the package and the lynxpipe modules it imports."""
    return {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that look up a floor, or sideways into a sibling part."""
    bad = []
    for module, targets in sorted(graph.items()):
        mine = _part(module)
        for target in sorted(targets):
            theirs = _part(target)
            if theirs == mine or FLOORS[theirs] < FLOORS[mine]:
                continue
            if any(mine == a and (target == b or target.startswith(b + "."))
                   for a, b in SIBLING_ARTIFACTS):
                continue
            bad.append(f"{module} (floor {FLOORS[mine]}) imports {target} "
                       f"(floor {FLOORS[theirs]})")
    return bad


def test_every_module_has_a_floor() -> None:
    assert all(_part(m) for m in import_graph())


def test_floors_only_look_down() -> None:
    assert violations(import_graph()) == []


def test_sim_never_imports_plan_and_nothing_imports_cli_or_report() -> None:
    graph = import_graph()
    assert not [m for m, t in graph.items() if m.startswith("lynxpipe.sim")
                and any(x.startswith("lynxpipe.plan") for x in t)]
    for top in ("lynxpipe.cli", "lynxpipe.report"):
        users = {m for m, t in graph.items() if any(x.startswith(top) for x in t)}
        assert {_part(u) for u in users} <= {top, "lynxpipe.cli"}, (top, users)


def test_the_checker_catches_an_upward_import() -> None:
    assert violations({"lynxpipe.sim.engine": {"lynxpipe.plan.types"}})
    assert violations({"lynxpipe.runtime.model.layer": {"lynxpipe.plan.heu"}})
    assert not violations({"lynxpipe.runtime.pipeline.executor": {"lynxpipe.plan.types"}})


def test_pure_floors_do_not_import_torch() -> None:
    modules = sorted(m for m in import_graph() if not m.endswith("__main__")
                     and any(m == p or m.startswith(p + ".") for p in PURE_PARTS))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
            + "assert not bad, bad[:5]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
