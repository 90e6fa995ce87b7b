"""Every objective by name: what data it trains on, what it needs, which options it reads, how to call it.

The loop asks `combined_loss` for the weighted sum of the selected paired objectives; each entry below is a
thin adapter from its inputs (+ config) to one pure function. Whatever depends on *which* objective is
selected is a field here, so config, evaluation and `dpokit losses` read it from this table instead of
testing names. To add an objective: write its pure function (paired.py, reference_free.py, …) and one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import Tensor

    from dpokit.logprobs.sequence import PairLogps


# The tensor functions load on first call: config, --help and `dpokit losses` read this table without torch.
def P():
    from dpokit.objectives import paired
    return paired


def RF():
    from dpokit.objectives import reference_free
    return reference_free


def kto_loss(*args):
    from dpokit.objectives.kto import kto_loss
    return kto_loss(*args)


def grpo_loss(*args):
    from dpokit.objectives.grpo import grpo_loss
    return grpo_loss(*args)


def rloo_loss(*args):
    from dpokit.objectives.rloo import rloo_loss
    return rloo_loss(*args)


def ppo_loss(*args):
    from dpokit.objectives.ppo import ppo_loss
    return ppo_loss(*args)


def f_divergence_scores(*args):
    from dpokit.objectives.modifiers import f_divergence_scores
    return f_divergence_scores(*args)


def wpo_weights(*args):
    from dpokit.objectives.modifiers import wpo_weights
    return wpo_weights(*args)


# What each kind of objective trains on; the loop builds its inputs accordingly.
DATA = {"paired": "preference pairs", "unpaired": "labelled completions, not pairs",
        "online": "completions it samples and scores each step"}


@dataclass(frozen=True)
class Objective:
    name: str
    summary: str
    paper: str
    reference: bool | str           # needs π_ref log-probs; a config key: only when that option is > 0 (kl_coef)
    options: tuple[str, ...]        # config keys it reads besides beta (each a TrainConfig "objective" option)
    compute: Callable               # paired: (Inputs, cfg) → losses [B]; unpaired: (UnpairedInputs, cfg) → [n];
                                    # online: (OnlineInputs, cfg) → (scalar loss, detached stats)
    data: str = "paired"            # a DATA key
    averaged: bool = False          # reads length-averaged log-probs ā = log π/|y|: its reward is β·ā; no ld_alpha
    nll: bool = False               # includes NLL(chosen): the "nll" metric is logged
    f_divergence: bool = True       # defined with --f-divergence: its scores enter only as chosen − rejected (or
                                    # not at all), where the partition term log Z(x) cancels
    metrics: Callable | None = None  # (policy PairLogps) → extra detached metrics {name: scalar}
    check: Callable | None = None   # (cfg) → what is wrong with the config for this objective, or None


@dataclass
class Inputs:
    policy: PairLogps
    ref: PairLogps | None
    c: Tensor | None = None         # chosen score (log-ratio, f-divergence transformed)
    r: Tensor | None = None


@dataclass
class UnpairedInputs:
    """KTO's: summed log-probs [n] of each completion under π and π_ref, labels bool [n] (True = desirable)
    and the batch's KL reference point z_ref (a scalar; objectives/kto.kto_reference_point)."""
    policy: Tensor
    ref: Tensor
    labels: Tensor
    z_ref: Tensor


@dataclass
class OnlineInputs:
    """GRPO's and RLOO's, per micro-batch of sampled completions: per-token log-probs [B, T] under π_θ, π_old
    and π_ref (None: no KL term), the mask [B, T], advantages [B] and the divisor of the whole batch
    (grpo.normalizer). PPO's: advantages [B, T] per token, and the value model's values [B, T] (with grad),
    old_values (at sampling time) and the GAE returns."""
    logps: Tensor
    old_logps: Tensor
    advantages: Tensor
    mask: Tensor
    ref_logps: Tensor | None
    normalizer: float | None = None
    values: Tensor | None = None
    old_values: Tensor | None = None
    returns: Tensor | None = None


def _scores(pol: PairLogps, ref: PairLogps, cfg) -> tuple[Tensor, Tensor]:
    return (f_divergence_scores(pol.chosen - ref.chosen, cfg.f_divergence, cfg.f_alpha),
            f_divergence_scores(pol.rejected - ref.rejected, cfg.f_divergence, cfg.f_alpha))


