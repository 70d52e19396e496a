"""The recompute engine: drop planned tensors in forward and regenerate them in windows
(`recompute`, `records`), account the bytes held (`meter`), the same for the user's own blocks
(`blocks`), and the self-check against the planner's graph (`selfcheck`).

Public API: `from lynxpipe.runtime.engine import RecomputeEngine, wrap_blocks`.
"""

from lynxpipe.runtime.engine.blocks import RecomputedBlock, use_engine, wrap_blocks
from lynxpipe.runtime.engine.recompute import RecomputeEngine, Task

__all__ = ["RecomputeEngine", "RecomputedBlock", "Task", "use_engine", "wrap_blocks"]
