"""Name what a block's forward does, op by op (SPEC §11): the one naming scheme the profiler
(`lynxpipe.profile.module`), the recompute engine (`wrap_blocks(plan=...)`) and the torch
export (`lynxpipe.integrations.torch_sac`) share.

Every aten op the forward dispatches, except views, is named `<module path>/<op>` (`#k` for the
k-th repeat in that module; the block's own code has an empty path): `self_attn.q_proj/mm`,
`mlp.act_fn/silu`, `add#1`. A tensor is named by the op that last wrote its storage (`:k` for
an op's k-th output): a saved tensor's name is what a plan drops. The block's first argument is
`x`; other arguments, parameters and buffers are *external* (never named, never dropped).

`ForwardLog` records, per op, its name, segment (collectives end one), the named storages it
reads and writes, its output layout and, for random ops, the RNG state before it: enough to
replay any subset of the ops later (`runtime.engine.traced`).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import SAC_IGNORED_OPS

from lynxpipe.errors import LynxError

INPUT = "x"
"""Name of the block's first argument (the layer input), as in the analytic graph."""
COLLECTIVE_NAMESPACES = frozenset({"c10d", "_c10d_functional", "c10d_functional"})
"""Op namespaces of torch.distributed collectives."""
COLLECTIVE_HELPERS = frozenset({"wait_tensor", "_wrap_tensor_autograd"})
"""Functional-collective ops that complete one (no new collective, no new segment)."""
META_ONLY = frozenset({"empty_like", "zeros_like", "ones_like", "full_like", "rand_like",
                       "randn_like", "randint_like", "new_empty", "new_empty_strided",
                       "new_zeros", "new_ones", "new_full"})
"""Ops that read only their input's shape, never its values (not a data dependency)."""
DATA_DEPENDENT = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "item"})
"""Ops that hand tensor values to Python (control flow on them cannot be replayed)."""


def op_name(func: Any) -> str:
    """The aten op of an OpOverload (`aten.mm.default` -> `mm`)."""
    return func._opname if hasattr(func, "_opname") else str(func).split(".")[-2]


def is_alias(func: Any) -> bool:
    """True for views: ops whose outputs alias an input without writing it."""
    return any(r.alias_info is not None and not r.alias_info.is_write
               for r in func._schema.returns)


def is_collective(func: Any) -> bool:
    """True for torch.distributed collectives (and the ops that complete them)."""
    return getattr(func, "namespace", "") in COLLECTIVE_NAMESPACES


def check_replayable(func: Any, path: str) -> None:
    """Refuse ops whose results steer Python (data-dependent control flow or shapes)."""
    tags = getattr(func, "tags", ())
    if op_name(func) in DATA_DEPENDENT or torch.Tag.data_dependent_output in tags \
            or torch.Tag.dynamic_output_shape in tags:
        where = f"module `{path}`" if path else "the block's own code"
        raise LynxError(f"{func} in {where} makes the forward depend on tensor values "
                        f"(data-dependent control flow or output shape); a block must run the "
                        f"same ops on any input to be replayed op by op: move it out of the "
                        f"block, or recompute the block whole (policy full)")


def storage_key(t: Tensor) -> int:
    """Identity of `t`'s storage (stable while a StorageWeakRef to it is held)."""
    return t.untyped_storage()._cdata


class PathTracker:
    """Which submodule of a block is running: hooks on every submodule keep a path stack."""

    def __init__(self, block: nn.Module) -> None:
        self.stack: list[str] = [""]
        for path, module in block.named_modules():
            if path:
                module.register_forward_pre_hook(functools.partial(self._enter, path))
                module.register_forward_hook(self._exit, always_call=True)

    def _enter(self, path: str, *_: Any) -> None:
        self.stack.append(path)

    def _exit(self, *_: Any) -> None:
        if len(self.stack) > 1:
            self.stack.pop()

    @property
    def path(self) -> str:
        """Path of the innermost running submodule ('' for the block's own code)."""
        return self.stack[-1]


_TRACKERS: "weakref.WeakKeyDictionary[nn.Module, PathTracker]" = weakref.WeakKeyDictionary()


def path_tracker(block: nn.Module) -> PathTracker:
    """The block's tracker (hooks are registered once per block)."""
    tracker = _TRACKERS.get(block)
    if tracker is None:
        tracker = _TRACKERS[block] = PathTracker(block)
    return tracker


