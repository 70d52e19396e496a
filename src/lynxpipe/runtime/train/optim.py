"""AdamW, the same arithmetic as torch.optim.AdamW (single-tensor path, foreach=False).

Why not torch's: constructing any `torch.optim.Optimizer` imports torch._dynamo, ~4 s of CPU
per rank process here; with every rank paying it on two shared cores a launch got 10-15 s
slower. The update below is `torch.optim.adam._single_tensor_adam` with decoupled weight decay,
op for op, so results are bitwise identical (tested).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import Tensor


class Optimizer(Protocol):
    """What the executor needs from an optimizer."""

    def step(self) -> None:
        """Update the parameters from their gradients."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients."""


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter) over a list of parameters."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.steps = 0
        """Updates done (every parameter is updated each step)."""
        self.exp_avg: list[Tensor | None] = [None] * len(self.params)
        self.exp_avg_sq: list[Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW update of every parameter that has a gradient."""
        self.steps += 1
        beta1, beta2 = self.betas
        bias1, bias2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
        step_size, bias2_sqrt = self.lr / bias1, bias2 ** 0.5
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if self.exp_avg[i] is None:
                self.exp_avg[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.exp_avg_sq[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
            m, v = self.exp_avg[i], self.exp_avg_sq[i]
            assert m is not None and v is not None
            p.mul_(1 - self.lr * self.weight_decay)
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            p.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(self.eps), value=-step_size)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) every gradient."""
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters, step count and moments (for checkpoints)."""
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps,
                "weight_decay": self.weight_decay, "steps": self.steps,
                "exp_avg": list(self.exp_avg), "exp_avg_sq": list(self.exp_avg_sq)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (moments copied to the parameters' devices)."""
        if len(state["exp_avg"]) != len(self.params):
            raise ValueError(f"optimizer state has {len(state['exp_avg'])} parameters, "
                             f"this model {len(self.params)}")
        self.lr, self.betas, self.eps = state["lr"], tuple(state["betas"]), state["eps"]
        self.weight_decay, self.steps = state["weight_decay"], state["steps"]
        self.exp_avg = [None if t is None else t.to(p.device)
                        for t, p in zip(state["exp_avg"], self.params)]
        self.exp_avg_sq = [None if t is None else t.to(p.device)
                           for t, p in zip(state["exp_avg_sq"], self.params)]
