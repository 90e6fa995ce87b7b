"""The DPO training loop, top to bottom: load → tokenize → evaluate → train → evaluate → save.

Everything a step does is visible here: reference log-probs under no_grad, policy log-probs with grad,
the loss, backward over grad_accum micro-batches, clipping, the optimizer and schedule steps, metrics.
The data order is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would have seen. Under torchrun every rank runs this same loop on its share of each
micro-batch (`dpokit.distributed` holds the bookkeeping); with one process those helpers do nothing.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpokit.config import TrainConfig
from dpokit.evaluation import evaluate_pairs
from dpokit.evaluation.preference import format_eval
from dpokit.logprobs import compute_precision
from dpokit.logprobs.attention import attention_kind
from dpokit.distributed import (Distributed, any_across, check_launch, full_model_state, full_optimizer_state,
                                gather_cat, gather_objects, gradient_sync, grad_norm_value, load_optimizer_state,
                                start, sum_across, training_state_bytes, wrap)
from dpokit.loop.checkpoint import (check_same_run, check_writable, complete_checkpoints, deterministic_kernels,
                                    find_checkpoint, keep_metrics_until, load_training_state, load_weights, rng_state,
                                    save_checkpoint)
from dpokit.loop.inputs import epoch_order, load_data, pair_groups, rank_share, sharing_summary
from dpokit.loop.signals import StopSignals, TrainingInterrupted
from dpokit.loop.optim import build_optimizer, build_scheduler
from dpokit.loop.reference import AdaptersOff, prepare_reference, sync_reference
from dpokit.models import load_model, load_tokenizer
from dpokit.models.load import save_final, stalled_weights_note, warn_half_on_cpu
from dpokit.models.lora import add_lora, disable_dropout
from dpokit.loop.steps import NonFiniteError, finish_kto_metrics, kto_step, paired_step
from dpokit.objectives import OBJECTIVES


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    eval_before: dict | None  # at the start of this invocation: step 0, or the resumed step
    eval_after: dict | None
    final_dir: Path
    resumed_at: int = 0


def pick_device(name: str) -> torch.device:
    """The device of a one-process run (online training)."""
    return Distributed().device(name)


def train(config: TrainConfig | None = None, log=print, **overrides) -> TrainResult:
    """Train a policy with the configured objective (DPO by default).

    `overrides` are TrainConfig fields: train(beta=0.5, data="pairs.jsonl"). Under torchrun (or inside a
    process group the caller made) this process trains its share: DDP, or FSDP2 with fsdp=True."""
    cfg = TrainConfig.from_dict({**(config.to_dict() if config else {}), **overrides})
    check_launch(cfg.online, cfg.loss_names)
    with deterministic_kernels(cfg.deterministic), attention_kind(cfg.attention, log):
        if cfg.online:  # GRPO / online DPO: trains on its own samples, not on a pairs file
            from dpokit.loop.online import train_online
            if cfg.memory_check:
                log("memory check: not available for online runs (sampling is not modelled; docs/PERFORMANCE.md)")
            return train_online(cfg, log)
        ctx = start(cfg.fsdp, cfg.device)
        try:
            return _train(cfg, ctx, log if ctx.is_main else (lambda *a, **k: None))
        finally:
            ctx.close()


def _train(cfg: TrainConfig, ctx: Distributed, log) -> TrainResult:
    unpaired = any(OBJECTIVES[n].data == "unpaired" for n in cfg.loss_names)
    device = ctx.device(cfg.device)
    torch.manual_seed(cfg.seed)  # the same seed on every rank: LoRA's initial weights must agree
    random.seed(cfg.seed)
    out = Path(cfg.output_dir)
    if ctx.is_main:
        check_writable(cfg.output_dir, 0)  # before minutes of loading: a bad --output-dir fails now
        (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")

    # ---- data and models --------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    step_fn = kto_step if unpaired else paired_step
    train_set, eval_set = load_data(cfg, tokenizer, unpaired, log)
    pad_id = tokenizer.pad_token_id
    if cfg.memory_check:  # refuse before minutes of loading what cannot fit (config only: milliseconds)
        from dpokit.estimate import check_memory
        check_memory(cfg, train_set, device, ctx, log)  # rank 0 decides, after a barrier
    warn_half_on_cpu(device, cfg.model_dtype, log)
    policy = load_model(cfg.model, device, cfg.allow_pickle, cfg.trust_remote_code, cfg.model_dtype)
    # Dropout stays off (eval mode): log π − log π_ref must compare the same deterministic function.
    policy.eval()
    reference, train_ref, eval_ref = prepare_reference(cfg, policy, tokenizer, train_set, eval_set, unpaired,
                                                       device, pad_id, log, ctx)  # (+ the fp32 master copy)
    if cfg.pure_half:
        log(stalled_weights_note(policy, cfg))
    if cfg.lora_r:
        policy = add_lora(policy, cfg, log)
        if reference == "adapters-off":
            reference = AdaptersOff(policy)
    if cfg.gradient_checkpointing:  # after the reference copy: it only runs forward, under no_grad
        # transformers checkpoints only in train mode; zero every dropout so train mode changes nothing else
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not cfg.lora_r:  # (add_lora already zeroed the base's dropout and keeps --lora-dropout)
            disable_dropout(policy)
        policy.train()

    # ---- schedule: a micro-batch is batch_size rows per process; each process takes every world-th row --
    n = len(train_set)
    micro_size = cfg.batch_size * ctx.world
    micro_per_epoch = math.ceil(n / micro_size)
    if unpaired and n % micro_size == 1 and micro_per_epoch > 1:
        micro_per_epoch -= 1  # the lone last example joins the previous micro-batch (see step_batches)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    groups = None if unpaired else pair_groups(train_set)  # ranked rows: their pairs stay together

    def step_batches(step: int) -> list[list[int]]:
        """Row indices of each micro-batch of optimizer step `step` (all ranks), from (seed, epoch) alone."""
        epoch, k = divmod(step, steps_per_epoch)
        order = epoch_order(n, groups, cfg.seed + epoch, cfg.shuffle)
        micro = [order[i:i + micro_size] for i in range(0, n, micro_size)]
        if unpaired and len(micro) > 1 and len(micro[-1]) == 1:
            tail = micro.pop()  # KTO's KL estimate needs another example's completion in the batch
            micro[-1] = micro[-1] + tail
        return micro[k * cfg.grad_accum:(k + 1) * cfg.grad_accum]

    # weights + two AdamW moments (fp32), plus 10 %: refuse now rather than fail at the first save
    if ctx.is_main:
        check_writable(cfg.output_dir, int(sum(p.numel() for p in policy.parameters()) * 4 * 3 * 1.1))
    ckpt = find_checkpoint(cfg.output_dir, cfg.resume, log) if cfg.resume else None
    if ckpt is not None:
        check_same_run(ckpt, cfg.to_dict())
        load_weights(ckpt, policy, reference)  # whole tensors, before FSDP shards them
    trained = wrap(policy, ctx) if ctx.enabled else policy  # what the steps call (DDP/FSDP hooks its forward)
    optimizer = build_optimizer(policy.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, total_steps, cfg.lr_scheduler)
    fp16 = cfg.dtype == "fp16"
    scaler = torch.amp.GradScaler(device.type) if fp16 else None  # fp16 gradients underflow without it
    start_step = 0
    if ckpt is not None:
        # (eval_ref stays this run's: prepare_reference computed it from the starting reference, for --eval-data)
        start_step = load_training_state(ckpt, lambda s: load_optimizer_state(trained, optimizer, s, ctx), scheduler,
                                         ctx.world, scaler, ctx.rank, device)
        log(f"resumed from {ckpt} at step {start_step}")
        if ctx.is_main:
            keep_metrics_until(out / "metrics.jsonl", start_step)  # steps after the checkpoint are redone

    def checkpoint(step_done: int) -> Path:
        model_state = full_model_state(trained, ctx)  # gathers shards: every rank takes part
        optimizer_state = full_optimizer_state(trained, optimizer, ctx)
        rngs = gather_objects(rng_state(device), ctx)  # each rank's own: dropout draws differ per rank
        path = None
        if ctx.is_main:
            path = save_checkpoint(cfg.output_dir, step_done, policy, tokenizer, optimizer_state, scheduler,
                                   cfg.to_yaml(), reference if cfg.sync_ref_every else None, cfg.keep_last,
                                   model_state, ctx.world, scaler.state_dict() if scaler else None, rngs, device.type)
        ctx.barrier()  # no rank moves on (or exits) before the checkpoint is complete
        return path

    def evaluate() -> dict[str, float]:
        return run_eval(trained if ctx.fsdp else policy, eval_set, eval_ref, cfg, pad_id, device, ctx)

    # ---- held-out evaluation before training ---------------------------------------------------------
    eval_before = None
    if eval_set:
        eval_before = evaluate()
        log(f"held-out {'before training' if not start_step else 'at resume'} ({len(eval_set)} pairs): "
            f"{format_eval(eval_before)}")

    # ---- training -------------------------------------------------------------------------------
    unit = "completions" if unpaired else "pairs"
    where = (f"{ctx.world} processes ({'FSDP2' if ctx.fsdp else 'DDP'}, {cfg.batch_size} {unit} each per micro-batch)"
             if ctx.enabled else str(device))
    log(f"training {cfg.loss} for {total_steps - start_step} steps × {micro_size * cfg.grad_accum} {unit} "
        f"({n} {unit}, {steps_per_epoch} steps/epoch) on {where}")
    if groups is not None and cfg.prefix_sharing:
        epoch0 = [m for s in range(steps_per_epoch) for m in step_batches(s)]
        log(sharing_summary(train_set, [[rank_share(m, r, ctx.world, True) for r in range(ctx.world)] for m in epoch0]))
    metrics_file = open(out / "metrics.jsonl", "a" if start_step else "w", encoding="utf-8") if ctx.is_main else None
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps,
               disable=not (cfg.progress and ctx.is_main), desc="dpo", dynamic_ncols=True)
    fp16_skipped = 0

    def optimizer_step(step: int) -> dict:
        """grad_accum micro-batches, clip, update; the step's metrics. Raises NonFiniteError before the update."""
        t0 = time.perf_counter()
        micro = step_batches(step)
        step_pairs = sum(len(m) for m in micro)
        sums: dict[str, float] = defaultdict(float)
        for k, idx in enumerate(micro):
            mine = rank_share(idx, ctx.rank, ctx.world, groups is not None)
            # A rank with no row left in the epoch's last micro-batch repeats one with weight 0: every rank
            # must run each forward and backward, or the gradient reduction would wait forever.
            weight = 1.0 if mine else 0.0
            mine = mine or idx[:1]
            ref_rows = train_ref.select(mine, device) if train_ref is not None else None
            kto = {}
            if unpaired and ctx.enabled:  # KL rows borrow the previous completion of the whole micro-batch
                partners = [idx[(p - 1) % len(idx)] for p in range(ctx.rank, len(idx), ctx.world)] or idx[-1:]
                kto = {"kl_partners": [train_set[i] for i in partners], "gather": lambda t: gather_cat(t, ctx)}
            with gradient_sync(trained, ctx, sync=k == len(micro) - 1):
                # ÷ (step_pairs / world): DDP and FSDP average gradients over ranks, so this yields the step mean
                micro_sums, micro_tokens = step_fn(trained, reference, [train_set[i] for i in mine], cfg, pad_id,
                                                   device, step_pairs / ctx.world, step + 1, ref_rows, weight,
                                                   check_finite=not ctx.enabled, scaler=scaler, **kto)
            for key, value in micro_sums.items():
                sums[key] += value * weight
            sums["tokens"] += micro_tokens * weight
        sums = sum_across(sums, ctx)
        def rows():  # named in errors only
            return [train_set[i].source for m in micro for i in m]
        if not math.isfinite(sums["loss"]):
            raise NonFiniteError(f"step {step + 1}: non-finite loss on rows {rows()}")
        if fp16:
            scaler.unscale_(optimizer)  # true gradients, so clipping and the logged norm mean what they say
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm or float("inf"))
        grad_norm = grad_norm_value(norm)
        if fp16 and not math.isfinite(grad_norm):  # fp16 overflow: expected now and then, the scaler adapts
            nonlocal fp16_skipped
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skips the update (it saw the inf)
            scaler.update()  # lowers the scale
            optimizer.zero_grad(set_to_none=True)
            fp16_skipped += 1
            log(f"step {step + 1}: fp16 gradients overflowed at loss scale {scale:g}; step skipped "
                f"({fp16_skipped} so far), scale lowered to {scaler.get_scale():g}")
            return {"step": step + 1, "fp16_overflow_skipped": fp16_skipped, "loss_scale": scaler.get_scale()}
        if not math.isfinite(grad_norm):
            raise NonFiniteError(f"step {step + 1}: non-finite gradient norm on rows {rows()}")
        lr = scheduler.get_last_lr()[0]
        if fp16:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.sync_ref_every and (step + 1) % cfg.sync_ref_every == 0:
            sync_reference(reference, policy, cfg.sync_ref_alpha)
        seconds = time.perf_counter() - t0
        tokens = sums.pop("tokens")
        record = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4)}
        record.update({k: v / step_pairs for k, v in sums.items()})
        if unpaired:
            finish_kto_metrics(record)
        record.update({"lr": lr, "grad_norm": grad_norm, "pairs_per_s": step_pairs / seconds,
                       "tokens_per_s": tokens / seconds})
        if fp16:
            record["loss_scale"] = scaler.get_scale()
        return record

    skipped_nonfinite = 0
    with StopSignals() as stop:
        for step in bar:
            try:
                record = optimizer_step(step)
            except NonFiniteError as e:
                optimizer.zero_grad(set_to_none=True)  # nothing of this step reaches the weights
                if cfg.on_nonfinite == "stop":
                    last = complete_checkpoints(cfg.output_dir)
                    raise NonFiniteError(f"{e}; weights not updated; last checkpoint: {last[-1] if last else 'none'}"
                                         " (--on-nonfinite skip skips such steps)") from None
                skipped_nonfinite += 1
                log(f"skipped: {e}")
                record = {"step": step + 1, "skipped_nonfinite": skipped_nonfinite}
            if "loss" in record and eval_set and cfg.eval_every and (step + 1) % cfg.eval_every == 0 \
                    and step + 1 < total_steps:
                record.update(evaluate())
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if "loss" in record:
                bar.set_postfix(loss=f"{record['loss']:.4f}", **({"acc": f"{record['rewards/accuracies']:.2f}",
                                "margin": f"{record['rewards/margins']:.3f}"} if not unpaired else {}))
            if any_across(stop.received is not None, ctx):  # every rank stops at the same step
                bar.close()
                if metrics_file:
                    metrics_file.close()
                raise TrainingInterrupted(stop.received or signal.SIGTERM, checkpoint(step + 1))
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                checkpoint(step + 1)
    bar.close()

    # ---- held-out evaluation after training, and the final model ------------------------------------
    eval_after = None
    if eval_set:
        eval_after = evaluate()
        if metrics_file:
            metrics_file.write(json.dumps({"step": total_steps, **eval_after}) + "\n")
        log(f"held-out after training  ({len(eval_set)} pairs): {format_eval(eval_after)}")
    if metrics_file:
        metrics_file.close()
    if ctx.enabled:
        weights, moments = training_state_bytes(policy, optimizer)
        log(f"each process held {weights / 2**30:.2f} GiB of weights and {moments / 2**30:.2f} GiB of optimizer state"
            f" ({'sharded by FSDP2' if ctx.fsdp else 'replicated by DDP'})")
    final = out / "final"
    model_state = full_model_state(trained, ctx)
    if ctx.is_main:
        if cfg.lora_r and cfg.merge_lora:
            policy = policy.merge_and_unload()  # a plain transformers model again, adapters folded in
        save_final(policy, final, cfg, model_state)  # in --model-dtype, config.json saying so
        tokenizer.save_pretrained(final)
    ctx.barrier()
    log(f"saved {final} (load it with AutoModelForCausalLM.from_pretrained); metrics in {out / 'metrics.jsonl'}")
    return TrainResult(out, total_steps, eval_before, eval_after, final, start_step)


def run_eval(policy, eval_set, eval_ref, cfg: TrainConfig, pad_id: int, device, ctx=None) -> dict[str, float]:
    with compute_precision(device, cfg.dtype):
        return evaluate_pairs(policy, eval_set, eval_ref, cfg, pad_id, device, ctx)
