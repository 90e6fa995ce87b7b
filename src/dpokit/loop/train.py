"""The DPO training loop, top to bottom: load → tokenize → evaluate → train → evaluate → save.

Everything a step does is visible here: reference log-probs under no_grad, policy log-probs with grad,
the loss, backward over grad_accum micro-batches, clipping, the optimizer and schedule steps, metrics.
The data order is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpokit.batches import TokenizedPair, tokenize_completions, tokenize_pairs
from dpokit.config import TrainConfig
from dpokit.data import builtin_path, load_completions, load_pairs
from dpokit.evaluation import evaluate_pairs
from dpokit.logprobs import compute_precision
from dpokit.loop.checkpoint import (check_same_run, check_writable, complete_checkpoints, find_checkpoint,
                                    load_checkpoint, save_checkpoint)
from dpokit.loop.signals import StopSignals, TrainingInterrupted
from dpokit.loop.optim import build_optimizer, build_scheduler
from dpokit.loop.reference import AdaptersOff, prepare_reference
from dpokit.models import load_model, load_tokenizer
from dpokit.models.load import ModelError
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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_data(cfg: TrainConfig, tokenizer, unpaired: bool, log) -> tuple[list, list[TokenizedPair]]:
    """Read, check and tokenize the training and held-out data, reporting what happened to every row.

    Training rows are pairs, or labelled completions for unpaired objectives (KTO); held-out rows are
    always pairs, so every objective reports the same implicit-reward accuracy."""
    train_path = cfg.data or builtin_path("helpful_train")
    eval_path = cfg.eval_data or (None if cfg.data else builtin_path("helpful_eval"))
    out = []
    for role, path in (("train", train_path), ("eval", eval_path)):
        if path is None:
            out.append([])
            continue
        if unpaired and role == "train":
            examples, report = load_completions(path, cfg.on_bad_row)
            tokenized, tok_report = tokenize_completions(examples, tokenizer, cfg.max_length, cfg.max_prompt_length)
        else:
            pairs, report = load_pairs(path, cfg.on_bad_row)
            tokenized, tok_report = tokenize_pairs(pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
        log(f"{role} data: {report.summary()}")
        log(f"  {tok_report.summary()}")
        if not tokenized:
            raise ValueError(f"{path}: no pair survived tokenization ({tok_report.summary()})")
        out.append(tokenized)
    return out[0], out[1]


def train(config: TrainConfig | None = None, log=print, **overrides) -> TrainResult:
    """Train a policy with the configured objective (DPO by default).

    `overrides` are TrainConfig fields: train(beta=0.5, data="pairs.jsonl")."""
    cfg = TrainConfig.from_dict({**(config.to_dict() if config else {}), **overrides})
    if cfg.online:  # GRPO / online DPO: trains on its own samples, not on a pairs file
        from dpokit.loop.online import train_online
        return train_online(cfg, log)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.output_dir)
    check_writable(cfg.output_dir, 0)  # before minutes of loading: a bad --output-dir fails now
    (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")

    # ---- data and models --------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    unpaired = any(OBJECTIVES[n].data == "unpaired" for n in cfg.loss_names)
    step_fn = kto_step if unpaired else paired_step
    train_set, eval_set = load_data(cfg, tokenizer, unpaired, log)
    pad_id = tokenizer.pad_token_id
    policy = load_model(cfg.model, device, cfg.allow_pickle, cfg.trust_remote_code)
    # Dropout stays off (eval mode): log π − log π_ref must compare the same deterministic function.
    policy.eval()
    reference, train_ref, eval_ref = prepare_reference(cfg, policy, tokenizer, train_set, eval_set, unpaired,
                                                       device, pad_id, log)
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

    # ---- schedule ---------------------------------------------------------------------------------
    n = len(train_set)
    micro_per_epoch = math.ceil(n / cfg.batch_size)
    if unpaired and n % cfg.batch_size == 1 and micro_per_epoch > 1:
        micro_per_epoch -= 1  # the lone last example joins the previous micro-batch (see step_batches)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    def step_batches(step: int) -> list[list[int]]:
        """Row indices of each micro-batch of optimizer step `step`, from (seed, epoch) alone."""
        epoch, k = divmod(step, steps_per_epoch)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
                 if cfg.shuffle else list(range(n)))
        micro = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        if unpaired and len(micro) > 1 and len(micro[-1]) == 1:
            tail = micro.pop()  # KTO's KL estimate needs another example's completion in the batch
            micro[-1] = micro[-1] + tail
        return micro[k * cfg.grad_accum:(k + 1) * cfg.grad_accum]

    optimizer = build_optimizer(policy.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, total_steps, cfg.lr_scheduler)
    # weights + two AdamW moments (fp32), plus 10 %: refuse now rather than fail at the first save
    check_writable(cfg.output_dir, int(sum(p.numel() for p in policy.parameters()) * 4 * 3 * 1.1))
    start_step = 0
    ckpt = find_checkpoint(cfg.output_dir, cfg.resume, log) if cfg.resume else None
    if ckpt is not None:
        check_same_run(ckpt, cfg.to_dict())
        start_step, eval_ref = load_checkpoint(ckpt, policy, optimizer, scheduler, reference, eval_ref)
        log(f"resumed from {ckpt} at step {start_step}")
        keep_metrics_until(out / "metrics.jsonl", start_step)  # steps after the checkpoint are redone

    def checkpoint(step_done: int):
        return save_checkpoint(cfg.output_dir, step_done, policy, tokenizer, optimizer, scheduler, cfg.to_yaml(),
                               reference if cfg.sync_ref_every else None, eval_ref, cfg.keep_last)

    # ---- held-out evaluation before training ---------------------------------------------------------
    eval_before = None
    if eval_set:
        eval_before = run_eval(policy, eval_set, eval_ref, cfg, pad_id, device)
        log(f"held-out {'before training' if not start_step else 'at resume'} ({len(eval_set)} pairs): "
            f"{format_eval(eval_before)}")

    # ---- training -------------------------------------------------------------------------------
    unit = "completions" if unpaired else "pairs"
    log(f"training {cfg.loss} for {total_steps - start_step} steps × {cfg.batch_size * cfg.grad_accum} {unit} "
        f"({n} {unit}, {steps_per_epoch} steps/epoch) on {device}")
    metrics_file = open(out / "metrics.jsonl", "a" if start_step else "w", encoding="utf-8")
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not cfg.progress,
               desc="dpo", dynamic_ncols=True)
    def optimizer_step(step: int) -> dict:
        """grad_accum micro-batches, clip, update; the step's metrics. Raises NonFiniteError before the update."""
        t0 = time.perf_counter()
        micro = step_batches(step)
        step_pairs = sum(len(m) for m in micro)
        sums: dict[str, float] = defaultdict(float)
        tokens = 0
        for idx in micro:
            ref_rows = train_ref.select(idx, device) if train_ref is not None else None
            micro_sums, micro_tokens = step_fn(policy, reference, [train_set[i] for i in idx], cfg, pad_id, device,
                                               step_pairs, step + 1, ref_rows)
            for key, value in micro_sums.items():
                sums[key] += value
            tokens += micro_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm or float("inf"))
        if not torch.isfinite(grad_norm):
            raise NonFiniteError(f"step {step + 1}: non-finite gradient norm on rows "
                                 f"{[train_set[i].source for m in micro for i in m]}")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.sync_ref_every and (step + 1) % cfg.sync_ref_every == 0:
            sync_reference(reference, policy, cfg.sync_ref_alpha)
        seconds = time.perf_counter() - t0
        record = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4)}
        record.update({k: v / step_pairs for k, v in sums.items()})
        if unpaired:
            finish_kto_metrics(record)
        record.update({"lr": lr, "grad_norm": grad_norm.item(), "pairs_per_s": step_pairs / seconds,
                       "tokens_per_s": tokens / seconds})
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
                record.update(run_eval(policy, eval_set, eval_ref, cfg, pad_id, device))
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if "loss" in record:
                bar.set_postfix(loss=f"{record['loss']:.4f}", **({"acc": f"{record['rewards/accuracies']:.2f}",
                                "margin": f"{record['rewards/margins']:.3f}"} if not unpaired else {}))
            if stop.received is not None:
                bar.close()
                metrics_file.close()
                raise TrainingInterrupted(stop.received, checkpoint(step + 1))
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                checkpoint(step + 1)
    bar.close()

    # ---- held-out evaluation after training, and the final model ------------------------------------
    eval_after = None
    if eval_set:
        eval_after = run_eval(policy, eval_set, eval_ref, cfg, pad_id, device)
        metrics_file.write(json.dumps({"step": total_steps, **eval_after}) + "\n")
        log(f"held-out after training  ({len(eval_set)} pairs): {format_eval(eval_after)}")
    metrics_file.close()
    final = out / "final"
    if cfg.lora_r and cfg.merge_lora:
        policy = policy.merge_and_unload()  # a plain transformers model again, adapters folded in
    policy.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    log(f"saved {final} (load it with AutoModelForCausalLM.from_pretrained); metrics in {out / 'metrics.jsonl'}")
    return TrainResult(out, total_steps, eval_before, eval_after, final, start_step)


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric lines of steps after `step` (written by a run that died before its next checkpoint)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")


