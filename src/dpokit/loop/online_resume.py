"""Checkpoints and exact resume of an online run (GRPO, RLOO, PPO, online DPO), in the offline loop's format
(loop/checkpoint.py: atomic, checksummed, --keep-last pruning) and through its calls, as loop/train.py's `_start`
and `checkpoint` make them.

What a step depends on beyond the step number: the policy's weights, the optimizer and lr schedule (PPO: one
optimizer over policy and value model), the RNG state, a reference that moves (online DPO with --sync-ref-every:
TR-DPO) and PPO's value model. All of these are in the checkpoint. The rest is a pure function of (seed, step):
the prompts of a step (`BatchSchedule`, by (seed, epoch)), the sampling seed (seed × 1_000_003 + step), PPO's
mini-batch permutations (seed, step, pass); GRPO's μ iterations and PPO's epochs all happen within one step, so a
checkpoint, written between steps, never falls inside them. A resumed run therefore repeats the uninterrupted
run's weights bit for bit (on one device kind; the check is CPU's, tests/test_online_resume.py).

Under torchrun (loop/online_dist.py) the weights and optimizer state are the same on every rank (DDP): rank 0
writes them, with every rank's RNG state, and each rank restores its own; a checkpoint is resumed with the number
of processes that wrote it (it fixes each step's prompts per rank and the ranks' sampling streams).
"""

from __future__ import annotations

from pathlib import Path

from dpokit.distributed import gather_objects
from dpokit.loop.checkpoint import (check_same_run, check_writable, find_checkpoint, keep_metrics_until,
                                    load_extra_weights, load_training_state, load_weights, rng_state, save_checkpoint)
from dpokit.loop.optim import build_optimizer, build_scheduler


def start_online(cfg, policy, reference, extra_models: dict, params, total_updates: int, device, log, shard):
    """(optimizer, lr schedule, step to start at): built fresh, or restored with the weights from the checkpoint
    that --resume names. `extra_models`: the method's other trained models (PPO: {"value": V}); `shard`: this
    process's part of the run (online_dist.Shard)."""
    params = list(params)
    # weights + two AdamW moments (fp32), plus 10 %: refuse now rather than fail at the first save
    if shard.is_main:
        check_writable(cfg.output_dir, int(sum(p.numel() for p in params) * 4 * 3 * 1.1))
    ckpt = find_checkpoint(cfg.output_dir, cfg.resume, log) if cfg.resume else None
    if ckpt is not None:
        check_same_run(ckpt, cfg.to_dict())  # changed online options are refused, each shown old → new
        load_weights(ckpt, policy, reference if cfg.sync_ref_every else None)
        load_extra_weights(ckpt, extra_models)
    optimizer = build_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, total_updates, cfg.lr_scheduler)
    if ckpt is None:
        return optimizer, scheduler, 0
    start_step = load_training_state(ckpt, optimizer.load_state_dict, scheduler, shard.world, None, shard.rank,
                                     device)
    log(f"resumed from {ckpt} at step {start_step}")
    if shard.is_main:
        keep_metrics_until(Path(cfg.output_dir) / "metrics.jsonl", start_step)  # later steps are redone
    return optimizer, scheduler, start_step


def save_online(cfg, step_done: int, policy, reference, extra_models: dict, tokenizer, optimizer, scheduler,
                device, shard) -> Path | None:
    """A checkpoint after step `step_done`: the reference only when it moves (TR-DPO), PPO's value model. Every
    rank takes part (its RNG state); rank 0 writes and returns the path, the others None."""
    rngs = gather_objects(rng_state(device), shard.ctx)  # each rank's own sampling and dropout streams
    path = None
    if shard.is_main:
        path = save_checkpoint(cfg.output_dir, step_done, policy, tokenizer, optimizer.state_dict(), scheduler,
                               cfg.to_yaml(), reference if cfg.sync_ref_every else None, cfg.keep_last, None,
                               shard.world, None, rngs, device.type, extra_models=extra_models)
    shard.ctx.barrier()  # no rank moves on (or exits) before the checkpoint is complete
    return path
