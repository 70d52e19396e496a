"""Self-check of the runtime against the planner's graph: recompute policies give bit-identical
losses and gradients, recompute runs where planned, and the measured saved bytes per layer are
the graph's `saved_bytes(kept)` (norm statistics and token bookkeeping are graph tensors too).

Runs one stage holding the whole model (embedding, layers, head) with two micro-batches in the
order F0 F1 RECV_B(0) B0 B1. Used by the tests (CPU, gloo) and by hand on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lynxpipe.runtime.engine.meter import EngineStats
from lynxpipe.runtime.engine.recompute import RecomputeEngine, Task
from lynxpipe.runtime.model.env import PlainRuntime
from lynxpipe.runtime.model.layer import BuildConfig, TransformerLayer
from lynxpipe.runtime.model.stage import Stage
from lynxpipe.schedule.actions import Window
from lynxpipe.schedule.windows import BWD_COLL, FWD_COLL, RECV

Batch = tuple[Tensor, Tensor]
"""Saved tensors the runtime tags that the cost graph does not count."""


@dataclass(frozen=True)
class PolicyCase:
    """A recompute policy to compare against keeping everything."""

    name: str
    """Label in messages."""
    dropped: dict[int, frozenset[str]] = field(default_factory=dict)
    """Layer -> dropped names."""
    full_layers: frozenset[int] = frozenset()
    """Layers recomputed whole (segment -1)."""
    tasks: dict[Window, tuple[Task, ...]] = field(default_factory=dict)
    """Pinned tasks."""


@dataclass(frozen=True)
class CaseResult:
    """What one run measured."""

    losses: tuple[Tensor, ...]
    """Loss per micro-batch."""
    grads: dict[str, Tensor]
    """Accumulated gradient per parameter."""
    saved_after_f0: dict[tuple[int, int], dict[str, int]]
    """Meter breakdown right after the first forward."""
    stats: EngineStats
    """Engine counters of the step."""


def _layers(stage: Stage) -> list[TransformerLayer]:
    return list(stage.layers)  # type: ignore[arg-type]


def _first(steps: tuple, kind: str) -> list[int]:
    return [i for i, s in enumerate(steps) if s.kind == kind]


def standard_cases(stage: Stage) -> list[PolicyCase]:
    """Policies a-e of the brief: none, all on demand, selective, pinned windows, full."""
    layers = _layers(stage)
    idx = [lay.index for lay in layers]
    drop_all = {lay.index: frozenset(t.name for t in lay.graph.droppable()) for lay in layers}
    attn = _attention_core(layers[0])
    return [PolicyCase("none"), PolicyCase("all-on-demand", drop_all),
            PolicyCase("selective", {i: attn for i in idx}),
            PolicyCase("pinned", drop_all, tasks=pinned_tasks(stage, drop_all)),
            PolicyCase("full", full_layers=frozenset(idx),
                       tasks={_recv(0): (Task(0, idx[0], -1),)})]


def _attention_core(layer: TransformerLayer) -> frozenset[str]:
    """What selective recompute drops: the explicit attention core's probabilities, or the fused
    kernel's output and logsumexp (its q copy too, with GQA)."""
    explicit = frozenset({"probs", "probs_dropped"})
    return frozenset(t.name for t in layer.graph.droppable()
                     if t.name in explicit or t.producer == "attn")


def _recv(mb: int) -> Window:
    return Window(RECV, mb, 0, recv="RECV_B")


def _segments(layer: TransformerLayer, names: frozenset[str]) -> list[int]:
    return sorted({layer.graph.tensor(n).segment for n in names})


