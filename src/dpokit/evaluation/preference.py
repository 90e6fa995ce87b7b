"""Held-out preference metrics, with TRL's metric names under an `eval/` prefix."""

from __future__ import annotations

import torch

from dpokit.batches import TokenizedPair, collate
from dpokit.logprobs import pair_logps
from dpokit.objectives import dpo_loss


@torch.no_grad()
def reference_logps(model, pairs: list[TokenizedPair], batch_size: int, pad_id: int,
                    device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of every pair under `model`: (chosen [n], rejected [n]), on CPU.

    The reference is frozen, so these are computed once and reused by every evaluation."""
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate(pairs[i:i + batch_size], pad_id).items()}
        c, r = pair_logps(model, batch)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def evaluate_pairs(policy, pairs: list[TokenizedPair], ref: tuple[torch.Tensor, torch.Tensor], beta: float,
                   label_smoothing: float, batch_size: int, pad_id: int, device) -> dict[str, float]:
    """Implicit-reward accuracy (chosen reward strictly above rejected, as TRL counts it), margins,
    rewards and log-probs of the policy on held-out pairs; `ref` from `reference_logps`."""
    was_training = policy.training
    policy.eval()
    chosen, rejected = reference_logps(policy, pairs, batch_size, pad_id, device)
    policy.train(was_training)
    losses, rc, rr = dpo_loss(chosen, rejected, ref[0], ref[1], beta, label_smoothing)
    return {
        "eval/loss": losses.mean().item(),
        "eval/rewards/chosen": rc.mean().item(),
        "eval/rewards/rejected": rr.mean().item(),
        "eval/rewards/margins": (rc - rr).mean().item(),
        "eval/rewards/accuracies": (rc > rr).float().mean().item(),
        "eval/logps/chosen": chosen.mean().item(),
        "eval/logps/rejected": rejected.mean().item(),
        # A falling chosen log-prob is a known DPO failure mode (both completions pushed down): show it.
        "eval/logps/chosen_shift": (chosen - ref[0]).mean().item(),
        "eval/logps/rejected_shift": (rejected - ref[1]).mean().item(),
    }
