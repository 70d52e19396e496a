"""Discrete-event simulation of per-rank action lists (SPEC §6). Pure Python."""
