"""Do the emulated sweep's predictions still describe this code? Re-plan every cell from the
profiles the sweep measured (benchmarks/results/emulated_overlap/profiles/) and compare each
policy's predicted step time and peak with results.json at the budgets it ran, and (where the
sweep kept them) the predictions from the op times measured beside the runs. Pure planning: no
ranks, no root.

    python benchmarks/emulated_replan.py        # exit 1 if any cell's prediction differs
    python benchmarks/emulated_replan.py --model gpt-medium-cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import emulated_overlap as eo

from lynxpipe.artifact import from_dict
from lynxpipe.profile.assemble import median_ops, retime
from lynxpipe.profile.samples import OpSamples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=eo.MODEL, choices=eo.MODELS)
    model = ap.parse_args().model
    data = json.loads((eo.out_dir(model) / "results.json").read_text())
    stored = {(c["layout"], c["rate"], c["policy"], c["budget_bytes"]): c for c in data["cells"]}
    differ, count = [], 0
    with tempfile.TemporaryDirectory() as work:
        for layout, rate in sorted({(c["layout"], c["rate"]) for c in data["cells"]}):
            prof = eo.profile_path(layout, rate, model)
            if not prof.exists():
                print(f"{layout} @ {rate}: no stored profile (run before profiles were kept)")
                return 1
            probe, analytic = eo.requests(prof, eo.LAYOUTS[layout], model)
            ran = sorted({c["budget_bytes"] for c in data["cells"]
                          if (c["layout"], c["rate"]) == (layout, rate)})
            specs, plans, _ = eo.plan_cells(probe, ran, Path(work))
            ops = eo.ops_path(layout, rate, model)
            if ops.exists():
                timed = [from_dict(OpSamples, o) for o in json.loads(ops.read_text())]
                eo.in_run_predictions(specs, plans, retime(probe.costs, analytic.costs,
                                                           median_ops(timed)))
            for spec in specs:
                cell, count = stored[(layout, rate, spec["policy"], spec["budget_bytes"])], count + 1
                for key in ("predicted_ms", "inrun_predicted_ms"):
                    old, new = cell.get(key), spec.get(key)
                    if (old is None) != (new is None) or (
                            old is not None and abs(old - new) > 1e-6):
                        differ.append(f"{layout} @ {rate} {spec['policy']} "
                                      f"{spec['budget_bytes']:,} B {key}: {old} -> {new}")
                if cell["predicted_peak_bytes"] != spec["predicted_peak_bytes"]:
                    differ.append(f"{layout} @ {rate} {spec['policy']} "
                                  f"{spec['budget_bytes']:,} B: peak differs")
    print(f"{count} cells re-planned from the stored profiles (sweep at {data['meta']['commit']}); "
          f"{len(differ)} predictions differ")
    print("\n".join(differ))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