class Namer:
    """Op names of one forward: `<path>/<op>`, `#k` for repeats."""

    def __init__(self, tracker: PathTracker) -> None:
        self.tracker = tracker
        self.counts: dict[tuple[str, str], int] = {}
        tracker.stack[:] = [""]

    def name(self, func: Any) -> str:
        """Name the next op."""
        path, op = self.tracker.path, op_name(func)
        k = self.counts.get((path, op), 0)
        self.counts[(path, op)] = k + 1
        base = f"{path}/{op}" if path else op
        return f"{base}#{k}" if k else base


@dataclass
class Store:
    """A storage seen by the forward."""

    ref: StorageWeakRef
    """Keeps the key valid (the StorageImpl is not reused while referenced)."""
    name: str
    """Name of its current contents ('' for external storages)."""
    nbytes: int
    """Bytes of the storage."""
    op: int = -1
    """Index of the op that last wrote it (-1: created outside the block)."""
    offset: int = 0
    """Storage offset of that op's output (where a saved view's geometry is measured from)."""
    packed: bool = False
    """Autograd saved a tensor on it."""


@dataclass
class OpEvent:
    """One recorded op."""

    name: str
    """Its name (see the module docstring)."""
    func: Any
    """The OpOverload."""
    segment: int
    """Segment (collectives end one)."""
    reads: tuple[str, ...]
    """Named storages it reads as data (`x` and activations; externals left out)."""
    writes: tuple[tuple[int, str], ...]
    """(output leaf index, name) of every storage it creates or writes."""
    outs: tuple[tuple[str, Any], ...]
    """Per output leaf: ('new', (store key, shape, stride, offset, dtype, device)),
    ('alias', (input leaf index, shape, stride, offset)) or ('value', the non-tensor value)."""
    spec: Any = None
    """pytree spec of its output (to rebuild it from `outs`)."""
    rng: tuple[Any, ...] | None = None
    """RNG states before a random op: (CPU state, (CUDA device, state) or None, the op's
    generator or None, its state)."""
    collective: bool = False
    """A torch.distributed collective (never recomputed)."""


