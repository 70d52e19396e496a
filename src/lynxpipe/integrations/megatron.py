"""Megatron-Core export: the nearest plan its recompute flags can express (SPEC §11).

Megatron-Core (`TransformerConfig`, `--recompute-*` flags) can say: no recompute; `selective`
with a list of `recompute_modules` (`core_attn`, `layernorm`, `mlp`; the same in every layer);
`full` with method `uniform` (every layer, one layer per recompute unit) or `block` (the first
`recompute_num_layers` layers of every pipeline stage, the same count on every stage). All of it
runs on demand, and full recompute replays the layer's collectives. An uneven partition is
`--pipeline-model-parallel-layout` (`E` embedding, `t` a layer, `L` the loss, `|` between
stages, in model order).

`export_megatron` tries every setting those flags allow on the plan's partition, simulates each
with the same costs, and picks the fastest that fits the plan's budget (the leanest if none
does): the user sees what the flags lose next to the lynxpipe plan.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Literal

from lynxpipe.cost.graph import LayerGraph, op_kind
from lynxpipe.cost.table import CostTable
from lynxpipe.errors import LynxError
from lynxpipe.plan.finalize import make_plan
from lynxpipe.plan.types import Plan
from lynxpipe.schedule.policy import FULL, KEEP_ALL, LayerPolicy, stage_layers
from lynxpipe.workflow import request_for_plan

MODULES = ("core_attn", "layernorm", "mlp")
"""Megatron `recompute_modules` lynxpipe maps onto layer tensors."""
NORM_PATH = re.compile(r"(^|[._])(ln|norm|layernorm)", re.IGNORECASE)
MLP_ROOTS = ("mlp", "feed_forward", "ffn", "moe")


@dataclass(frozen=True)
class MegatronConfig:
    """Megatron-Core's recompute settings (TransformerConfig field names)."""

    recompute_granularity: Literal["full", "selective"] | None = None
    """None (no recompute), full or selective."""
    recompute_method: Literal["uniform", "block"] | None = None
    """full only: uniform (every layer) or block (the first layers of each stage)."""
    recompute_num_layers: int | None = None
    """full only: layers per recompute unit (uniform) or per stage (block)."""
    recompute_modules: tuple[str, ...] | None = None
    """selective only: the submodules recomputed in every layer."""
    pipeline_model_parallel_layout: str | None = None
    """Layers per pipeline stage when the partition is uneven."""

    def fields(self) -> dict[str, object]:
        """TransformerConfig keyword arguments (unset ones left out)."""
        out: dict[str, object] = {"recompute_granularity": self.recompute_granularity}
        if self.recompute_granularity == "full":
            out["recompute_method"] = self.recompute_method
            out["recompute_num_layers"] = self.recompute_num_layers
        if self.recompute_granularity == "selective":
            out["recompute_modules"] = list(self.recompute_modules or ())
        if self.pipeline_model_parallel_layout:
            out["pipeline_model_parallel_layout"] = self.pipeline_model_parallel_layout
        return out

    def flags(self) -> list[str]:
        """The matching Megatron-LM command-line flags."""
        out: list[str] = []
        if self.recompute_granularity is not None:
            out += ["--recompute-granularity", self.recompute_granularity]
        if self.recompute_granularity == "full":
            out += ["--recompute-method", str(self.recompute_method),
                    "--recompute-num-layers", str(self.recompute_num_layers)]
        if self.recompute_granularity == "selective":
            out += ["--recompute-modules", *(self.recompute_modules or ())]
        if self.pipeline_model_parallel_layout:
            out += ["--pipeline-model-parallel-layout", self.pipeline_model_parallel_layout]
        return out

    def label(self) -> str:
        """Short description."""
        if self.recompute_granularity is None:
            return "no recompute"
        if self.recompute_granularity == "selective":
            return "selective " + "+".join(self.recompute_modules or ())
        return f"full {self.recompute_method} {self.recompute_num_layers}"


def module_tensors(graph: LayerGraph) -> dict[str, frozenset[str]]:
    """Droppable tensors each Megatron module's recompute drops. Analytic graphs by name;
    traced graphs by the module path of the op that wrote them (norms: a path part starting
    with ln/norm/layernorm; MLP: under mlp/feed_forward/ffn/moe). `core_attn` drops what the
    attention kernel keeps for itself, not its output, which the out-projection saves too."""
    droppable = graph.droppable()
    analytic = {"layernorm": {"ln1_out", "ln2_out"},
                "mlp": {"fc1_out", "gelu_out", "gate_up_out", "swiglu_out"}}
    core = set(graph.attention_core())
    core |= {t.name for t in droppable
             if (t.producer == "attn" or op_kind(t.producer).startswith("_scaled_dot_product"))
             and set(t.used_by) <= {t.producer}}
    out = {"core_attn": frozenset(core)}
    for module, names in analytic.items():
        out[module] = frozenset(t.name for t in droppable if t.name in names
                                or _in_module(t.producer, module))
    return {k: v for k, v in out.items() if v}


