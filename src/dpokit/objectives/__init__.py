"""Stage 4 — objectives: preference losses as pure functions of per-sequence log-probs.

paired.py: with a reference (DPO family); reference_free.py: CPO, SimPO, ORPO; kto.py (unpaired); grpo.py,
rloo.py and ppo.py (online); modifiers.py: f-divergences and WPO weights; registry.py: every objective by name —
its data, reference, options and traits — and the combined loss the loop calls.
"""

from dpokit.objectives.registry import (OBJECTIVES, Objective, OnlineInputs, UnpairedInputs, combined_loss,
                                        needs_reference, rewards)

__all__ = ["OBJECTIVES", "Objective", "OnlineInputs", "UnpairedInputs", "combined_loss", "dpo_loss", "needs_reference",
           "rewards"]


def __getattr__(name: str):
    """dpo_loss loads torch on first use: the table above is read without it (`dpokit losses`, --help)."""
    if name == "dpo_loss":
        from dpokit.objectives.dpo import dpo_loss
        return dpo_loss
    raise AttributeError(f"module 'dpokit.objectives' has no attribute {name!r}")
