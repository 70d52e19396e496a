"""The reference model on torch: TP linears and vocab-parallel embedding/loss (`tp`, `vocab`),
fused-style element-wise ops that save exactly what Megatron's kernels save (`ops`), the named
tensor environment and runtime hooks (`env`), the decoder layer of every registered family
(`layer`) and the pipeline stage holding layers, embedding and head (`stage`)."""
