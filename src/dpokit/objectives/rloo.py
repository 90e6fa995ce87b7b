"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE
Style Optimization for Learning from Human Feedback in LLMs", arXiv:2402.14740; Kool et al. 2019). Pure tensor
functions; the loop is loop/online.py's group step, shared with GRPO.

Each prompt gets k samples y_1 … y_k from π_old. A whole completion is one action (no value model): its reward
is the score minus the KL penalty of the sequence, and its baseline the mean of the *other* k − 1 rewards,

    r'_i = R(x, y_i) − β_KL · Σ_t (log π_old(y_it) − log π_ref(y_it))          (k1 sequence KL, as the paper)
    A_i  = r'_i − 1/(k−1) Σ_{j≠i} r'_j                                          (`rloo_advantages`)

and the loss is REINFORCE on the sequence, here with PPO's clip of the sequence ratio ρ_i = π_θ(y_i)/π_old(y_i)
so that μ > 1 passes over a batch stay near π_old, as TRL 1.16's RLOOTrainer (`rloo_loss`):

    L = 1/B Σ_i −min(ρ_i A_i, clip(ρ_i, 1 − ε_low, 1 + ε_high) A_i)

At μ = 1, ρ_i = 1 and the gradient is the paper's −1/B Σ_i A_i ∇ log π_θ(y_i). Same as TRL 1.16: sequence-level
ratio, k1 KL of π_old against π_ref subtracted from the reward, mean over sequences. Differs: no
`normalize_advantages` option (TRL's default is off), no reward clipping, and every reward is finite (dpokit
refuses a non-finite one instead of leaving it out of the baseline).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rloo_advantages(scores: Tensor, group_size: int, kl: Tensor | None = None,
                    kl_coef: float = 0.0) -> tuple[Tensor, Tensor]:
    """(advantages [P*k], rewards r' [P*k]) of the module docstring. scores and kl (each sample's summed
    log π_old − log π_ref; None: no penalty): [P*k], grouped (row p*k + j = sample j of prompt p)."""
    if group_size < 2 or scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"need [P*k] scores with group size k >= 2, got shape {tuple(scores.shape)} and k = "
                         f"{group_size}")
    rewards = scores if kl is None else scores - kl_coef * kl.to(scores.dtype)
    groups = rewards.view(-1, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).view(-1), rewards


def rloo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, epsilon_low: float = 0.2,
              epsilon_high: float | None = None, normalizer: float | None = None) -> tuple[Tensor, dict]:
    """The clipped sequence-level REINFORCE loss of the module docstring, Σ_i over the B rows / `normalizer`
    (default B; pass the whole batch's number of sequences to each micro-batch so they add up).

    logps (with grad), old_logps: [B, T] per-token, right-padded; mask: [B, T]; advantages: [B]. Returns (loss,
    detached sequence means: clip_fraction/low, clip_fraction/high, clip_fraction, ratio)."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    ratio = torch.exp(((logps - old_logps) * mask).sum(1))
    a = advantages.to(logps.dtype)
    per_seq = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * a)
    loss = per_seq.sum() / (normalizer if normalizer is not None else logps.shape[0])
    with torch.no_grad():
        low, high = (ratio < 1 - epsilon_low) & (a < 0), (ratio > 1 + epsilon_high) & (a > 0)
        stats = {"clip_fraction/low": low.float().mean(), "clip_fraction/high": high.float().mean(),
                 "clip_fraction": (low | high).float().mean(), "ratio": ratio.detach().mean()}
    return loss, stats
