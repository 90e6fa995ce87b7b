"""PPO, the classic RLHF step (`dpokit train --loss ppo --reward R`; Ziegler et al. 2019, arXiv:1909.08593;
Stiennon et al. 2020, arXiv:2009.01325; Ouyang et al. 2022, arXiv:2203.02155; TRL's PPOTrainer as it was before
TRL removed it). The objective's tensor functions are objectives/ppo.py; the loop around this step (prompts,
sampling, rewards, metrics, final/) is loop/online.py's `train_online`, which run.py hands `ppo_method`.

Four models, as in the papers: the policy π_θ (trained), the reference π_ref (frozen; loaded when kl_coef > 0),
the reward model R (--reward: any reward spec, frozen) and the value model V (trained).

The value model is a separate model, as TRL's: a sequence-classification backbone with a one-output head
(`AutoModelForSequenceClassification`, num_labels = 1), read at every completion token rather than only at the
last one. It starts
  * from the reward model, when --reward is a single classifier folder with one label that reads the policy's
    tokens (same vocabulary): TRL's recipe (the value then starts near the score of the whole completion);
  * else from the policy's own weights with a fresh head, drawn from N(0, initializer_range²) seeded by --seed.
A reward folder with several labels and no #LABEL is refused: which logit is the reward is then a guess.
Policy and value model share one optimizer (one parameter list, one schedule, one gradient-norm clip over
both), as TRL's PolicyAndValueWrapper, and the gradient of L_policy + vf_coef · L_value per micro-batch, taken
one model at a time (`micro_batch_backward`: the same gradients, one model's activations held at once).
With --lora-r the value model stays a separate model but trains as the policy does: its own LoRA adapters (the
same r, α and targets) and its head in full, its backbone frozen in --model-dtype — a fully trained value model
would bring back the gradients and AdamW state of a whole model that LoRA saves on the policy. (It does not share
the policy's frozen base: one model with two adapters would save the second copy of the weights, at the price of
switching adapters between every policy and value pass.)

One step (one rollout batch of batch_size × grad_accum prompts × num_generations samples):
  1. no-grad passes, in the micro-batches of the first PPO epoch (so that on a CPU, whose kernels repeat
     themselves, that epoch's first update sees ρ = 1 exactly): log π_old, log π_ref and V_old per token;
  2. per-token rewards (KL penalty everywhere, score at the last token), optionally whitened (whiten_rewards);
     GAE(γ, λ) advantages and returns; advantages whitened over the batch's tokens;
  3. num_ppo_epochs passes; each pass shuffles the rows (seeded by seed, step and pass) into num_mini_batches
     equal mini-batches (config_checks: it divides the rows), each accumulated over micro-batches of
     batch_size × num_generations rows and applied by loop/update.py's `update`. A micro-batch's loss is
     divided by its mini-batch's token count, so the micro-batches add up to the mini-batch's loss exactly.

Under torchrun (loop/online_dist.py) each rank samples and scores its share of the step's prompts; the rollout's
token ids and rewards are gathered into the one-process row order (`rollout_rows`), so the mini-batch permutations,
the GAE inputs and the whitening are those of the whole rollout, and each rank computes every world-th row of
each micro-batch (of batch_size × processes × num_generations rows): the no-grad passes summed back over ranks,
the gradient passes through DDP-wrapped policy (TokenLogpsModule) and value model (`ValuesModule`), both reduced
in the last micro-batch's backward of each mini-batch.

Differences from TRL's PPOTrainer: the score is the reward of the last real token (TRL added it one position
later, on the first padding token, which its value mask included and its policy mask did not); the value loss
and the advantages use the same tokens as the policy loss; micro-batches are summed over a shared divisor
(TRL averaged their means); no missing_eos_penalty, stop_token or response truncation options; the k1 KL only.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path

import torch

from dpokit.batches import pad_rows
from dpokit.config import ConfigError
from dpokit.evaluation.rewards import classifier_folder
from dpokit.logprobs import compute_precision
from dpokit.loop.online import token_logps
from dpokit.loop.online_dist import ONE
from dpokit.loop.steps import NonFiniteError
from dpokit.loop.update import update
from dpokit.models.lora import add_lora, base_weights, disable_dropout
from dpokit.objectives.ppo import explained_variance, gae, ppo_policy_loss, ppo_value_loss, token_rewards, whiten


def ppo_method(cfg, policy, tokenizer, device, log):
    """train_online's `method` for --loss ppo: (step function, policy + value parameters, updates per step, the value
    model by name for checkpoints)."""
    value_model = load_value_model(cfg, policy, tokenizer, device, log)
    params = [p for p in policy.parameters()] + [p for p in value_model.parameters()]

    def step_fn(policy, reference, samples, rewards, cfg, optimizer, scheduler, pad_id, device, step, shard=ONE):
        return ppo_step(policy, value_model, params, reference, samples, rewards, cfg, optimizer, scheduler, pad_id,
                        device, step, shard)
    return step_fn, params, cfg.num_ppo_epochs * cfg.num_mini_batches, {"value": value_model}  # checkpointed too


def _reward_folder(cfg) -> tuple[Path, str | None] | None:
    """(folder, label or None) when --reward is one classifier folder (`DIR` or `DIR#LABEL`) as load_reward reads
    it, else None."""
    source = classifier_folder(cfg.reward_specs[0]) if len(cfg.reward_specs) == 1 else None
    return None if source is None else (Path(source[0]), source[1])


def load_value_model(cfg, policy, tokenizer, device, log):
    """The value model of the module docstring, in the policy's dtype, set up for training as the policy is."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    dtype = next(policy.parameters()).dtype
    source = _reward_folder(cfg)
    if source is not None:
        folder, label = source
        try:  # AutoConfig, not config.json: transformers leaves the default two labels out of the file
            labels = AutoConfig.from_pretrained(folder, trust_remote_code=False).id2label or {}
        except (OSError, ValueError) as e:
            raise ConfigError(f"reward = {cfg.reward!r}: cannot read {folder / 'config.json'}: {e}") from None
        if len(labels) > 1 and not label:
            raise ConfigError(f"reward = {cfg.reward!r}: {folder} is a classifier with {len(labels)} labels "
                              f"({', '.join(map(str, labels.values()))}): name the reward's label as DIR#LABEL, or "
                              "give a one-label reward model (`dpokit train-rm`)")
        theirs = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        same_tokens = theirs.get_vocab() == tokenizer.get_vocab()
        if len(labels) <= 1 and same_tokens:
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=1, use_safetensors=True, trust_remote_code=False, dtype=dtype)
            log(f"value model: initialised from the reward model {folder}")
            return _set_up(model.to(device), cfg, policy, log)
        log(f"value model: the reward model {folder} " + ("has several labels" if same_tokens else
            "reads other tokens than the policy") + "; initialised from the policy with a fresh head instead")
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    if not hasattr(model, "score"):
        raise ConfigError(f"--loss ppo: {type(model).__name__} has no `score` head to read values from; use a "
                          "decoder model (Llama, Qwen, Mistral, GPT-2, …) or a one-label reward model folder")
    plain = policy.get_base_model() if cfg.lora_r else policy  # the transformers model under PEFT's wrapper
    model.base_model.load_state_dict(base_weights(plain.base_model))  # the policy's weights without adapters
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for p in model.score.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * getattr(config, "initializer_range", 0.02)
                    if p.dim() > 1 else torch.zeros(p.shape))
    log("value model: initialised from the policy's weights with a fresh head")
    return _set_up(model.to(device), cfg, policy, log)


