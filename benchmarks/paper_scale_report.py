"""Tables, analysis text and figure of the paper-scale benchmark (`paper_scale.py` runs it).

Every sentence here is computed from the rows in results.json, so `--render-only` rewrites the
report after a change to it without planning again.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

from lynxpipe.report.tables import gib

Row = dict[str, Any]
BEGIN, END = "<!-- paper_scale:begin -->", "<!-- paper_scale:end -->"
CLUSTERS = ("a100-nvlink", "a100-pcie", "ascend-910b")
POLICIES = ("none", "full", "full-block", "selective", "checkmate", "adapipe", "lynx-heu",
            "lynx-opt")
ON_DEMAND = ("selective", "checkmate", "adapipe")
GAP_TOL = 1e-4  # HiGHS' default relative MIP gap: above it, a solve stopped at its time limit


# -- tables -------------------------------------------------------------------------------------
def _table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 2) -> str:
    align = [":---" if i < left else "---:" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def pct(x: float | None, sign: bool = True) -> str:
    return "–" if x is None else (f"{100 * x:+.1f}%" if sign else f"{100 * x:.0f}%")


def model_label(r: Row) -> str:
    """The model with its attention variant (rows before issue 10 had only explicit)."""
    return f"{r['layout']['model']} {r.get('attention', 'explicit')}"


def row_label(r: Row) -> str:
    return f"{r['cluster']} {model_label(r)} @ {pct(r['budget']['fraction'], False)}"


def _cell(row: Row, name: str) -> str:
    rec = row["policies"].get(name)
    if rec is None:
        return "–"
    text = f"{rec['step_time_ms']:,.0f}"
    if name != "none":
        text += f" ({row['derived']['speedup_over_full'][name]:.2f}×)"
    return text + ("" if rec["fits_budget"] else " ✗")


def layout_table(rows: Sequence[Row]) -> str:
    """One line per model: layout, memory under `none`, the budgets the rule gave."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(model_label(r), []).append(r)
    out = []
    for name, group in groups.items():
        lay, b = group[0]["layout"], group[0]["budget"]
        budgets = sorted({(g["budget"]["fraction"], gib(g["budget"]["budget_bytes"])
                           + (" (cap)" if g["budget"]["capped_at_device_memory"] else ""))
                          for g in group}, reverse=True)
        out.append([name, f"{lay['tp']}/{lay['pp']}/{lay['dp']}", str(group[0]["devices"]),
                    f"{lay['micro_batch']} × {lay['microbatches']}", gib(b["static_bytes"]),
                    gib(b["none_activation_bytes"]),
                    ", ".join(f"{int(100 * f)}%: {v}" for f, v in budgets)])
    return _table(["model", "tp/pp/dp", "devices", "micro-batch × m", "static GiB (fullest rank)",
                   "`none` activations GiB (fullest rank)", "budget GiB per fraction"], out)


def step_table(rows: Sequence[Row], names: Sequence[str]) -> str:
    """Step time (speedup over full) per policy, best on-demand and HEU/OPT gap per row."""
    out = []
    for r in rows:
        d, best = r["derived"], r["derived"]["best_on_demand"]
        out.append([r["cluster"], model_label(r), gib(r["budget"]["budget_bytes"])]
                   + [_cell(r, n) for n in names]
                   + [best or "none fits",
                      f"{d['heu_over_best_on_demand']:.3f}×" if best else "–",
                      pct(d["heu_opt_gap"])])
    return _table(["cluster", "model", "budget GiB"] + list(names)
                  + ["best on-demand", "HEU vs it", "HEU/OPT−1"], out)


def planning_table(rows: Sequence[Row], names: Sequence[str]) -> str:
    """Planner wall time (plan.planner_ms) of each policy; lynx-heu also as a median of reruns."""
    out = []
    for r in rows:
        cells = [("–" if n not in r["policies"] else f"{r['policies'][n]['planner_ms']:,.0f}"
                  + (" (limit)" if n == "lynx-opt" and r["policies"][n]["hit_time_limit"]
                     else "")) for n in names]
        out.append([r["cluster"], model_label(r), pct(r["budget"]["fraction"], False)]
                   + cells + [f"{r['heu_median_ms']:,.0f} / {r['heu_median_cpu_ms']:,.0f}"])
    return _table(["cluster", "model", "budget frac."] + list(names)
                  + [f"lynx-heu median of {len(rows[0]['heu_repeat_ms'])}: wall / CPU"], out)


