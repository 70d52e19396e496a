"""The planner, simulator, cost model and reports must never import torch (SPEC §2)."""

import subprocess
import sys

PURE = ["lynxpipe.specs", "lynxpipe.cost.table", "lynxpipe.cost.flops", "lynxpipe.schedule.orders",
        "lynxpipe.schedule.validate", "lynxpipe.sim.engine", "lynxpipe.plan.planners",
        "lynxpipe.plan.types"]


def test_pure_modules_do_not_import_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in PURE)
            + "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
            + "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