@dataclass
class ForwardLog:
    """Everything one block forward did, by name."""

    namer: Namer
    """Names ops."""
    stores: dict[int, Store] = field(default_factory=dict)
    """Storages by key."""
    ops: list[OpEvent] = field(default_factory=list)
    """Recorded ops, in order."""
    segment: int = 0
    """Current segment."""
    made_by: dict[str, int] = field(default_factory=dict)
    """Name -> index of the op that wrote it."""

    def external(self, *values: Any) -> None:
        """Mark every tensor in `values` (any nesting) as external."""
        for t in tree_flatten(values)[0]:
            if isinstance(t, Tensor):
                self.stores.setdefault(storage_key(t), Store(
                    StorageWeakRef(t.untyped_storage()), "", t.untyped_storage().nbytes()))

    def input(self, t: Tensor) -> None:
        """The block input `x`."""
        self.stores[storage_key(t)] = Store(StorageWeakRef(t.untyped_storage()), INPUT,
                                            t.untyped_storage().nbytes(), -1, t.storage_offset())

    def store_of(self, t: Tensor) -> Store:
        """The record of `t`'s storage (an unseen one is external: made outside the block)."""
        key = storage_key(t)
        store = self.stores.get(key)
        if store is None or store.ref.expired():
            store = self.stores[key] = Store(StorageWeakRef(t.untyped_storage()), "",
                                             t.untyped_storage().nbytes())
        return store

    def rng_state(self, func: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
        """RNG states a random op will draw from (None for deterministic ops)."""
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return None
        leaves = tree_flatten((args, kwargs))[0]
        cuda = next((t.device for t in leaves if isinstance(t, Tensor) and t.is_cuda), None)
        gen = kwargs.get("generator")
        return (torch.get_rng_state(), (cuda, torch.cuda.get_rng_state(cuda)) if cuda else None,
                gen, gen.get_state() if gen is not None else None)

    def record(self, func: Any, args: Any, kwargs: dict[str, Any], out: Any,
               rng: tuple[Any, ...] | None) -> OpEvent:
        """Log one (non-view) op after it ran."""
        name = self.namer.name(func)
        in_leaves = tree_flatten((args, kwargs))[0]
        in_keys = {storage_key(t): i for i, t in enumerate(in_leaves) if isinstance(t, Tensor)}
        reads = () if op_name(func) in META_ONLY else tuple(dict.fromkeys(
            s.name for s in (self.store_of(t) for t in in_leaves if isinstance(t, Tensor))
            if s.name))
        written = _written_leaves(func, args, kwargs)
        outs, writes = [], []
        out_leaves, spec = tree_flatten(out)
        for i, leaf in enumerate(out_leaves):
            if not isinstance(leaf, Tensor):
                outs.append(("value", leaf))
                continue
            key = storage_key(leaf)
            out_name = name if i == 0 else f"{name}:{i}"
            if key in in_keys:
                outs.append(("alias", (in_keys[key], tuple(leaf.shape), tuple(leaf.stride()),
                                       leaf.storage_offset())))
                if key in written or is_collective(func):
                    writes.append((i, self._write(key, leaf, out_name, len(self.ops))))
                continue
            self.stores[key] = Store(StorageWeakRef(leaf.untyped_storage()), out_name,
                                     leaf.untyped_storage().nbytes(), len(self.ops),
                                     leaf.storage_offset())
            writes.append((i, out_name))
            outs.append(("new", (key, tuple(leaf.shape), tuple(leaf.stride()),
                                 leaf.storage_offset(), leaf.dtype, leaf.device)))
        event = OpEvent(name, func, self.segment, reads, tuple(writes), tuple(outs), spec, rng,
                        is_collective(func))
        for _, written_name in writes:
            self.made_by[written_name] = len(self.ops)
        self.ops.append(event)
        if event.collective and op_name(func) not in COLLECTIVE_HELPERS:
            self.segment += 1
        return event

    def _write(self, key: int, leaf: Tensor, name: str, op: int) -> str:
        store = self.stores[key]
        if store.packed or store.name == INPUT:
            what = ("the block's input x" if store.name == INPUT
                    else f"`{store.name}`, which autograd saved for backward")
            raise LynxError(f"in-place op {name} writes {what}; a recompute could not give the "
                            f"saved value back: use the out-of-place op (e.g. inplace=False)")
        if store.name:
            store.name, store.op, store.offset = name, op, leaf.storage_offset()
        return name


def _written_leaves(func: Any, args: Any, kwargs: dict[str, Any]) -> set[int]:
    """Storage keys of the arguments an in-place / out= op writes."""
    keys: set[int] = set()
    schema_args = func._schema.arguments
    for i, arg in enumerate(schema_args):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        for t in tree_flatten(value)[0]:
            if isinstance(t, Tensor):
                keys.add(storage_key(t))
    return keys


class Recorder(TorchDispatchMode):
    """Logs a block forward into a `ForwardLog` (views pass through unrecorded)."""

    active: list["Recorder"] = []
    """Recorders running now (a recompute pauses them, so its ops are not logged)."""

    def __init__(self, log: ForwardLog, strict: bool = True) -> None:
        super().__init__()
        self.log = log
        self.strict = strict
        """Refuse data-dependent ops (needed only when the forward will be replayed)."""
        self.paused = False

    def __enter__(self) -> "Recorder":
        Recorder.active.append(self)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        Recorder.active.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        if self.paused or func in SAC_IGNORED_OPS or is_alias(func):
            return func(*args, **kwargs)
        if self.strict:
            check_replayable(func, self.log.namer.tracker.path)
        rng = self.log.rng_state(func, args, kwargs)
        out = func(*args, **kwargs)
        self.observe(self.log.record(func, args, kwargs, out, rng), func, args, kwargs, out)
        return out

    def observe(self, event: OpEvent, func: Any, args: Any, kwargs: dict[str, Any],
                out: Any) -> None:
        """Hook for subclasses (the profiler counts FLOPs and bytes here)."""


@contextlib.contextmanager
def paused_recorders() -> Iterator[None]:
    """Pause every running recorder (around a recompute, whose ops are not the forward's)."""
    was = [(r, r.paused) for r in Recorder.active]
    for r, _ in was:
        r.paused = True
    try:
        yield
    finally:
        for r, state in was:
            r.paused = state


def _sdpa_cpu_flops(q: Tensor, k: Tensor, v: Tensor, *_: Any, out_val: Any = None,
                    **__: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q.shape, k.shape, v.shape)


def _sdpa_cpu_bwd_flops(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, *_: Any,
                        out_val: Any = None, **__: Any) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad.shape, q.shape, k.shape, v.shape)


def op_flops(func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> int:
    """FLOPs of one op by torch's FlopCounterMode formulas (matrix products, convolutions,
    attention; 0 for element-wise ops), plus the CPU flash-attention kernels it leaves out."""
    from torch.utils.flop_counter import flop_registry

    packet = func.overloadpacket
    counter = flop_registry.get(packet) or _EXTRA_FLOPS.get(op_name(func))
    return int(counter(*args, **kwargs, out_val=out)) if counter is not None else 0


_EXTRA_FLOPS = {"_scaled_dot_product_flash_attention_for_cpu": _sdpa_cpu_flops,
                "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_cpu_bwd_flops}