def _use(w: dict[str, Any], name: str) -> str:
    if name not in w:
        return "–"
    tasks = ", ".join(f"{k} {v}" for k, v in sorted(w[name]["tasks_by_window"].items()))
    return f"{w[name]['hidden_ms']:,.0f} / {w[name]['exposed_ms']:,.0f} ({tasks or 'none'})"


def _kept(r: Row) -> str:
    """Which candidate lynx-opt returned (its MILP plan, or lynx-heu/checkmate/full's)."""
    won = r["policies"].get("lynx-opt", {}).get("chosen_from")
    return won.split(" (")[0] if won else "–"


def diagnostics_table(rows: Sequence[Row]) -> str:
    """What overlapping could and did gain: overheads over `none`, windows, hidden/exposed."""
    out = []
    for r in rows:
        d, w, lw = r["derived"], r["derived"]["heu_worst_rank"], r["windows_per_layer"]
        out.append([r["cluster"], model_label(r), pct(r["budget"]["fraction"], False),
                    pct(d["best_on_demand_over_none"]), pct(d["heu_over_none"]),
                    pct(d["overlap_share"], False),
                    f"{lw['layer_fwd_ms']:.2f} / {lw['fwd_tp_wait_ms']:.2f} / "
                    f"{lw['bwd_remainder_ms']:.2f}", f"{w['rank']}",
                    f"{w['none_tp_wait_ms']:,.0f} / {w['none_idle_ms']:,.0f}",
                    _use(w, "lynx-heu"), _use(w, "lynx-opt"), _kept(r)])
    return _table(["cluster", "model", "budget frac.", "best on-demand vs `none`",
                   "lynx-heu vs `none`", "overlap share",
                   "per layer·mb: fwd / fwd TP wait / bwd AR remainder (ms)", "rank",
                   "`none` on rank: TP waits / idle (ms)",
                   "lynx-heu on rank: hidden / exposed ms (R tasks by window)",
                   "lynx-opt on rank: same", "lynx-opt kept"], out, left=3)


# -- analysis -----------------------------------------------------------------------------------
OVERLAPS = """Every policy runs on the same simulated timeline with the same communication
optimisations (SPEC §4, honest baselines), so lynx can only gain from idle time that remains:
- backward: each input-gradient all-reduce (QKV, FC1) is issued after its dgrad and overlapped
  with the weight-gradient GEMM, as Megatron does; only the remainder is idle (a window);
- p2p `SEND_F`/`SEND_B` run on a separate communication stream and never block compute; a
  `RECV` wait is idle time for every policy (a window for lynx);
- forward TP all-reduces block compute for every policy (Megatron does not overlap them); lynx
  may fill them with recompute, 0.9 of each window usable (contention);
- recompute never replays a collective (segment recompute) except in layers marked `full`
  (Megatron `full`/`full-block`, or a planner's all-drop fallback), which replay the forward
  all-reduces on the critical path as Megatron's reentrant checkpoint does;
- the DP gradient all-reduce and the optimizer step follow the pipeline flush, unoverlapped,
  identically for every policy."""

# (a, b): when both fit, `a` should not be slower than `b`.
DOMINANCE = (("lynx-heu", "checkmate"), ("lynx-heu", "adapipe"), ("lynx-heu", "selective"),
             ("lynx-heu", "full-block"), ("lynx-heu", "full"), ("lynx-opt", "lynx-heu"),
             ("checkmate", "selective"), ("checkmate", "full"), ("adapipe", "checkmate"),
             ("full-block", "full"))


def anomalies(rows: Sequence[Row], tol: float = 5e-4) -> list[str]:
    """A policy slower than one it should dominate, or faster than `none` on its partition."""
    out = []
    for r in rows:
        pol = r["policies"]
        for a, b in DOMINANCE:
            if a in pol and b in pol and pol[a]["fits_budget"] and pol[b]["fits_budget"] \
                    and pol[a]["step_time_ms"] > pol[b]["step_time_ms"] * (1 + tol):
                out.append(f"{row_label(r)}: `{a}` {pol[a]['step_time_ms']:,.1f} ms is slower than "
                           f"`{b}` {pol[b]['step_time_ms']:,.1f} ms")
        none = pol["none"]
        out += [f"{row_label(r)}: `{n}` {p['step_time_ms']:,.1f} ms is faster than `none` "
                f"{none['step_time_ms']:,.1f} ms on the same partition" for n, p in pol.items()
                if p["partition"] == none["partition"]
                and p["step_time_ms"] < none["step_time_ms"] * (1 - tol)]
    return out


