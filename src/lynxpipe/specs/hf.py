"""Hugging Face `config.json` files as ModelSpecs: one reader per family, every field checked.

GPT-2 style configs name their fields `n_layer`, `n_embd`, `attn_pdrop`, `resid_pdrop`, ...;
LLaMA style ones `num_hidden_layers`, `hidden_size`, `attention_dropout`, ... The attention
implementation `sdpa`, `flash_attention_2`/`_3` or `flex_attention` means fused attention,
`eager` explicit; a config without one gets transformers' default, `sdpa` (fused).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lynxpipe.artifact import read_json
from lynxpipe.checks import integer, probability
from lynxpipe.errors import LynxError
from lynxpipe.specs.families import FAMILIES, family_of_hf
from lynxpipe.specs.model import ModelSpec

FUSED_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
EXPLICIT_IMPLEMENTATIONS = ("eager",)


class _Fields:
    """Typed access to a config's fields; every error names the file, the key and the value."""

    def __init__(self, cfg: dict[str, Any], where: str) -> None:
        self.cfg, self.where = cfg, where

    def int(self, key: str, default: int | None = None) -> int:
        value = self.cfg.get(key, default)
        if value is None and default is not None:
            value = default
        if value is None:
            raise LynxError(f"{self.where}: missing key {key!r}")
        return integer(value, f"{self.where}: {key}")

    def prob(self, key: str, default: float) -> float:
        return probability(self.cfg.get(key, default), f"{self.where}: {key}")


def _gpt2(f: _Fields) -> dict[str, Any]:
    hidden, heads = f.int("n_embd"), f.int("n_head")
    return dict(num_layers=f.int("n_layer"), hidden_size=hidden, num_heads=heads,
                num_kv_heads=heads, ffn_hidden_size=f.int("n_inner", 4 * hidden),
                vocab_size=f.int("vocab_size"), attention_dropout=f.prob("attn_pdrop", 0.1),
                # Megatron applies the hidden dropout to the embedding too; GPT-2 configs carry
                # the same value in embd_pdrop and resid_pdrop
                hidden_dropout=f.prob("resid_pdrop", 0.1))


def _llama(f: _Fields) -> dict[str, Any]:
    heads = f.int("num_attention_heads")
    return dict(num_layers=f.int("num_hidden_layers"), hidden_size=f.int("hidden_size"),
                num_heads=heads, num_kv_heads=f.int("num_key_value_heads", heads),
                ffn_hidden_size=f.int("intermediate_size"), vocab_size=f.int("vocab_size"),
                attention_dropout=f.prob("attention_dropout", 0.0), hidden_dropout=0.0)


HF_READERS: dict[str, Callable[[_Fields], dict[str, Any]]] = {"gpt": _gpt2, "llama": _llama}
"""The config reader of every family that Hugging Face configs map onto."""


def attention_of(cfg: dict[str, Any], where: str) -> str:
    """fused or explicit, from the config's attention implementation (default: sdpa)."""
    impl = cfg.get("_attn_implementation", cfg.get("attn_implementation")) or "sdpa"
    if impl in FUSED_IMPLEMENTATIONS:
        return "fused"
    if impl in EXPLICIT_IMPLEMENTATIONS:
        return "explicit"
    raise LynxError(f"{where}: attention implementation {impl!r} is not known; use one of "
                    f"{', '.join(FUSED_IMPLEMENTATIONS + EXPLICIT_IMPLEMENTATIONS)}")


def _read(path: Path) -> dict[str, Any]:
    cfg = read_json(path, "config.json")
    if not isinstance(cfg, dict):
        raise LynxError(f"{path}: a config.json holds a JSON object, not "
                        f"{type(cfg).__name__ if cfg is not None else 'null'}")
    return cfg


def load_hf_config(path: str | Path) -> ModelSpec:
    """Build a ModelSpec from a GPT-2 or LLaMA family Hugging Face `config.json`."""
    path = Path(path)
    cfg = _read(path)
    model_type = str(cfg.get("model_type", "")).lower()
    family = family_of_hf(model_type)
    if family is None or family.name not in HF_READERS:
        known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
        raise LynxError(f"{path}: model_type={model_type!r} is not supported; use one of "
                        f"{', '.join(known)}")
    name = cfg.get("_name_or_path") or path.parent.name or path.stem
    fields = HF_READERS[family.name](_Fields(cfg, str(path)))
    return ModelSpec(name=str(name), family=family.name, attention=attention_of(cfg, str(path)),
                     **fields)
