"""PPO for language models, the classic RLHF step (Ziegler et al. 2019, arXiv:1909.08593; Stiennon et al. 2020,
arXiv:2009.01325; Ouyang et al. 2022, arXiv:2203.02155; the algorithm of TRL's PPOTrainer before TRL removed it).
Pure tensor functions; the loop is loop/ppo.py.

A completion y = y_1 … y_T of prompt x is an episode: state s_t = (x, y_<t), action y_t. Its rewards
(`token_rewards`) are a KL penalty at every token plus the reward model's score R(x, y) at the last one,

    r_t = −β_KL · (log π_old(y_t | s_t) − log π_ref(y_t | s_t))  + [t = T] · R(x, y)

(Stiennon 2020 eq. 1; the per-token k1 estimate of KL(π‖π_ref), as TRL). A value model V(s_t) gives the
baseline; generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438):

    δ_t = r_t + γ V(s_{t+1}) − V(s_t)      (V(s_{T+1}) = 0)
    A_t = δ_t + γλ A_{t+1},   returns G_t = A_t + V(s_t)                    (`gae`)

The advantages are whitened over the batch's real tokens (`whiten`); the clipped surrogate (Schulman et al.
2017, arXiv:1707.06347) with ρ_t = π_θ(y_t | s_t) / π_old(y_t | s_t) and the clipped value loss are

    L_policy = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε_low, 1 + ε_high))        (`ppo_policy_loss`)
    L_value  = ½ mean_t max((V_t − G_t)², (clip(V_t, V_old,t − c, V_old,t + c) − G_t)²)  (`ppo_value_loss`)

and the step minimises L_policy + vf_coef · L_value. Shapes: [B, T], completions right-padded, `mask` 1 at
their real tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor | None, mask: Tensor,
                  kl_coef: float) -> tuple[Tensor, Tensor]:
    """(r [B, T], non-score reward [B, T]) of the module docstring: −kl_coef · (log π_old − log π_ref) at each
    real token (0 without a reference) and scores [B] added at each row's last real token; 0 at padding.

    Unlike TRL, which put the score one position after the last token (on the first padding position, inside
    its value mask but outside its policy mask), the score is the reward of the completion's last action."""
    mask = mask.to(logps.dtype)
    non_score = torch.zeros_like(logps) if ref_logps is None else -kl_coef * (logps - ref_logps) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards = non_score.clone()
    rewards[torch.arange(len(scores), device=logps.device), last] += scores.to(logps.dtype) * (mask.sum(1) > 0)
    return rewards, non_score


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman 2016) of right-padded episodes: (advantages, returns), [B, T].

    rewards, values: [B, T]; padding of either is ignored (taken as 0, so the step after a row's last token has
    V = 0: the episode ends there). Returns G_t = A_t + V_t, the value model's target; both 0 at padding."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x − mean) / sqrt(var + 1e-8) over the real tokens of the whole batch (mean and the unbiased variance
    Σ(x − mean)² / (n − 1) taken where mask is 1, as TRL's masked_whiten); shift_mean=False adds the mean back
    (TRL's whiten_rewards: the rewards' scale changes, not their mean). Padding is returned as 0."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp(min=1)
    var = (((x - mean) ** 2) * mask).sum() / (n - 1).clamp(min=1)  # one token: 0, so it whitens to 0
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def _mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)


def ppo_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, epsilon_low: float = 0.2,
                    epsilon_high: float | None = None, normalizer: float | None = None) -> tuple[Tensor, dict]:
    """PPO's clipped surrogate per token (module docstring), summed over real tokens and divided by `normalizer`
    (default: this batch's real tokens, the token mean). Pass a whole mini-batch's token count to each of its
    micro-batches: their losses then add up to the mini-batch's (TRL averaged micro-batch means instead; the same
    when every micro-batch holds as many tokens).

    logps (with grad), old_logps, advantages (one per token), mask: [B, T]. ε_high None: ε_low (PPO's cliprange).
    Returns (loss, detached token means over real tokens: clip_fraction/low (ρ < 1 − ε_low, A < 0),
    clip_fraction/high (ρ > 1 + ε_high, A > 0), clip_fraction (either: the tokens whose gradient the clip
    removes), ratio, approx_kl (½ (log ρ)², TRL's approxkl))."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    a = advantages.to(logps.dtype)
    per_token = torch.max(-a * ratio, -a * torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high))
    loss = (per_token * mask).sum() / (normalizer if normalizer is not None else mask.sum().clamp(min=1))
    with torch.no_grad():
        low, high = (ratio < 1 - epsilon_low) & (a < 0), (ratio > 1 + epsilon_high) & (a > 0)
        stats = {"clip_fraction/low": _mean(low, mask), "clip_fraction/high": _mean(high, mask),
                 "clip_fraction": _mean(low | high, mask), "ratio": _mean(ratio, mask),
                 "approx_kl": _mean(0.5 * log_ratio ** 2, mask)}
    return loss, stats


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float = 0.2,
                   normalizer: float | None = None) -> tuple[Tensor, dict]:
    """PPO's clipped value loss ½ max((V − G)², (clip(V, V_old ± c) − G)²) per token (module docstring), summed
    over real tokens and divided by `normalizer` (default: the token count; see `ppo_policy_loss`).

    values (with grad), old_values (the value model's at sampling time), returns: [B, T]. Returns (loss,
    detached: value_clip_fraction, the tokens where the clipped term is the larger, so the clip removes the
    gradient, as TRL's vf_clipfrac)."""
    mask = mask.to(values.dtype)
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    plain, bounded = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * (torch.max(plain, bounded) * mask).sum() / (
        normalizer if normalizer is not None else mask.sum().clamp(min=1))
    with torch.no_grad():
        stats = {"value_clip_fraction": _mean(bounded > plain, mask)}
    return loss, stats


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float | None:
    """1 − Var(G − V) / Var(G) over real tokens: 1 when the value model predicts the returns, ≤ 0 when it is no
    better than their mean; None when the returns do not vary (undefined)."""
    mask = mask.to(values.dtype)
    n = mask.sum()
    var = lambda x: (((x - (x * mask).sum() / n) ** 2) * mask).sum() / n  # noqa: E731
    spread = var(returns)
    return float(1 - var(returns - values) / spread) if spread > 0 else None


def ppo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, values: Tensor, old_values: Tensor,
             returns: Tensor, epsilon_low: float = 0.2, epsilon_high: float | None = None,
             cliprange_value: float = 0.2, vf_coef: float = 0.1,
             normalizer: float | None = None) -> tuple[Tensor, dict]:
    """L_policy + vf_coef · L_value of one (micro-)batch, both over the same tokens and `normalizer` (TRL's
    loss = pg_loss + vf_coef · vf_loss); stats of both, with loss/policy and loss/value (detached)."""
    policy, stats = ppo_policy_loss(logps, old_logps, advantages, mask, epsilon_low, epsilon_high, normalizer)
    value, value_stats = ppo_value_loss(values, old_values, returns, mask, cliprange_value, normalizer)
    return policy + vf_coef * value, {**stats, **value_stats, "loss/policy": policy.detach(),
                                      "loss/value": value.detach()}
