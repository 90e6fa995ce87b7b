"""The reference side of a run: a frozen model, or its log-probs from the on-disk cache.

With a fixed reference (every paired objective except TR-DPO's moving one), the reference's
log-probs of the training pairs are computed once — or read from the cache — and the reference model
is then released: training never runs it again, and its weights no longer take memory.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from dpokit.batches.budget import TOKENS_PER_PAIR
from dpokit.config import ConfigError, TrainConfig
from dpokit.distributed import Distributed, broadcast_object, start
from dpokit.logprobs import PairLogps, compute_precision, pairs_logps, sampler_ref
from dpokit.logprobs.attention import attention_kind
from dpokit.logprobs.sequence import autocast_dtype
from dpokit.logprobs.refcache import cache_key, cache_path, load_cached, store, weights_digest
from dpokit.models import load_model, load_tokenizer
from dpokit.models.load import ModelError, keep_master_copy
from dpokit.objectives import OBJECTIVES, needs_reference


@dataclass
class AdaptersOff:
    """The reference of a LoRA run: the policy's own weights with its adapters disabled (no copy)."""
    policy: object


def reference_forward(reference):
    """(model to run, context to run it in) for a reference model or an `AdaptersOff`."""
    if isinstance(reference, AdaptersOff):
        return reference.policy, reference.policy.disable_adapter()
    return reference, nullcontext()


def load_ref_model(cfg, tokenizer, device, policy):
    """--ref-model, frozen; refused when its tokenizer differs (log-prob ratios need the same token ids), and
    under TR-DPO when its parameters are not the policy's names and shapes (`check_syncable`)."""
    if load_tokenizer(cfg.ref_model, cfg.trust_remote_code).get_vocab() != tokenizer.get_vocab():
        raise ModelError(f"--ref-model {cfg.ref_model} has a different tokenizer from --model {cfg.model}; "
                         "log-prob ratios need the same token ids")
    model = load_model(cfg.ref_model, device, cfg.allow_pickle, cfg.trust_remote_code,
                       cfg.model_dtype).requires_grad_(False).eval()  # frozen: stays in --model-dtype
    if cfg.sync_ref_every:
        try:
            check_syncable(model, policy)
        except ModelError as e:
            raise ModelError(f"--ref-model {cfg.ref_model} with --sync-ref-every: {e}") from None
    return model


def prepare_reference(cfg, policy, tokenizer, train_set, eval_set, unpaired: bool, device, pad_id: int, log,
                      ctx: Distributed | None = None):
    """Return (reference model or None, cached train reference log-probs or None, eval reference log-probs).

    Held-out reference log-probs always come from the starting reference — the starting policy itself
    for reference-free objectives — so every objective reports comparable eval/rewards. Under torchrun
    (`ctx`) the ranks compute them in parallel; rank 0 reads and writes the cache file.

    The policy arrives in --model-dtype and leaves in the precision it trains in (`keep_master_copy`: an fp32
    master copy in full fine-tuning): a live reference copy is taken before, in --model-dtype, and the cached and
    held-out sums are computed after, from the weights the evaluation and the training steps run."""
    ctx = ctx or Distributed()
    with_ref = needs_reference(cfg.loss_names)
    model = None
    if cfg.ref_model:
        model = load_ref_model(cfg, tokenizer, device, policy)
    if not with_ref:
        log(f"loss {cfg.loss} is reference-free: no reference model loaded")
    cacheable = with_ref and cfg.ref_cache and not cfg.sync_ref_every and not unpaired
    if with_ref and not cacheable and not cfg.ref_model and not cfg.lora_r:
        # A live frozen copy of the starting policy, taken while the policy is still in --model-dtype: it stays
        # half-size (a LoRA run needs no copy: its reference is the base with adapters off, see AdaptersOff).
        model = copy.deepcopy(policy).requires_grad_(False).eval()
    keep_master_copy(policy, cfg)  # from here on the policy is in the precision it trains and evaluates in
    # Reference sums come from a --ref-model, else from the policy itself: the same starting (half-rounded)
    # values as a live copy, in the very weights the evaluation and the training steps run. So with the cache
    # (the default) step 0's margins are exactly 0 and its loss ln 2 under any --model-dtype. A live
    # bf16/fp16 copy (--no-ref-cache, TR-DPO, KTO) gives the training steps reference sums computed in
    # bf16/fp16 weights instead, so step 0's training margins are that precision's rounding noise, not 0;
    # held-out ones stay exactly 0 (computed here, from the policy).
    source = model if cfg.ref_model else policy
    # The digest covers the weights that compute the sums (names, dtypes, bytes: an fp32 master copy of bf16
    # values differs from the fp32 checkpoint, a bf16 --ref-model from an fp32 one); the precision, device and
    # batch layout they are computed in go in the key too (`numerics`).
    low = autocast_dtype(device, cfg.dtype)
    weights = weights_digest(source) if cfg.ref_cache else None

    def numerics(batch_size: int) -> str:
        # ":once": a batch computes each distinct prompt and completion once (batches/packing.py); sums cached
        # before that layout, where a batch repeated a prompt or completion, are not those of today's batches
        layout = (f"pack{cfg.pack_tokens}" if cfg.prefix_sharing else "padded") + f":once:attention-{cfg.attention}"
        # (The token budget, x1024tok, joined the key with reference batching by tokens: it changed every key,
        # fp32 ones included, so caches made before it are recomputed once.)
        return (f"{device.type}:{ {torch.bfloat16: 'bf16', torch.float16: 'fp16'}.get(low, 'fp32')}:"
                f"{layout}:batch{batch_size}x{TOKENS_PER_PAIR}tok")  # batches/budget.py: pairs and tokens

    def logps_of(pairs, role: str) -> PairLogps:
        # Batches: held-out pairs in --eval-batch-size ones, the very batches the evaluation runs the policy in
        # (evaluation/preference.py), so step 0's held-out margins are exactly 0 under every --dtype, not rounding
        # noise (which would show as a random "accuracy"). Training pairs in --batch-size ones, the training
        # micro-batch: the sums are compared with the steps' (exactly equal where a micro-batch is a cached batch:
        # one process, --no-shuffle, rows within the token budget; otherwise to fp32 rounding, or bf16/fp16
        # rounding under autocast: README, tests/test_refcache_exact.py), and the pass holds no more activations
        # than a training step. Evaluation options then leave the training numbers alone.
        batch_size = cfg.eval_batch_size if role == "held-out" else cfg.batch_size
        key = cache_key(weights + numerics(batch_size), pairs, cfg.ld_alpha) if cfg.ref_cache else None
        cached = broadcast_object(load_cached(key) if key and ctx.is_main else None, ctx)
        if cached is not None:
            log(f"{role} reference log-probs: read from cache {cache_path(key)}")
            return cached
        start, computed = time.perf_counter(), []
        with compute_precision(device, cfg.dtype):
            def compute(rows):
                computed.append(len(rows))
                return pairs_logps(source, rows, batch_size, pad_id, device, ld_alpha=cfg.ld_alpha,
                                   prefix_sharing=cfg.prefix_sharing, pack_tokens=cfg.pack_tokens, ctx=ctx)
            # rows sampled from this reference carry its sums (logprobs/sampler_ref.py), checked against its weights
            logps = (sampler_ref.with_sampler_logps(pairs, weights, compute, sampler_ref.sums_dtype(source), log)
                     if role == "training" and sampler_ref.applies(pairs, cfg, low, log) else compute(pairs))
        seconds = time.perf_counter() - start
        where = f", cached at {store(key, logps)}" if key and ctx.is_main else ""
        on = f" on {ctx.world} processes" if ctx.enabled else ""
        log(f"{role} reference log-probs: computed for {sum(computed)} pairs in {seconds:.1f} s{on}{where}")
        return logps

    eval_ref = logps_of(eval_set, "held-out") if eval_set else None
    train_ref = logps_of(train_set, "training") if cacheable else None
    if with_ref and not cacheable and not unpaired:
        sampler_ref.note_unused(train_set, cfg, log)
    if cacheable or not with_ref:
        model = None  # never run again: release its memory
    elif not cfg.ref_model and cfg.lora_r:
        model = "adapters-off"  # the caller wraps the policy in adapters after this; see AdaptersOff
    return model, train_ref, eval_ref


