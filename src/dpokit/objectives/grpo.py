"""GRPO: group-relative policy optimisation (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300; DeepSeek-R1 2025,
arXiv:2501.12948), with the DAPO (Yu et al. 2025, arXiv:2503.14476) and Dr. GRPO (Liu et al. 2025,
arXiv:2503.20783) variants of its normalisation. Pure tensor functions; the online loop is loop/online.py.

For each prompt x, G completions y_1 … y_G are sampled from the policy as it was before this batch's
updates (π_old) and scored r_1 … r_G. No value network: the baseline is the group's mean reward,

    A_i = (r_i − mean(r_1..G)) / (std(r_1..G) + 1e-4)                          (group_advantages)

and every token t of y_i gets A_i. The clipped surrogate of PPO (Schulman et al. 2017) per token, with
ρ_it = π_θ(y_it | x, y_i<t) / π_old(y_it | x, y_i<t):

    ℓ_it = −min(ρ_it A_i, clip(ρ_it, 1 − ε_low, 1 + ε_high) A_i) + β_KL · k3_it  (grpo_loss)
    k3_it = π_ref/π_θ − log(π_ref/π_θ) − 1 ≥ 0                                 (k3_kl, Schulman 2020)

k3 is an unbiased, always non-negative per-token estimate of KL(π_θ‖π_ref) on samples from π_θ.

GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071; importance_sampling_level
"sequence", TRL 1.16's name) replaces the token ratio by one ratio per completion, the geometric mean of its
token ratios (length-normalised, so that long and short completions' ratios live on one scale):

    s_i = exp( 1/|y_i| Σ_t (log π_θ(y_it | ·) − log π_old(y_it | ·)) )
    ℓ_it = −min(s_i A_i, clip(s_i, 1 − ε_low, 1 + ε_high) A_i) + β_KL · k3_it   for every token t of y_i

so a whole completion is clipped or kept together: a token-level ratio weights each token by one noisy
sample of its own, which the paper finds to destabilise long-sequence and MoE training. The paper aggregates
with "grpo" (one term per sequence); "dapo" and "dr_grpo" weigh sequence i by |y_i| (as TRL; the run logs a note).
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("dapo", "grpo", "dr_grpo")
SCALES = ("group", "batch", "none")
LEVELS = ("token", "sequence")  # importance_sampling_level: GRPO's token ratios, GSPO's sequence ratio
# the stats that are means over completions, not tokens, at the sequence level (as TRL 1.16 logs them)
SEQUENCE_STATS = ("clip_fraction/low", "clip_fraction/high", "clip_fraction", "ratio")


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group") -> Tensor:
    """Group-relative advantages. rewards: [P*G], grouped (row p*G + j = sample j of prompt p) → [P*G].

        A_i = r_i − mean(group of i), then divided by
          "group": std(group of i) + 1e-4   (Shao 2024; TRL 1.16's default)
          "batch": std(all P*G rewards) + 1e-4   (group mean, batch std: "Lite PPO", arXiv:2508.08221,
                   the reference TRL 1.16 gives)
          "none":  nothing   (Liu 2025, Dr. GRPO: dividing by a group's std over-weights prompts that are
                   nearly always solved or never solved, whose std is small)
    std is torch's default unbiased (n − 1) estimate and 1e-4 keeps a zero-std group finite, as TRL 1.16:
    such a group's advantages are exactly 0 (no signal), whatever the scale.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if group_size < 2 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"need [P*G] rewards with group_size G >= 2, got shape {tuple(rewards.shape)} and "
                         f"G = {group_size}")
    groups = rewards.view(-1, group_size)
    advantages = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        return advantages / (groups.std(dim=1).repeat_interleave(group_size) + 1e-4)
    if scale == "batch":
        return advantages / (rewards.std() + 1e-4)
    return advantages


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π_θ‖π_ref) (Schulman 2020, "Approximating KL divergence"; used by
    Shao 2024 Eq. 4): exp(d) − d − 1 with d = log π_ref − log π_θ. ≥ 0, and 0 where the two agree. Same shape."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def normalizer(aggregation: str, tokens: int, sequences: int, max_completion_length: int | None = None) -> float:
    """What `grpo_loss` divides its sum by, for a batch of `sequences` completions with `tokens` tokens in all.

    Pass the value for a whole optimisation batch to each of its micro-batches: their losses then add up
    to the loss of the batch in one piece (every aggregation is a sum of per-sequence terms)."""
    if aggregation == "dapo":
        return float(max(tokens, 1))
    if aggregation == "grpo":
        return float(sequences)
    if aggregation == "dr_grpo":
        if not max_completion_length:
            raise ValueError("aggregation dr_grpo needs max_completion_length (the sampler's max_new_tokens)")
        return float(sequences * max_completion_length)
    raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")