def pinned_tasks(stage: Stage,
                 dropped: dict[int, frozenset[str]]) -> dict[Window, tuple[Task, ...]]:
    """Spread tasks over forward, backward and RECV windows (and leave some on demand).

    mb0: first layer in F(mb1)'s forward windows, middle layers in the backward windows of the
    layer above in B(mb0), last layer in the RECV_B wait before B(mb0). mb1: last layer in the
    head's forward window of F(mb1), the others in B(mb1)'s backward windows of the layer above,
    except the first layer, which stays on demand.
    """
    layers = _layers(stage)
    tasks: dict[Window, list[Task]] = {}

    def pin(window: Window, task: Task) -> None:
        tasks.setdefault(window, []).append(task)

    for pos, lay in enumerate(layers):
        last, above = pos == len(layers) - 1, layers[min(pos + 1, len(layers) - 1)]
        fwd = _first(lay.graph.fwd_steps, "coll")
        bwd = _first(above.graph.bwd_steps, "coll")
        for k, seg in enumerate(_segments(lay, dropped.get(lay.index, frozenset()))):
            if pos == 0:
                pin(Window(FWD_COLL, 1, 0, lay.index, fwd[k % len(fwd)]), Task(0, lay.index, seg))
            elif last:
                pin(_recv(0), Task(0, lay.index, seg))
            else:
                pin(Window(BWD_COLL, 0, 0, above.index, bwd[k % len(bwd)]),
                    Task(0, lay.index, seg))
            if last and stage.head is not None:
                ce = _first(stage.head.graph.fwd_steps, "coll")
                pin(Window(FWD_COLL, 1, 0, stage.head.index, ce[k % len(ce)]),
                    Task(1, lay.index, seg))
            elif 0 < pos and not last:
                pin(Window(BWD_COLL, 1, 0, above.index, bwd[k % len(bwd)]),
                    Task(1, lay.index, seg))
    return {w: tuple(ts) for w, ts in tasks.items()}


def run_case(stage: Stage, case: PolicyCase, batches: list[Batch]) -> CaseResult:
    """F0 F1 RECV_B(0) B0 B1 under `case`; returns losses, grads, memory and counters."""
    engine = RecomputeEngine(case.dropped, case.tasks, case.full_layers)
    stage.zero_grad(set_to_none=True)
    losses, saved = [], {}
    for mb, (ids, targets) in enumerate(batches):
        stage.rng.set_key(0, mb)
        with engine.forward(mb, 0):
            losses.append(stage(ids, targets, engine))
        if mb == 0:
            saved = engine.meter.breakdown()
    engine.run_tasks(_recv(0))
    for mb, loss in enumerate(losses):
        with engine.backward(mb, 0):
            loss.backward()
    stage.finish_grads()
    grads = {n: p.grad.detach().clone() for n, p in stage.named_parameters() if p.grad is not None}
    return CaseResult(tuple(x.detach() for x in losses), grads, saved, engine.end_step())


def compare(ref: CaseResult, res: CaseResult, label: str) -> list[str]:
    """Losses and every gradient must be bitwise equal."""
    problems = [f"{label}: loss of micro-batch {i} differs ({a.item()} vs {b.item()})"
                for i, (a, b) in enumerate(zip(ref.losses, res.losses)) if not torch.equal(a, b)]
    if ref.grads.keys() != res.grads.keys():
        problems.append(f"{label}: different parameters got gradients")
    problems += [f"{label}: gradient of {n} differs (max |diff| "
                 f"{(ref.grads[n] - g).abs().max().item():.3g})"
                 for n, g in res.grads.items()
                 if n in ref.grads and not torch.equal(ref.grads[n], g)]
    return problems


def expected_regions(stage: Stage, case: PolicyCase, num_mb: int) -> set[Task]:
    """(mb, layer, segment) regions the policy drops tensors from."""
    out = set()
    for lay in _layers(stage):
        segs = ([-1] if lay.index in case.full_layers
                else _segments(lay, case.dropped.get(lay.index, frozenset())))
        out |= {Task(mb, lay.index, seg) for mb in range(num_mb) for seg in segs}
    return out


