"""Cost model: the op graph of a layer (layer.py) and its times on a cluster (table.py)."""
