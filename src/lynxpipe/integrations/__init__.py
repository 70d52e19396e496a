"""A plan in the frameworks users already run (SPEC §11), `lynxpipe export --to ...`:

- `megatron`: the nearest plan Megatron-Core's recompute flags can express, its
  TransformerConfig fields and command-line flags, simulated beside the lynxpipe plan;
- `torch_export` + `torch_sac`: a selective-checkpointing `policy_fn` for
  `torch.utils.checkpoint.create_selective_checkpoint_contexts` (recompute on demand);
- `flat`: a flat JSON listing (per-layer keep/drop, per-task window) for any other framework.

Only `torch_sac` imports torch.
"""