def target_heu_time(rows: Sequence[Row]) -> str:
    """Issue 10: lynx-heu < 0.2 s on every row, < 0.05 s at the median (median of reruns)."""
    times = [r["heu_median_ms"] for r in rows]
    slow = [r for r in rows if r["heu_median_ms"] >= 200]
    med = statistics.median(times)
    slowest = max(rows, key=lambda r: r["heu_median_ms"])
    text = (f"- **lynx-heu plans every row in < 0.2 s**: **{'met' if not slow else 'missed'}** — "
            f"under 0.2 s on {len(rows) - len(slow)}/{len(rows)} rows (median of "
            f"{len(rows[0]['heu_repeat_ms'])} reruns each; slowest {slowest['heu_median_ms']:,.0f}"
            f" ms, {row_label(slowest)}).\n- **lynx-heu median < 0.05 s**: "
            f"**{'met' if med < 50 else 'missed'}** — median {med:,.0f} ms over all rows "
            f"(CPU time {statistics.median(r['heu_median_cpu_ms'] for r in rows):,.0f} ms).")
    if slow or med >= 50:
        by_att = {a: statistics.median(r["heu_median_ms"] for r in rows if r["attention"] == a)
                  for a in sorted({r["attention"] for r in rows})}
        slow_att = sorted({r["attention"] for r in slow})
        text += (" No MILP runs on these regular stages (keep sets: a replicated-layer "
                 "knapsack, re-picked by the exact count programme `plan/countdp.py` where it "
                 "would send layers to `full`; the never-slower-than-checkmate candidate comes "
                 "from the same programme, and is left out on a partition where lynx-heu's plan "
                 "already beats checkmate's lower bound). Median by attention: "
                 + ", ".join(f"{a} {ms:,.0f} ms" for a, ms in by_att.items())
                 + (f"; the rows at or over 0.2 s are all {slow_att[0]}" if len(slow_att) == 1
                    else "") + ". What is left is work per candidate, with no single hot spot: "
                 "simulating the window-aware candidates (each new set of keep sets and "
                 "windows is summarised afresh), the count programme and the "
                 "knapsack over every keep/drop option of a layer (over 40 with explicit "
                 "attention, about 24 fused), and the refinement "
                 "(`python benchmarks/heu_phases.py CLUSTER MODEL ATTENTION FRACTION` breaks "
                 "one row down by phase).")
    return text


def target_opt_gap(rows: Sequence[Row]) -> str:
    """Issue 10: within 1% of lynx-opt at the median, <= 3% where lynx-opt finished."""
    have = [r for r in rows if "lynx-opt" in r["policies"] and _feasible(r)]
    if not have:
        return "- **lynx-heu vs lynx-opt**: lynx-opt absent from this run."
    done = [r for r in have if not r["policies"]["lynx-opt"]["hit_time_limit"]]
    gap = {id(r): r["derived"]["heu_opt_gap"] for r in have}
    med = statistics.median(gap.values())
    miss = [r for r in done if gap[id(r)] > 0.03]
    kept: dict[str, int] = {}
    for r in have:
        kept[_kept(r)] = kept.get(_kept(r), 0) + 1
    none_fit = len(rows) - sum(_feasible(r) for r in rows)
    text = (f"- **lynx-heu within 1% of lynx-opt at the median**: **{'met' if med <= 0.01 else 'missed'}**"
            f" — median HEU/OPT−1 {pct(med)} over the {len(have)} rows where a plan fits ("
            f"{none_fit} rows have a budget below the smallest feasible one: static + that "
            f"fraction of `none`'s activations is less than any plan needs, so nothing fits "
            f"and they are left out of the quality targets).\n"
            f"- **lynx-heu within 3% of lynx-opt on every row where lynx-opt finished**: "
            f"**{'met' if not miss else 'missed'}** — lynx-opt finished on {len(done)}/{len(have)}"
            f" rows; over 3% on {len(miss)}"
            + (" (" + ", ".join(f"{row_label(r)}: {pct(gap[id(r)])}" for r in miss) + ")"
               if miss else "") + ". lynx-opt returns the fastest of its MILP plan, lynx-heu, "
            "checkmate and full (`Plan.chosen_from`): " + ", ".join(
                f"{k} on {v}" for k, v in sorted(kept.items(), key=lambda kv: -kv[1])) + ".")
    return text


