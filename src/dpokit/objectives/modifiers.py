"""Modifiers that change what the paired objectives see: f-divergence scores and WPO weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def f_divergence_scores(logratio: Tensor, kind: str = "reverse_kl", alpha: float = 0.5) -> Tensor:
    """f'(π/π_ref) as a function of the log-ratio u = log π − log π_ref (Wang 2023, "Beyond reverse KL").

        reverse_kl: u (plain DPO);  forward_kl: 1 − e^{−u};  js: log 2 + log σ(u);
        alpha: (e^{(α−1)u} − 1)/(α − 1), exponent clamped at 80 so fp32 stays finite (as TRL).
    """
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return 1 - torch.exp(-logratio)
    if kind == "js":
        return math.log(2) + F.logsigmoid(logratio)
    if kind == "alpha":
        if abs(alpha - 1.0) < 1e-6:
            return logratio  # the α → 1 limit is reverse KL
        t = torch.clamp((alpha - 1.0) * logratio, max=80.0)
        return (torch.exp(t) - 1.0) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence {kind!r}")


def wpo_weights(chosen_aligned_mean: Tensor, rejected_aligned_mean: Tensor) -> Tensor:
    """WPO (Zhou 2024, Eq. 2) pair weight w(x, y_w) · w(x, y_l), detached.

    Each input is the per-sequence mean over tokens of log π(y_t) − log Σ_v π(v)², so
    w = exp(mean) is the length-normalised probability of the completion under the policy's own
    sampling distribution, re-weighting off-policy pairs toward on-policy ones."""
    return torch.exp(chosen_aligned_mean + rejected_aligned_mean).detach()
