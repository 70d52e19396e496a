"""The pipeline executor (SPEC §7): interprets one rank's action list of a Plan.

One rank, one step: F/B run its model chunks under the recompute engine; RECV posts an ordered
`irecv` (or finds it posted: see below), runs the engine's tasks pinned to that
`Window(RECV, ...)` while the message is in flight, then waits (the wait is timed: it is the
idle the planner filled); SEND posts an `isend` and keeps the handle until the step ends (the
buffer is never reused before that);
R actions were handed to the engine up front, which runs them in their window or, for
`on_demand`, when backward first needs the tensors. After the last action: SP gradient sum over
TP, DP gradient all-reduce, AdamW step. Messages are tagged by (micro-batch, receiving stage,
direction), so gloo matches them whatever the posting order; NCCL ignores tags, so there the
plan's per-pair orders must agree (checked up front).

gloo moves a message only once its receive is posted (`benchmarks/gloo_p2p_probe.py`): a
receive posted at its RECV waits the whole transfer even when the send left long before. With
`plan.recv_ahead` (measured gloo profiles), each RECV posts the next one's `irecv` before it
waits, the first at the step's start, so a message moves while the rank computes; the planner
counts that one buffer in static memory. NCCL posts a SEND with the RECV after it instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lynxpipe.errors import LynxError
from lynxpipe.plan.types import Plan
from lynxpipe.runtime.engine.meter import EngineStats
from lynxpipe.runtime.engine.recompute import RecomputeEngine
from lynxpipe.runtime.model.stage import Stage
from lynxpipe.runtime.pipeline.from_plan import (
    boundary_shape,
    p2p_order_problems,
    p2p_tag,
)
from lynxpipe.runtime.pipeline.groups import ProcessGroups
from lynxpipe.runtime.pipeline.health import short_error
from lynxpipe.runtime.train.optim import Optimizer
from lynxpipe.schedule.actions import Action, Window
from lynxpipe.schedule.windows import RECV, window_kind

Batch = tuple[Tensor, Tensor]
"""(token ids [b, s], targets [b, s]) of one micro-batch."""
ActionHook = Callable[[int, Action], None]
"""Called before each action with its index in the rank's order (heartbeats, fault tests)."""


class PeerError(LynxError):
    """A p2p wait failed (timeout or a closed connection): the peer is the likely culprit."""

    def __init__(self, message: str, peer: int) -> None:
        super().__init__(message)
        self.peer = peer


@dataclass(frozen=True)
class ActionTiming:
    """Wall time of one action of a step (host time: on GPU, kernels and NCCL waits are
    asynchronous, so only the step time, which synchronizes, is device time)."""

    action: str
    """The action, e.g. `F(mb0,s1)`."""
    start_ms: float
    """Start, from the step start."""
    duration_ms: float
    """Wall time of the whole action."""
    wait_ms: float
    """RECV: time blocked on the message after the window's recompute tasks ran; 0 for other
    actions (TP collective waits inside F/B are part of their duration)."""
    recompute_ms: float
    """Recompute run inside this action (RECV windows; F/B collective windows; on demand in B)."""


@dataclass(frozen=True)
class StepResult:
    """What one rank measured in one step."""

    step: int
    """Global step index (0-based)."""
    losses: tuple[float, ...]
    """Per micro-batch loss (last stage only; empty elsewhere)."""
    step_ms: float
    """Wall time of the step: pipeline + DP sync + optimizer."""
    pipeline_ms: float
    """Actions (forward, backward, p2p, recompute) until the last send completed."""
    dp_sync_ms: float
    """SP gradient sum and DP gradient all-reduce."""
    optimizer_ms: float
    """AdamW step."""
    recv_wait_ms: float
    """Time blocked in RECV waits (after their window's tasks)."""
    send_wait_ms: float
    """Time blocked completing sends at the end of the pipeline."""
    actions: tuple[ActionTiming, ...]
    """Per-action wall times, in order (R actions excluded: their time is in their host)."""
    engine: EngineStats
    """Recompute counters and activation peak of the step."""
    cuda_peak_bytes: int | None
    """torch.cuda.max_memory_allocated during the step (None on CPU)."""
    posted_ahead: int = 0
    """Receives posted before their RECV action (one RECV ahead, or paired with a SEND)."""