def _feasible(r: Row) -> bool:
    """Some plan fits the row's budget (the 5% rule can fall below the smallest feasible)."""
    return any(p["fits_budget"] for p in r["policies"].values())


def target_never_slower(rows: Sequence[Row], tol: float = 1e-6) -> str:
    """Issue 10: lynx-heu never slower than checkmate or adapipe on the same partition."""
    worse = []
    for r in rows:
        pol = r["policies"]
        heu = pol["lynx-heu"]
        for name in ("checkmate", "adapipe"):
            other = pol.get(name)
            if other and other["fits_budget"] and other["partition"] == heu["partition"] and (
                    not heu["fits_budget"]
                    or heu["step_time_ms"] > other["step_time_ms"] * (1 + tol)):
                worse.append(f"{row_label(r)} vs {name}: {heu['step_time_ms']:,.1f} > "
                             f"{other['step_time_ms']:,.1f} ms")
    same = sum(pol["lynx-heu"]["partition"] in (pol["checkmate"]["partition"],
                                               pol["adapipe"]["partition"])
               for pol in (r["policies"] for r in rows))
    return (f"- **lynx-heu never slower than checkmate or adapipe on the same partition**: "
            f"**{'met' if not worse else 'missed'}** — {len(worse)} exceptions over {len(rows)} "
            f"rows ({same} rows share a partition with one of them)"
            + (": " + "; ".join(worse) if worse else "") + ".")


def target_pcie(rows: Sequence[Row]) -> str:
    pcie = [r for r in rows if r["cluster"] == "a100-pcie"]
    if not pcie:
        return "- **a100-pcie targets**: no a100-pcie row in this run."
    sp = [r["derived"]["speedup_over_full"]["lynx-heu"] for r in pcie]
    ratio = [r["derived"]["heu_over_best_on_demand"] or 1.0 for r in pcie]
    heads = [r["derived"]["best_on_demand_over_none"] or 0.0 for r in pcie]
    beats = sum(x > 1.0005 for x in ratio)
    return (f"- **a100-pcie: lynx-heu ≥ 1.2× `full`**: **{'met' if min(sp) >= 1.2 else 'missed'}**"
            f" — on {sum(s >= 1.2 for s in sp)}/{len(pcie)} rows (min {min(sp):.2f}×, max "
            f"{max(sp):.2f}×).\n- **a100-pcie: lynx-heu beats the best fitting on-demand "
            f"baseline on most rows**: **{'met' if beats > len(pcie) / 2 else 'missed'}** — "
            f"faster (by > 0.05%) on {beats}/{len(pcie)} rows, by ≥ 1% on "
            f"{sum(x >= 1.01 for x in ratio)}; median {pct(statistics.median(ratio) - 1)}, max "
            f"{pct(max(ratio) - 1)}. The margin is bounded by what the best on-demand baseline "
            f"loses to `none`, which depends on the budget: " + "; ".join(
                f"at {pct(f, False)}: ≤ {pct(max(h for h, r in zip(heads, pcie) if r['budget']['fraction'] == f))}"
                f" (lynx-heu's gain median {pct(statistics.median(x for x, r in zip(ratio, pcie) if r['budget']['fraction'] == f) - 1)})"
                for f in sorted({r["budget"]["fraction"] for r in pcie}, reverse=True))
            + ". That baseline recomputes by segment without replaying collectives and drops the "
            "cheap, large attention-core tensors first (at s = 2048 they are most of the bytes), "
            "so at loose budgets it is close to `none` and there is little left to hide.")


