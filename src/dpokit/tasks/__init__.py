"""Experiments built from the pipeline: pairs made by sampling and a reward, the `demo`, the `sweep`."""
