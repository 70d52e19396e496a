"""Running a plan's action lists on torch.distributed: what a rank builds from the plan
(`from_plan`), the executor (`executor`), process groups (`groups`), heartbeats and failures
(`health`) and the launcher with its fork server (`launch`, `zygote`)."""