def why_windows(rows: Sequence[Row]) -> str:
    """Per cluster: window sizes per layer, and where lynx-heu hid nothing while lynx-opt did."""
    lines = []
    for cluster in CLUSTERS:
        sub = [r for r in rows if r["cluster"] == cluster]
        if not sub:
            continue
        lw = [r["windows_per_layer"] for r in sub]
        bwd = [w["bwd_remainder_ms"] / w["layer_fwd_ms"] for w in lw]
        fwd = statistics.median(w["fwd_tp_wait_ms"] / w["layer_fwd_ms"] for w in lw)
        blind = [r for r in sub if r["derived"]["heu_worst_rank"]["lynx-heu"]["hidden_ms"] == 0]
        opt_hid = sum(r["derived"]["heu_worst_rank"].get("lynx-opt", {}).get("hidden_ms", 0) > 0
                      for r in blind)
        share = [r["derived"]["overlap_share"] for r in sub
                 if r["derived"]["overlap_share"] is not None]
        lines.append(
            f"  - {cluster}: backward all-reduce remainder {pct(min(bwd), False)}–"
            f"{pct(max(bwd), False)} and forward TP "
            f"wait ≈ {pct(fwd, False)} (median) of a layer's forward time; overlap share median "
            f"{pct(statistics.median(share), False) if share else '–'}; lynx-heu hid nothing on "
            f"its worst rank on {len(blind)}/{len(sub)} rows, where lynx-opt hid some on "
            f"{opt_hid}.")
    return ("- **Why (windows)**. Overlap share = 1 − (T_heu − T_none)/(T_best-on-demand − "
            "T_none), the part of the best on-demand overhead lynx-heu removes. lynx-heu "
            "chooses keep sets against each layer's *natural* windows (the backward all-reduce "
            "remainders of the layer above), then a refinement pass moves on-demand tasks into "
            "idle RECV / forward-collective windows the simulation shows:\n" + "\n".join(lines)
            + "\n  Where the weight-gradient GEMM covers the whole backward all-reduce "
            "(remainder 0%), the natural windows are empty and lynx-heu starts from "
            "checkmate-like keep sets; its refinement then moves on-demand tasks whole into the "
            "latest idle RECV / forward-collective window with room, giving back moves of any "
            "rank that would exceed its budget. It does not re-choose keep sets with those "
            "windows in mind, which lynx-opt does (*R tasks by window* below): a lynx-heu "
            "limitation, not a cost-model effect. On PCIe the natural windows alone hold the "
            "recompute at loose budgets.")


def why_memory(rows: Sequence[Row]) -> str:
    """Rows where TP waits dwarf the recompute, yet the best lynx plan, at the budget, exposes."""
    def binds(r: Row) -> bool:
        name = "lynx-opt" if "lynx-opt" in r["policies"] else "lynx-heu"
        w, peak = r["derived"]["heu_worst_rank"], max(r["policies"][name]["peak_memory_bytes"])
        return w[name]["exposed_ms"] > 0.05 * (w[name]["exposed_ms"] + w[name]["hidden_ms"]) \
            and peak >= 0.99 * r["budget"]["budget_bytes"] \
            and w["none_tp_wait_ms"] > 2 * (w[name]["exposed_ms"] + w[name]["hidden_ms"])
    hit = [r for r in rows if binds(r)]
    return "" if not hit else (
        "- **Why (memory)**. On " + ", ".join(row_label(r) for r in hit) + " the worst rank's TP "
        "waits are over twice the recompute, yet the best lynx plan leaves some exposed with its "
        "peak memory at the budget (≥ 99%): a task run early holds its regenerated tensors from "
        "its window until its backward, and the budget has no room left for them.")


