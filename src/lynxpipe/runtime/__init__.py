"""Real execution (SPEC §7), in four sub-packages (all but the pure `train.job` and
`train.result` import torch; the planner and simulator never import this package):

- `model`: Megatron-style TP layers with window hooks and the reference layer of every family;
- `engine`: the recompute engine (saved-tensor hooks), user blocks, self-checks;
- `pipeline`: the executor of a plan's action lists, process groups, launcher;
- `train`: the training loop, data, optimizer, checkpoints and the RunResult artifact.
"""
