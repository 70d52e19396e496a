"""The registry of model families: what distinguishes one decoder-layer structure from another.

A family is a set of structural choices (norm, MLP, positions, biases, head tying). The cost
model builds a layer graph from them (`cost.layers`), the runtime builds its reference layer from
the same flags (`runtime.model.layer`), and Hugging Face configs are mapped onto a family by
`model_type`. A new family is a new row here, plus a builder for any new kind of norm or MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lynxpipe.errors import LynxError

NormKind = Literal["layernorm", "rmsnorm"]
MlpKind = Literal["gelu", "swiglu"]


@dataclass(frozen=True)
class Family:
    """Structural choices of one decoder-layer family."""

    name: str
    """Registry key, stored in ModelSpec.family."""
    norm: NormKind
    """LayerNorm (mean and 1/std, weight and bias) or RMSNorm (1/rms, weight only)."""
    mlp: MlpKind
    """GeLU MLP (fc1, gelu, fc2) or SwiGLU (gate_up, swiglu, down)."""
    rope: bool
    """Rotary position embedding applied to q and k inside the QKV op."""
    linear_bias: bool
    """Biases on QKV, FC1, out-proj and FC2 (Megatron GPT) or none (LLaMA)."""
    learned_positions: bool
    """A learned position embedding added after the word embedding."""
    tied_head: bool
    """The LM head reuses the word embedding (no separate parameters)."""
    hf_model_types: tuple[str, ...]
    """Hugging Face `model_type` values read as this family."""

    def layer_params(self, h: int, f: int, kv: int) -> int:
        """Parameters of one layer of width h, MLP width f, key/value width kv."""
        qkv = h * (h + 2 * kv)
        mlp = (2 if self.mlp == "swiglu" else 1) * h * f + f * h
        norms = (2 if self.norm == "layernorm" else 1) * h * 2
        biases = (h + 2 * kv) + h + f + h if self.linear_bias else 0
        return qkv + h * h + mlp + norms + biases

    def norm_flops_per_element(self) -> int:
        """FLOPs per element of the norm (LayerNorm: mean, variance, scale and shift)."""
        return 8 if self.norm == "layernorm" else 4

    def norm_stats_bytes_per_token(self) -> int:
        """fp32 statistics a norm keeps for backward per token (mean and 1/std, or 1/rms)."""
        return 8 if self.norm == "layernorm" else 4


FAMILIES: dict[str, Family] = {
    "gpt": Family("gpt", "layernorm", "gelu", rope=False, linear_bias=True,
                  learned_positions=True, tied_head=True,
                  hf_model_types=("gpt2", "gpt_neo", "gpt_bigcode", "openai-gpt")),
    "llama": Family("llama", "rmsnorm", "swiglu", rope=True, linear_bias=False,
                    learned_positions=False, tied_head=False,
                    hf_model_types=("llama", "mistral", "qwen2")),
}
"""Every known family."""


def get_family(name: str) -> Family:
    """The registry row of `name`; unknown families are an error naming the known ones."""
    family = FAMILIES.get(name)
    if family is None:
        raise LynxError(f"family={name!r} is not a known model family; known: "
                        f"{', '.join(FAMILIES)}")
    return family


def family_of_hf(model_type: str) -> Family | None:
    """The family a Hugging Face `model_type` maps to, if any."""
    return next((f for f in FAMILIES.values() if model_type in f.hf_model_types), None)
