"""Held-out evaluation of an online run (GRPO, RLOO, PPO, online DPO): every --eval-every steps and after the
last one, the current policy samples one completion of each --eval-prompts prompt and is scored against the
reference's samples of the same prompts. Logged as metrics.jsonl's eval/… keys (report.html draws them):

  eval/reward, eval/reward_ci95       mean --reward of the policy's samples and its 95 % half-width (normal
                                       approximation over prompts; evaluation/generation.mean_ci)
  eval/win_rate, eval/win_rate_ci95   share of prompts where the policy's sample out-scores the reference's
                                       (a tie counts ½; evaluation/generation.win_rate, as `dpokit eval`)
  eval/reference_reward               mean reward of the reference's samples (fixed for the run)
  eval/kl, eval/kl_seq                log π − log π_ref of the policy's sampled tokens at T = 1, per token and per
                                       completion (the sweep frontier's x-axis); only when a reference is loaded
  eval/completion_length              mean tokens per policy sample

Comparable across steps: the policy samples with one fixed seed at every evaluation (only its weights change),
at --max-new-tokens and at temperature 1 whatever the run's --temperature: the model's own distribution, so
that the mean of log π − log π_ref over its samples estimates KL(π ‖ π_ref) (over samples drawn at another
temperature it would estimate nothing defined). The reference's samples are drawn once, before training and
before a resume loads the checkpoint's weights: from the starting reference (the starting policy when none is
loaded, e.g. GRPO with kl_coef = 0), so a resumed run compares against the same samples; under TR-DPO
(--sync-ref-every) eval/kl is to the reference as it has moved. Sampling uses its own seeded generator and the
policy's train/eval mode is restored, so an evaluation changes nothing in training: the weights of a run are the
same with or without it.

Cost: at most --eval-max-prompts prompts (default 64; a seeded subset of a longer file) × 1 sample, one
teacher-forced reference pass for eval/kl; the reference's samples once per run.
"""

from __future__ import annotations

import random

from dpokit.data import builtin_path
from dpokit.evaluation.generation import mean_ci, teacher_forced_logps, win_rate
from dpokit.generation import sample
from dpokit.loop.reference import reference_forward

EVAL_SEED = 7_919  # added to --seed × 1_000_003 − 1_000_000: no training step's sampling seed (seed × 1_000_003 + step)


def eval_prompts_path(cfg) -> str | None:
    """--eval-prompts; by default the built-in sentiment task's held-out prompts when --prompts is the built-in
    default (the task's own training prompts), else none."""
    if cfg.eval_prompts:
        return cfg.eval_prompts
    return builtin_path("sentiment_eval") if cfg.prompts is None else None


def cap_prompts(prompts: list, cfg) -> list:
    """At most --eval-max-prompts of `prompts` (0: all): a subset seeded by --seed, in file order."""
    if not cfg.eval_max_prompts or len(prompts) <= cfg.eval_max_prompts:
        return prompts
    keep = sorted(random.Random(cfg.seed).sample(range(len(prompts)), cfg.eval_max_prompts))
    return [prompts[i] for i in keep]


class OnlineEval:
    """`prepare` once before training (the reference's samples), then call with the current policy and reference."""

    def __init__(self, cfg, tokenizer, prompts: list, reward_fn, pad_id: int):
        self.cfg, self.tokenizer, self.prompts, self.reward_fn, self.pad_id = cfg, tokenizer, prompts, reward_fn, pad_id
        self.seed = cfg.seed * 1_000_003 - 1_000_000 + EVAL_SEED
        self.reference_rewards: list[float] = []

    def _sample(self, model, seed: int):
        samples = sample(model, self.tokenizer, self.prompts, 1, self.cfg.max_new_tokens, 1.0, seed=seed)
        return samples, self.reward_fn([samples.prompt_of(i) for i in range(len(samples.texts))], samples.texts)

    def prepare(self, starting_model) -> "OnlineEval":
        """The reference's samples and rewards, from the model the run starts from (reference or policy)."""
        model, adapters = reference_forward(starting_model)
        with adapters:
            _, self.reference_rewards = self._sample(model, self.seed + 1)
        return self

    def __call__(self, policy, reference) -> dict[str, float]:
        samples, rewards = self._sample(policy, self.seed)
        metrics = {}
        metrics["eval/reward"], metrics["eval/reward_ci95"] = mean_ci(rewards)
        metrics["eval/win_rate"], metrics["eval/win_rate_ci95"] = mean_ci(win_rate(rewards, self.reference_rewards))
        metrics["eval/reference_reward"] = sum(self.reference_rewards) / len(self.reference_rewards)
        if reference is not None:
            model, adapters = reference_forward(reference)
            with adapters:
                ref_logps = teacher_forced_logps(model, samples, self.pad_id)
            kl = [lp - lr for lp, lr in zip(samples.logps, ref_logps)]
            metrics["eval/kl"] = sum(kl) / max(1, sum(samples.lengths))
            metrics["eval/kl_seq"] = sum(kl) / len(kl)
        metrics["eval/completion_length"] = sum(samples.lengths) / len(samples.lengths)
        return {k: v for k, v in metrics.items() if v == v}  # no NaN in metrics.jsonl (one prompt: no interval)


def format_online_eval(metrics: dict) -> str:
    kl = f", KL {metrics['eval/kl']:.4f}/token" if "eval/kl" in metrics else ""
    return (f"reward {metrics['eval/reward']:.4f} ± {metrics['eval/reward_ci95']:.4f} (reference "
            f"{metrics['eval/reference_reward']:.4f}), win rate {metrics['eval/win_rate']:.1%}{kl}")
