"""KTO (Ethayarajh et al. 2024, arXiv:2402.01306): prospect-theoretic loss on unpaired, labelled completions."""

from __future__ import annotations

import torch
from torch import Tensor


def kto_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """z_ref = max(0, mean_i [log π(y'_i|x_i) − log π_ref(y'_i|x_i)]), detached (paper §4.1).

    y'_i is a completion of another prompt in the batch, so the mean estimates KL(π ‖ π_ref) on
    mismatched inputs; no gradient flows through it."""
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, z_ref: Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Tensor:
    """Per-example KTO loss (paper Eq. 8), inputs [n], labels bool [n] (True = desirable):

        r = log π(y|x) − log π_ref(y|x)
        desirable:    λ_D · (1 − σ(β (r − z_ref)))
        undesirable:  λ_U · (1 − σ(β (z_ref − r)))
    """
    r = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z_ref)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z_ref - r)))
    return torch.where(labels, desirable, undesirable)