def check_counters(stage: Stage, case: PolicyCase, res: CaseResult) -> list[str]:
    """Each dropped region is recomputed once, where planned, regenerating the graph's bytes."""
    label, stats = case.name, res.stats
    ran = [Task(r.mb, r.layer, r.segment) for r in stats.tasks]
    want = expected_regions(stage, case, len(res.losses))
    problems = []
    if sorted(ran) != sorted(want):
        problems.append(f"{label}: recomputed {sorted(ran)}, expected {sorted(want)}")
    if stats.missed:
        problems.append(f"{label}: windows never opened: {stats.missed}")
    layers = {lay.index: lay for lay in _layers(stage)}
    for r in stats.tasks:
        if r.window != r.planned:
            problems.append(f"{label}: {r.mb, r.layer, r.segment} ran in "
                            f"{r.window or 'on demand'}, "
                            f"planned {r.planned or 'on demand'}")
        want_bytes = _region_bytes(stage, layers[r.layer], case, r.segment)
        if r.regenerated_bytes != want_bytes:
            problems.append(f"{label}: {r.mb, r.layer, r.segment} regenerated "
                            f"{r.regenerated_bytes} B, graph says {want_bytes} B")
    if stats.current_bytes != 0:
        problems.append(f"{label}: {stats.current_bytes} B still held after the step")
    return problems


def _region_bytes(stage: Stage, lay: TransformerLayer, case: PolicyCase, seg: int) -> int:
    g = lay.graph
    if seg == -1:  # everything but x (norm statistics included)
        return g.saved_bytes() - g.tensor("x").size_bytes
    return sum(t.size_bytes for t in g.tensors
               if t.segment == seg and t.name in case.dropped.get(lay.index, ()))


def check_memory(stage: Stage, case: PolicyCase, res: CaseResult) -> list[str]:
    """Saved bytes per layer after F0 = graph.saved_bytes(kept), norm statistics and token
    bookkeeping included (the graph names them `*_stats`, `embed_ids`, `ce_targets`)."""
    problems = []
    owners = {lay.index: lay for lay in _layers(stage)}
    for (_, layer), names in res.saved_after_f0.items():
        held = sum(names.values())
        if layer in owners:
            g, full = owners[layer].graph, layer in case.full_layers
            kept = frozenset() if full else frozenset(
                t.name for t in g.droppable()) - case.dropped.get(layer, frozenset())
            want = g.tensor("x").size_bytes if full else g.saved_bytes(kept)
        elif stage.embed is not None and layer == stage.embed.index:
            want = stage.embed.graph.saved_bytes()
        else:
            assert stage.head is not None
            want = stage.head.graph.saved_bytes()
        if held != want:
            problems.append(f"{case.name}: layer {layer} holds {held} B after F0, planner says "
                            f"{want} B: {names}")
    return problems


def self_check(stage: Stage, batches: list[Batch]) -> list[str]:
    """Run the standard cases; returns human-readable problems (empty: all good)."""
    cases = standard_cases(stage)
    ref = run_case(stage, cases[0], batches)
    problems = check_memory(stage, cases[0], ref)
    for case in cases[1:]:
        res = run_case(stage, case, batches)
        problems += compare(ref, res, case.name)
        problems += check_counters(stage, case, res) + check_memory(stage, case, res)
    return problems


class _Trace(PlainRuntime):
    """Logs tags and windows of one layer in the order the forward/backward issue them."""

    def __init__(self, layer: int, log: list[tuple[str, int, object]]) -> None:
        self.layer, self.log = layer, log

    def tag(self, name: str, *parts: Tensor) -> None:
        self.log.append(("tag", self.layer, name))

    def window(self, kind: str, step: int) -> None:
        self.log.append((kind, self.layer, step))