class _Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1e3


class PipelineExecutor:
    """Runs one rank's part of a plan, step after step (see the module docstring)."""

    def __init__(self, plan: Plan, groups: ProcessGroups, chunks: Mapping[int, Stage],
                 engine: RecomputeEngine, optimizer: Optimizer, *,
                 device: str = "cpu", on_action: ActionHook | None = None) -> None:
        self.plan, self.groups, self.chunks = plan, groups, dict(chunks)
        self.engine, self.optimizer, self.device = engine, optimizer, device
        self.on_action = on_action
        self.actions = plan.order.ranks[groups.pp_rank]
        self.num_stages = plan.order.num_stages
        self.shape = boundary_shape(plan)
        self.dtype = next(iter(self.chunks.values())).cfg.dtype
        self.pairs: dict[int, int] = {}
        # RECV index -> the next RECV's index, posted when the first runs (-1: the step start)
        self.ahead: dict[int, int] = {}
        if groups.pp is not None and dist.get_backend(groups.pp) != "gloo":
            self._prepare_ordered_p2p()
        elif groups.pp is not None and plan.recv_ahead:
            recvs = [i for i, a in enumerate(self.actions) if a.kind.startswith("RECV")]
            self.ahead = dict(zip([-1, *recvs], recvs))
        for chunk in self.chunks.values():
            engine.register_params(chunk.parameters())
        self._reset()

    def _reset(self) -> None:
        self.inputs: dict[tuple[int, int], Tensor] = {}
        self.outputs: dict[tuple[int, int], Tensor] = {}
        self.grads_in: dict[tuple[int, int], Tensor] = {}
        self.recv_b: dict[tuple[int, int], Tensor] = {}
        self.holds: dict[tuple[int, int], list[int]] = {}
        self.sends: list[tuple[Any, Tensor]] = []
        self.preposted: dict[int, tuple[Tensor, Any]] = {}
        self.losses: dict[int, Tensor] = {}
        self.recv_wait_ms = 0.0
        self.posted_ahead = 0

    # --- one step --------------------------------------------------------------------------
    def run_step(self, step: int, batches: Sequence[Batch]) -> StepResult:
        """Run every action of this rank for `step`, then sync gradients and step AdamW."""
        if len(batches) != self.plan.order.num_microbatches:
            raise LynxError(f"step {step}: {len(batches)} micro-batches, the plan has "
                            f"{self.plan.order.num_microbatches}")
        self._reset()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        clock, timings = _Clock(), []
        self._post_ahead(-1)
        for idx, action in enumerate(self.actions):
            if self.on_action is not None:
                self.on_action(idx, action)
            if action.kind == "R":
                continue
            start = clock.ms()
            wait_ms, rec_ms = self._do(step, idx, action, batches)
            timings.append(ActionTiming(str(action), start, clock.ms() - start, wait_ms, rec_ms))
            self._reap_sends()
        send_start = clock.ms()
        self._finish_sends()
        pipeline_ms = clock.ms()
        stats = self._end_pipeline()
        self._sync_grads()
        sync_ms = clock.ms()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        cuda_peak = None
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()  # the step time is device time; action times are host's
            cuda_peak = torch.cuda.max_memory_allocated()
        losses = tuple(float(self.losses[mb]) for mb in sorted(self.losses))
        return StepResult(step, losses, clock.ms(), pipeline_ms, sync_ms - pipeline_ms,
                          clock.ms() - sync_ms, self.recv_wait_ms, pipeline_ms - send_start,
                          _attribute(timings, stats, self.actions), stats, cuda_peak,
                          self.posted_ahead)

    def _do(self, step: int, idx: int, a: Action, batches: Sequence[Batch]
            ) -> tuple[float, float]:
        """Execute action `idx`; returns (wait ms, recompute ms measured inside it)."""
        if a.kind == "F":
            self._forward(step, a, batches[a.mb])
        elif a.kind == "B":
            self._backward(a)
        elif a.kind in ("RECV_F", "RECV_B"):
            return self._recv(idx, a)
        elif a.kind in ("SEND_F", "SEND_B"):
            self._send(idx, a)
        else:
            raise LynxError(f"unknown action {a}")
        return 0.0, 0.0

    def _forward(self, step: int, a: Action, batch: Batch) -> None:
        chunk, key = self.chunks[a.stage], (a.mb, a.stage)
        ids, targets = batch
        x = ids if a.stage == 0 else self.inputs[key].requires_grad_()
        if a.stage == 0:
            self.inputs[key] = ids
        last = a.stage == self.num_stages - 1
        chunk.rng.set_key(step, self.groups.dp_rank, a.mb)
        with self.engine.forward(a.mb, a.stage):
            out = chunk(x, targets if last else None, self.engine)
        self.outputs[key] = out
        if last:
            self.losses[a.mb] = out.detach()

    def _backward(self, a: Action) -> None:
        key = (a.mb, a.stage)
        out, x = self.outputs.pop(key), self.inputs.pop(key)
        with self.engine.backward(a.mb, a.stage):
            if a.stage == self.num_stages - 1:
                (out / self.plan.order.num_microbatches).backward()
            else:
                torch.autograd.backward(out, self.recv_b.pop(key))
        del out
        if a.stage > 0:
            self.grads_in[key] = x.grad
        for ptr in self.holds.pop(key, []):
            self.engine.meter.release(ptr)

    # --- p2p -------------------------------------------------------------------------------
    def _peer(self, stage: int) -> int:
        return self.groups.pipeline_peer(stage % self.plan.order.pp)

    def _recv_spec(self, a: Action) -> tuple[Tensor, int, int]:
        """(fresh buffer, source rank, tag) of a RECV."""
        forward = a.kind == "RECV_F"
        src = self._peer(a.stage - 1 if forward else a.stage + 1)
        buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return buf, src, p2p_tag(a.mb, a.stage, "F" if forward else "B", self.num_stages)

    def _send_spec(self, a: Action) -> tuple[Tensor, int, int]:
        """(tensor, destination rank, tag) of a SEND."""
        forward = a.kind == "SEND_F"
        key = (a.mb, a.stage)
        dest = a.stage + 1 if forward else a.stage - 1
        t = self.outputs[key].detach() if forward else self.grads_in.pop(key)
        return t.contiguous(), self._peer(dest), p2p_tag(a.mb, dest, "F" if forward else "B",
                                                         self.num_stages)

    def _recv(self, idx: int, a: Action) -> tuple[float, float]:
        pre = self.preposted.pop(idx, None)
        if pre is None:
            buf, src, tag = self._recv_spec(a)
            work = dist.irecv(buf, src=src, group=self.groups.pp, tag=tag)
        else:
            (buf, work), src = pre, self._recv_spec(a)[1]
        self._post_ahead(idx)
        key = (a.mb, a.stage)
        # receive buffers are activation memory the planner counts (the stage input is the
        # first layer's `x`); the meter counts each storage once however often it is held
        self.holds.setdefault(key, []).append(
            self.engine.meter.hold(buf, (a.mb, -2), a.kind.lower(), "recv"))
        t0 = time.perf_counter()
        self.engine.run_tasks(Window(RECV, a.mb, a.stage, recv=a.kind))  # type: ignore[arg-type]
        t1 = time.perf_counter()
        try:
            work.wait()
        except RuntimeError as exc:
            raise PeerError(f"{a} from rank {src} failed: {short_error(exc)}", src) from None
        wait_ms = (time.perf_counter() - t1) * 1e3
        self.recv_wait_ms += wait_ms
        (self.inputs if a.kind == "RECV_F" else self.recv_b)[key] = buf
        return wait_ms, (t1 - t0) * 1e3

    def _post_ahead(self, idx: int) -> None:
        """Post the receive that follows RECV `idx` (-1: the step's first), if posting ahead."""
        j = self.ahead.get(idx)
        if j is not None:
            buf, src, tag = self._recv_spec(self.actions[j])
            self.preposted[j] = (buf, dist.irecv(buf, src=src, group=self.groups.pp, tag=tag))
            self.posted_ahead += 1

    def _send(self, idx: int, a: Action) -> None:
        t, dest, tag = self._send_spec(a)
        j = self.pairs.get(idx)
        if j is None:
            work = dist.isend(t, dst=dest, group=self.groups.pp, tag=tag)
        else:  # post the RECV that follows together with this send (see _prepare_ordered_p2p)
            buf, src, rtag = self._recv_spec(self.actions[j])
            work, rwork = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, t, dest, self.groups.pp, tag),
                dist.P2POp(dist.irecv, buf, src, self.groups.pp, rtag)])
            self.preposted[j] = (buf, rwork)
            self.posted_ahead += 1
        self.sends.append((work, t))

    def _prepare_ordered_p2p(self) -> None:
        """Backends that ignore tags (NCCL) pair messages by posting order, and a send whose
        receiver is itself blocked sending back deadlocks (1F1B steady state: SEND_F then
        RECV_B on one rank, SEND_B then RECV_F on its peer). As Megatron does, such a SEND and
        the RECV right after it (R actions between) are posted as one batch. gloo matches by
        tag and `batch_isend_irecv` can hang there, so it keeps plain isend/irecv."""
        problems = p2p_order_problems(self.plan.order)
        if problems:
            raise LynxError(f"{dist.get_backend(self.groups.pp)} pairs p2p messages by order, "
                            f"and this plan's orders disagree: {problems[0]}")
        acts = self.actions
        for i, a in enumerate(acts):
            j = i + 1
            while j < len(acts) and acts[j].kind == "R":
                j += 1
            if a.kind.startswith("SEND") and j < len(acts) and acts[j].kind.startswith("RECV"):
                self.pairs[i] = j
        # a batch must not be the group's first collective: make one now, on every member
        dist.all_reduce(torch.zeros(1, device=self.device), group=self.groups.pp)

    def _reap_sends(self) -> None:
        """Forget completed sends so their buffers can be freed early."""
        if self.sends:
            self.sends = [(w, t) for w, t in self.sends if not w.is_completed()]

    def _finish_sends(self) -> None:
        for work, _ in self.sends:
            try:
                work.wait()
            except RuntimeError as exc:
                raise LynxError(f"a pipeline send failed: {short_error(exc)}") from None
        self.sends = []

    # --- after the pipeline ----------------------------------------------------------------
    def _end_pipeline(self) -> EngineStats:
        left = sorted(set(self.outputs) | set(self.inputs) | set(self.recv_b))
        if left:
            raise LynxError(f"pipeline order left (micro-batch, stage) {left} without backward")
        return self.engine.end_step()

    def _sync_grads(self) -> None:
        """SP-replicated grads summed over TP, then every grad averaged over DP."""
        for chunk in self.chunks.values():
            chunk.finish_grads()
        if self.groups.dp is None:
            return
        grads = [p.grad for c in self.chunks.values() for p in c.parameters()
                 if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.groups.dp)
        flat /= self.groups.layout.dp
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _attribute(timings: list[ActionTiming], stats: EngineStats,
               actions: Sequence[Action]) -> tuple[ActionTiming, ...]:
    """Add recompute run inside F/B (collective windows, on demand) to their timings."""
    stage_of = {(a.mb, a.layer): a.stage for a in actions if a.kind == "R"}
    extra: dict[str, float] = {}
    for rec in stats.tasks:
        if rec.window is not None and window_kind(rec.window.kind).in_layer:
            host = rec.window.host()
        elif rec.window is None:
            host = ("B", rec.mb, stage_of.get((rec.mb, rec.layer), -1))
        else:
            continue  # recv windows are timed by the RECV itself
        label = str(Action(host[0], host[1], host[2]))  # type: ignore[arg-type]
        extra[label] = extra.get(label, 0.0) + rec.time_s * 1e3
    return tuple(ActionTiming(t.action, t.start_ms, t.duration_ms, t.wait_ms,
                              t.recompute_ms + extra.get(t.action, 0.0)) for t in timings)