def _set_up(model, cfg, policy, log):
    """Trainable as the policy is: in full, or with --lora-r its own adapters (the policy's r, α, targets) and the
    head in full (PEFT's SEQ_CLS task: modules_to_save), so the backbone gets no gradients or optimizer state."""
    if model.config.pad_token_id is None:
        model.config.pad_token_id = policy.config.pad_token_id
    model.eval()  # dropout off, as the policy
    if cfg.lora_r:
        model = add_lora(model, cfg, lambda line: log(f"value model: {line}"), task_type="SEQ_CLS")
    else:
        model.requires_grad_(True)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not cfg.lora_r:  # (add_lora already zeroed the base's dropout and keeps --lora-dropout)
            disable_dropout(model)
        model.train()
    return model


class ValuesModule(torch.nn.Module):
    """A value model whose forward is `token_values`' pass: the unit DDP wraps (its hooks run on a module's forward,
    and the pass calls the backbone and the head, never the classifier's own forward). `lm`: distributed.wrap's
    name for the model it wraps."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, index):
        return _read_values(self.lm, input_ids, attention_mask, index)


def _read_values(value_model, input_ids, attention_mask, index) -> torch.Tensor:
    """The head read at the hidden states `index` (rows, positions): [len(rows)] in fp32."""
    # under PEFT: the wrapped classifier (its layers carry the adapters, its score is the trained copy)
    value_model = value_model.get_base_model() if hasattr(value_model, "get_base_model") else value_model
    hidden = value_model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state
    return value_model.score(hidden[index]).float().squeeze(-1)


def token_values(value_model, rows: list[tuple[list[int], list[int]]], pad_id: int, device, cfg) -> torch.Tensor:
    """V(s_t) for each completion token t of each row, [B, T] right-padded (0 at padding): the head read at the
    position whose logits predict token t (the state before it, as TRL's values[:, context_length − 1 : −1]).
    `value_model`: the model, or its DDP-wrapped `ValuesModule` (a gradient pass under torchrun)."""
    batch = {k: v.to(device) for k, v in pad_rows(rows, pad_id).items()}
    index = ([i for i, (_, c) in enumerate(rows) for _ in c], [len(p) - 1 + t for p, c in rows for t in range(len(c))])
    with compute_precision(device, cfg.dtype):
        if isinstance(getattr(value_model, "module", None), ValuesModule):
            scores = value_model(batch["input_ids"], batch["attention_mask"], index)
        else:
            scores = _read_values(value_model, batch["input_ids"], batch["attention_mask"], index)
    out = scores.new_zeros(len(rows), max(len(c) for _, c in rows))
    return out.index_put((torch.tensor(index[0], device=out.device),
                          torch.tensor([t for _, c in rows for t in range(len(c))], device=out.device)), scores)


def layout(n_rows: int, cfg, step: int, epoch: int, world: int = 1) -> list[list[list[int]]]:
    """The mini-batches of PPO pass `epoch` of step `step`, each a list of micro-batches of row indices: a
    permutation seeded by (seed, step, epoch), cut into num_mini_batches equal parts (config_checks refuses a
    num_mini_batches that does not divide the rows: the scheduler counts num_mini_batches updates per pass), then
    into micro-batches of batch_size × world × num_generations rows (under torchrun each rank computes its share)."""
    generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 101 + epoch)
    order = torch.randperm(n_rows, generator=generator)
    per_micro = cfg.batch_size * world * cfg.num_generations
    minis = [part.tolist() for part in order.tensor_split(cfg.num_mini_batches)]
    return [[mini[i:i + per_micro] for i in range(0, len(mini), per_micro)] for mini in minis]


def rollout(policy, value_model, reference, rows, micro, pad_id, device, cfg, shard=ONE):
    """No-grad passes over the rollout: (log π_old, log π_ref or None, V_old, mask), each [N, T]. Under torchrun each
    rank computes its share of each micro-batch and the tensors are summed over ranks (each row from one rank)."""
    n, width = len(rows), max(len(c) for _, c in rows)
    old, values, mask = (torch.zeros(n, width, device=device) for _ in range(3))
    ref = torch.zeros(n, width, device=device) if reference is not None else None
    with torch.no_grad():
        for m in map(shard.share, micro):
            if not m:  # fewer rows than ranks in this micro-batch
                continue
            part = [rows[i] for i in m]
            logps, part_mask = token_logps(policy, part, pad_id, device, cfg)
            w = logps.shape[1]
            old[m, :w], mask[m, :w] = logps, part_mask
            values[m, :w] = token_values(value_model, part, pad_id, device, cfg)
            if ref is not None:
                ref[m, :w] = token_logps(reference, part, pad_id, device, cfg)[0]
    if shard.world > 1:
        old, values, mask = map(shard.all_sum, (old, values, mask))
        ref = shard.all_sum(ref) if ref is not None else None
    return old, ref, values, mask


def rollout_rows(samples, rewards, cfg, step: int, shard=ONE) -> tuple[list, list[float]]:
    """(prompt ids, completion ids) and reward of every row of the step, every rank's, in the one-process order:
    PPO's mini-batches shuffle, and its whitening and value statistics span, the whole rollout."""
    rows = list(zip(samples.prompt_ids, samples.completion_ids))
    if shard.world == 1:
        return rows, list(rewards)
    parts = shard.gather_all((rows, list(rewards)))
    n = cfg.num_generations
    order = [(r, k * n + j) for r, k in shard.step_placement(step) for j in range(n)]
    return [parts[r][0][i] for r, i in order], [parts[r][1][i] for r, i in order]


def micro_batch_backward(trained, valued, part, rollout_part, normalizer: float, weight: float, pad_id, device, cfg,
                         step: int, check_finite: bool = True) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """One micro-batch's L_policy + vf_coef · L_value (objectives/ppo.py `ppo_loss`), backpropagated one model at a
    time: the two terms share no parameter, so the gradients are those of their sum, while only one model's
    activations are held at once (the policy's are freed before the value model's forward). `rollout_part`: the
    micro-batch's rows of (log π_old, advantages, V_old, returns). Returns (the loss, detached; ppo_loss's stats;
    the mask of real completion tokens)."""
    old, advantages, old_values, returns = rollout_part
    logps, mask = token_logps(trained, part, pad_id, device, cfg)
    w = logps.shape[1]
    policy, stats = ppo_policy_loss(logps, old[:, :w], advantages[:, :w], mask, cfg.epsilon_low, cfg.epsilon_high,
                                    normalizer)
    if check_finite and not torch.isfinite(policy):
        raise NonFiniteError(f"step {step + 1}: non-finite PPO policy loss")
    (policy if weight == 1.0 else policy * weight).backward()  # frees the policy's activations
    values = token_values(valued, part, pad_id, device, cfg)
    value, value_stats = ppo_value_loss(values, old_values[:, :w], returns[:, :w], mask, cfg.cliprange_value,
                                        normalizer)
    if check_finite and not torch.isfinite(value):
        raise NonFiniteError(f"step {step + 1}: non-finite PPO value loss")
    (cfg.vf_coef * value * weight).backward()
    policy, value = policy.detach(), value.detach()
    return policy + cfg.vf_coef * value, {**stats, **value_stats, "loss/policy": policy, "loss/value": value}, mask


def ppo_step(policy, value_model, params, reference, samples, rewards, cfg, optimizer, scheduler, pad_id, device,
             step, shard=ONE) -> dict:
    """Rollout passes, rewards, GAE, then num_ppo_epochs × num_mini_batches updates (module docstring). Under
    torchrun (loop/online_dist.py) every rank holds the whole rollout's tensors and computes its share of each
    micro-batch, its loss over the mini-batch's tokens / processes, through DDP-wrapped policy and value model."""
    rows, rewards = rollout_rows(samples, rewards, cfg, step, shard)
    passes = [layout(len(rows), cfg, step, epoch, shard.world) for epoch in range(cfg.num_ppo_epochs)]
    old, ref, old_values, mask = rollout(policy, value_model, reference, rows, [m for mini in passes[0] for m in mini],
                                         pad_id, device, cfg, shard)
    scores = torch.tensor(rewards, dtype=torch.float32, device=device)
    token_r, non_score = token_rewards(scores, old, ref, mask, cfg.kl_coef)
    if cfg.whiten_rewards:
        token_r = whiten(token_r, mask, shift_mean=False)
    advantages, returns = gae(token_r, old_values, mask, cfg.gamma, cfg.lam)
    advantages = whiten(advantages, mask)

    trained, valued = shard.trained(policy), shard.trained(value_model, ValuesModule)  # themselves in one process
    sums: dict[str, float] = defaultdict(float)
    updates = 0
    for mini_batches in passes:
        for mini in mini_batches:
            tokens = float(sum(mask[m].sum().item() for m in mini))
            for k, m in enumerate(mini):
                # a rank without rows in this micro-batch runs a weight-0 one: DDP's reduction waits for every rank
                m, weight = (shard.share(m), 1.0) if shard.share(m) else (m[:1], 0.0)
                part = [rows[i] for i in m]
                with shard.sync(last=k == len(mini) - 1):
                    loss, stats, part_mask = micro_batch_backward(
                        trained, valued, part, (old[m], advantages[m], old_values[m], returns[m]),
                        tokens / shard.world, weight, pad_id, device, cfg, step, shard.check_finite)
                # the micro-batches' losses add up to the mini-batch's (over every rank's: ÷ processes)
                sums["loss"] += loss.item() * weight / shard.world
                sums["loss/policy"] += stats.pop("loss/policy").item() * weight / shard.world
                sums["loss/value"] += stats.pop("loss/value").item() * weight / shard.world
                for key, value in stats.items():  # token means → token-weighted over the whole step
                    sums[key] += value.item() * part_mask.sum().item() * weight
            done = update(params, optimizer, scheduler, cfg.max_grad_norm, step=step + 1)
            updates += 1
    sums = shard.sum(sums)
    losses = {k: sums.pop(k) / updates for k in ("loss", "loss/policy", "loss/value")}
    total_tokens = mask.sum().item() * cfg.num_ppo_epochs
    kl_seq = ((old - ref) * mask).sum(1) if ref is not None else torch.zeros_like(scores)  # k1, per completion
    non_score_sum = non_score.sum(1)
    explained = explained_variance(old_values, returns, mask)
    return {**losses, **{k: v / total_tokens for k, v in sums.items()},
            # kl: per token over the batch's completion tokens, as GRPO's; kl_seq: per completion
            "kl": kl_seq.sum().item() / mask.sum().item(), "kl_seq": kl_seq.mean().item(),
            "non_score_reward": non_score_sum.mean().item() + 0.0,  # not -0.0
            "rlhf_reward": (scores + non_score_sum).mean().item(),
            "value": (old_values * mask).sum().item() / mask.sum().item(),
            **({"explained_variance": explained} if explained is not None else {}),  # no NaN in metrics.jsonl
            "lr": done.lr, "grad_norm": done.grad_norm}
