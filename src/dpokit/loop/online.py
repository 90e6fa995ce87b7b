"""Online training on the policy's own samples: GRPO, RLOO, PPO (its step in loop/ppo.py), online DPO and
iterative DPO.

Every step, top to bottom:
  1. the step's prompts: batch_size × grad_accum of them, in an order that is a pure function of (seed, epoch)
     as in the offline loop;
  2. num_generations completions of each, sampled from the *current* policy with dpokit's KV-cache sampler
     (eval mode; the sampling seed is a function of (seed, step), so a run is reproducible);
  3. their rewards from --reward (a weighted sum when several);
  4. GRPO (objectives/grpo.py; Shao et al. 2024, arXiv:2402.03300): group-relative advantages; per-token
     log-probs of the sampled tokens under π_old (one no-grad teacher-forced pass) and, when kl_coef > 0,
     under π_ref — all three at the sampling temperature, softmax(logits / T), as TRL; then grpo_iterations (μ) optimizer updates over the sampled batch, each accumulated over
     micro-batches of batch_size prompts' groups.
     RLOO (objectives/rloo.py; Ahmadian et al. 2024, arXiv:2402.14740): the same step with leave-one-out
     advantages of rewards that carry the sequence KL to π_ref, and one clipped ratio per completion.
     PPO (loop/ppo.py, objectives/ppo.py): a value model, GAE, num_ppo_epochs × num_mini_batches updates.
     Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback",
     arXiv:2402.04792): the best and the worst completion of each prompt form a pair (ties skipped and
     counted); one update of the configured paired objective (sigmoid: DPO) on those pairs against the
     reference, through the offline loop's own `paired_step`; with --sync-ref-every N (TR-DPO) the reference
     then moves to α·π + (1 − α)·π_ref after every N-th step;
  5. one line of metrics.jsonl (reward, advantages, KL, lengths, clipping, generation time and share).
At the end final/ is saved as in the offline loop. Under torchrun (DDP) each rank samples and scores its share
of the step's prompts and the updates are the one-process updates over every rank's completions
(loop/online_dist.py).

--rounds K (iterative DPO, loop/iterative.py): K rounds of (pairs file sampled from the current policy →
offline training on it, starting from the current policy). The reference of a round is the policy the round
starts from — the offline loop's default, as in Self-Rewarding LMs (Yuan et al. 2024, arXiv:2401.10020) where
M_{t+1} is DPO-trained from M_t — so the KL to the original model can grow with every round; --ref-model pins
one reference for all rounds instead. --sync-ref-every N moves a round's reference as in any offline run.
"""

from __future__ import annotations

import copy
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

from dpokit.batches import TokenizedPair, pad_rows
from dpokit.config import TrainConfig
from dpokit.data import DataError, builtin_path, load_prompts
from dpokit.evaluation.rewards import combine
from dpokit.distributed import any_across, start
from dpokit.generation.sample import prompt_token_ids
from dpokit.logprobs import compute_precision, sequence
from dpokit.loop.checkpoint import check_writable
from dpokit.loop.online_dist import ONE, Shard, draw, step_record
from dpokit.loop.online_eval import OnlineEval, cap_prompts, eval_prompts_path, format_online_eval
from dpokit.loop.online_resume import save_online, start_online
from dpokit.loop.reference import AdaptersOff, load_ref_model, reference_forward, sync_reference
from dpokit.loop.schedule import BatchSchedule
from dpokit.loop.steps import NonFiniteError, paired_step
from dpokit.loop.train import run_steps
from dpokit.loop.trackers import open_metrics
from dpokit.loop.update import update
from dpokit.loop.result import TrainResult
from dpokit.models.lora import add_lora, disable_dropout
from dpokit.models import load_model, load_tokenizer
from dpokit.models.load import keep_master_copy, save_final, stalled_weights_note, torch_dtype, warn_half_on_cpu
from dpokit.objectives import OBJECTIVES, OnlineInputs, needs_reference
from dpokit.objectives.grpo import SEQUENCE_STATS, group_advantages, normalizer
from dpokit.objectives.rloo import rloo_advantages
from dpokit.generation.pairs import select_pairs


