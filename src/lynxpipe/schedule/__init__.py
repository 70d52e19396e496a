"""Pipeline orders as data: per-rank action lists shared by the simulator and the runtime."""
