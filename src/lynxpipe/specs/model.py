"""Transformer model description and presets (Hugging Face `config.json` files: `specs.hf`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from lynxpipe.checks import integer, probability, text
from lynxpipe.errors import LynxError
from lynxpipe.specs.families import FAMILIES, Family, get_family

Attention = Literal["fused", "explicit"]
ATTENTION_KINDS: tuple[str, ...] = ("fused", "explicit")
DTYPE_BYTES = (1, 2, 4)
"""Activation widths: fp8, fp16/bf16, fp32."""


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer of a registered family (`specs.families`): GPT (LayerNorm,
    GeLU MLP) or LLaMA (RMSNorm, SwiGLU, RoPE, GQA)."""

    name: str
    """Preset or user-given name; part of the plan fingerprint."""
    family: str
    """Layer structure: a key of `specs.families.FAMILIES` (gpt, llama)."""
    num_layers: int
    """Number of identical transformer layers."""
    hidden_size: int
    """Model width h."""
    num_heads: int
    """Attention heads a."""
    num_kv_heads: int
    """Key/value heads (GQA); equals num_heads for GPT."""
    ffn_hidden_size: int
    """MLP inner width (4h for GPT; SwiGLU width for LLaMA)."""
    vocab_size: int
    """Vocabulary size V (padded as Megatron pads it)."""
    attention: Attention = "fused"
    """`fused`: one FlashAttention-style kernel (SDPA, flash_attention_2, TE) that saves q, k, v,
    its output and the row logsumexp, never the s x s scores (what users run, SPEC §10);
    `explicit`: scores, softmax and dropout as separate ops (Korthikanti's accounting)."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities (fused: regenerated from a saved RNG seed)."""
    hidden_dropout: float = 0.1
    """Dropout after the out-projection, after the MLP and on the embedding (0: no masks)."""
    dtype_bytes: int = 2
    """Bytes per activation element (2 for fp16/bf16)."""

    def __post_init__(self) -> None:
        where = f"model {self.name}"
        text(self.name, "model name")
        for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                    "ffn_hidden_size", "vocab_size"):
            integer(getattr(self, key), f"{where}: {key}")
        if self.dtype_bytes not in DTYPE_BYTES or isinstance(self.dtype_bytes, bool):
            raise LynxError(f"{where}: dtype_bytes={self.dtype_bytes!r} must be 1, 2 or 4")
        if self.family not in FAMILIES:
            raise LynxError(f"{where}: family={self.family!r} is not a known model "
                            f"family; known: {', '.join(FAMILIES)}")
        if self.hidden_size % self.num_heads:
            raise LynxError(f"{where}: hidden_size={self.hidden_size} is not divisible "
                            f"by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise LynxError(f"{where}: num_heads={self.num_heads} is not divisible "
                            f"by num_kv_heads={self.num_kv_heads}")
        if self.attention not in ATTENTION_KINDS:
            raise LynxError(f"{where}: attention={self.attention!r} must be one of "
                            f"{', '.join(ATTENTION_KINDS)}")
        for key in ("attention_dropout", "hidden_dropout"):
            probability(getattr(self, key), f"{where}: {key}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def family_info(self) -> Family:
        """The family's registry row."""
        return get_family(self.family)

    def layer_params(self) -> int:
        """Parameters of one transformer layer (weights and biases, both norms)."""
        return self.family_info.layer_params(self.hidden_size, self.ffn_hidden_size,
                                             self.num_kv_heads * self.head_dim)

    def total_params(self) -> int:
        """All parameters, embedding counted once (tied with the LM head as in Megatron GPT)."""
        embed = self.vocab_size * self.hidden_size
        tied_head = 0 if self.family_info.tied_head else embed
        return self.num_layers * self.layer_params() + embed + tied_head + 2 * self.hidden_size


def _gpt(name: str, layers: int, hidden: int, heads: int) -> ModelSpec:
    # Megatron's defaults: attention and hidden dropout 0.1
    return ModelSpec(name, "gpt", layers, hidden, heads, heads, 4 * hidden, 51200,
                     attention_dropout=0.1, hidden_dropout=0.1)


# GPT sizes from Brown et al. 2020 / Megatron-LM (Narayanan et al. 2021, Table 1); 22B is the
# model of Korthikanti et al. 2022 (48 layers, h=6144, a=64). Vocabulary: GPT-2 BPE padded to
# 51200 as Megatron pads it. LLaMA from Touvron et al. 2023 (Table 2) / the released configs.
MODEL_PRESETS: dict[str, ModelSpec] = {
    "gpt-1.3b": _gpt("gpt-1.3b", 24, 2048, 16),
    "gpt-2.7b": _gpt("gpt-2.7b", 32, 2560, 32),
    "gpt-6.7b": _gpt("gpt-6.7b", 32, 4096, 32),
    "gpt-13b": _gpt("gpt-13b", 40, 5120, 40),
    "gpt-22b": _gpt("gpt-22b", 48, 6144, 64),
    "llama-7b": ModelSpec("llama-7b", "llama", 32, 4096, 32, 32, 11008, 32000,
                          hidden_dropout=0.0),
    "llama-13b": ModelSpec("llama-13b", "llama", 40, 5120, 40, 40, 13824, 32000,
                           hidden_dropout=0.0),
    # Small models for the CPU runtime, tests and the emulated cluster: attention dropout 0,
    # as fused attention on CPU needs (SPEC §10), hidden dropout on
    "gpt-tiny": ModelSpec("gpt-tiny", "gpt", 4, 64, 4, 4, 256, 512),
    "gpt-small-cpu": ModelSpec("gpt-small-cpu", "gpt", 8, 512, 8, 8, 2048, 4096),
    # twice the width: GEMMs grow as h^2, a TP all-reduce as h (the emulated sweep's second shape)
    "gpt-medium-cpu": ModelSpec("gpt-medium-cpu", "gpt", 8, 1024, 16, 16, 4096, 4096),
    "llama-tiny": ModelSpec("llama-tiny", "llama", 4, 128, 4, 2, 256, 512, hidden_dropout=0.1),
}


def get_model(name: str) -> ModelSpec:
    """Return a preset, or load `name` as a Hugging Face style `config.json` if it is a file."""
    if name in MODEL_PRESETS:
        return MODEL_PRESETS[name]
    if Path(name).exists():
        from lynxpipe.specs.hf import load_hf_config

        return load_hf_config(name)
    raise LynxError(f"unknown model {name!r}; use a preset ({', '.join(MODEL_PRESETS)}) "
                    f"or the path of a Hugging Face config.json")


def with_layers(spec: ModelSpec, num_layers: int) -> ModelSpec:
    """Same model with a different depth (used by tests and partition experiments)."""
    return replace(spec, num_layers=num_layers, name=f"{spec.name}-L{num_layers}")