def _in_module(op: str, module: str) -> bool:
    if "/" not in op:
        return False
    path = op.rsplit("/", 1)[0]
    if module == "layernorm":
        return bool(NORM_PATH.search(path.rsplit(".", 1)[-1]))
    return path.split(".", 1)[0] in MLP_ROOTS


def layer_policies(config: MegatronConfig, graph: LayerGraph, partition: tuple[int, ...]
                   ) -> tuple[LayerPolicy, ...]:
    """What Megatron runs for `config`, layer by layer, on `partition`."""
    stages = stage_layers(partition)
    if config.recompute_granularity is None:
        return (KEEP_ALL,) * sum(partition)
    if config.recompute_granularity == "selective":
        tensors = module_tensors(graph)
        unknown = sorted(set(config.recompute_modules or ()) - set(tensors))
        if unknown:
            raise LynxError(f"recompute_modules {unknown}: this layer has no such tensors "
                            f"(it has {', '.join(tensors) or 'none'})")
        dropped = frozenset().union(*(tensors[m] for m in config.recompute_modules or ()))
        return (LayerPolicy(dropped),) * sum(partition)
    if config.recompute_method == "uniform":
        if config.recompute_num_layers != 1:
            raise LynxError("uniform recompute of several layers per unit keeps only every "
                            "unit's input: not a lynxpipe layer policy (use 1)")
        return (FULL,) * sum(partition)
    k = int(config.recompute_num_layers or 0)
    return tuple(FULL if i < k else KEEP_ALL for rng in stages for i in range(len(rng)))


def layout(partition: tuple[int, ...]) -> str | None:
    """`--pipeline-model-parallel-layout` of an uneven partition (None when even)."""
    if len(set(partition)) <= 1:
        return None
    stages = ["t" * n for n in partition]
    stages[0], stages[-1] = "E" + stages[0], stages[-1] + "L"
    return "|".join(_compress(s) for s in stages)


def _compress(stage: str) -> str:
    """`Ettt` -> `Et*3`, as Megatron writes repeats."""
    out = []
    for char, run in itertools.groupby(stage):
        n = len(list(run))
        out.append(f"{char}*{n}" if n > 2 else char * n)
    return "".join(out)


def parse_layout(text: str) -> tuple[int, ...]:
    """Layers per stage of a layout string (Megatron's grammar: `x*n`, `(..)*n`, commas)."""
    text = text.replace(",", "")
    for pattern in (r"\(([^)]+)\)\*(\d+)", r"(.)\*(\d+)"):
        text = re.sub(pattern, lambda m: m.group(1) * int(m.group(2)), text)
    stages = text.split("|")
    if not stages[0].startswith("E") or not stages[-1].endswith("L"):
        raise LynxError(f"layout {text!r}: must start with E and end with L")
    bad = set("".join(stages)) - set("EtL")
    if bad:
        raise LynxError(f"layout {text!r}: unknown layer characters {sorted(bad)}")
    return tuple(s.count("t") for s in stages)


def candidates(graph: LayerGraph, partition: tuple[int, ...]) -> list[MegatronConfig]:
    """Every recompute setting Megatron can express on `partition`."""
    lay = layout(partition)
    out = [MegatronConfig(pipeline_model_parallel_layout=lay)]
    modules = [m for m in MODULES if m in module_tensors(graph)]
    for r in range(1, len(modules) + 1):
        out += [MegatronConfig("selective", recompute_modules=combo,
                               pipeline_model_parallel_layout=lay)
                for combo in itertools.combinations(modules, r)]
    out.append(MegatronConfig("full", "uniform", 1, pipeline_model_parallel_layout=lay))
    out += [MegatronConfig("full", "block", k, pipeline_model_parallel_layout=lay)
            for k in range(1, max(partition))]
    return out


@dataclass(frozen=True)
class MegatronExport:
    """The nearest Megatron setting and what it costs next to the lynxpipe plan."""

    config: MegatronConfig
    """What to give Megatron-Core."""
    nearest: Plan
    """That setting as a lynxpipe plan (all recompute on demand), simulated."""
    plan: Plan
    """The lynxpipe plan it approximates."""
    tried: int
    """Settings simulated."""


def export_megatron(plan: Plan, costs: CostTable) -> MegatronExport:
    """The fastest setting Megatron can express that fits the plan's budget (the leanest when
    none fits), on the plan's own partition and costs."""
    req = request_for_plan(plan, costs)
    graph = costs.layer.graph
    best: tuple[tuple[bool, float], MegatronConfig, Plan] | None = None
    tried = candidates(graph, plan.partition)
    for config in tried:
        layers = layer_policies(config, graph, plan.partition)
        cand, _ = make_plan(req, "megatron", plan.partition, layers, None, 0.0,
                            notes=(" ".join(config.flags()),))
        pred = cand.predicted
        key = ((not pred.fits_budget),
               pred.step_time_ms if pred.fits_budget else max(pred.peak_memory_bytes))
        if best is None or key < best[0]:
            best = (key, config, cand)
    assert best is not None
    return MegatronExport(best[1], best[2], plan, len(tried))
