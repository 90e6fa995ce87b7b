"""Stage 6 — evaluation: held-out preference metrics (implicit-reward accuracy, margins, log-prob shift)."""

from dpokit.evaluation.preference import evaluate_pairs

__all__ = ["evaluate_pairs"]
