"""Paired objectives without a reference model (none is loaded). Inputs are policy log-probs only, [B]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """CPO preference term (Xu 2024, Eq. 3): DPO with π_ref uniform, on summed log-probs.

        loss = −(1 − ε) log σ(β (log π(y_w) − log π(y_l))) − ε log σ(−β (…))
    The paper's NLL regulariser (weight `cpo_alpha`) is added by the caller from `sft_loss`."""
    logits = beta * (chosen_logps - rejected_logps)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def simpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> Tensor:
    """SimPO (Meng 2024, Eq. 6) on length-averaged log-probs with target margin γ.

        z = β (ā_w − ā_l) − γ,   ā = log π(y|x) / |y|
        loss = −(1 − ε) log σ(z) − ε log σ(−z)
    """
    logits = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends (Mächler 2012)."""
    # torch.where evaluates (and differentiates) both branches: clamp each to its own side of −ln 2,
    # or the unused one yields inf/NaN gradients (e.g. log1p(−exp(x)) at x ≈ 0).
    near_zero = x > -0.6931471805599453
    return torch.where(near_zero, torch.log(-torch.expm1(x.clamp(min=-0.6931471805599453))),
                       torch.log1p(-torch.exp(x.clamp(max=-0.6931471805599453))))


def orpo_log_odds(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor) -> Tensor:
    """log[odds(y_w) / odds(y_l)] with odds(y) = P / (1 − P), P = exp(ā) (ORPO, Hong 2024, Eq. 4–6)."""
    return (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))


def orpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, lam: float) -> Tensor:
    """ORPO's odds-ratio term (Hong 2024, Eq. 7): loss = −λ log σ(log odds-ratio).

    The full ORPO objective adds NLL(y_w) with weight 1 (the caller adds `sft_loss`)."""
    return -lam * F.logsigmoid(orpo_log_odds(chosen_avg_logps, rejected_avg_logps))
