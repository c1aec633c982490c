"""Pretraining on Ray Train: datasets over normalised states, per-worker loops, the runner."""
