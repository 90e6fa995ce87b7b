"""The DPO training loop, top to bottom: load → tokenize → evaluate → train → evaluate → save.

`_train` reads as the run does: `_load` (data, policy, reference), `_start` (optimizer, lr schedule, resume),
evaluation, `_train_steps`, evaluation, `_save_final`. An `optimizer_step` is `accumulate` (forward and
backward over grad_accum micro-batches: loop/steps.py) then one `update` (clip, optimizer and schedule
steps, non-finite handling: loop/update.py, shared with the online loop). The data order is a pure function
of (seed, step) (loop/schedule.py), so a resumed run sees exactly the batches an uninterrupted run would
have seen. Under torchrun every rank runs this same loop on its share of each micro-batch
(`dpokit.distributed` holds the bookkeeping); with one process those helpers do nothing.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpokit.config import TrainConfig
from dpokit.evaluation import evaluate_pairs
from dpokit.evaluation.preference import format_eval
from dpokit.logprobs import compute_precision
from dpokit.logprobs.attention import attention_kind
from dpokit.logprobs.sequence import TokenLogpsModule
from dpokit.distributed import (Distributed, any_across, check_launch, full_model_state, full_optimizer_state,
                                gather_objects, gradient_sync, load_optimizer_state, start, sum_across,
                                training_state_bytes, wrap)
from dpokit.loop.checkpoint import (check_same_run, check_writable, complete_checkpoints, deterministic_kernels,
                                    find_checkpoint, keep_metrics_until, load_training_state, load_weights, rng_state,
                                    save_checkpoint)
from dpokit.batches.inputs import load_data, pair_groups, rank_share, sharing_summary
from dpokit.loop.schedule import BatchSchedule
from dpokit.loop.signals import StopSignals, TrainingInterrupted
from dpokit.loop.optim import build_optimizer, build_scheduler
from dpokit.loop.reference import AdaptersOff, prepare_reference, sync_reference
from dpokit.models import load_model, load_tokenizer
from dpokit.models.load import save_final, stalled_weights_note, warn_half_on_cpu
from dpokit.models.lora import add_lora, disable_dropout
from dpokit.loop.steps import NonFiniteError, finish_kto_metrics, kto_step, paired_step
from dpokit.loop.trackers import open_metrics
from dpokit.loop.result import TrainResult, pick_device  # noqa: F401 (pick_device: re-exported)
from dpokit.loop.update import NonFiniteSteps, update
from dpokit.objectives import OBJECTIVES


def train_offline(cfg: TrainConfig, log=print) -> TrainResult:
    """Train on a data file (loop/run.py's `train` for offline configs, and each round of iterative DPO). Under
    torchrun (or inside a process group the caller made) this process trains its share: DDP, or FSDP2."""
    check_launch(cfg.loss_names)
    with deterministic_kernels(cfg.deterministic), attention_kind(cfg.attention, log):
        ctx = start(cfg.fsdp, cfg.device)
        try:
            return _train(cfg, ctx, log if ctx.is_main else (lambda *a, **k: None))
        finally:
            ctx.close()


@dataclass
class Run:
    """What the parts of one offline run share: built by `_load` (data, models, the step order) and `_start`
    (optimizer, lr schedule and fp16 scaler, resumed from a checkpoint when asked)."""
    cfg: TrainConfig
    ctx: Distributed
    device: torch.device
    log: Callable
    tokenizer: object
    train_set: list
    eval_set: list
    train_ref: object  # the training rows' cached reference log-probs (None: the reference runs live)
    eval_ref: object
    policy: torch.nn.Module
    reference: object  # a model, AdaptersOff, or None (reference-free objective or cached log-probs)
    batches: BatchSchedule
    unpaired: bool  # KTO's labelled completions rather than pairs
    trained: torch.nn.Module | None = None  # what the steps call: the policy, DDP/FSDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    scaler: torch.amp.GradScaler | None = None  # fp16 only: fp16 gradients underflow without it
    fp16_skipped: int = 0  # steps the scaler skipped for overflowing gradients

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def _train(cfg: TrainConfig, ctx: Distributed, log) -> TrainResult:
    run = _load(cfg, ctx, log)
    total_steps = run.batches.total_steps(cfg.epochs, cfg.max_steps)
    start_step = _start(run, total_steps)
    out = Path(cfg.output_dir)
    eval_before = None
    if run.eval_set:
        eval_before = evaluate(run)
        log(f"held-out {'before training' if not start_step else 'at resume'} ({len(run.eval_set)} pairs): "
            f"{format_eval(eval_before)}")
    _announce(run, start_step, total_steps)
    metrics_file = open_metrics(cfg, out, start_step, ctx.is_main)  # metrics.jsonl and --report-to's trackers
    try:
        _train_steps(run, start_step, total_steps, metrics_file)
        eval_after = None
        if run.eval_set:
            eval_after = evaluate(run)
            if metrics_file:
                metrics_file.write_record({"step": total_steps, **eval_after})
            log(f"held-out after training  ({len(run.eval_set)} pairs): {format_eval(eval_after)}")
    finally:
        if metrics_file:
            metrics_file.close()
    final = _save_final(run, out / "final")
    log(f"saved {final} (load it with AutoModelForCausalLM.from_pretrained); metrics in {out / 'metrics.jsonl'}")
    return TrainResult(out, total_steps, eval_before, eval_after, final, start_step)


def _load(cfg: TrainConfig, ctx: Distributed, log) -> Run:
    """Data, policy and reference (in this order, after the seed: a resumed run repeats it exactly)."""
    unpaired = any(OBJECTIVES[n].data == "unpaired" for n in cfg.loss_names)
    device = ctx.device(cfg.device)
    torch.manual_seed(cfg.seed)  # the same seed on every rank: LoRA's initial weights must agree
    random.seed(cfg.seed)
    if ctx.is_main:
        check_writable(cfg.output_dir, 0)  # before minutes of loading: a bad --output-dir fails now
        (Path(cfg.output_dir) / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_set, eval_set = load_data(cfg, tokenizer, unpaired, log)
    if cfg.memory_check:  # refuse before minutes of loading what cannot fit (config only: milliseconds)
        from dpokit.estimate import check_memory
        check_memory(cfg, train_set, device, ctx, log)  # rank 0 decides, after a barrier
    warn_half_on_cpu(device, cfg.model_dtype, log)
    policy = load_model(cfg.model, device, cfg.allow_pickle, cfg.trust_remote_code, cfg.model_dtype)
    # Dropout stays off (eval mode): log π − log π_ref must compare the same deterministic function.
    policy.eval()
    reference, train_ref, eval_ref = prepare_reference(cfg, policy, tokenizer, train_set, eval_set, unpaired, device,
                                                       tokenizer.pad_token_id, log, ctx)  # (+ the fp32 master copy)
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
    # a micro-batch is batch_size rows per process; ranked rows keep their pairs together
    batches = BatchSchedule(len(train_set), cfg.batch_size * ctx.world, cfg.grad_accum, cfg.seed, cfg.shuffle,
                            None if unpaired else pair_groups(train_set), no_lone_tail=unpaired)
    return Run(cfg, ctx, device, log, tokenizer, train_set, eval_set, train_ref, eval_ref, policy, reference,
               batches, unpaired)


def _start(run: Run, total_steps: int) -> int:
    """Wrap the policy (torchrun) and build the optimizer, lr schedule and fp16 scaler, restored from the checkpoint
    when resuming; the step to start at."""
    cfg, ctx = run.cfg, run.ctx
    # weights + two AdamW moments (fp32), plus 10 %: refuse now rather than fail at the first save
    if ctx.is_main:
        check_writable(cfg.output_dir, int(sum(p.numel() for p in run.policy.parameters()) * 4 * 3 * 1.1))
    ckpt = find_checkpoint(cfg.output_dir, cfg.resume, run.log) if cfg.resume else None
    if ckpt is not None:
        check_same_run(ckpt, cfg.to_dict())
        load_weights(ckpt, run.policy, run.reference)  # whole tensors, before FSDP shards them
    run.trained = wrap(TokenLogpsModule(run.policy), ctx) if ctx.enabled else run.policy  # DDP/FSDP hooks its forward
    run.optimizer = build_optimizer(run.policy.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    run.scheduler = build_scheduler(run.optimizer, cfg.warmup_steps, total_steps, cfg.lr_scheduler)
    run.scaler = torch.amp.GradScaler(run.device.type) if cfg.dtype == "fp16" else None
    if ckpt is None:
        return 0
    # (eval_ref stays this run's: prepare_reference computed it from the starting reference, for --eval-data)
    start_step = load_training_state(ckpt, lambda s: load_optimizer_state(run.trained, run.optimizer, s, ctx),
                                     run.scheduler, ctx.world, run.scaler, ctx.rank, run.device)
    run.log(f"resumed from {ckpt} at step {start_step}")
    if ctx.is_main:
        keep_metrics_until(Path(cfg.output_dir) / "metrics.jsonl", start_step)  # later steps are redone
    return start_step


def _announce(run: Run, start_step: int, total_steps: int) -> None:
    cfg, ctx, batches, unit = run.cfg, run.ctx, run.batches, "completions" if run.unpaired else "pairs"
    where = (f"{ctx.world} processes ({'FSDP2' if ctx.fsdp else 'DDP'}, {cfg.batch_size} {unit} each per micro-batch)"
             if ctx.enabled else str(run.device))
    run.log(f"training {cfg.loss} for {total_steps - start_step} steps × {batches.micro_size * cfg.grad_accum} "
            f"{unit} ({batches.rows} {unit}, {batches.steps_per_epoch} steps/epoch) on {where}")
    if batches.groups is not None and cfg.prefix_sharing:
        run.log(sharing_summary(run.train_set, [[rank_share(m, r, ctx.world, True) for r in range(ctx.world)]
                                                for m in batches.epoch_micro_batches(0)]))


def _train_steps(run: Run, start_step: int, total_steps: int, metrics_file) -> None:
    cfg, ctx = run.cfg, run.ctx
    run_steps(cfg, start_step, total_steps, "dpo", lambda step: optimizer_step(run, step),
              (lambda: evaluate(run)) if run.eval_set else None, lambda step: checkpoint(run, step), metrics_file,
              lambda r: {"loss": f"{r['loss']:.4f}", **({"acc": f"{r['rewards/accuracies']:.2f}",
                                                          "margin": f"{r['rewards/margins']:.3f}"} if not run.unpaired
                                                        else {})},
              run.optimizer, run.log, show=cfg.progress and ctx.is_main,
              stop_all=lambda received: any_across(received, ctx),  # every rank stops at the same step
              skip_hint=" (--on-nonfinite skip skips such steps)")


def run_steps(cfg: TrainConfig, start_step: int, total_steps: int, desc: str, take_step: Callable[[int], dict],
              evaluate_fn: Callable[[], dict] | None, save: Callable[[int], object], metrics_file,
              postfix: Callable[[dict], dict], optimizer, log, show: bool = True,
              stop_all: Callable[[bool], bool] = bool, skip_hint: str = "") -> None:
    """Steps start_step … total_steps − 1 of a step loop (offline DPO, `dpokit train-rm`): `take_step(step)` → its
    metrics (a NonFiniteError is handled per --on-nonfinite), held-out `evaluate_fn()` every --eval-every steps, one
    metrics.jsonl line (`metrics_file`: a trackers.MetricsSink, which also sends it to --report-to's trackers, or a
    plain text file), `save(step)` every --save-every steps; on SIGINT/SIGTERM (`stop_all` agrees across
    processes) `save`, then TrainingInterrupted naming what it saved."""
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not show, desc=desc,
               dynamic_ncols=True)

    def last_checkpoint() -> str:
        last = complete_checkpoints(cfg.output_dir)
        return f"weights not updated; last checkpoint: {last[-1] if last else 'none'}{skip_hint}"
    nonfinite = NonFiniteSteps(cfg.on_nonfinite, log, last_checkpoint)
    with StopSignals() as stop:
        for step in bar:
            try:
                record = take_step(step)
            except NonFiniteError as e:
                record = {"step": step + 1, **nonfinite.handle(e, optimizer)}
            if "loss" in record and evaluate_fn and cfg.eval_every and (step + 1) % cfg.eval_every == 0 \
                    and step + 1 < total_steps:
                record.update(evaluate_fn())
            if metrics_file:
                if hasattr(metrics_file, "write_record"):
                    metrics_file.write_record(record)
                else:
                    metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if "loss" in record:
                bar.set_postfix(**postfix(record))
            if stop_all(stop.received is not None):
                bar.close()
                if metrics_file:
                    metrics_file.close()
                raise TrainingInterrupted(stop.received or signal.SIGTERM, save(step + 1))
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                save(step + 1)
    bar.close()


def optimizer_step(run: Run, step: int) -> dict:
    """grad_accum micro-batches, then one update (loop/update.py); the step's metrics. Raises NonFiniteError
    before the update."""
    cfg, t0 = run.cfg, time.perf_counter()
    micro = run.batches.micro_batches(step)
    step_rows = sum(len(m) for m in micro)
    sums = accumulate(run, micro, step_rows, step)
    rows = lambda: [run.train_set[i].source for m in micro for i in m]  # noqa: E731 (named in errors only)
    if not math.isfinite(sums["loss"]):
        raise NonFiniteError(f"step {step + 1}: non-finite loss on rows {rows()}")
    done = update(run.policy.parameters(), run.optimizer, run.scheduler, cfg.max_grad_norm, run.scaler, step + 1,
                  rows)
    if done.skipped:  # fp16 overflow: expected now and then, the scaler adapts
        run.fp16_skipped += 1
        run.log(f"step {step + 1}: fp16 gradients overflowed at loss scale {done.overflow_scale:g}; step skipped "
                f"({run.fp16_skipped} so far), scale lowered to {done.loss_scale:g}")
        return {"step": step + 1, "fp16_overflow_skipped": run.fp16_skipped, "loss_scale": done.loss_scale}
    if cfg.sync_ref_every and (step + 1) % cfg.sync_ref_every == 0:
        sync_reference(run.reference, run.policy, cfg.sync_ref_alpha)
    seconds = time.perf_counter() - t0
    tokens = sums.pop("tokens")
    record = {"step": step + 1, "epoch": round((step + 1) / run.batches.steps_per_epoch, 4)}
    record.update({k: v / step_rows for k, v in sums.items()})
    if run.unpaired:
        finish_kto_metrics(record)
    record.update({"lr": done.lr, "grad_norm": done.grad_norm, "pairs_per_s": step_rows / seconds,
                   "tokens_per_s": tokens / seconds})
    if done.loss_scale is not None:
        record["loss_scale"] = done.loss_scale
    return record


def accumulate(run: Run, micro: list[list[int]], step_rows: int, step: int) -> dict[str, float]:
    """Forward and backward over the step's micro-batches (this process's share of each); the metric sums over
    every process, with "tokens"."""
    cfg, ctx = run.cfg, run.ctx
    step_fn = kto_step if run.unpaired else paired_step
    sums: dict[str, float] = defaultdict(float)
    for k, idx in enumerate(micro):
        mine = rank_share(idx, ctx.rank, ctx.world, run.batches.groups is not None)
        # A rank with no row left in the epoch's last micro-batch repeats one with weight 0: every rank must run
        # each forward and backward, or the gradient reduction would wait forever.
        weight = 1.0 if mine else 0.0
        mine = mine or idx[:1]
        ref_rows = run.train_ref.select(mine, run.device) if run.train_ref is not None else None
        # KTO's KL rows borrow completions across processes: its step needs the whole micro-batch
        kto = {"micro_batch": [run.train_set[i] for i in idx], "ctx": ctx} if run.unpaired else {}
        with gradient_sync(run.trained, ctx, sync=k == len(micro) - 1):
            # ÷ (step_rows / world): DDP and FSDP average gradients over ranks, so this yields the step mean
            micro_sums, micro_tokens = step_fn(run.trained, run.reference, [run.train_set[i] for i in mine], cfg,
                                               run.pad_id, run.device, step_rows / ctx.world, step + 1, ref_rows,
                                               weight, check_finite=not ctx.enabled, scaler=run.scaler, **kto)
        for key, value in micro_sums.items():
            sums[key] += value * weight
        sums["tokens"] += micro_tokens * weight
    return sum_across(sums, ctx)


def checkpoint(run: Run, step_done: int) -> Path:
    """Save a checkpoint after step `step_done` (every rank takes part: sharded state is gathered)."""
    cfg, ctx = run.cfg, run.ctx
    model_state = full_model_state(run.trained, ctx)
    optimizer_state = full_optimizer_state(run.trained, run.optimizer, ctx)
    rngs = gather_objects(rng_state(run.device), ctx)  # each rank's own: dropout draws differ per rank
    path = None
    if ctx.is_main:
        path = save_checkpoint(cfg.output_dir, step_done, run.policy, run.tokenizer, optimizer_state, run.scheduler,
                               cfg.to_yaml(), run.reference if cfg.sync_ref_every else None, cfg.keep_last,
                               model_state, ctx.world, run.scaler.state_dict() if run.scaler else None, rngs,
                               run.device.type)
    ctx.barrier()  # no rank moves on (or exits) before the checkpoint is complete
    return path


def evaluate(run: Run) -> dict[str, float]:
    return run_eval(run.trained if run.ctx.fsdp else run.policy, run.eval_set, run.eval_ref, run.cfg, run.pad_id,
                    run.device, run.ctx)


def _save_final(run: Run, final: Path) -> Path:
    """The trained model in --model-dtype (LoRA merged with --merge-lora), and its tokenizer."""
    cfg, ctx, policy = run.cfg, run.ctx, run.policy
    if ctx.enabled:
        weights, moments = training_state_bytes(policy, run.optimizer)
        run.log(f"each process held {weights / 2**30:.2f} GiB of weights and {moments / 2**30:.2f} GiB of optimizer "
                f"state ({'sharded by FSDP2' if ctx.fsdp else 'replicated by DDP'})")
    model_state = full_model_state(run.trained, ctx)
    if ctx.is_main:
        if cfg.lora_r and cfg.merge_lora:
            policy = policy.merge_and_unload()  # a plain transformers model again, adapters folded in
        save_final(policy, final, cfg, model_state)  # in --model-dtype, config.json saying so
        run.tokenizer.save_pretrained(final)
    ctx.barrier()
    return final


def run_eval(policy, eval_set, eval_ref, cfg: TrainConfig, pad_id: int, device, ctx=None) -> dict[str, float]:
    with compute_precision(device, cfg.dtype):
        return evaluate_pairs(policy, eval_set, eval_ref, cfg, pad_id, device, ctx)