def cache_reference(config: TrainConfig | None = None, log=print, **overrides) -> None:
    """`dpokit cache-ref`: compute (or find) the reference log-probs a `train` with the same options
    would use, and stop. Training then starts without loading or running the reference."""
    cfg = TrainConfig.from_dict({**(config.to_dict() if config else {}), **overrides})
    if cfg.online:
        raise ValueError("nothing to cache: online training (grpo, --online-dpo) samples new completions every step")
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    unpaired = any(OBJECTIVES[n].data == "unpaired" for n in cfg.loss_names)
    if unpaired or cfg.sync_ref_every or not cfg.ref_cache:
        raise ValueError("nothing to cache: kto, TR-DPO (--sync-ref-every) and --no-ref-cache run the reference live")
    train_set, eval_set = load_data(cfg, tokenizer, unpaired, log)
    policy = load_model(cfg.model, device, cfg.allow_pickle, cfg.trust_remote_code)
    prepare_reference(cfg, policy, tokenizer, train_set, eval_set, unpaired, device, tokenizer.pad_token_id, log)


def add_lora(policy, cfg: TrainConfig, log):
    """Wrap the policy in PEFT LoRA adapters; only they train (B starts at 0, so π = π_ref at step 0)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModelError("--lora-r needs peft: pip install 'dpokit[lora]'") from None
    targets = cfg.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    disable_dropout(policy)  # the base stays deterministic; only the LoRA path gets --lora-dropout
    policy = get_peft_model(policy, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                               target_modules=targets, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    log(f"LoRA r={cfg.lora_r}: training {trainable:,} of {total:,} parameters ({trainable / total:.2%})")
    return policy.train(cfg.lora_dropout > 0)  # train mode only to switch the LoRA dropout on


def disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


@torch.no_grad()
def sync_reference(reference, policy, alpha: float) -> None:
    """TR-DPO (Gorbatovski 2024) soft update: π_ref ← α·π + (1 − α)·π_ref."""
    for ref_param, param in zip(reference.parameters(), policy.parameters()):
        ref_param.mul_(1 - alpha).add_(param, alpha=alpha)


def run_eval(policy, eval_set, eval_ref, cfg: TrainConfig, pad_id: int, device) -> dict[str, float]:
    with compute_precision(device, cfg.dtype):
        return evaluate_pairs(policy, eval_set, eval_ref, cfg, pad_id, device)


def format_eval(m: dict[str, float]) -> str:
    loss = f"loss {m['eval/loss']:.4f}, " if "eval/loss" in m else ""
    return (f"implicit-reward accuracy {m['eval/rewards/accuracies']:.3f}, margin {m['eval/rewards/margins']:+.3f}, "
            f"{loss}chosen log-prob shift {m['eval/logps/chosen_shift']:+.2f}, "
            f"rejected {m['eval/logps/rejected_shift']:+.2f}")