def train_online(cfg: TrainConfig, log=print, method=None, sampler=draw) -> TrainResult:
    """`dpokit train --loss grpo|rloo` or `--online-dpo` (module docstring). Called by loop/run.py's `train`; under
    torchrun (or in a process group the caller made) this process trains its share (loop/online_dist.py).

    `method` (loop/ppo.py's `ppo_method`, which run.py passes for --loss ppo): (cfg, policy, tokenizer, device,
    log) → (step function with grpo_step's signature, the trained parameters, optimizer updates per step[, the
    other trained models to checkpoint, name → module]); the default is GRPO's and RLOO's `grpo_step` or
    `online_dpo_step` on the policy's parameters. The steps run in the offline loop's `run_steps` (non-finite
    handling, --eval-every, --save-every, SIGINT/SIGTERM checkpoint); checkpoints and resume: loop/online_resume.py,
    held-out evaluation: loop/online_eval.py. `sampler`: (policy, tokenizer, this rank's prompts of the step, cfg,
    step, rank) → Samples; online_dist.draw samples the policy (tests inject fixed completions here)."""
    shard = Shard(start(False, cfg.device))
    try:
        return _train_online(cfg, log if shard.is_main else (lambda *a, **k: None), method, sampler, shard)
    finally:
        shard.close()


