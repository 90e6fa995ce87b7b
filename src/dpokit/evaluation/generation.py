"""Generation metrics: what the policy writes, scored by a ground-truth reward, against the reference.

For each prompt, k samples from the policy and k from the reference (temperature 1, no top-p by
default, so the samples are draws from the models themselves). Reported, with 95 % intervals computed
over prompts (the k samples of one prompt are not independent):
- mean reward of each model and the win rate of policy over reference (sample j of the policy against
  sample j of the reference for the same prompt; a tie counts ½);
- the sequence-level KL(π‖π_ref) = E_{y~π}[Σ_t log π(y_t|·) − log π_ref(y_t|·)], estimated on the policy's
  samples — the x-axis of the DPO paper's reward–KL frontier. Only an estimate of that KL when sampling
  at temperature 1 without top-p; otherwise reported with a note;
- mean completion length in tokens (DPO is known to lengthen answers).
"""

from __future__ import annotations

import math

import torch

from dpokit.batches import pad_rows
from dpokit.generation import Samples, sample
from dpokit.logprobs import sequence_logps


def mean_ci(values: list[float], groups: int = 1) -> tuple[float, float]:
    """Mean and 95 % half-width (normal approximation) of `values`, treating each run of `groups`
    consecutive values (the samples of one prompt) as one observation."""
    per_group = [sum(values[i:i + groups]) / len(values[i:i + groups]) for i in range(0, len(values), groups)]
    n = len(per_group)
    mean = sum(per_group) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in per_group) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)


@torch.no_grad()
def teacher_forced_logps(model, samples: Samples, pad_id: int, batch_size: int = 64) -> list[float]:
    """Σ log model(token | prefix) over each sample's completion tokens (the tokens actually sampled)."""
    device = next(model.parameters()).device
    rows = list(zip(samples.prompt_ids, samples.completion_ids))
    out: list[float] = []
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in pad_rows(rows[i:i + batch_size], pad_id).items()}
        out += sequence_logps(model, **batch).double().tolist()
    return out


def first_k(samples: Samples, rewards: list[float], k: int) -> tuple[Samples, list[float]]:
    """The first k samples of each prompt (of samples.n ≥ k)."""
    rows = [p * samples.n + j for p in range(len(samples.prompts)) for j in range(k)]
    pick = lambda xs: [xs[r] for r in rows]  # noqa: E731
    return (Samples(samples.prompts, k, pick(samples.prompt_ids), pick(samples.completion_ids), pick(samples.texts),
                    pick(samples.logps)), pick(rewards))


def win_rate(policy: list[float], reference: list[float]) -> list[float]:
    return [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy, reference)]


def summarize(samples: Samples, rewards: list[float]) -> dict:
    mean, ci = mean_ci(rewards, samples.n)
    return {"reward_mean": mean, "reward_ci95": ci, "length_mean": sum(samples.lengths) / len(samples.lengths)}


def generation_metrics(policy, reference, tokenizer, prompts: list, reward_fn, k: int = 4,
                       max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                       batch_size: int = 128, reference_samples: tuple[Samples, list[float]] | None = None,
                       keep_samples: int = 20) -> tuple[dict, tuple[Samples, list[float]]]:
    """Policy vs reference on `prompts` (module docstring). Returns the metrics and the reference's
    (samples, rewards), which stay valid for every later policy of the same reference — pass them back
    as `reference_samples` to skip re-sampling the reference (a sweep does)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if reference_samples is None:
        ref_s = sample(reference, tokenizer, prompts, k, max_new_tokens, temperature, top_p, batch_size, seed + 1)
        reference_samples = (ref_s, reward_fn([ref_s.prompt_of(i) for i in range(len(ref_s.texts))], ref_s.texts))
    ref_s, ref_rewards = reference_samples
    if ref_s.n < k or len(ref_s.prompts) != len(prompts):
        raise ValueError(f"reference_samples must hold at least k={k} samples of each of the {len(prompts)} prompts")
    if ref_s.n > k:  # e.g. 16 drawn once for Best-of-16: compare with the first k of each prompt
        ref_s, ref_rewards = first_k(ref_s, ref_rewards, k)
    pol_s = sample(policy, tokenizer, prompts, k, max_new_tokens, temperature, top_p, batch_size, seed)
    pol_rewards = reward_fn([pol_s.prompt_of(i) for i in range(len(pol_s.texts))], pol_s.texts)
    ref_on_policy = teacher_forced_logps(reference, pol_s, pad_id)
    kl = [lp - lr for lp, lr in zip(pol_s.logps, ref_on_policy)]
    wins = win_rate(pol_rewards, ref_rewards)
    metrics = {
        "reward": getattr(reward_fn, "__name__", str(reward_fn)), "prompts": len(prompts),
        "samples_per_prompt": k, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
        "seed": seed,
        "policy": summarize(pol_s, pol_rewards), "reference": summarize(ref_s, ref_rewards),
    }
    metrics["win_rate"], metrics["win_rate_ci95"] = mean_ci(wins, k)
    metrics["kl_mean"], metrics["kl_ci95"] = mean_ci(kl, k)
    if temperature != 1.0 or top_p != 1.0:
        metrics["kl_note"] = ("samples drawn with temperature/top-p: kl_mean is E[log π − log π_ref] under the "
                              "sampling distribution, not KL(π‖π_ref)")
    metrics["generation_seconds"] = pol_s.seconds
    metrics["rewards"] = {"policy": pol_rewards, "reference": ref_rewards}  # every sample's, for the histogram
    metrics["samples"] = [{"prompt": pol_s.prompt_of(i), "policy": pol_s.texts[i], "policy_reward": pol_rewards[i],
                           "reference": ref_s.texts[i], "reference_reward": ref_rewards[i]}
                          for i in range(0, len(pol_s.texts), k)][:keep_samples]
    return metrics, reference_samples


def best_of_n(reference_samples: Samples, rewards: list[float], n: int) -> dict:
    """Best-of-N from the reference: per prompt, the highest-reward of its first n samples. Its KL to the
    reference is the analytic log n − (n − 1)/n (Stiennon et al. 2020; an upper bound, tight for
    continuous rewards), as in the DPO paper's frontier."""
    k = reference_samples.n
    if n > k:
        raise ValueError(f"best-of-{n} needs at least {n} samples per prompt, have {k}")
    best = [max(rewards[i:i + n]) for i in range(0, len(rewards), k)]
    mean, ci = mean_ci(best)
    return {"n": n, "reward_mean": mean, "reward_ci95": ci, "kl": math.log(n) - (n - 1) / n}