def grpo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, ref_logps: Tensor | None = None,
              epsilon_low: float = 0.2, epsilon_high: float | None = None, kl_coef: float = 0.0,
              aggregation: str = "dapo", max_completion_length: int | None = None,
              normalizer_value: float | None = None,
              importance_sampling_level: str = "token") -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO objective of a batch of B completions (module docstring for ℓ_it).

    logps, old_logps, ref_logps: [B, T] per-token log-probs of the sampled completion tokens under π_θ (with
    grad), π_old and π_ref, right-padded; mask: [B, T], 1 at real tokens; advantages: [B]. ε_high = None
    means ε_high = ε_low (PPO's symmetric clip; DAPO's "clip-higher" uses ε_high = 0.28 > ε_low = 0.2).

    Aggregation of ℓ_it over the batch:
      "grpo":    (1/B) Σ_i (1/|y_i|) Σ_t ℓ_it   — mean per sequence, then over sequences (Shao 2024)
      "dapo":    Σ_i Σ_t ℓ_it / Σ_i |y_i|       — every token weighs the same (Yu 2025; TRL 1.16's default)
      "dr_grpo": Σ_i Σ_t ℓ_it / (B · L)         — L = max_completion_length, a constant (Liu 2025)
    dpokit's default is "dapo". Under "grpo" a token of a long completion weighs 1/|y_i|, so a long
    wrong answer (A < 0) is penalised less per token than a short one and a long right answer rewarded
    less: a length bias that lets wrong answers grow (Liu 2025, §3.1). "dapo" removes it; "dr_grpo"
    removes also the batch-to-batch variation of the divisor, but ties the loss scale (and so the
    learning rate) to the chosen L. `normalizer_value` overrides the divisor (see `normalizer`).
    importance_sampling_level "sequence": GSPO's ratio s_i for every token of y_i (module docstring); a row
    whose mask is all 0 (a masked truncated completion) gets s_i = 1 and contributes nothing.

    Returns (scalar loss, detached stats over real tokens: clip_fraction/low — ρ < 1 − ε_low with A < 0,
    clip_fraction/high — ρ > 1 + ε_high with A > 0 (the tokens whose gradient the clip removes, as TRL
    counts them), clip_fraction (their sum), ratio (mean ρ), and kl (mean k3) when ref_logps is given). At the
    sequence level the SEQUENCE_STATS are means over the B completions instead (TRL 1.16's clip_ratio).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    if importance_sampling_level not in LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {', '.join(LEVELS)}, got "
                         f"{importance_sampling_level!r}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":  # [B, 1]: one ratio per completion, broadcast over its tokens
        log_ratio = ((log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1)).unsqueeze(1)
    ratio = torch.exp(log_ratio)
    a = advantages.to(logps.dtype).unsqueeze(1)                                  # [B, 1]: one per completion
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * a)
    kl = None
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)
        if kl_coef:
            per_token = per_token + kl_coef * kl
    elif kl_coef:
        raise ValueError("kl_coef > 0 needs ref_logps")
    tokens = mask.sum()
    if aggregation == "grpo":
        summed = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()
    else:
        summed = (per_token * mask).sum()
    divisor = normalizer_value if normalizer_value is not None else normalizer(
        aggregation, int(tokens.item()), logps.shape[0], max_completion_length)
    loss = summed / divisor

    with torch.no_grad():
        def token_mean(x: Tensor) -> Tensor:
            if x.shape[1] == 1 and importance_sampling_level == "sequence":  # s_i: a mean over completions
                return x.to(mask.dtype).mean()
            return (x.to(mask.dtype) * mask).sum() / tokens.clamp(min=1)
        low = (ratio < 1 - epsilon_low) & (a < 0)
        high = (ratio > 1 + epsilon_high) & (a > 0)
        stats = {"clip_fraction/low": token_mean(low), "clip_fraction/high": token_mean(high),
                 "clip_fraction": token_mean(low | high), "ratio": token_mean(ratio.detach())}
        if kl is not None:
            stats["kl"] = token_mean(kl.detach())
    return loss, stats
