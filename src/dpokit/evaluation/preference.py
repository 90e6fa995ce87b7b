"""Held-out preference metrics, with TRL's metric names under an `eval/` prefix."""

from __future__ import annotations

import torch

from dpokit.batches import TokenizedPair, eval_batches, pair_batch
from dpokit.distributed import Distributed, map_batches
from dpokit.logprobs import PairLogps, pair_logps
from dpokit.objectives import OBJECTIVES, combined_loss, needs_reference


@torch.no_grad()
def reference_logps(model, pairs: list[TokenizedPair], batch_size: int, pad_id: int, device,
                    ld_alpha: float | None = None, with_wpo: bool = False, prefix_sharing: bool = True,
                    pack_tokens: int = 0, ctx: Distributed | None = None) -> PairLogps:
    """Log-prob summaries of every pair under `model`, concatenated over batches, on CPU.

    Used for the frozen reference (computed once, reused by every evaluation) and for the policy. Under
    torchrun the batches are shared out over the ranks (in lockstep: an FSDP model's forward is collective)
    and every rank gets the whole result. Batches as the reference cache's (`eval_batches`: a pair count and a
    token budget), so cached held-out sums are computed in the evaluation's very batches."""
    ranges = eval_batches(pairs, batch_size, prefix_sharing, pack_tokens)

    def batch_logps(b: int) -> PairLogps:
        batch = pair_batch(pairs[ranges[b][0]:ranges[b][1]], pad_id, prefix_sharing, pack_tokens)
        return pair_logps(model, {k: v.to(device) for k, v in batch.items()}, ld_alpha, with_wpo)

    parts = map_batches(batch_logps, len(ranges), ctx, lockstep=True)

    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values).cpu()
    return PairLogps(*(cat(n) for n in ("chosen", "rejected", "chosen_tokens", "rejected_tokens",
                                        "chosen_wpo", "rejected_wpo", "chosen_plain")))


@torch.no_grad()
def evaluate_pairs(policy, pairs: list[TokenizedPair], ref: PairLogps, cfg, pad_id: int, device,
                   ctx: Distributed | None = None) -> dict[str, float]:
    """Held-out metrics of the policy against `ref` (the starting reference, from `reference_logps`).

    eval/loss is the configured paired objective (absent for KTO); eval/rewards/* are always
    β·(log π − log π_ref) against the starting model, so "did it align" reads the same for every objective. Accuracy counts chosen
    strictly above rejected, as TRL does (ties, e.g. before training, count as wrong)."""
    was_training = policy.training
    policy.eval()
    pol = reference_logps(policy, pairs, cfg.eval_batch_size, pad_id, device, cfg.ld_alpha, cfg.use_weighting,
                          cfg.prefix_sharing, cfg.pack_tokens, ctx)
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
