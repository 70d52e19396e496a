"""Model, cluster and parallel-layout specifications (typed, frozen, JSON-serialisable)."""

from lynxpipe.specs.cluster import CLUSTER_PRESETS, ClusterSpec, get_cluster
from lynxpipe.specs.hf import load_hf_config
from lynxpipe.specs.model import MODEL_PRESETS, ModelSpec, get_model
from lynxpipe.specs.parallel import ParallelSpec, validate_layout

__all__ = [
    "ClusterSpec", "get_cluster", "CLUSTER_PRESETS",
    "ModelSpec", "get_model", "load_hf_config", "MODEL_PRESETS",
    "ParallelSpec", "validate_layout",
]