def _orpo_metrics(policy: PairLogps) -> dict[str, Tensor]:
    import torch.nn.functional as F
    log_odds = RF().orpo_log_odds(policy.chosen_avg.detach(), policy.rejected_avg.detach())
    return {"orpo/log_odds": log_odds.mean(), "orpo/log_odds_ratio": F.logsigmoid(log_odds).mean()}


def _needs_positive_smoothing(cfg) -> str | None:
    return None if cfg.label_smoothing > 0 else ("loss exo_pair needs label_smoothing > 0 (EXO's ε; log ε is in "
                                                 "the loss), e.g. --label-smoothing 0.001")


def _needs_two_per_batch(cfg) -> str | None:
    return None if cfg.batch_size >= 2 else (f"batch_size = {cfg.batch_size} is out of range for kto: must be >= 2 "
                                             "(the KL reference point pairs each prompt with another example's "
                                             "completion)")


def _entry(name, summary, paper, compute, options=(), reference=True, **traits):
    return Objective(name, summary, paper, reference, tuple(options), compute, **traits)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in [
    _entry("sigmoid", "DPO; with label_smoothing > 0, conservative DPO (cDPO)",
           "Rafailov et al. 2023 (arXiv:2305.18290); cDPO: Mitchell 2023",
           lambda x, cfg: P().sigmoid_loss(x.c, x.r, cfg.beta, cfg.label_smoothing), ["label_smoothing"]),
    _entry("robust", "rDPO: unbiased DPO under label-flip rate ε = label_smoothing",
           "Chowdhury et al. 2024 (arXiv:2403.00409)",
           lambda x, cfg: P().robust_loss(x.c, x.r, cfg.beta, cfg.label_smoothing), ["label_smoothing"]),
    _entry("ipo", "IPO: squared loss toward margin 1/(2β); ipo_normalize token (TRL) or sum (authors)",
           "Azar et al. 2023 (arXiv:2310.12036)",
           lambda x, cfg: P().ipo_loss(x.c, x.r, cfg.beta, x.policy.chosen_tokens, x.policy.rejected_tokens,
                                     cfg.ipo_normalize), ["ipo_normalize"]),
    _entry("hinge", "SLiC hinge loss on the DPO log-ratio margin", "Zhao et al. 2023 (arXiv:2305.10425)",
           lambda x, cfg: P().hinge_loss(x.c, x.r, cfg.beta)),
    _entry("exo_pair", "EXO: reverse-KL preference matching; needs label_smoothing > 0",
           "Ji et al. 2024 (arXiv:2402.00856)",
           lambda x, cfg: P().exo_pair_loss(x.c, x.r, cfg.beta, cfg.label_smoothing), ["label_smoothing"],
           check=_needs_positive_smoothing),
    _entry("nca_pair", "NCA: absolute-likelihood noise-contrastive alignment", "Chen et al. 2024 (arXiv:2402.05369)",
           lambda x, cfg: P().nca_pair_loss(x.c, x.r, cfg.beta), f_divergence=False),
    _entry("bco_pair", "BCO: binary classifier on implicit rewards (no running shift, as TRL)",
           "Jung et al. 2024 (arXiv:2404.04656)", lambda x, cfg: P().bco_pair_loss(x.c, x.r, cfg.beta),
           f_divergence=False),
    _entry("sppo_hard", "SPPO with hard win probabilities", "Wu et al. 2024 (arXiv:2405.00675)",
           lambda x, cfg: P().sppo_hard_loss(x.c, x.r, cfg.beta), f_divergence=False),
    _entry("aot", "AOT paired: DPO on sorted batch quantiles of log-odds", "Melnyk et al. 2024 (arXiv:2406.05882)",
           lambda x, cfg: P().aot_loss(x.policy.chosen, x.policy.rejected, x.ref.chosen, x.ref.rejected, cfg.beta,
                                     cfg.label_smoothing), ["label_smoothing"], f_divergence=False),
    _entry("aot_unpaired", "AOT unpaired: sorted chosen vs sorted rejected log-ratios",
           "Melnyk et al. 2024 (arXiv:2406.05882)",
           lambda x, cfg: P().aot_unpaired_loss(x.c, x.r, cfg.beta, cfg.label_smoothing), ["label_smoothing"],
           f_divergence=False),
    _entry("apo_zero", "APO-zero: raise chosen, lower rejected likelihood (chosen better than the model)",
           "D'Oosterlinck et al. 2024 (arXiv:2408.06266)", lambda x, cfg: P().apo_zero_loss(x.c, x.r, cfg.beta),
           f_divergence=False),
    _entry("apo_down", "APO-down: lower both, rejected more (chosen worse than the model)",
           "D'Oosterlinck et al. 2024 (arXiv:2408.06266)", lambda x, cfg: P().apo_down_loss(x.c, x.r, cfg.beta),
           f_divergence=False),
    _entry("discopop", "DiscoPOP: log-ratio-modulated logistic/exponential blend",
           "Lu et al. 2024 (arXiv:2406.08414)",
           lambda x, cfg: P().discopop_loss(x.c, x.r, cfg.beta, cfg.discopop_tau), ["discopop_tau"]),
    _entry("dpop", "DPO-Positive: penalises the chosen log-prob falling below the reference",
           "Pal et al. 2024 (arXiv:2402.13228)",
           lambda x, cfg: P().dpop_loss(x.c, x.r, cfg.beta, cfg.dpop_lambda, x.policy.chosen - x.ref.chosen),
           ["dpop_lambda"], f_divergence=False),  # its penalty reads the raw log-ratio Δ_w alone
    _entry("sigmoid_norm", "DPO on length-normalised log-ratios (TRL's sigmoid_norm)", "TRL",
           lambda x, cfg: P().sigmoid_norm_loss(x.c, x.r, cfg.beta, x.policy.chosen_tokens,
                                              x.policy.rejected_tokens)),
    _entry("sft", "NLL of the chosen completion (token mean); sigmoid,sft is RPO",
           "RPO: Pang et al. 2024 (arXiv:2404.19733)",
           lambda x, cfg: P().sft_loss(x.policy.chosen_nll_logps, x.policy.chosen_tokens).expand_as(x.policy.chosen),
           reference=False, nll=True),
    _entry("cpo", "CPO: reference-free DPO on summed log-probs + cpo_alpha · NLL(chosen)",
           "Xu et al. 2024 (arXiv:2401.08417)",
           lambda x, cfg: RF().cpo_loss(x.policy.chosen, x.policy.rejected, cfg.beta, cfg.label_smoothing)
           + cfg.cpo_alpha * P().sft_loss(x.policy.chosen_nll_logps, x.policy.chosen_tokens),
           ["label_smoothing", "cpo_alpha"], reference=False, nll=True),
    _entry("simpo", "SimPO: reference-free, length-averaged log-probs with target margin simpo_gamma",
           "Meng et al. 2024 (arXiv:2405.14734)",
           lambda x, cfg: RF().simpo_loss(x.policy.chosen_avg, x.policy.rejected_avg, cfg.beta, cfg.simpo_gamma,
                                        cfg.label_smoothing), ["simpo_gamma", "label_smoothing"], reference=False,
           averaged=True),
    _entry("orpo", "ORPO: NLL(chosen) + orpo_lambda · odds-ratio term, reference-free",
           "Hong et al. 2024 (arXiv:2403.07691)",
           lambda x, cfg: RF().orpo_loss(x.policy.chosen_avg, x.policy.rejected_avg, cfg.orpo_lambda)
           + P().sft_loss(x.policy.chosen_nll_logps, x.policy.chosen_tokens), ["orpo_lambda"], reference=False,
           averaged=True, nll=True, metrics=_orpo_metrics),
    _entry("kto", "KTO: unpaired desirable/undesirable completions vs a batch KL reference point",
           "Ethayarajh et al. 2024 (arXiv:2402.01306)",
           lambda x, cfg: kto_loss(x.policy, x.ref, x.labels, x.z_ref, cfg.beta, cfg.kto_desirable_weight,
                                   cfg.kto_undesirable_weight),
           ["kto_desirable_weight", "kto_undesirable_weight"], data="unpaired", check=_needs_two_per_batch),
    _entry("grpo", "GRPO: group-relative advantages, clipped ratio, k3 KL (--loss grpo --reward R); DAPO and "
           "Dr. GRPO normalisations; GSPO's sequence ratio", "Shao et al. 2024 (arXiv:2402.03300); DAPO: Yu 2025; "
           "Dr. GRPO: Liu 2025; GSPO: Zheng 2025 (arXiv:2507.18071)",
           lambda x, cfg: grpo_loss(x.logps, x.old_logps, x.advantages, x.mask, x.ref_logps, cfg.epsilon_low,
                                    cfg.epsilon_high, cfg.kl_coef, cfg.grpo_aggregation, cfg.max_new_tokens,
                                    x.normalizer, cfg.importance_sampling_level),
           ["grpo_iterations", "epsilon_low", "epsilon_high", "kl_coef", "grpo_aggregation", "scale_rewards",
            "importance_sampling_level", "mask_truncated_completions"],
           reference="kl_coef", data="online"),
    _entry("rloo", "RLOO: REINFORCE with a leave-one-out baseline over k samples, KL to π_ref in the reward, "
           "clipped sequence ratio (--loss rloo --reward R)", "Ahmadian et al. 2024 (arXiv:2402.14740)",
           lambda x, cfg: rloo_loss(x.logps, x.old_logps, x.advantages, x.mask, cfg.epsilon_low, cfg.epsilon_high,
                                    x.normalizer),
           ["grpo_iterations", "epsilon_low", "epsilon_high", "kl_coef", "mask_truncated_completions"],
           reference="kl_coef", data="online"),
    _entry("ppo", "PPO (RLHF): value model, GAE, whitened advantages, clipped policy and value losses, KL penalty "
           "in the reward (--loss ppo --reward R)",
           "Ziegler et al. 2019 (arXiv:1909.08593); Stiennon 2020; Ouyang 2022; TRL's PPOTrainer",
           lambda x, cfg: ppo_loss(x.logps, x.old_logps, x.advantages, x.mask, x.values, x.old_values, x.returns,
                                   cfg.epsilon_low, cfg.epsilon_high, cfg.cliprange_value, cfg.vf_coef, x.normalizer),
           ["epsilon_low", "epsilon_high", "kl_coef", "num_ppo_epochs", "num_mini_batches", "cliprange_value",
            "vf_coef", "gamma", "lam", "whiten_rewards"], reference="kl_coef", data="online"),
]}