def _train_online(cfg: TrainConfig, log, method, sampler, shard: Shard) -> TrainResult:
    device = shard.ctx.device(cfg.device)
    torch.manual_seed(cfg.seed)  # the same on every rank: LoRA's and PPO's fresh weights agree
    random.seed(cfg.seed)
    out = Path(cfg.output_dir)
    if shard.is_main:
        check_writable(cfg.output_dir, 0)
        (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")

    tokenizer, prompts, reward_fn, policy, reference = _load_online(cfg, device, log)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    step_fn, params, updates_per_step, *extra = (method or _group_method)(cfg, policy, tokenizer, device, log)
    extra_models = extra[0] if extra else {}
    # rank 0 evaluates, as one process would; its reference samples are drawn before resume loads weights
    evaluator = _online_eval(cfg, tokenizer, reward_fn, pad_id, policy, reference, log) if shard.is_main else None

    # ---- schedule: a step = one sampled batch of batch_size × grad_accum prompts (per process), in the offline
    # loop's order; GRPO and RLOO make μ optimizer updates on it, PPO num_ppo_epochs × num_mini_batches
    order = BatchSchedule(len(prompts), cfg.batch_size * shard.world, cfg.grad_accum, cfg.seed, cfg.shuffle)
    steps_per_epoch = order.steps_per_epoch
    total_steps = order.total_steps(cfg.epochs, cfg.max_steps)
    shard.check_shares(order, total_steps)
    shard.order = order  # PPO puts every rank's rows back in the one-process order (loop/ppo.py)
    optimizer, scheduler, start_step = start_online(cfg, policy, reference, extra_models, params,
                                                    total_steps * updates_per_step, device, log, shard)
    final_bytes = sum(p.numel() for p in policy.parameters()) * torch_dtype(cfg.model_dtype).itemsize
    if shard.is_main:
        check_writable(cfg.output_dir, int(final_bytes * 1.1), "the final model")  # in --model-dtype, plus 10 %

    method = f"online {cfg.loss}" if cfg.online_dpo else cfg.loss
    if cfg.importance_sampling_level == "sequence" and cfg.grpo_aggregation != "grpo":
        log(f"note: GSPO's sequence ratio under --grpo-aggregation {cfg.grpo_aggregation} weighs each completion "
            "by its length; the paper aggregates per sequence (--grpo-aggregation grpo)")
    where = f"{shard.world} processes (DDP, {cfg.batch_size} prompts each per micro-batch)" if shard.world > 1 \
        else str(device)
    log(f"training {method} for {total_steps - start_step} steps × {order.micro_size * cfg.grad_accum} prompts × "
        f"{cfg.num_generations} samples ({len(prompts)} prompts, {steps_per_epoch} steps/epoch) on {where}")

    def take_step(step: int) -> dict:
        t0 = time.perf_counter()
        samples = sampler(policy, tokenizer, [prompts[i] for i in shard.step_prompts(order, step)], cfg, step,
                          shard.rank)
        t_reward = time.perf_counter()
        rewards = reward_fn([samples.prompt_of(i) for i in range(len(samples.texts))], samples.texts)
        reward_s = time.perf_counter() - t_reward
        # a NonFiniteError goes to run_steps: not this update (with μ > 1 the batch's earlier ones stay)
        record = step_fn(policy, reference, samples, rewards, cfg, optimizer, scheduler, pad_id, device, step,
                         shard=shard)
        return step_record(cfg, step, steps_per_epoch, record, *shard.view(samples, rewards, reward_s),
                           time.perf_counter() - t0)

    metrics_file = open_metrics(cfg, out, start_step, shard.is_main)  # metrics.jsonl and --report-to's trackers
    run_steps(cfg, start_step, total_steps, method, take_step,
              (lambda: evaluator(policy, reference) if evaluator else {}) if cfg.eval_every else None,
              lambda step: save_online(cfg, step, policy, reference, extra_models, tokenizer, optimizer, scheduler,
                                       device, shard), metrics_file,
              lambda r: {"reward": f"{r['reward']:.3f}", "loss": f"{r['loss']:.4f}"}, optimizer, log,
              show=cfg.progress and shard.is_main, stop_all=lambda received: any_across(received, shard.ctx))
    eval_after = None
    if evaluator:
        eval_after = evaluator(policy, reference)
        metrics_file.write_record({"step": total_steps, **eval_after})
        log(f"held-out after training ({len(evaluator.prompts)} prompts): {format_online_eval(eval_after)}")
    if metrics_file:
        metrics_file.close()
    final = out / "final"
    if shard.is_main:
        if cfg.lora_r and cfg.merge_lora:
            policy = policy.merge_and_unload()  # a plain transformers model again, adapters folded in
        save_final(policy, final, cfg)  # in --model-dtype, config.json saying so (LoRA: the adapter alone)
        tokenizer.save_pretrained(final)
    shard.ctx.barrier()  # no rank exits before final/ is written
    loader = "PeftModel.from_pretrained(base, final)" if cfg.lora_r and not cfg.merge_lora else \
        "AutoModelForCausalLM.from_pretrained"  # a LoRA run without --merge-lora saves the adapter alone
    log(f"saved {final} (load it with {loader}); metrics in {out / 'metrics.jsonl'}")
    return TrainResult(out, total_steps, None, eval_after, final, start_step)


def _group_method(cfg: TrainConfig, policy, tokenizer, device, log):
    """train_online's default `method`: GRPO's and RLOO's group step (μ updates per step) or online DPO's (one)."""
    if cfg.online_dpo:
        return online_dpo_step, policy.parameters(), 1
    return grpo_step, policy.parameters(), cfg.grpo_iterations


def _load_online(cfg: TrainConfig, device, log):
    """(tokenizer, prompts, reward function, policy, reference or None) of an online run, the policy set up as
    the offline loop sets it up (fp32 master copy, checkpointing in train mode with dropout zeroed)."""
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    prompts = load_online_prompts(cfg, tokenizer, log)
    reward_fn = combine(cfg.reward_specs, cfg.reward_weight_values, str(device))
    warn_half_on_cpu(device, cfg.model_dtype, log)
    policy = load_model(cfg.model, device, cfg.allow_pickle, cfg.trust_remote_code, cfg.model_dtype)
    policy.eval()  # dropout off: log π_θ − log π_old must compare the same deterministic function
    if cfg.lora_r:  # before the reference: a LoRA run's is this very model with its adapters off (AdaptersOff)
        policy = add_lora(policy, cfg, log)  # train mode only with --lora-dropout; sample() runs in eval mode
    reference = load_reference(cfg, policy, tokenizer, device, cfg.kl_coef > 0 if not cfg.online_dpo else
                               needs_reference(cfg.loss_names), log)
    keep_master_copy(policy, cfg)  # as the offline loop: the reference copy stays in --model-dtype (LoRA: no-op)
    if cfg.pure_half:
        log(stalled_weights_note(policy, cfg))
    if cfg.gradient_checkpointing:  # as the offline loop: checkpoint in train mode, with every dropout zeroed
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not cfg.lora_r:  # (add_lora already zeroed the base's dropout and keeps --lora-dropout)
            disable_dropout(policy)
        policy.train()
    return tokenizer, prompts, reward_fn, policy, reference


def _online_eval(cfg: TrainConfig, tokenizer, reward_fn, pad_id: int, policy, reference, log) -> OnlineEval | None:
    """The held-out evaluation of loop/online_eval.py, its reference samples drawn now (from the starting model), or
    None without eval prompts."""
    path = eval_prompts_path(cfg)
    if path is None:
        return None
    prompts = cap_prompts(load_online_prompts(cfg, tokenizer, log, path, "eval prompts"), cfg)
    log(f"held-out evaluation: {len(prompts)} prompts × 1 sample, after training"
        + (f" and every {cfg.eval_every} steps" if cfg.eval_every else ""))
    return OnlineEval(cfg, tokenizer, prompts, reward_fn, pad_id).prepare(reference if reference is not None
                                                                          else policy)


def grpo_step(policy, reference, samples, rewards, cfg, optimizer, scheduler, pad_id, device, step,
              shard: Shard = ONE) -> dict:
    """GRPO's and RLOO's step: π_old and π_ref per-token log-probs once, the advantages, then μ updates on the
    sampled batch. RLOO (objectives/rloo.py) differs in its advantages (leave-one-out, with the KL to π_ref in
    the reward rather than in the loss) and its loss (one ratio per completion, divided by the completions).
    mask_truncated_completions (TRL 1.16's; DAPO's overlong filtering, Yu 2025): a completion that stopped at
    max_new_tokens without EOS keeps its reward in its group's advantages, as TRL, but its tokens' mask is 0:
    out of the loss, the KL, the token count of the divisor and the logged token means. `shard`: this rank's
    part of a torchrun run, whose advantages, divisor and metrics are those of every rank's rows."""
    rloo = cfg.loss_names == ["rloo"]
    n_rows = len(samples.texts)
    rows = list(zip(samples.prompt_ids, samples.completion_ids))
    per_micro = cfg.batch_size * cfg.num_generations  # whole groups per micro-batch
    micro = [slice(i, min(i + per_micro, n_rows)) for i in range(0, n_rows, per_micro)]
    if cfg.mask_truncated_completions and samples.truncated is None:
        raise ValueError("mask_truncated_completions: these samples do not say which completions were truncated")
    cut = samples.truncated if cfg.mask_truncated_completions else [False] * n_rows
    kept = torch.tensor([[0.0 if c else 1.0] for c in cut], device=device)  # [B, 1]

    def masked(m: slice, out: tuple) -> tuple:  # (logps, mask, …) of micro-batch m, truncated rows' mask 0
        return (out[0], out[1] * kept[m], *out[2:])
    tokens = sum(n for n, c in zip(samples.lengths, cut) if not c)
    with torch.no_grad():
        # With μ = 1 the weights are still π_old when the loss is taken, so π_old's log-probs would be exactly
        # the pass's own (detached): skip that forward pass, as TRL does, unless RLOO's reward needs them.
        need_old = cfg.grpo_iterations > 1 or rloo and reference is not None
        old = [masked(m, token_logps(policy, rows[m], pad_id, device, cfg)) for m in micro] if need_old else None
        ref = [token_logps(reference, rows[m], pad_id, device, cfg)[0] for m in micro] if reference is not None \
            else None
    record = {}
    scores = shard.cat(torch.tensor(rewards, dtype=torch.float64))  # every rank's rows: the whole batch's
    if rloo:
        kl = None if ref is None else \
            shard.cat(torch.cat([((o - r) * mask).sum(1) for (o, mask), r in zip(old, ref)]).double().cpu())
        advantages, _ = rloo_advantages(scores, cfg.num_generations, kl, cfg.kl_coef)
        divisor = float(len(scores))  # a mean over completions
        if kl is not None:
            # kl per token over the completion tokens, as GRPO's (there k3, here k1); kl_seq per completion
            n_kept = shard.sum({"kept": sum(mask.sum().item() for _, mask in old)})["kept"]  # 0: all masked
            record = {"kl": kl.sum().item() / max(n_kept, 1.0), "kl_seq": kl.mean().item(),
                      "non_score_reward": -cfg.kl_coef * kl.mean().item() + 0.0}  # not -0.0
        ref = None  # RLOO's KL is in the reward, not in the loss
    else:
        advantages = group_advantages(scores, cfg.num_generations, cfg.scale_rewards)
        divisor = normalizer(cfg.grpo_aggregation, shard.sum({"tokens": tokens})["tokens"], len(scores),
                             cfg.max_new_tokens)  # of the whole batch
    record["advantage_std"] = advantages.std().item()
    advantages = advantages[shard.mine(n_rows)].float().to(device)
    divisor /= shard.world  # DDP averages the ranks' gradients: each rank's share of the batch's sum
    trained = shard.trained(policy)  # DDP-wrapped under torchrun
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, float] = defaultdict(float)  # what each stat is a mean over: tokens, or completions
    for _ in range(cfg.grpo_iterations):
        for k, m in enumerate(micro):
            with shard.sync(last=k == len(micro) - 1):
                # the entropy of π_θ(· | prefix) at each token: from the same pass's logits (no_grad, TRL's metric)
                logps, mask, entropy = masked(m, token_logps(trained, rows[m], pad_id, device, cfg, entropy=True))
                loss, stats = OBJECTIVES[cfg.loss_names[0]].compute(OnlineInputs(
                    logps, logps.detach() if cfg.grpo_iterations == 1 else old[k][0], advantages[m], mask,
                    None if ref is None else ref[k], divisor), cfg)
                if shard.check_finite and not torch.isfinite(loss):
                    raise NonFiniteError(f"step {step + 1}: non-finite {cfg.loss} loss")
                loss.backward()
            sums["loss"] += loss.item() / shard.world  # micro-batch losses add up to the batch's (shared divisor)
            # RLOO's stats and GSPO's ratio stats are per completion; GRPO's, the KL and the entropy per token
            per_completion = set(stats) if rloo else set(SEQUENCE_STATS) \
                if cfg.importance_sampling_level == "sequence" else set()
            stats["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
            for key, value in stats.items():
                weight = mask.shape[0] if key in per_completion else mask.sum().item()
                sums[key] += value.item() * weight
                counts[key] += weight
        done = update(policy.parameters(), optimizer, scheduler, cfg.max_grad_norm, step=step + 1)
    mu = cfg.grpo_iterations
    sums, counts = shard.sum(sums), shard.sum(counts)
    record.update({"loss": sums.pop("loss") / mu, **{k: v / counts[k] if counts[k] else 0.0
                                                      for k, v in sums.items()}})
    record.update({"lr": done.lr, "grad_norm": done.grad_norm})
    return record  # loss, clip fractions, ratio, entropy and GRPO's kl: means over the μ updates


def online_dpo_step(policy, reference, samples, rewards, cfg, optimizer, scheduler, pad_id, device, step,
                    shard: Shard = ONE) -> dict:
    """Best vs worst completion of each prompt → one update of the paired objective(s) on those pairs (under
    torchrun: each rank's pairs, the gradient and the metrics those of all of them)."""
    pairs, left_out = best_vs_worst(samples, rewards, step)
    counts = {k: int(v) for k, v in shard.sum({"pairs": len(pairs), **left_out}).items()}
    record = counts  # every group tied: nothing to learn from this batch
    if counts["pairs"]:
        sums: dict[str, float] = defaultdict(float)
        # a rank without a pair of its own runs a weight-0 one: DDP's reduction waits for every rank
        micro = [pairs[i:i + cfg.batch_size] for i in range(0, len(pairs), cfg.batch_size)] or [[TokenizedPair(
            samples.prompt_ids[0], samples.completion_ids[0], samples.completion_ids[-1], "(weight 0)")]]
        weight, trained = (1.0 if pairs else 0.0), shard.trained(policy)
        for k, part in enumerate(micro):
            with shard.sync(last=k == len(micro) - 1):
                micro_sums, _ = paired_step(trained, reference, part, cfg, pad_id, device,
                                            counts["pairs"] / shard.world, step + 1, weight=weight,
                                            check_finite=shard.check_finite)
            for key, value in micro_sums.items():
                sums[key] += value * weight
        done = update(policy.parameters(), optimizer, scheduler, cfg.max_grad_norm, step=step + 1)
        record = {**{k: v / counts["pairs"] for k, v in shard.sum(sums).items()}, **counts, "lr": done.lr,
                  "grad_norm": done.grad_norm}
    if cfg.sync_ref_every and (step + 1) % cfg.sync_ref_every == 0:  # TR-DPO, as in the offline loop
        sync_reference(reference, policy, cfg.sync_ref_alpha)
    return record


def best_vs_worst(samples, rewards, step: int) -> tuple[list[TokenizedPair], dict[str, int]]:
    """One pair per prompt, selected as generation/pairs.pair_up selects (highest vs lowest reward; ties and equal
    texts left out and counted), but kept as the sampled token ids: re-tokenizing the decoded text can give
    other ids than the ones the policy emitted."""
    chosen, stats = select_pairs(samples, rewards, "best-worst")
    pairs = [TokenizedPair(samples.prompt_ids[hi], samples.completion_ids[hi], samples.completion_ids[lo],
                           f"step {step + 1} prompt {p}") for p, hi, lo in chosen]
    return pairs, {"ties": stats.ties, "identical": stats.identical}


def token_logps(model, rows: list[tuple[list[int], list[int]]], pad_id: int, device, cfg, entropy: bool = False):
    """Per-token log-probs of each row's completion tokens, [B, T] right-padded, and the mask of real tokens;
    entropy=True: a third tensor, the entropy of the (tempered) distribution at each of them, detached.

    Under softmax(logits / cfg.temperature), the distribution the tokens were sampled from, for π_θ, π_old and
    π_ref alike (as TRL 1.16's GRPOTrainer): at T ≠ 1, T = 1 log-probs would make ρ and the KL those of a model
    other than the one that sampled, and μ = 1 would no longer be on-policy."""
    batch = {k: v.to(device) for k, v in pad_rows(rows, pad_id).items()}
    model, adapters = reference_forward(model)  # a LoRA run's reference: the policy with its adapters off
    with compute_precision(device, cfg.dtype), adapters:  # (a DDP-wrapped policy: through its forward)
        tok = sequence.token_logps(model, batch, temperature=cfg.temperature, with_entropy=entropy)
    shape, index = (len(rows), max(len(c) for _, c in rows)), (tok.rows, tok.positions)
    logps = tok.values.new_zeros(shape).index_put(index, tok.values)  # keeps the graph to tok.values
    mask = torch.zeros(shape, device=tok.values.device).index_put(index, torch.ones_like(tok.values).detach())
    if entropy:
        return logps, mask, torch.zeros(shape, device=mask.device, dtype=tok.entropy.dtype).index_put(index,
                                                                                                    tok.entropy)
    return logps, mask


def load_online_prompts(cfg: TrainConfig, tokenizer, log, path: str | None = None, what: str = "prompts") -> list:
    """`path` (default: --prompts, else the built-in sentiment prompts), without those too long to sample from: more
    than max_prompt_length tokens, or leaving fewer than max_new_tokens of max_length."""
    path = path or cfg.prompts or builtin_path("sentiment_train")
    prompts, report = load_prompts(path, cfg.on_bad_row)
    log(f"{what}: {report.summary()}")
    limit = min(cfg.max_prompt_length or cfg.max_length, cfg.max_length - cfg.max_new_tokens)
    kept = [p for p in prompts if len(prompt_token_ids(p, tokenizer)) <= limit]
    if len(kept) < len(prompts):
        log(f"  left out {len(prompts) - len(kept)} prompts longer than {limit} tokens")
    if not kept:
        raise DataError(path, None, None, f"no prompt fits in {limit} tokens (max_prompt_length, max_length − "
                        "max_new_tokens)", "empty")
    return kept


def load_reference(cfg: TrainConfig, policy, tokenizer, device, needed: bool, log):
    """The frozen reference: --ref-model, else a copy of the starting policy (a LoRA policy: itself with its
    adapters off, `AdaptersOff`, no copy); None (nothing loaded) if unused."""
    if not needed:
        log("no reference model loaded (" + ("kl_coef = 0" if not cfg.online_dpo else f"loss {cfg.loss} is "
                                              "reference-free") + ")")
        return None
    if cfg.ref_model:
        return load_ref_model(cfg, tokenizer, device, policy)
    if cfg.lora_r:
        return AdaptersOff(policy)
    return copy.deepcopy(policy).requires_grad_(False).eval()
