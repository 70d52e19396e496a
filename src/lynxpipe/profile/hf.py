"""Hugging Face models as block sources (`lynxpipe profile --module hf --model config.json`).

The model is built from its config with random weights (nothing is downloaded), in training
mode (dropout on), fp32 on CPU. A block's arguments are those the model itself passes to its
first decoder layer (attention mask, position embeddings, ...): a pre-hook captures them from a
forward on random token ids, with `use_cache=False`, and stops the forward there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lynxpipe.errors import LynxError
from lynxpipe.profile.trace import BlockCall

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_hf_model(config: str | Path | Any, seed: int = 0) -> Any:
    """A causal-LM of the config (a config.json path, or a transformers config object) with
    random weights, fp32, in training mode; the attention implementation is the config's own
    (`_attn_implementation`; default sdpa)."""
    import torch

    try:
        import transformers
    except ImportError:
        raise LynxError("--module hf needs transformers (pip install transformers)") from None
    if isinstance(config, (str, Path)):
        data = json.loads(Path(config).read_text())
        impl = data.get("_attn_implementation") or data.get("attn_implementation") or "sdpa"
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise LynxError(f"{config}: no model_type")
        config = transformers.AutoConfig.for_model(model_type, **data)
    else:
        impl = getattr(config, "_attn_implementation", None) or "sdpa"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl,
                                                          dtype=torch.float32)
    return model.train()


def decoder_layers(model: Any) -> Any:
    """The model's stack of decoder layers (the ModuleList as long as the model is deep)."""
    from torch import nn

    depth = getattr(model.config, "num_hidden_layers", None)
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
    if not stacks:
        raise LynxError(f"{type(model).__name__}: found no list of {depth} decoder layers")
    return stacks[0]


class _Captured(Exception):
    """The layer's arguments are in hand: stop the model's forward."""


def hf_block_source(config: str | Path | Any, layer: int = 0, seed: int = 0):  # noqa: ANN201
    """(batch, seq) -> a call of decoder layer `layer` of the config's model, with the
    arguments the model passes it."""
    import torch

    model = build_hf_model(config, seed)
    block = decoder_layers(model)[layer]
    vocab = model.config.vocab_size

    def call(batch: int, seq: int) -> BlockCall:
        got: dict[str, Any] = {}

        def hook(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            got["args"], got["kwargs"] = args, kwargs
            raise _Captured

        gen = torch.Generator().manual_seed(seed + 1000 * batch + seq)
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        if "args" not in got:
            raise LynxError(f"{type(model).__name__}: decoder layer {layer} never ran")
        args, kwargs = got["args"], dict(got["kwargs"])
        hidden = args[0] if args else kwargs.pop("hidden_states")
        x = torch.randn(hidden.shape, generator=gen, dtype=hidden.dtype)
        return BlockCall(block, (x, *args[1:]), kwargs)

    return call
