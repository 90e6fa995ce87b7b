"""`dpokit sft`: supervised fine-tuning on demonstrations, the stage before DPO (Zephyr: dSFT, then dDPO).

The run reads demonstrations (data/demos.py: prompt/completion rows, `messages` conversations, or the chosen side
of a pairs file — the built-in pairs by default), tokenizes them with the spans trained on (batches/demos.py:
completions, every assistant turn), and minimises the mean NLL per trained token of each step
(objectives/sft.demonstration_nll, TRL 1.16 SFTTrainer's loss). Everything else is the offline loop's:
`BatchSchedule` (the data order a pure function of seed and step), packing (--pack-tokens: demonstrations packed
into rows, each its own attention segment, same log-probs as one per row), `update`, `run_steps` (checkpoints,
SIGTERM, --on-nonfinite, --eval-every), LoRA, gradient checkpointing, fp16's scaler, and torchrun (DDP: each
rank trains every world-th demonstration of each micro-batch; the divisor N counts every rank's tokens).
final/ is a causal LM (LoRA: the adapter, or merged with --merge-lora) for `dpokit train --model`.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit.batches.demos import TokenizedDemo, collate_demos, tokenize_demos
from dpokit.batches.inputs import data_paths, rank_share
from dpokit.config import TrainConfig
from dpokit.data import DataError
from dpokit.data.demos import load_demos
from dpokit.distributed import (Distributed, any_across, gather_objects, gradient_sync, map_batches, start,
                                sum_across, wrap)
from dpokit.logprobs import compute_precision
from dpokit.logprobs.attention import attention_kind
from dpokit.logprobs.sequence import TokenLogpsModule, token_logps
from dpokit.loop.checkpoint import (check_same_run, check_writable, deterministic_kernels, find_checkpoint,
                                    keep_metrics_until, load_training_state, load_weights, rng_state, save_checkpoint)
from dpokit.loop.optim import build_optimizer, build_scheduler
from dpokit.loop.result import TrainResult
from dpokit.loop.schedule import BatchSchedule
from dpokit.loop.steps import NonFiniteError
from dpokit.loop.train import run_steps
from dpokit.loop.trackers import open_metrics
from dpokit.loop.update import update
from dpokit.models import load_model, load_tokenizer
from dpokit.models.load import keep_master_copy, save_final, warn_half_on_cpu
from dpokit.models.lora import add_lora, disable_dropout
from dpokit.objectives.sft import demonstration_nll


def load_demo_data(cfg: TrainConfig, tokenizer, log) -> tuple[list[TokenizedDemo], list[TokenizedDemo]]:
    """Training and held-out demonstrations (--data / --eval-data, else the built-in pairs' chosen side),
    tokenized; what happened to every row is logged."""
    out = []
    for role, path in zip(("train", "eval"), data_paths(cfg)):
        if path is None:
            out.append([])
            continue
        demos, report = load_demos(path, cfg.on_bad_row)
        tokenized, tok_report = tokenize_demos(demos, tokenizer, cfg.max_length)
        log(f"{role} data: {report.summary()}")
        log(f"  {tok_report.summary()}")
        if not tokenized:
            raise DataError(path, None, None, f"no demonstration survived tokenization ({tok_report.summary()})",
                            "empty")
        out.append(tokenized)
    return out[0], out[1]


@dataclass
class SFTRun:
    cfg: TrainConfig
    ctx: Distributed
    device: torch.device
    log: object
    tokenizer: object
    train_set: list[TokenizedDemo]
    eval_set: list[TokenizedDemo]
    policy: torch.nn.Module
    batches: BatchSchedule
    trained: torch.nn.Module | None = None  # the policy, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    scaler: torch.amp.GradScaler | None = None
    fp16_skipped: int = 0


def train_sft(cfg: TrainConfig, log=print) -> TrainResult:
    """Fine-tune on demonstrations (run kind SFT: loop/run.py's `train` calls this). Under torchrun: DDP."""
    with deterministic_kernels(cfg.deterministic), attention_kind(cfg.attention, log):
        ctx = start(False, cfg.device)
        try:
            return _train(cfg, ctx, log if ctx.is_main else (lambda *a, **k: None))
        finally:
            ctx.close()


def _train(cfg: TrainConfig, ctx: Distributed, log) -> TrainResult:
    run = _load(cfg, ctx, log)
    total_steps = run.batches.total_steps(cfg.epochs, cfg.max_steps)
    start_step = _start(run, total_steps)
    out = Path(cfg.output_dir)
    eval_before = evaluate(run) if run.eval_set else None
    if eval_before:
        log(f"held-out {'before training' if not start_step else 'at resume'} ({len(run.eval_set)} demonstrations): "
            f"loss {eval_before['eval/loss']:.4f}")
    b = run.batches
    where = f"{ctx.world} processes (DDP)" if ctx.enabled else str(run.device)
    log(f"supervised fine-tuning for {total_steps - start_step} steps × {b.micro_size * cfg.grad_accum} "
        f"demonstrations ({b.rows} demonstrations, {b.steps_per_epoch} steps/epoch) on {where}")
    metrics = open_metrics(cfg, out, start_step, ctx.is_main)  # metrics.jsonl and --report-to's trackers
    try:
        run_steps(cfg, start_step, total_steps, "sft", lambda step: optimizer_step(run, step),
                  (lambda: evaluate(run)) if run.eval_set else None, lambda step: checkpoint(run, step), metrics,
                  lambda r: {"loss": f"{r['loss']:.4f}"}, run.optimizer, log, show=cfg.progress and ctx.is_main,
                  stop_all=lambda received: any_across(received, ctx))
        eval_after = evaluate(run) if run.eval_set else None
        if eval_after:
            if metrics:
                metrics.write_record({"step": total_steps, **eval_after})
            log(f"held-out after training  ({len(run.eval_set)} demonstrations): loss {eval_after['eval/loss']:.4f}")
    finally:
        if metrics:
            metrics.close()
    final = _save_final(run, out / "final")
    log(f"saved {final} (a causal LM: `dpokit train --model {final}` starts DPO from it); metrics in "
        f"{out / 'metrics.jsonl'}")
    return TrainResult(out, total_steps, eval_before, eval_after, final, start_step)


def _load(cfg: TrainConfig, ctx: Distributed, log) -> SFTRun:
    device = ctx.device(cfg.device)
    torch.manual_seed(cfg.seed)  # the same seed on every rank: LoRA's initial weights must agree
    random.seed(cfg.seed)
    if ctx.is_main:
        check_writable(cfg.output_dir, 0)  # before minutes of loading: a bad --output-dir fails now
        (Path(cfg.output_dir) / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_set, eval_set = load_demo_data(cfg, tokenizer, log)
    if cfg.memory_check:
        log("memory check: not available for SFT runs (not modelled yet); `dpokit estimate` models DPO")
    warn_half_on_cpu(device, cfg.model_dtype, log)
    policy = load_model(cfg.model, device, cfg.allow_pickle, cfg.trust_remote_code, cfg.model_dtype)
    policy.eval()  # dropout off: a step is a deterministic function of the weights and the batch
    keep_master_copy(policy, cfg)  # fp32 trained weights unless --model-dtype fp32 already (LoRA: base stays)
    if cfg.lora_r:
        policy = add_lora(policy, cfg, log)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not cfg.lora_r:
            disable_dropout(policy)
        policy.train()  # transformers checkpoints only in train mode; dropout is zeroed
    batches = BatchSchedule(len(train_set), cfg.batch_size * ctx.world, cfg.grad_accum, cfg.seed, cfg.shuffle)
    return SFTRun(cfg, ctx, device, log, tokenizer, train_set, eval_set, policy, batches)


def _start(run: SFTRun, total_steps: int) -> int:
    cfg, ctx = run.cfg, run.ctx
    if ctx.is_main:  # weights + two AdamW moments (fp32), plus 10 %
        check_writable(cfg.output_dir, int(sum(p.numel() for p in run.policy.parameters()) * 4 * 3 * 1.1))
    ckpt = find_checkpoint(cfg.output_dir, cfg.resume, run.log) if cfg.resume else None
    if ckpt is not None:
        check_same_run(ckpt, cfg.to_dict())
        load_weights(ckpt, run.policy)
    run.trained = wrap(TokenLogpsModule(run.policy), ctx) if ctx.enabled else run.policy  # DDP hooks its forward
    run.optimizer = build_optimizer(run.policy.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    run.scheduler = build_scheduler(run.optimizer, cfg.warmup_steps, total_steps, cfg.lr_scheduler)
    run.scaler = torch.amp.GradScaler(run.device.type) if cfg.dtype == "fp16" else None
    if ckpt is None:
        return 0
    start_step = load_training_state(ckpt, run.optimizer.load_state_dict, run.scheduler, ctx.world, run.scaler,
                                     ctx.rank, run.device)
    run.log(f"resumed from {ckpt} at step {start_step}")
    if ctx.is_main:
        keep_metrics_until(Path(cfg.output_dir) / "metrics.jsonl", start_step)  # later steps are redone
    return start_step


def _batch(run: SFTRun, demos: list[TokenizedDemo]) -> dict:
    return {k: v.to(run.device) for k, v in collate_demos(demos, run.tokenizer.pad_token_id,
                                                           run.cfg.pack_tokens).items()}


def optimizer_step(run: SFTRun, step: int) -> dict:
    """grad_accum micro-batches of forward and backward, each backward on its NLL sum ÷ N (the step's trained
    tokens, every process's; × world since DDP averages gradients over ranks), then one `update`. Raises
    NonFiniteError before the update."""
    cfg, ctx, t0 = run.cfg, run.ctx, time.perf_counter()
    micro = run.batches.micro_batches(step)
    step_tokens = sum(run.train_set[i].trained for idx in micro for i in idx)
    sums: dict[str, float] = defaultdict(float)
    for k, idx in enumerate(micro):
        mine = rank_share(idx, ctx.rank, ctx.world, False)
        # a rank with no row left in the epoch's last micro-batch runs one with weight 0: every rank must take
        # part in each gradient reduction
        weight = 1.0 if mine else 0.0
        demos = [run.train_set[i] for i in (mine or idx[:1])]
        with gradient_sync(run.trained, ctx, sync=k == len(micro) - 1):
            with compute_precision(run.device, cfg.dtype):
                logps = token_logps(run.trained, _batch(run, demos)).values
            loss = demonstration_nll(logps, step_tokens / ctx.world) * weight
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        sums["nll"] += -logps.detach().sum().item() * weight
        sums["tokens"] += sum(len(d.ids) for d in demos) * weight
        sums["demos"] += len(demos) * weight
    sums = sum_across(sums, ctx)
    rows = lambda: [run.train_set[i].source for m in micro for i in m]  # noqa: E731 (named in errors only)
    loss = sums["nll"] / max(step_tokens, 1)
    if not math.isfinite(loss):
        raise NonFiniteError(f"step {step + 1}: non-finite loss on rows {rows()}")
    done = update(run.policy.parameters(), run.optimizer, run.scheduler, cfg.max_grad_norm, run.scaler, step + 1,
                  rows)
    if done.skipped:  # fp16 overflow: expected now and then, the scaler adapts
        run.fp16_skipped += 1
        return {"step": step + 1, "fp16_overflow_skipped": run.fp16_skipped, "loss_scale": done.loss_scale}
    seconds = time.perf_counter() - t0
    record = {"step": step + 1, "epoch": round((step + 1) / run.batches.steps_per_epoch, 4), "loss": loss,
              "num_tokens": step_tokens, "lr": done.lr, "grad_norm": done.grad_norm,
              "demos_per_s": sums["demos"] / seconds, "tokens_per_s": sums["tokens"] / seconds}
    if done.loss_scale is not None:
        record["loss_scale"] = done.loss_scale
    return record


@torch.no_grad()
def evaluate(run: SFTRun) -> dict[str, float]:
    """eval/loss: the mean NLL per trained token over --eval-data (every token weighs the same, as in training),
    in batches of --eval-batch-size split over the processes."""
    size, training = run.cfg.eval_batch_size, run.policy.training
    run.policy.eval()

    def one(b: int) -> tuple[float, int]:
        demos = run.eval_set[b * size:(b + 1) * size]
        with compute_precision(run.device, run.cfg.dtype):
            logps = token_logps(run.policy, _batch(run, demos)).values
        return -logps.sum().item(), sum(d.trained for d in demos)
    parts = map_batches(one, -(-len(run.eval_set) // size), run.ctx)
    run.policy.train(training)
    return {"eval/loss": sum(p[0] for p in parts) / max(sum(p[1] for p in parts), 1)}


def checkpoint(run: SFTRun, step_done: int) -> Path:
    """Save a checkpoint after step `step_done` (every rank's RNG state; rank 0 writes)."""
    cfg, ctx = run.cfg, run.ctx
    rngs = gather_objects(rng_state(run.device), ctx)
    path = None
    if ctx.is_main:
        path = save_checkpoint(cfg.output_dir, step_done, run.policy, run.tokenizer, run.optimizer.state_dict(),
                               run.scheduler, cfg.to_yaml(), None, cfg.keep_last, None, ctx.world,
                               run.scaler.state_dict() if run.scaler else None, rngs, run.device.type)
    ctx.barrier()  # no rank moves on (or exits) before the checkpoint is complete
    return path


def _save_final(run: SFTRun, final: Path) -> Path:
    """The fine-tuned model in --model-dtype (LoRA merged with --merge-lora, else the adapter) and its tokenizer."""
    cfg, ctx, policy = run.cfg, run.ctx, run.policy
    if ctx.is_main:
        if cfg.lora_r and cfg.merge_lora:
            policy = policy.merge_and_unload()
        save_final(policy, final, cfg)
        run.tokenizer.save_pretrained(final)
    ctx.barrier()
    return final
