"""lynxpipe: activation recomputation hidden inside the communication waits of TP/PP training.

Data flow (see README, Architecture): specs -> cost -> plan -> sim | runtime -> report.
The planner and simulator packages never import torch.
"""

__version__ = "0.1.0"