def needs_reference(names: list[str], cfg=None) -> bool:
    """Whether the objectives read π_ref; one whose `reference` is an option (GRPO's kl_coef) only when `cfg`
    sets that option above 0."""
    return any(o.reference is True or isinstance(o.reference, str) and cfg is not None
               and getattr(cfg, o.reference) > 0 for o in (OBJECTIVES[n] for n in names))


def combined_loss(names: list[str], weights: list[float], policy: PairLogps, ref: PairLogps | None,
                  cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """Σ_i w_i · loss_i per pair [B], and objective-specific metrics (already detached)."""
    import torch
    x = Inputs(policy, ref)
    if ref is not None:
        x.c, x.r = _scores(policy, ref, cfg)
    total = torch.zeros_like(policy.chosen)
    metrics: dict[str, Tensor] = {}
    for name, weight in zip(names, weights):
        losses = OBJECTIVES[name].compute(x, cfg)
        if cfg.use_weighting:  # WPO re-weights every objective, as in TRL
            losses = losses * wpo_weights(policy.chosen_wpo, policy.rejected_wpo)
        total = total + weight * losses
        if len(names) > 1:
            metrics[f"loss/{name}"] = losses.detach().mean()
    if any(OBJECTIVES[n].nll for n in names):
        metrics["nll"] = P().sft_loss(policy.chosen_nll_logps.detach(), policy.chosen_tokens)
    for name in names:
        if OBJECTIVES[name].metrics is not None:
            metrics.update(OBJECTIVES[name].metrics(policy))
    if cfg.use_weighting:
        metrics["wpo/weight"] = wpo_weights(policy.chosen_wpo, policy.rejected_wpo).mean()
    return total, metrics


def rewards(policy: PairLogps, ref: PairLogps | None, cfg) -> tuple[Tensor, Tensor]:
    """Implicit rewards [B] for logging: β·(log π − log π_ref) with a reference; without one, β·log π
    (β·average log π for the length-averaged ones, simpo and orpo), TRL's convention for its reference-free
    trainers."""
    if ref is not None:
        return cfg.beta * (policy.chosen - ref.chosen).detach(), cfg.beta * (policy.rejected - ref.rejected).detach()
    if any(OBJECTIVES[n].averaged for n in cfg.loss_names):
        return cfg.beta * policy.chosen_avg.detach(), cfg.beta * policy.rejected_avg.detach()
    return cfg.beta * policy.chosen.detach(), cfg.beta * policy.rejected.detach()
