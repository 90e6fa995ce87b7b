"""Stage 4 — objectives: preference losses as pure functions of per-sequence log-probs."""

from dpokit.objectives.dpo import dpo_loss

__all__ = ["dpo_loss"]
