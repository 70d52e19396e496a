"""Transformer model description: presets and Hugging Face style `config.json` loading."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from lynxpipe.errors import LynxError
from lynxpipe.specs.families import FAMILIES, Family, family_of_hf, get_family


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
    dropout: float = 0.1
    """Dropout probability of attention and residual dropout (0 disables the masks)."""
    dtype_bytes: int = 2
    """Bytes per activation element (2 for fp16/bf16)."""

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                    "ffn_hidden_size", "vocab_size", "dtype_bytes"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LynxError(f"model {self.name}: {key}={value!r} must be a positive integer")
        if self.family not in FAMILIES:
            raise LynxError(f"model {self.name}: family={self.family!r} is not a known model "
                            f"family; known: {', '.join(FAMILIES)}")
        if self.hidden_size % self.num_heads:
            raise LynxError(f"model {self.name}: hidden_size={self.hidden_size} is not divisible "
                            f"by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise LynxError(f"model {self.name}: num_heads={self.num_heads} is not divisible "
                            f"by num_kv_heads={self.num_kv_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise LynxError(f"model {self.name}: dropout={self.dropout} must be in [0, 1)")

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
    return ModelSpec(name, "gpt", layers, hidden, heads, heads, 4 * hidden, 51200)


# GPT sizes from Brown et al. 2020 / Megatron-LM (Narayanan et al. 2021, Table 1); 22B is the
# model of Korthikanti et al. 2022 (48 layers, h=6144, a=64). Vocabulary: GPT-2 BPE padded to
# 51200 as Megatron pads it. LLaMA from Touvron et al. 2023 (Table 2) / the released configs.
MODEL_PRESETS: dict[str, ModelSpec] = {
    "gpt-1.3b": _gpt("gpt-1.3b", 24, 2048, 16),
    "gpt-2.7b": _gpt("gpt-2.7b", 32, 2560, 32),
    "gpt-6.7b": _gpt("gpt-6.7b", 32, 4096, 32),
    "gpt-13b": _gpt("gpt-13b", 40, 5120, 40),
    "gpt-22b": _gpt("gpt-22b", 48, 6144, 64),
    "llama-7b": ModelSpec("llama-7b", "llama", 32, 4096, 32, 32, 11008, 32000, dropout=0.0),
    "llama-13b": ModelSpec("llama-13b", "llama", 40, 5120, 40, 40, 13824, 32000, dropout=0.0),
    # Small models for the CPU runtime, tests and the emulated cluster.
    "gpt-tiny": ModelSpec("gpt-tiny", "gpt", 4, 64, 4, 4, 256, 512),
    "gpt-small-cpu": ModelSpec("gpt-small-cpu", "gpt", 4, 512, 8, 8, 2048, 4096),
    "llama-tiny": ModelSpec("llama-tiny", "llama", 4, 128, 4, 2, 256, 512, dropout=0.0),
}


def get_model(name: str) -> ModelSpec:
    """Return a preset, or load `name` as a Hugging Face style `config.json` if it is a file."""
    if name in MODEL_PRESETS:
        return MODEL_PRESETS[name]
    if Path(name).is_file():
        return load_hf_config(name)
    raise LynxError(f"unknown model {name!r}; use a preset ({', '.join(MODEL_PRESETS)}) "
                    f"or the path of a Hugging Face config.json")


def load_hf_config(path: str | Path) -> ModelSpec:
    """Build a ModelSpec from a GPT-2 or LLaMA family Hugging Face `config.json`."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LynxError(f"{path}: cannot read config.json ({exc})") from None
    model_type = str(cfg.get("model_type", "")).lower()
    name = cfg.get("_name_or_path") or path.parent.name or path.stem
    try:
        family = family_of_hf(model_type)
        if family is not None and family.name == "gpt":
            hidden = cfg["n_embd"]
            spec = ModelSpec(
                name=str(name), family="gpt", num_layers=cfg["n_layer"], hidden_size=hidden,
                num_heads=cfg["n_head"], num_kv_heads=cfg["n_head"],
                ffn_hidden_size=cfg.get("n_inner") or 4 * hidden, vocab_size=cfg["vocab_size"],
                dropout=float(cfg.get("resid_pdrop", 0.1)),
            )
        elif family is not None and family.name == "llama":
            heads = cfg["num_attention_heads"]
            spec = ModelSpec(
                name=str(name), family="llama", num_layers=cfg["num_hidden_layers"],
                hidden_size=cfg["hidden_size"], num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                ffn_hidden_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                dropout=float(cfg.get("attention_dropout", 0.0)),
            )
        else:
            known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
            raise LynxError(f"{path}: model_type={model_type!r} is not supported; "
                            f"use one of {', '.join(known)}")
    except KeyError as exc:
        raise LynxError(f"{path}: missing key {exc.args[0]!r} for model_type={model_type}") from None
    return spec


def with_layers(spec: ModelSpec, num_layers: int) -> ModelSpec:
    """Same model with a different depth (used by tests and partition experiments)."""
    return replace(spec, num_layers=num_layers, name=f"{spec.name}-L{num_layers}")
