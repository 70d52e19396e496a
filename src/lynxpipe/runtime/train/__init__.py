"""Training with a plan: the per-rank loop (`worker`), the job description (`job`, pure),
data (`data`), AdamW (`optim`), checkpoints (`checkpoint`) and the RunResult artifact with its
summaries (`result`, pure; `summary`)."""
