"""Paired objectives with a reference model. Pure functions of per-pair tensors, all shaped [B].

Notation: c = chosen score, r = rejected score. A score is the log-ratio Δ = log π(y|x) − log π_ref(y|x)
(or its f-divergence transform, see modifiers.py); h = c − r. Every function returns per-pair losses [B].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_loss(c: Tensor, r: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov 2023, Eq. 7) with cDPO label smoothing ε (Mitchell 2023).

        loss = −(1 − ε) log σ(β h) − ε log σ(−β h)
    """
    logits = beta * (c - r)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def robust_loss(c: Tensor, r: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """rDPO (Chowdhury 2024, Eq. 8): unbiased DPO under label-flip rate ε < 1/2.

        loss = [−(1 − ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε)
    """
    logits = beta * (c - r)
    return (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing)


def ipo_loss(c: Tensor, r: Tensor, beta: float, chosen_tokens: Tensor, rejected_tokens: Tensor,
             normalize: str = "token") -> Tensor:
    """IPO (Azar 2023, Eq. 17), τ = β.

        loss = (h − 1/(2τ))²,   h = c/|y_w| − r/|y_l| ("token", TRL) or c − r ("sum", the authors' code)
    """
    if normalize == "token":
        h = c / chosen_tokens.clamp(min=1) - r / rejected_tokens.clamp(min=1)
    elif normalize == "sum":
        h = c - r
    else:
        raise ValueError(f"ipo normalize must be 'token' or 'sum', got {normalize!r}")
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(c: Tensor, r: Tensor, beta: float) -> Tensor:
    """SLiC hinge (Zhao 2023) on the DPO log-ratios: loss = max(0, 1 − β h)."""
    return torch.relu(1 - beta * (c - r))


def exo_pair_loss(c: Tensor, r: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """EXO (Ji 2024, Eq. 16, K = 2): KL(p_θ ‖ p_label) with p_θ = σ(±β h), p_label = (1 − ε, ε), ε > 0.

        loss = σ(βh)(log σ(βh) − log(1 − ε)) + σ(−βh)(log σ(−βh) − log ε)
    """
    logits = beta * (c - r)
    eps = torch.as_tensor(label_smoothing, dtype=logits.dtype, device=logits.device)
    return (torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-eps))
            + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(eps)))


def nca_pair_loss(c: Tensor, r: Tensor, beta: float) -> Tensor:
    """NCA (Chen 2024, pairwise): loss = −log σ(βc) − ½ log σ(−βc) − ½ log σ(−βr)."""
    return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)


def bco_pair_loss(c: Tensor, r: Tensor, beta: float) -> Tensor:
    """BCO (Jung 2024), pairwise, without the running reward shift δ (as TRL 1.16):
    loss = −log σ(βc) − log σ(−βr)."""
    return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)


def sppo_hard_loss(c: Tensor, r: Tensor, beta: float) -> Tensor:
    """SPPO (Wu 2024, Eq. 4.7) with hard win probabilities 1/0: loss = (c − 1/(2β))² + (r + 1/(2β))²."""
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2


def aot_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float, label_smoothing: float = 0.0) -> Tensor:
    """AOT, paired (Melnyk 2024): DPO's sigmoid on sorted batch quantiles of the log-odds.

        δ = sort(log π(y_w) − log π(y_l)) − sort(log π_ref(y_w) − log π_ref(y_l))   (sorted over the batch)
        loss = −(1 − ε) log σ(β δ) − ε log σ(−β δ)
    """
    delta = torch.sort(policy_chosen - policy_rejected, dim=0).values - torch.sort(
        ref_chosen - ref_rejected, dim=0).values
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def aot_unpaired_loss(c: Tensor, r: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """AOT, unpaired (Melnyk 2024): δ = sort(c) − sort(r) over the batch, then the same sigmoid loss."""
    delta = torch.sort(c, dim=0).values - torch.sort(r, dim=0).values
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def apo_zero_loss(c: Tensor, r: Tensor, beta: float) -> Tensor:
    """APO-zero (D'Oosterlinck 2024, Eq. 7): raise chosen, lower rejected. loss = 1 − σ(βc) + σ(βr)."""
    return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)


def apo_down_loss(c: Tensor, r: Tensor, beta: float) -> Tensor:
    """APO-down (D'Oosterlinck 2024, Eq. 8): lower both, rejected more. loss = σ(βc) + 1 − σ(β(c − r))."""
    return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))


def discopop_loss(c: Tensor, r: Tensor, beta: float, tau: float = 0.05) -> Tensor:
    """DiscoPOP (Lu 2024, Eq. 5): log-ratio-modulated blend of the logistic and exponential losses.

        ρ = β h;  m = σ(ρ / τ);  loss = (1 − m) · (−log σ(ρ)) + m · exp(−ρ)
    """
    rho = beta * (c - r)
    # m · e^{−ρ} as exp(log m − ρ): for ρ ≪ 0, e^{−ρ} overflows while m underflows (0 · inf = NaN).
    return torch.sigmoid(-rho / tau) * -F.logsigmoid(rho) + torch.exp(F.logsigmoid(rho / tau) - rho)


def dpop_loss(c: Tensor, r: Tensor, beta: float, lam: float, chosen_logratio: Tensor | None = None) -> Tensor:
    """DPO-Positive (Pal 2024, Eq. 3): DPO plus a penalty when the chosen log-prob falls below the reference.

        loss = −log σ(β (h − λ · max(0, −Δ_w)))      (−Δ_w = log π_ref(y_w) − log π(y_w))
    The penalty always uses the raw log-ratio Δ_w (`chosen_logratio`, default c), also when c is an
    f-divergence score.
    """
    delta_w = c if chosen_logratio is None else chosen_logratio
    return -F.logsigmoid(beta * (c - r - lam * torch.relu(-delta_w)))


def sigmoid_norm_loss(c: Tensor, r: Tensor, beta: float, chosen_tokens: Tensor, rejected_tokens: Tensor) -> Tensor:
    """Length-normalised DPO (TRL's `sigmoid_norm`): loss = −log σ(β (c/|y_w| − r/|y_l|))."""
    return -F.logsigmoid(beta * (c / chosen_tokens.clamp(min=1) - r / rejected_tokens.clamp(min=1)))


def sft_loss(chosen_logps: Tensor, chosen_tokens: Tensor) -> Tensor:
    """NLL of the chosen completions, averaged over all their tokens in the batch (a scalar).

    With `sigmoid` this is RPO (Pang 2024): loss = DPO + α · NLL(y_w)."""
    return -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)
