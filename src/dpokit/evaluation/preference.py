"""Held-out preference metrics, with TRL's metric names under an `eval/` prefix."""

from __future__ import annotations

import torch

from dpokit.batches import TokenizedPair
from dpokit.distributed import Distributed
from dpokit.logprobs import PairLogps, pairs_logps
from dpokit.objectives import OBJECTIVES, combined_loss, needs_reference


@torch.no_grad()
def evaluate_pairs(policy, pairs: list[TokenizedPair], ref: PairLogps, cfg, pad_id: int, device,
                   ctx: Distributed | None = None) -> dict[str, float]:
    """Held-out metrics of the policy against `ref` (the starting reference's `pairs_logps` in the same
    batches: cfg.eval_batch_size pairs and the run's layout, so before training the margins are exactly 0).

    eval/loss is the configured paired objective (absent for KTO); eval/rewards/* are always
    β·(log π − log π_ref) against the starting model, so "did it align" reads the same for every objective. Accuracy counts chosen
    strictly above rejected, as TRL does (ties, e.g. before training, count as wrong)."""
    was_training = policy.training
    policy.eval()
    pol = pairs_logps(policy, pairs, cfg.eval_batch_size, pad_id, device, ld_alpha=cfg.ld_alpha,
                      with_wpo=cfg.use_weighting, prefix_sharing=cfg.prefix_sharing, pack_tokens=cfg.pack_tokens,
                      ctx=ctx)
    policy.train(was_training)
    rc, rr = cfg.beta * (pol.chosen - ref.chosen), cfg.beta * (pol.rejected - ref.rejected)
    metrics = {}
    if all(OBJECTIVES[n].data == "paired" for n in cfg.loss_names):  # KTO's loss is not defined on pairs
        losses, _ = combined_loss(cfg.loss_names, cfg.loss_weight_values, pol,
                                  ref if needs_reference(cfg.loss_names) else None, cfg)
        metrics["eval/loss"] = losses.mean().item()
    return metrics | {
        "eval/rewards/chosen": rc.mean().item(),
        "eval/rewards/rejected": rr.mean().item(),
        "eval/rewards/margins": (rc - rr).mean().item(),
        "eval/rewards/accuracies": (rc > rr).float().mean().item(),
        "eval/logps/chosen": pol.chosen.mean().item(),
        "eval/logps/rejected": pol.rejected.mean().item(),
        # A falling chosen log-prob is a known DPO failure mode (both completions pushed down): show it.
        "eval/logps/chosen_shift": (pol.chosen - ref.chosen).mean().item(),
        "eval/logps/rejected_shift": (pol.rejected - ref.rejected).mean().item(),
    }


def format_eval(m: dict[str, float]) -> str:
    loss = f"loss {m['eval/loss']:.4f}, " if "eval/loss" in m else ""
    return (f"implicit-reward accuracy {m['eval/rewards/accuracies']:.3f}, margin {m['eval/rewards/margins']:+.3f}, "
            f"{loss}chosen log-prob shift {m['eval/logps/chosen_shift']:+.2f}, "
            f"rejected {m['eval/logps/rejected_shift']:+.2f}")
