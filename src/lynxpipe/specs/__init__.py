"""Model, cluster and parallel-layout specifications (typed, frozen, JSON-serialisable)."""

from lynxpipe.specs.cluster import ClusterSpec, get_cluster, CLUSTER_PRESETS
from lynxpipe.specs.model import ModelSpec, get_model, load_hf_config, MODEL_PRESETS
from lynxpipe.specs.parallel import ParallelSpec, validate_layout

__all__ = [
    "ClusterSpec", "get_cluster", "CLUSTER_PRESETS",
    "ModelSpec", "get_model", "load_hf_config", "MODEL_PRESETS",
    "ParallelSpec", "validate_layout",
]
