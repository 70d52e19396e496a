"""Do the emulated sweep's predictions still describe this code? Re-plan every cell from the
profiles the sweep measured (benchmarks/results/emulated_overlap/profiles/) and compare each
policy's predicted step time and peak with results.json. Pure planning: no ranks, no root.

    python benchmarks/emulated_replan.py        # exit 1 if any cell's prediction differs
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import emulated_overlap as eo


def main() -> int:
    data = json.loads((eo.OUT / "results.json").read_text())
    stored = {(c["layout"], c["rate"], c["policy"], c["budget_bytes"]): c for c in data["cells"]}
    differ, count = [], 0
    with tempfile.TemporaryDirectory() as work:
        for layout, rate in sorted({(c["layout"], c["rate"]) for c in data["cells"]}):
            prof = eo.profile_path(layout, rate)
            if not prof.exists():
                print(f"{layout} @ {rate}: no stored profile (run before profiles were kept)")
                return 1
            specs, _ = eo.plan_cells(prof, eo.LAYOUTS[layout], data["meta"]["budgets"],
                                     Path(work))
            for spec in specs:
                cell, count = stored[(layout, rate, spec["policy"], spec["budget_bytes"])], count + 1
                if (abs(cell["predicted_ms"] - spec["predicted_ms"]) > 1e-6
                        or cell["predicted_peak_bytes"] != spec["predicted_peak_bytes"]):
                    differ.append(f"{layout} @ {rate} {spec['policy']} {spec['budget_bytes']:,} B: "
                                  f"{cell['predicted_ms']:,.1f} -> {spec['predicted_ms']:,.1f} ms")
    print(f"{count} cells re-planned from the stored profiles (sweep at {data['meta']['commit']}); "
          f"{len(differ)} predictions differ")
    print("\n".join(differ))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
