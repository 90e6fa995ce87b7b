"""`dpokit train-rm`: a Bradley–Terry reward model fitted to a pairs file, the first half of RLHF.

The model is an HF `AutoModelForSequenceClassification` with one label, built from --model's weights (the
embedded SmolLM2 by default, through the same cached safetensors folder `dpokit train` loads) with a fresh
score head (seeded by --seed); its score of a (prompt, completion) is the head's output at the last non-pad
token of the row. Each pair is two rows, prompt+chosen and prompt+rejected, in the padded layout (TRL's); the
loss is objectives/reward_model.py's −log σ(r_c − r_r − m) (+ TRL's centring term).

What a row reads and how it is tokenized is `evaluation.rewards.reward_model_ids` (the chat-rendered
conversation when the tokenizer has a chat template, else prompt + completion text, cut at --max-length from
the end) and batches are `reward_model_batch`'s: exactly what `--reward DIR` computes with final/ (whose
tokenizer keeps model_max_length = --max-length), so a score in training is the score in use.

The run reuses the offline machinery: data files and their errors (data/, --on-bad-row, ranked rows' pairs
kept together), the step order (`BatchSchedule`), the optimizer and schedule, `update`, checkpoints
(--save-every, --keep-last, SIGTERM, `--resume auto` to bit-identical weights) and LoRA (task SEQ_CLS: the
score head trains in full). One process (no torchrun yet).
"""

from __future__ import annotations

import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit.batches.inputs import data_paths, pair_groups
from dpokit.config import ConfigError, TrainConfig
from dpokit.data import DataError, load_pairs
from dpokit.evaluation.rewards import reward_model_batch, reward_model_ids
from dpokit.logprobs import compute_precision
from dpokit.loop.checkpoint import (check_same_run, check_writable, deterministic_kernels,
                                    find_checkpoint, keep_metrics_until, load_training_state, load_weights,
                                    rng_state, save_checkpoint)
from dpokit.loop.optim import build_optimizer, build_scheduler
from dpokit.loop.result import TrainResult, pick_device
from dpokit.loop.schedule import BatchSchedule
from dpokit.loop.steps import NonFiniteError
from dpokit.loop.train import run_steps
from dpokit.loop.trackers import open_metrics
from dpokit.loop.update import update
from dpokit.models import load_tokenizer
from dpokit.models.load import ModelError, keep_master_copy, resolve, save_final, torch_dtype, warn_half_on_cpu
from dpokit.models.lora import add_lora, disable_dropout
from dpokit.objectives.reward_model import bradley_terry_loss


@dataclass
class RewardPair:
    """One pair as the reward model reads it: the token ids of prompt+chosen and of prompt+rejected."""
    prompt: object
    chosen: object
    rejected: object
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float  # 0.0 where the row gives none
    source: str
    group: str | None = None  # a ranked row's pairs stay together (pair_groups)


