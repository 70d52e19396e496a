"""Real execution (SPEC §7): Megatron-style TP layers with window hooks, the reference GPT/LLaMA
model that mirrors the planner's op graph, and the recompute engine.

Modules (all import torch; the planner and simulator never import this package):
- `tp`, `vocab`, `ops`: tensor-parallel linears, vocab-parallel embedding/loss, fused-style ops.
- `env`, `model`, `stage`: the reference layers (ops named as in `cost/layers.py`) and `Stage`.
- `recompute`, `records`, `meter`: `RecomputeEngine` (drop, regenerate in windows, account).
- `api`: `wrap_blocks` for the user's own transformer blocks.
- `selfcheck`: bitwise / counter / memory checks against the planner's graph.
"""
