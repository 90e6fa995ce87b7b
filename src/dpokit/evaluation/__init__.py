"""Stage 6 — evaluation: held-out preference metrics (implicit-reward accuracy, margins, log-prob shift)."""

from dpokit.evaluation.preference import evaluate_pairs, reference_logps

__all__ = ["evaluate_pairs", "reference_logps"]