def check_syncable(reference, policy) -> None:
    """A ModelError naming the first parameter whose name or shape differs between the two models."""
    ref = {n: tuple(p.shape) for n, p in reference.named_parameters()}
    pol = {n: tuple(p.shape) for n, p in policy.named_parameters()}
    if ref != pol:
        name = min(set(ref) ^ set(pol) or {n for n in pol if ref[n] != pol[n]})
        raise ModelError(f"parameter {name} is {list(ref.get(name, [])) if name in ref else 'missing'} in the "
                         f"reference, {list(pol[name]) if name in pol else 'missing'} in the policy: TR-DPO mixes "
                         "them parameter by parameter, so the reference needs the policy's architecture")


@torch.no_grad()
def sync_reference(reference, policy, alpha: float) -> None:
    """TR-DPO (Gorbatovski 2024) soft update: π_ref ← α·π + (1 − α)·π_ref, parameter by parameter by name."""
    check_syncable(reference, policy)
    ref_params = dict(reference.named_parameters())
    for name, param in policy.named_parameters():
        ref_params[name].mul_(1 - alpha).add_(param, alpha=alpha)


def cache_reference(config: TrainConfig | None = None, log=print, **overrides) -> None:
    """`dpokit cache-ref`: compute (or find) the reference log-probs a `train` with the same options
    would use, and stop. Training then starts without loading or running the reference."""
    cfg = TrainConfig.from_dict({**(config.to_dict() if config else {}), **overrides})
    if cfg.online:
        raise ConfigError("nothing to cache: online training (grpo, rloo, ppo, --online-dpo) samples new completions "
                          "every step")
    unpaired = any(OBJECTIVES[n].data == "unpaired" for n in cfg.loss_names)
    if unpaired or cfg.sync_ref_every or not cfg.ref_cache:
        raise ConfigError("nothing to cache: kto, TR-DPO (--sync-ref-every) and --no-ref-cache run the reference live")
    from dpokit.batches.inputs import load_data
    ctx = start(False, cfg.device)  # under torchrun the ranks share the batches out; nothing is sharded
    try:
        log = log if ctx.is_main else (lambda *a, **k: None)
        device = ctx.device(cfg.device)
        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
        train_set, eval_set = load_data(cfg, tokenizer, unpaired, log)
        policy = load_model(cfg.model, device, cfg.allow_pickle, cfg.trust_remote_code, cfg.model_dtype)
        with attention_kind(cfg.attention, log):  # the cache key names it: compute with the same kind
            prepare_reference(cfg, policy, tokenizer, train_set, eval_set, unpaired, device, tokenizer.pad_token_id,
                              log, ctx)
    finally:
        ctx.close()
