"""What every series of `dpokit sweep` shares (tasks/sweep.py, tasks/sweep_rl.py): the options that make a run's
result, the online runs' config on the task, the pairs a file gives, and continuing a run a signal stopped."""

from __future__ import annotations

import shutil
from pathlib import Path

from dpokit.config import BOOKKEEPING, TrainConfig
from dpokit.data import builtin_path
from dpokit.loop.checkpoint import CheckpointError, check_same_run, checkpoint_root, complete_checkpoints
from dpokit.tasks.demo import SentimentTask


def result_options(cfg: TrainConfig) -> dict:
    """The options that change a run's result: all but the bookkeeping ones (checkpoint cadence, progress bar, …)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in BOOKKEEPING}


# PPO's kl_coef and reward: tasks/sweep_rl.py. PPO takes its 16 prompts per step as 4 micro-batches of 4: the same
# updates (ppo_step divides each micro-batch by its mini-batch's tokens; one RLHF step's loss measured equal to 4e-6), a
# quarter of the activations (peak 7.9 GB against 13.4 GB), and faster on a CPU (173 s a step against 235 s;
# 2026-12-03, docs/RESULTS.md "PPO's memory")
ONLINE_OBJECTIVES = {"GRPO": {"loss": "grpo"}, "Online DPO": {"online_dpo": True, "pack_tokens": 0},
                     "PPO": {"loss": "ppo", "batch_size": 4, "grad_accum": 4}}


def online_train_config(run_dir: Path, task: SentimentTask, method: str, steps: int, **overrides) -> TrainConfig:
    """GRPO, online DPO or PPO on the task's training prompts, sampling as the task does (the same budget for each:
    steps × 16 prompts × task.samples completions)."""
    values = dict(model=task.model, output_dir=str(run_dir), prompts=task.train_prompts or builtin_path("sentiment_train"),
                  reward=task.reward, num_generations=task.samples, max_new_tokens=task.max_new_tokens,
                  batch_size=16, grad_accum=1, max_steps=steps, warmup_steps=5, max_length=128, max_prompt_length=64,
                  seed=task.seed, lr=2e-5)
    values.update(ONLINE_OBJECTIVES[method])
    values.update(overrides)
    return TrainConfig.from_dict(values, source=f"sweep {method}")


def count_pairs(path: Path, cfg) -> int:
    """Pairs training reads from `path` (a ranked row gives several)."""
    from dpokit.data import load_pairs
    return len(load_pairs(str(path), cfg.on_bad_row, ranked_pairs=cfg.ranked_pairs,
                          ultrafeedback_score=cfg.ultrafeedback_score)[0])


def continue_or_start(cfg: TrainConfig, log) -> None:
    """Resume the run from its folder's newest checkpoint when that checkpoint is this very run's (a sweep a signal
    stopped: the same command continues it); a checkpoint written with other options (an earlier sweep's, kept by
    --keep-checkpoints) is removed, so the run starts fresh instead of being refused."""
    found = complete_checkpoints(cfg.output_dir)
    if found:
        try:
            check_same_run(found[-1], cfg.to_dict())
        except CheckpointError as e:
            log(f"  starting fresh: {e}")
            shutil.rmtree(checkpoint_root(cfg.output_dir))
    cfg.resume = "auto"
