"""Element-wise ops written as autograd Functions so each saves exactly what Megatron's fused
kernels save (Korthikanti's accounting): dropout keeps a 1-byte mask, the scaled causal softmax
keeps its output, SwiGLU keeps its input, RMSNorm keeps input and 1/rms, RoPE keeps nothing.
Native ops would save extra tensors (an fp32 dropout mask, SiLU's output, RMSNorm's normalised
input), which the planner does not count.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _wide(x: Tensor) -> Tensor:
    """x in at least fp32 (statistics of 16-bit activations are computed in fp32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def draw_keep_mask(shape: tuple[int, ...], p: float, generator: torch.Generator) -> Tensor:
    """Bool mask, True with probability 1 - p, drawn from `generator` on its device."""
    return torch.rand(shape, generator=generator, device=generator.device) >= p


class _MaskScale(torch.autograd.Function):
    """Dropout with a given keep-mask: x * mask / (1 - p); saves only the bool mask."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, mask: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x * mask * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (mask,) = ctx.saved_tensors
        return grad * mask * ctx.scale, None, None


def apply_dropout(x: Tensor, mask: Tensor, p: float) -> Tensor:
    """Apply a keep-mask drawn for dropout probability p."""
    return _MaskScale.apply(x, mask, 1.0 / (1.0 - p))


class _ScaledCausalSoftmax(torch.autograd.Function):
    """softmax(scale * scores, causal mask) over the last dim; saves only the output."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, scale: float, masked: Tensor) -> Tensor:
        x = (_wide(scores) * scale).masked_fill_(masked, float("-inf"))
        probs = torch.softmax(x, dim=-1).to(scores.dtype)
        ctx.save_for_backward(probs)
        ctx.scale = scale
        return probs

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (probs,) = ctx.saved_tensors
        dot = (grad * probs).sum(dim=-1, keepdim=True)
        return (grad - dot) * probs * ctx.scale, None, None


def scaled_causal_softmax(scores: Tensor, scale: float, masked: Tensor) -> Tensor:
    """Megatron's fused scale-mask-softmax; `masked` is True above the diagonal."""
    return _ScaledCausalSoftmax.apply(scores, scale, masked)


class _RMSNorm(torch.autograd.Function):
    """y = x / rms(x) * w; saves x and 1/rms (fp32), like a fused RMSNorm kernel."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        xf = _wide(x)
        rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
        out = (xf * rstd).to(x.dtype) * weight
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return out, rstd

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Any) -> tuple[Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        xhat = _wide(x) * rstd
        grad_w = (_wide(grad) * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        gx = _wide(grad) * _wide(weight)
        dot = (gx * xhat).mean(dim=-1, keepdim=True)
        return ((gx - xhat * dot) * rstd).to(x.dtype), grad_w, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """RMSNorm; returns (out, rstd) so the caller can name the saved statistics."""
    return _RMSNorm.apply(x, weight, eps)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor,
               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm; returns (out, mean, rstd): the statistics are what autograd saves with x."""
    return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up over the two halves of the last dim; saves only the input."""

    @staticmethod
    def forward(ctx: Any, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_gate = grad * up * (sig + silu * (1 - sig))
        return torch.cat([grad_gate, grad * silu], dim=-1)


def swiglu(gate_up: Tensor) -> Tensor:
    """SwiGLU activation of a fused [gate | up] projection."""
    return _SwiGLU.apply(gate_up)


def rope_tables(seq: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables [seq, head_dim] (rotate-half convention, as in Hugging Face LLaMA)."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(seq, dtype=torch.float64), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class _RoPE(torch.autograd.Function):
    """Rotate the q and k heads of a fused [s, b, groups, q_per_group + 2, hd] QKV tensor.

    Returns a new tensor (v copied) so the whole post-RoPE QKV is one saved storage, as the cost
    graph's `qkv_out`; the tables are constants, kept on ctx rather than saved.
    """

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, cos: Tensor, sin: Tensor, rotated: int) -> Tensor:
        out = qkv.clone()
        c, s = cos[:, None, None, None, :], sin[:, None, None, None, :]
        out[..., :rotated, :] = _rotate(qkv[..., :rotated, :], c, s).to(qkv.dtype)
        ctx.tables, ctx.rotated = (c, s), rotated
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        c, s = ctx.tables
        out = grad.clone()
        # the transpose of a rotation by theta is a rotation by -theta
        out[..., :ctx.rotated, :] = _rotate(grad[..., :ctx.rotated, :], c, -s).to(grad.dtype)
        return out, None, None, None


def apply_rope(qkv: Tensor, cos: Tensor, sin: Tensor, rotated: int) -> Tensor:
    """RoPE on the first `rotated` entries of dim -2 (the q heads and k of each KV group)."""
    return _RoPE.apply(qkv, cos, sin, rotated)


def attention_scale(head_dim: int) -> float:
    """1 / sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim)


def fused_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Causal FlashAttention-style attention: (output [b, heads, s, hd], fp32 row logsumexp
    [b, heads, s]). q has `heads`, k and v `kv_heads` dividing it (GQA).

    The aten flash kernels return the logsumexp, which `F.scaled_dot_product_attention` hides,
    so the recompute engine can name (and drop) it; their autograd saves exactly q, k, v, the
    output and the logsumexp (SPEC §10). No dropout: the reference runtime refuses attention
    dropout with fused attention.
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, True)
        return out, lse
    if k.shape[1] != q.shape[1]:
        from lynxpipe.errors import LynxError

        raise LynxError("fused grouped-query attention on CUDA is not in the reference runtime; "
                        "use --attention explicit, or num_kv_heads = num_heads")
    result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)
    return result[0], result[1]
