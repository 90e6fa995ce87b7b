"""The DPO training loop, top to bottom: load → tokenize → evaluate → train → evaluate → save.

Everything a step does is visible here: reference log-probs under no_grad, policy log-probs with grad,
the loss, backward over grad_accum micro-batches, clipping, the optimizer and schedule steps, metrics.
The data order is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpokit.batches import TokenizedPair, collate, tokenize_pairs
from dpokit.config import TrainConfig
from dpokit.data import builtin_path, load_pairs
from dpokit.evaluation import evaluate_pairs, reference_logps
from dpokit.logprobs import pair_logps
from dpokit.loop.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from dpokit.loop.optim import build_optimizer, build_scheduler
from dpokit.models import load_model, load_tokenizer
from dpokit.models.load import ModelError
from dpokit.objectives import combined_loss, needs_reference, rewards


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    eval_before: dict | None
    eval_after: dict | None
    final_dir: Path


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient; the step was not applied."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_data(cfg: TrainConfig, tokenizer, log) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """Read, check and tokenize the training and held-out pairs, reporting what happened to every row."""
    train_path = cfg.data or builtin_path("helpful_train")
    eval_path = cfg.eval_data or (None if cfg.data else builtin_path("helpful_eval"))
    out = []
    for role, path in (("train", train_path), ("eval", eval_path)):
        if path is None:
            out.append([])
            continue
        pairs, report = load_pairs(path, cfg.on_bad_row)
        tokenized, tok_report = tokenize_pairs(pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
        log(f"{role} data: {report.summary()}")
        log(f"  {tok_report.summary()}")
        if not tokenized:
            raise ValueError(f"{path}: no pair survived tokenization ({tok_report.summary()})")
        out.append(tokenized)
    return out[0], out[1]


def train(config: TrainConfig | None = None, log=print, **overrides) -> TrainResult:
    """Train a policy with DPO as configured; `overrides` are TrainConfig fields (train(beta=0.5, ...))."""
    cfg = TrainConfig.from_dict({**(config.to_dict() if config else {}), **overrides})
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")

    # ---- data and models --------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model)
    train_set, eval_set = load_data(cfg, tokenizer, log)
    pad_id = tokenizer.pad_token_id
    policy = load_model(cfg.model, device)
    with_ref = needs_reference(cfg.loss_names)
    reference = None
    if cfg.ref_model:
        if load_tokenizer(cfg.ref_model).get_vocab() != tokenizer.get_vocab():
            raise ModelError(f"--ref-model {cfg.ref_model} has a different tokenizer from --model {cfg.model}; "
                             "log-prob ratios need the same token ids")
        reference = load_model(cfg.ref_model, device)
    elif with_ref:
        reference = copy.deepcopy(policy)  # the starting policy, frozen
    else:
        log(f"loss {cfg.loss} is reference-free: no reference model loaded")
    if reference is not None:
        reference.requires_grad_(False)
        reference.eval()
    # Dropout stays off (eval mode): log π − log π_ref must compare the same deterministic function.
    policy.eval()

    # ---- schedule ---------------------------------------------------------------------------------
    n = len(train_set)
    micro_per_epoch = math.ceil(n / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    def step_batches(step: int) -> list[list[int]]:
        """Row indices of each micro-batch of optimizer step `step`, from (seed, epoch) alone."""
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        micro = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        return micro[k * cfg.grad_accum:(k + 1) * cfg.grad_accum]

    optimizer = build_optimizer(policy.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, total_steps, cfg.lr_scheduler)
    # Held-out log-probs of the starting reference, computed once; without a reference model, the
    # starting policy is the reference (so reference-free runs report the same eval/rewards too).
    eval_ref = None
    if eval_set:
        eval_ref = reference_logps(reference or policy, eval_set, cfg.eval_batch_size, pad_id, device,
                                   cfg.ld_alpha)
    start_step = 0
    if cfg.resume:
        ckpt = find_checkpoint(cfg.output_dir, cfg.resume)
        start_step, eval_ref = load_checkpoint(ckpt, policy, optimizer, scheduler, reference, eval_ref)
        log(f"resumed from {ckpt} at step {start_step}")

    # ---- held-out evaluation before training ---------------------------------------------------------
    eval_before = None
    if eval_set:
        eval_before = run_eval(policy, eval_set, eval_ref, cfg, pad_id, device)
        log(f"held-out {'before training' if not start_step else 'at resume'} ({len(eval_set)} pairs): "
            f"{format_eval(eval_before)}")

    # ---- training -------------------------------------------------------------------------------
    log(f"training {total_steps - start_step} steps × {cfg.batch_size * cfg.grad_accum} pairs "
        f"({n} pairs, {steps_per_epoch} steps/epoch) on {device}")
    metrics_file = open(out / "metrics.jsonl", "a" if cfg.resume else "w", encoding="utf-8")
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not cfg.progress,
               desc="dpo", dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        micro = step_batches(step)
        step_pairs = sum(len(m) for m in micro)
        sums: dict[str, float] = defaultdict(float)
        tokens = 0
        for idx in micro:
            rows = [train_set[i] for i in idx]
            batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
            ref = None
            if reference is not None and with_ref:
                with torch.no_grad():
                    ref = pair_logps(reference, batch, cfg.ld_alpha)
            pol = pair_logps(policy, batch, cfg.ld_alpha, cfg.use_weighting)
            losses, extra = combined_loss(cfg.loss_names, cfg.loss_weight_values, pol, ref, cfg)
            # Sum/step_pairs per micro-batch: the accumulated gradient is that of the mean over the step.
            loss = losses.sum() / step_pairs
            if not torch.isfinite(loss):
                raise NonFiniteError(f"step {step + 1}: non-finite loss on rows {[r.source for r in rows]}")
            loss.backward()
            r_chosen, r_rejected = rewards(pol, ref, cfg)
            sums["loss"] += losses.detach().sum().item()
            sums["rewards/chosen"] += r_chosen.sum().item()
            sums["rewards/rejected"] += r_rejected.sum().item()
            sums["rewards/margins"] += (r_chosen - r_rejected).sum().item()
            sums["rewards/accuracies"] += (r_chosen > r_rejected).float().sum().item()
            sums["logps/chosen"] += pol.chosen.detach().sum().item()
            sums["logps/rejected"] += pol.rejected.detach().sum().item()
            for key, value in extra.items():  # batch means → weighted by the micro-batch's pairs
                sums[key] += value.item() * len(rows)
            tokens += int(batch["attention_mask"].sum())
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
        record.update({"lr": lr, "grad_norm": grad_norm.item(), "pairs_per_s": step_pairs / seconds,
                       "tokens_per_s": tokens / seconds})
        if eval_set and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total_steps:
            record.update(run_eval(policy, eval_set, eval_ref, cfg, pad_id, device))
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                        margin=f"{record['rewards/margins']:.3f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(cfg.output_dir, step + 1, policy, tokenizer, optimizer, scheduler, cfg.to_yaml(),
                            reference if cfg.sync_ref_every else None, eval_ref)
    bar.close()

    # ---- held-out evaluation after training, and the final model ------------------------------------
    eval_after = None
    if eval_set:
        eval_after = run_eval(policy, eval_set, eval_ref, cfg, pad_id, device)
        metrics_file.write(json.dumps({"step": total_steps, **eval_after}) + "\n")
        log(f"held-out after training  ({len(eval_set)} pairs): {format_eval(eval_after)}")
    metrics_file.close()
    final = out / "final"
    policy.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    log(f"saved {final} (load it with AutoModelForCausalLM.from_pretrained); metrics in {out / 'metrics.jsonl'}")
    return TrainResult(out, total_steps, eval_before, eval_after, final)


@torch.no_grad()
def sync_reference(reference, policy, alpha: float) -> None:
    """TR-DPO (Gorbatovski 2024) soft update: π_ref ← α·π + (1 − α)·π_ref."""
    for ref_param, param in zip(reference.parameters(), policy.parameters()):
        ref_param.mul_(1 - alpha).add_(param, alpha=alpha)


def run_eval(policy, eval_set, eval_ref, cfg: TrainConfig, pad_id: int, device) -> dict[str, float]:
    return evaluate_pairs(policy, eval_set, eval_ref, cfg, pad_id, device)


def format_eval(m: dict[str, float]) -> str:
    return (f"implicit-reward accuracy {m['eval/rewards/accuracies']:.3f}, margin {m['eval/rewards/margins']:+.3f}, "
            f"loss {m['eval/loss']:.4f}, chosen log-prob shift {m['eval/logps/chosen_shift']:+.2f}, "
            f"rejected {m['eval/logps/rejected_shift']:+.2f}")
