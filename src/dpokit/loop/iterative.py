"""Iterative DPO (--online-dpo --rounds K): K rounds of (pairs file sampled from the current policy → an offline
run on it, starting from the current policy). loop/online.py's docstring says what a round's reference is.
Each round calls the offline loop (loop/train.py) directly: no loop calls back into the dispatcher."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from dpokit.config import ONLINE_OPTIONS, TrainConfig
from dpokit.evaluation.rewards import RewardError, combine
from dpokit.generation import sample
from dpokit.generation.pairs import pair_up, write_jsonl
from dpokit.loop.checkpoint import check_writable
from dpokit.loop.online import load_online_prompts
from dpokit.loop.result import TrainResult, pick_device
from dpokit.loop.train import train_offline
from dpokit.models import load_model, load_tokenizer


def iterative_dpo(cfg: TrainConfig, log) -> TrainResult:
    """--online-dpo --rounds K: per round, pairs sampled from the current policy, then offline training on them."""
    device = pick_device(cfg.device)
    out = Path(cfg.output_dir)
    check_writable(cfg.output_dir, 0)
    (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    prompts = load_online_prompts(cfg, tokenizer, log)
    reward_fn = combine(cfg.reward_specs, cfg.reward_weight_values, str(device))
    defaults = TrainConfig().to_dict()
    offline = {**cfg.to_dict(), **{k: defaults[k] for k in ONLINE_OPTIONS}}
    model, steps = cfg.model, 0
    metrics_file = open(out / "metrics.jsonl", "w", encoding="utf-8")
    for r in range(1, cfg.rounds + 1):
        policy = load_model(model, device, cfg.allow_pickle, cfg.trust_remote_code, cfg.model_dtype)  # samples only
        samples = sample(policy, tokenizer, prompts, cfg.num_generations, cfg.max_new_tokens, cfg.temperature,
                         seed=cfg.seed * 1_000_003 + r)
        del policy
        rewards = reward_fn([samples.prompt_of(i) for i in range(len(samples.texts))], samples.texts)
        rows, stats = pair_up(samples, rewards, "best-worst")
        stats.seconds = samples.seconds
        log(f"round {r}/{cfg.rounds}: {stats.summary()}; mean reward {statistics.fmean(rewards):.4f}")
        if not rows:
            raise RewardError(f"round {r}: every sampled group tied on reward; no pairs to train on")
        pairs_file = write_jsonl(rows, out / f"round-{r}" / "pairs.jsonl")
        result = train_offline(TrainConfig.from_dict({**offline, "model": model, "data": str(pairs_file),
                                                      "output_dir": str(out / f"round-{r}")}), log=log)
        model, steps = str(result.final_dir), steps + result.steps
        metrics_file.write(json.dumps({"round": r, "step": steps, "reward": statistics.fmean(rewards),
                                       "reward_std": statistics.stdev(rewards), "pairs": stats.pairs,
                                       "ties": stats.ties, "identical": stats.identical,
                                       "completion_length": statistics.fmean(samples.lengths),
                                       "generation_s": samples.seconds}) + "\n")
        metrics_file.flush()
    metrics_file.close()
    final = out / "final"
    shutil.copytree(model, final, dirs_exist_ok=True)
    log(f"saved {final} (the last round's model); per-round runs in {out}/round-*")
    return TrainResult(out, steps, None, None, final)