class _Tracer:
    """Stands in for the engine in `Stage.forward`: hands out `_Trace` runtimes."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, object]] = []

    def register_params(self, params: object) -> None:
        return None

    def record(self, layer: int, program: object) -> _Trace:
        return _Trace(layer, self.log)


def check_step_order(stage: Stage, batch: Batch) -> list[str]:
    """Windows open at the graph's collective steps, in program order, and every named tensor
    is produced in the segment the graph puts its producer in."""
    tracer = _Tracer()
    loss = stage(batch[0], batch[1], tracer)  # type: ignore[arg-type]
    loss.backward()
    problems: list[str] = []
    modules = [m for m in (stage.embed, *stage.layers, stage.head) if m is not None]
    for mod in modules:
        g, log = mod.graph, [e for e in tracer.log if e[1] == mod.index]
        fwd_want = _first(g.fwd_steps, "coll")
        bwd_want = _first(g.bwd_steps, "coll")
        fwd_got = [e[2] for e in log if e[0] == FWD_COLL]
        bwd_got = [e[2] for e in log if e[0] == BWD_COLL]
        if (fwd_got, bwd_got) != (fwd_want, bwd_want):
            problems.append(f"layer {mod.index}: windows fwd {fwd_got} bwd {bwd_got}, graph has "
                            f"fwd {fwd_want} bwd {bwd_want}")
        problems += _check_segments(mod.index, g, log)
    order = [e[1] for e in tracer.log if e[0] == BWD_COLL]
    if order != sorted(order, reverse=True):
        problems.append(f"backward windows not in reverse layer order: {order}")
    return problems


def _check_segments(layer: int, graph: object, log: list[tuple[str, int, object]]) -> list[str]:
    """A tensor tagged after k forward windows must be produced in segment k."""
    names = {t.name: t.segment for t in graph.tensors}  # type: ignore[attr-defined]
    problems, seen = [], 0
    for kind, _, what in log:
        if kind == FWD_COLL:
            seen += 1
        elif kind == "tag" and what in names and what != "x" and names[what] != seen:
            problems.append(f"layer {layer}: {what} produced in segment {seen}, graph says "
                            f"{names[what]}")
    return problems


_ROW = ("proj.weight", "fc2.weight")
_COLUMN = ("qkv.weight", "qkv.bias", "fc1.weight", "fc1.bias", "embed.weight", "logits.weight")


def _tp_slice(name: str, full: Tensor, cfg: BuildConfig) -> Tensor:
    """This rank's part of a tp=1 gradient (replicated params: all of it)."""
    tp = cfg.tp
    if name.endswith("fc1.weight") and cfg.model.family_info.mlp == "swiglu":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp.size)[tp.rank], up.chunk(tp.size)[tp.rank]])
    if name.endswith(_ROW):
        return full.chunk(tp.size, dim=1)[tp.rank]
    if name.endswith(_COLUMN):
        return full.chunk(tp.size, dim=0)[tp.rank]
    return full


def check_tp_equivalence(stage: Stage, batch: Batch, rtol: float = 1e-4) -> list[str]:
    """With dropout 0, a TP stage computes the tp=1 model: same loss, sliced gradients."""
    cfg = stage.cfg
    if cfg.model.hidden_dropout > 0 or cfg.model.attention_dropout > 0:
        return ["check_tp_equivalence needs dropout = 0 (masks differ with the sharding)"]
    single = Stage(BuildConfig(cfg.model, _single(cfg), cfg.tp.__class__(), cfg.dtype,
                               cfg.device, cfg.seed),
                   range(stage.layers[0].index, stage.layers[-1].index + 1),
                   embed=stage.embed is not None, head=stage.head is not None)
    losses, grads = [], []
    for st in (single, stage):
        st.zero_grad(set_to_none=True)
        loss = st(batch[0], batch[1])
        loss.backward()
        st.finish_grads()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in st.named_parameters()})
    problems = []
    if not torch.allclose(losses[0], losses[1], rtol=rtol):
        problems.append(f"tp={cfg.tp.size}: loss {losses[1].item()} vs tp=1 {losses[0].item()}")
    for name, g in grads[1].items():
        want = _tp_slice(name, grads[0][name], cfg)
        if not torch.allclose(g, want, rtol=rtol, atol=rtol * float(want.abs().max())):
            problems.append(f"tp={cfg.tp.size}: grad of {name} differs from tp=1 "
                            f"(max |diff| {(g - want).abs().max().item():.3g})")
    return problems


def _single(cfg: BuildConfig):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    return replace(cfg.par, tp=1, sequence_parallel=False)