def load_reward_pairs(path: str, cfg: TrainConfig, tokenizer, role: str, log) -> list[RewardPair]:
    """Read a pairs file (any paired format, ranked rows as their pairs) and tokenize it as the reward model
    reads it; a pair whose two rows are the same ids after truncation carries no preference and is dropped
    (counted)."""
    pairs, report = load_pairs(path, cfg.on_bad_row, ranked_pairs=cfg.ranked_pairs,
                               ultrafeedback_score=cfg.ultrafeedback_score)
    prompts = [p.prompt for p in pairs]
    ids = reward_model_ids(tokenizer, prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    chosen, rejected = ids[:len(pairs)], ids[len(pairs):]
    rows, same = [], []
    for p, c, r in zip(pairs, chosen, rejected):
        if c == r:
            same.append(p.source)
            continue
        rows.append(RewardPair(p.prompt, p.chosen, p.rejected, c, r, p.margin or 0.0, p.source, p.group))
    cut = sum(len(x) >= tokenizer.model_max_length for x in chosen + rejected)
    lengths = [len(x) for x in chosen + rejected] or [0]
    log(f"{role} data: {report.summary()}")
    log(f"  {len(rows)} pairs tokenized for the reward model; {cut} rows cut at --max-length {cfg.max_length}; "
        f"tokens mean/max {sum(lengths) / len(lengths):.0f}/{max(lengths)}"
        + (f"; dropped {len(same)} identical after truncation: {', '.join(same[:5])}" if same else ""))
    if not rows:
        raise DataError(path, None, None, "no pair survived tokenization (chosen and rejected identical after "
                        f"--max-length {cfg.max_length})", "empty")
    return rows


def build_reward_model(cfg: TrainConfig, tokenizer, device):
    """--model's weights under a one-label classifier head, initialised from --seed; pad_token_id set (HF
    finds each row's last real token as the last one that is not the pad id)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    torch.manual_seed(cfg.seed)  # the fresh score head's initial weights
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized", "lm_head unused": expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve(cfg.model, cfg.allow_pickle), num_labels=1, dtype=torch_dtype(cfg.model_dtype),
            use_safetensors=None if cfg.allow_pickle else True, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{cfg.model}: cannot load as a sequence classifier: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval()  # dropout off, as the policy's: a step is a deterministic function


def pair_scores(model, tokenizer, rows: list[RewardPair], device, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [B] of the chosen and of the rejected rows. Each distinct row is computed once, in one right-padded
    batch (chosen rows first, as TRL): a ranked row's completion sits in up to k − 1 of its pairs, which a
    micro-batch mostly holds together (pair_groups; its two ends may cut a row's pairs), and without dropout a
    score depends on the row's ids alone, so the pairs read copies of it — the same losses, and gradients summed
    over the copies (the gather's backward), as scoring every pair's two rows, up to the rounding of another batch
    shape (tests/test_reward_model.py). With dropout active (LoRA's --lora-dropout) every row keeps its own mask."""
    ids = [r.chosen_ids for r in rows] + [r.rejected_ids for r in rows]
    if model.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        where, distinct = list(range(len(ids))), ids
    else:
        first: dict[tuple, int] = {}
        where = [first.setdefault(tuple(x), len(first)) for x in ids]
        distinct = [list(x) for x in first]
    batch = reward_model_batch(tokenizer, distinct, device)
    with compute_precision(device, dtype):
        scores = model(**batch, use_cache=False).logits.squeeze(-1).float()
    scores = scores[torch.tensor(where, device=scores.device)]
    return scores[:len(rows)], scores[len(rows):]


def _losses(cfg: TrainConfig, rows: list[RewardPair], chosen, rejected) -> torch.Tensor:
    margin = torch.tensor([r.margin for r in rows], dtype=torch.float32, device=chosen.device)
    return bradley_terry_loss(chosen, rejected, margin, cfg.center_rewards_coefficient)


@dataclass
class RMRun:
    cfg: TrainConfig
    device: torch.device
    log: object
    tokenizer: object
    train_set: list[RewardPair]
    eval_set: list[RewardPair]
    model: torch.nn.Module
    batches: BatchSchedule
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    scaler: torch.amp.GradScaler | None = None
    fp16_skipped: int = 0  # steps the fp16 scaler skipped for overflowing gradients


def train_reward_model(cfg: TrainConfig, log=print) -> TrainResult:
    """Fit a reward model (run kind REWARD_MODEL: loop/run.py's `train` calls this); final/ works as --reward."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("dpokit train-rm runs in one process (no DDP/FSDP yet): launch it without torchrun")
    with deterministic_kernels(cfg.deterministic):
        return _train(cfg, log)


def _train(cfg: TrainConfig, log) -> TrainResult:
    run = _load(cfg, log)
    total_steps = run.batches.total_steps(cfg.epochs, cfg.max_steps)
    start_step = _start(run, total_steps)
    out = Path(cfg.output_dir)
    eval_before = evaluate(run) if run.eval_set else None
    if eval_before:
        log(f"held-out {'before training' if not start_step else 'at resume'} ({len(run.eval_set)} pairs): "
            + _format(eval_before))
    b = run.batches
    log(f"training a reward model for {total_steps - start_step} steps × {b.micro_size * cfg.grad_accum} pairs "
        f"({b.rows} pairs, {b.steps_per_epoch} steps/epoch) on {run.device}")
    with open_metrics(cfg, out, start_step) as metrics:  # metrics.jsonl and --report-to's trackers
        _train_steps(run, start_step, total_steps, metrics)
        eval_after = evaluate(run) if run.eval_set else None
        if eval_after:
            metrics.write_record({"step": total_steps, **eval_after})
            log(f"held-out after training  ({len(run.eval_set)} pairs): {_format(eval_after)}")
    final = _save_final(run, out / "final")
    log(f"saved {final} (a one-label classifier: AutoModelForSequenceClassification.from_pretrained, or "
        f"--reward {final}); metrics in {out / 'metrics.jsonl'}")
    return TrainResult(out, total_steps, eval_before, eval_after, final, start_step)


def _load(cfg: TrainConfig, log) -> RMRun:
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    check_writable(cfg.output_dir, 0)  # before minutes of loading: a bad --output-dir fails now
    (Path(cfg.output_dir) / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    # the scorer (--reward DIR) cuts rows at model_max_length and pads on the right, as training does
    tokenizer.model_max_length, tokenizer.padding_side = cfg.max_length, "right"
    train_path, eval_path = data_paths(cfg)
    train_set = load_reward_pairs(train_path, cfg, tokenizer, "train", log)
    eval_set = load_reward_pairs(eval_path, cfg, tokenizer, "eval", log) if eval_path else []
    if cfg.memory_check:
        log("memory check: not available for reward-model runs (not modelled yet)")
    warn_half_on_cpu(device, cfg.model_dtype, log)
    model = build_reward_model(cfg, tokenizer, device)
    keep_master_copy(model, cfg)  # fp32 trained weights (and optimizer state) unless --model-dtype fp32 already
    if cfg.lora_r:
        model = add_lora(model, cfg, log, task_type="SEQ_CLS")  # the score head trains in full (modules_to_save)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not cfg.lora_r:
            disable_dropout(model)
        model.train()  # transformers checkpoints only in train mode; dropout is zeroed
    batches = BatchSchedule(len(train_set), cfg.batch_size, cfg.grad_accum, cfg.seed, cfg.shuffle,
                            pair_groups(train_set))
    return RMRun(cfg, device, log, tokenizer, train_set, eval_set, model, batches)


def _start(run: RMRun, total_steps: int) -> int:
    cfg = run.cfg
    check_writable(cfg.output_dir, int(sum(p.numel() for p in run.model.parameters()) * 4 * 3 * 1.1))
    ckpt = find_checkpoint(cfg.output_dir, cfg.resume, run.log) if cfg.resume else None
    if ckpt is not None:
        check_same_run(ckpt, cfg.to_dict())
        load_weights(ckpt, run.model)
    run.optimizer = build_optimizer(run.model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    run.scheduler = build_scheduler(run.optimizer, cfg.warmup_steps, total_steps, cfg.lr_scheduler)
    run.scaler = torch.amp.GradScaler(run.device.type) if cfg.dtype == "fp16" else None
    if ckpt is None:
        return 0
    start_step = load_training_state(ckpt, run.optimizer.load_state_dict, run.scheduler, 1, run.scaler, 0,
                                     run.device)
    run.log(f"resumed from {ckpt} at step {start_step}")
    keep_metrics_until(Path(cfg.output_dir) / "metrics.jsonl", start_step)  # later steps are redone
    return start_step


def _train_steps(run: RMRun, start_step: int, total_steps: int, metrics) -> None:
    run_steps(run.cfg, start_step, total_steps, "reward model", lambda step: optimizer_step(run, step),
              (lambda: evaluate(run)) if run.eval_set else None, lambda step: checkpoint(run, step), metrics,
              lambda r: {"loss": f"{r['loss']:.4f}", "acc": f"{r['accuracy']:.2f}"}, run.optimizer, run.log,
              show=run.cfg.progress)


def optimizer_step(run: RMRun, step: int) -> dict:
    """grad_accum micro-batches of forward and backward (each pair's loss ÷ the step's pairs: the step's mean),
    then one `update`; the step's metrics. Raises NonFiniteError before the update."""
    cfg, t0 = run.cfg, time.perf_counter()
    micro = run.batches.micro_batches(step)
    step_rows = sum(len(m) for m in micro)
    sums: dict[str, float] = defaultdict(float)
    for idx in micro:
        rows = [run.train_set[i] for i in idx]
        chosen, rejected = pair_scores(run.model, run.tokenizer, rows, run.device, cfg.dtype)
        losses = _losses(cfg, rows, chosen, rejected)
        loss = losses.sum() / step_rows
        if not torch.isfinite(loss):
            raise NonFiniteError(f"step {step + 1}: non-finite loss on rows {[r.source for r in rows]}")
        (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        with torch.no_grad():
            sums["loss"] += losses.sum().item()
            sums["accuracy"] += (chosen > rejected).float().sum().item()
            sums["margin"] += (chosen - rejected).sum().item()
            sums["rewards/chosen"] += chosen.sum().item()
            sums["rewards/rejected"] += rejected.sum().item()
            sums["tokens"] += sum(len(r.chosen_ids) + len(r.rejected_ids) for r in rows)
    done = update(run.model.parameters(), run.optimizer, run.scheduler, cfg.max_grad_norm, run.scaler, step + 1,
                  lambda: [run.train_set[i].source for m in micro for i in m])
    if done.skipped:  # fp16 overflow: expected now and then, the scaler adapts
        run.fp16_skipped += 1
        return {"step": step + 1, "fp16_overflow_skipped": run.fp16_skipped, "loss_scale": done.loss_scale}
    seconds = time.perf_counter() - t0
    tokens = sums.pop("tokens")
    record = {"step": step + 1, "epoch": round((step + 1) / run.batches.steps_per_epoch, 4)}
    record.update({k: v / step_rows for k, v in sums.items()})
    record.update({"lr": done.lr, "grad_norm": done.grad_norm, "pairs_per_s": step_rows / seconds,
                   "tokens_per_s": tokens / seconds})
    return record


@torch.no_grad()
def evaluate(run: RMRun) -> dict[str, float]:
    """eval/loss (the training loss, margins and centring included), eval/accuracy (share of pairs with
    r_c > r_r; a tie counts as wrong, as TRL), eval/margin and the mean rewards, over --eval-data."""
    training = run.model.training
    run.model.eval()
    sums: dict[str, float] = defaultdict(float)
    size = run.cfg.eval_batch_size
    for i in range(0, len(run.eval_set), size):
        rows = run.eval_set[i:i + size]
        chosen, rejected = pair_scores(run.model, run.tokenizer, rows, run.device, run.cfg.dtype)
        sums["eval/loss"] += _losses(run.cfg, rows, chosen, rejected).sum().item()
        sums["eval/accuracy"] += (chosen > rejected).float().sum().item()
        sums["eval/margin"] += (chosen - rejected).sum().item()
        sums["eval/rewards/chosen"] += chosen.sum().item()
        sums["eval/rewards/rejected"] += rejected.sum().item()
    run.model.train(training)
    return {k: v / len(run.eval_set) for k, v in sums.items()}


def _format(metrics: dict) -> str:
    return (f"accuracy {metrics['eval/accuracy']:.3f}, loss {metrics['eval/loss']:.4f}, "
            f"margin {metrics['eval/margin']:+.4f}")


def checkpoint(run: RMRun, step_done: int) -> Path:
    return save_checkpoint(run.cfg.output_dir, step_done, run.model, run.tokenizer, run.optimizer.state_dict(),
                           run.scheduler, run.cfg.to_yaml(), None, run.cfg.keep_last, None, 1,
                           run.scaler.state_dict() if run.scaler else None, [rng_state(run.device)],
                           run.device.type)


def _save_final(run: RMRun, final: Path) -> Path:
    """A plain one-label classifier in --model-dtype (LoRA always merged: --reward loads whole models only)
    and its tokenizer (model_max_length = --max-length, right padding)."""
    model = run.model.merge_and_unload() if run.cfg.lora_r else run.model
    save_final(model, final, run.cfg)
    run.tokenizer.save_pretrained(final)
    return final