# -- outputs ------------------------------------------------------------------------------------
def plot_speedup(rows: Sequence[Row], names: Sequence[str], path: Path) -> Path:
    """Grouped bars of speedup over `full`, one panel per budget fraction; hatched = over budget."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    import lynxpipe.report.plot  # noqa: F401  (selects the Agg backend)

    fracs = sorted({r["budget"]["fraction"] for r in rows}, reverse=True)
    shown = [n for n in names if n != "full"]
    width = 0.8 / len(shown)
    fig, axes = plt.subplots(len(fracs), 1, figsize=(15, 3.6 * len(fracs)), squeeze=False)
    for ax, frac in zip(axes[:, 0], fracs):
        sub = [r for r in rows if r["budget"]["fraction"] == frac]
        for k, name in enumerate(shown):
            for i, r in enumerate(r for r in sub if name in r["policies"]):
                fits = r["policies"][name]["fits_budget"]
                ax.bar(i + (k - len(shown) / 2 + 0.5) * width,
                       r["derived"]["speedup_over_full"][name], width, color=f"C{k}",
                       hatch="" if fits else "//", edgecolor="white" if fits else "black")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(sub)), [f"{r['cluster']}\n{r['layout']['model']}" for r in sub],
                      fontsize=7)
        ax.set_ylim(0.8, None)
        ax.set_ylabel("speedup over full")
        ax.set_title(f"budget = static + {int(100 * frac)}% of `none` activations",
                     fontsize=9, loc="left")
    handles = [Patch(color=f"C{k}", label=n) for k, n in enumerate(shown)]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="over budget"))
    axes[0, 0].legend(handles=handles, ncol=len(handles), fontsize=8, loc="lower left",
                      bbox_to_anchor=(0, 1.08), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(rows: Sequence[Row], meta: dict[str, Any]) -> str:
    """The Markdown body shared by results.md and BENCHMARKS.md."""
    names = [n for n in POLICIES if any(n in r["policies"] for r in rows)]
    fracs = sorted({r["budget"]["fraction"] for r in rows}, reverse=True)
    opt = (f"`lynx-opt` ran with a {meta['opt_time_limit_s']:g} s time limit (`--opt-time-limit`;"
           " it bounds the MILP, then lynx-opt also runs its candidates)" if "lynx-opt" in names
           else "`lynx-opt` was **not registered** in `PLANNERS` at run time and is absent")
    parts = [
        f"Rerun: `python benchmarks/paper_scale.py` (`--quick`: 2-row smoke run; `--fractions "
        f"0.5,0.3,0.15` adds a middle budget). This run: **{meta['wall_s'] / 60:.1f} min** wall "
        f"on {meta['cpus']} cores (load average {meta['load_before']:.1f} → "
        f"{meta['load_after']:.1f}: the machine was shared), commit `{meta['commit']}`, "
        f"{meta['date']}. Outputs in `benchmarks/results/paper_scale/`: `results.json` (every "
        f"number, per-rank breakdowns, configuration), `results.md` (this text), `speedup.png`. "
        f"Analytic cost model, 1F1B, seq 2048, no sequence parallelism; every row twice: "
        f"`fused` attention (FlashAttention-style: no s×s tensors, backward recomputes the scores "
        f"inside the kernel; what Megatron-Core/TE, torchtitan and HF sdpa run) and `explicit` "
        f"(the paper's regime, s×s scores, softmax and dropout mask saved); Megatron's uniform "
        f"partition for `none`/`full`/`full-block`/`selective`/`checkmate`, the balanced one for "
        f"`adapipe`/`lynx-*` (each falls back to uniform when that simulates faster). {opt}.",
        "**Budget rule** (never looks at lynx's numbers): budget = static bytes (weights, grads, "
        "Adam state) of the fullest rank under `none` + FRACTION × that rank's `none` "
        "activation peak, capped at the device memory; FRACTION ∈ {"
        + ", ".join(f"{int(100 * f)}%" for f in fracs) + "}. No reserve. The fullest rank is rank "
        + "/".join(sorted({str(r["budget"]["fullest_rank"]) for r in rows}))
        + " (1F1B holds pp micro-batches on rank 0).",
        layout_table(rows),
        "### Overlaps every policy had\n\n" + OVERLAPS,
        "### Step time (ms) and speedup over `full`\n\n✗ = does not fit the budget. `none` is "
        "the no-recompute reference on the uniform partition (a policy on the balanced "
        "partition can beat it). *best on-demand* = fastest fitting of "
        + "/".join(f"`{n}`" for n in ON_DEMAND) + "; *HEU vs it* = its step time / lynx-heu's.",
    ] + [f"#### Budget fraction {int(100 * f)}%\n\n"
         + step_table([r for r in rows if r["budget"]["fraction"] == f], names) for f in fracs]
    bullets = [target_heu_time(rows), target_opt_gap(rows), target_never_slower(rows),
               target_pcie(rows),
               why_windows(rows), why_memory(rows)]
    parts += ["### Targets\n\n" + "\n".join(b for b in bullets if b),
              "### Where the time goes\n\nPer row, on the pipeline rank where lynx-heu leaves "
              "the most recompute exposed.\n\n" + diagnostics_table(rows),
              "### Planning time (ms)\n\n`plan.planner_ms` of each policy (one run; `(limit)`: "
              "lynx-opt hit its time limit or reported a MIP gap), and lynx-heu's median over "
              "separate reruns timed with `time.perf_counter` (the machine is shared and "
              "noisy).\n\n" + planning_table(rows, names)]
    odd = anomalies(rows)
    parts.append("### Anomalies\n\nA policy slower than one it should dominate (both fitting, "
                 "> 0.05%), or faster than `none` on the same partition:\n\n"
                 + ("\n".join(f"- {a}" for a in odd) if odd else "None found."))
    return "\n\n".join(parts) + "\n"


def update_benchmarks_md(path: Path, body: str) -> None:
    """Replace our marked block; create the file or append the section when missing."""
    block = f"{BEGIN}\n{body}{END}"
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nOne section per benchmark; each script rewrites only the block between "
        "its own markers.\n")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## Paper-scale (simulated)\n\n{block}\n"
    path.write_text(text)
