"""Planning: recomputation policies, partitioning and the Plan artifact (pure Python)."""
