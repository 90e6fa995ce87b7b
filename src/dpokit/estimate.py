"""Peak memory of a training run, by part, from the model's config alone: no weights are read.

The model is built on the `meta` device (shapes, no storage) to count parameters exactly, LoRA adapters
included; the rest follows from how dpokit trains (docs/PERFORMANCE.md, "Knowing memory before loading"):
- weights: trainable ones as an fp32 master (half with --pure-half), frozen ones (LoRA base, live reference)
  in --model-dtype; gradients as the trainable weights; AdamW two moments, RMSprop one, fp32 (half with
  --pure-half). FSDP divides all three by the number of processes; DDP replicates them.
- the reference: a live frozen copy (TR-DPO, KTO, --no-ref-cache), nothing for LoRA (adapters off), or with
  the reference cache only its log-probs (a few bytes per pair) once the reference pass is done.
- activations: per token, per layer, from hidden, intermediate and key/value widths, times a constant
  measured on this code (ACTIVATION_FACTOR); with gradient checkpointing one hidden state per layer plus
  one layer's recompute. Autocast to bf16/fp16 halves them and keeps a half copy of the weights it casts.
- the LM head: logits [tokens, vocab] in fp32 about three times over (logits, softmax, gradient), or at
  most one chunk of CHUNK_ELEMENTS when the head is chunked (logprobs/sequence.py).
- loading: safetensors are memory-mapped; a file in the dtype loaded becomes the weights (measured: no second
  copy), one in another dtype (bf16 file, fp32 weights) is read while the converted weights are built.
The peak is the largest of three phases: loading, the reference pass (no gradients yet), training.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

GiB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Measured (docs/memory_calibration.py, docs/PERFORMANCE.md): stored activation bytes per token and layer,
# divided by 4 · (10·hidden + 4·intermediate + 3·kv width) — the tensors a Llama-style layer saves for backward.
ACTIVATION_FACTOR = 1.0
# LoRA layers keep more per token: this fraction of 4 bytes × Σ(in + out) of the adapted Linears of a layer
# (without / with gradient checkpointing), and its backward holds about two [vocab, hidden] fp32 buffers more.
LORA_ACTIVATION = (0.8, 0.6)
LORA_BACKWARD_HEADS = 2
HEAD_COPIES = 3          # fp32 logits, their softmax and its gradient, alive together in backward
HEAD_GRAD_COPIES = 1.5   # chunked head: per-chunk [vocab, hidden] weight-gradient partials, when the head trains
RUNTIME_BYTES = 340 * 2**20  # RSS of a process that imported torch, transformers and dpokit (not counted)
# The rest of the process (tokenizer, data, Python objects) and the allocator's slack: measured 120–210 MiB on
# ~1–2 GiB runs, as a constant plus a share of the parts.
OTHER_BYTES, OTHER_SHARE = 64 * 2**20, 0.05


@dataclass
class Shape:
    """What the estimate needs of a model, counted on the meta device."""
    params: int
    layers: int
    hidden: int
    intermediate: int
    kv_width: int
    vocab: int
    lora_params: int = 0
    lora_rank: int = 0
    stored_dtype: str = "fp32"  # of the checkpoint's weights (config.torch_dtype), for the loading phase


@dataclass
class Estimate:
    parts: dict[str, int]                      # bytes per process in the training phase, by part
    phases: dict[str, int]                     # total bytes of each phase; the peak is their maximum
    notes: list[str] = field(default_factory=list)
    processes: int = 1

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def load_config(spec: str, trust_remote_code: bool = False):
    """The model's config: 'embedded', a .gguf, a folder (weights optional), a config.json or a cached hub id."""
    from transformers import AutoConfig

    from dpokit.models.load import ModelError, resolve
    where = resolve(spec) if spec == "embedded" or spec.endswith(".gguf") else spec
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{spec}: cannot read the model's config (a folder, config.json, 'embedded', or a hub "
                         f"id that is cached when offline): {e}") from None


def model_shape(config, cfg=None) -> Shape:
    """Parameter counts (tied weights once) and widths of a model built from `config` on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = getattr(config, "get_text_config", lambda: config)()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    dtype = str(getattr(config, "dtype", None) or "float32")
    stored = {"torch.bfloat16": "bf16", "bfloat16": "bf16", "torch.float16": "fp16", "float16": "fp16"}.get(dtype,
                                                                                                            "fp32")
    shape = Shape(sum(p.numel() for p in model.parameters()), text.num_hidden_layers, hidden,
                  getattr(text, "intermediate_size", None) or 4 * hidden, kv, text.vocab_size, stored_dtype=stored)
    if cfg is not None and cfg.lora_r:
        shape.lora_params = lora_params(model, cfg.lora_r, cfg.lora_target_modules)
        shape.lora_rank = cfg.lora_r
    return shape


def lora_params(model, r: int, targets: str) -> int:
    """r·(in + out) per adapted Linear: every Linear but the LM head for 'all-linear' (peft's rule), else
    those whose last name part is listed."""
    import torch
    head = model.get_output_embeddings()
    names = None if targets == "all-linear" else {t.strip() for t in targets.split(",") if t.strip()}
    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head
               and (names is None or name.rsplit(".", 1)[-1] in names))


def batch_tokens(cfg, pairs=None) -> tuple[int, int]:
    """(tokens a micro-batch computes, completion tokens it scores): from the data when given (its batch_size
    largest pairs), else the worst case of the length limits (prompt + chosen + rejected ≤ 2·max_length)."""
    if pairs and not hasattr(pairs[0], "chosen_ids"):  # KTO completions: each row and a KL row (another
        # example's completion on this prompt), padded to the longest: about twice the largest rows
        sizes = sorted((len(p.prompt_ids) + len(p.completion_ids), len(p.completion_ids)) for p in pairs)[::-1]
        largest = sizes[:cfg.batch_size]
        return 2 * len(largest) * largest[0][0], 2 * sum(k for _, k in largest)
    if pairs:
        if cfg.prefix_sharing:
            sizes = [(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids), len(p.chosen_ids)
                      + len(p.rejected_ids)) for p in pairs]
        else:  # padded: 2 rows per pair, each as long as the longest row of the batch
            sizes = [(2 * (len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))),
                      len(p.chosen_ids) + len(p.rejected_ids)) for p in pairs]
        largest = sorted(sizes, reverse=True)[:cfg.batch_size]
        return sum(t for t, _ in largest), sum(k for _, k in largest)
    return cfg.batch_size * 2 * cfg.max_length, cfg.batch_size * 2 * cfg.max_length


def activation_bytes(shape: Shape, tokens: int, checkpointing: bool, half: bool, lora: bool = False) -> int:
    """Bytes kept for backward by the decoder: every layer's saved tensors, or with checkpointing one hidden
    state per layer plus one layer recomputed; plus embeddings, final norm and gradient buffers (6·hidden);
    plus, with LoRA, what the adapter paths keep (LORA_ACTIVATION)."""
    layer = ACTIVATION_FACTOR * 4 * (10 * shape.hidden + 4 * shape.intermediate + 3 * shape.kv_width)
    per_token = (4 * shape.layers * shape.hidden + layer) if checkpointing else shape.layers * layer
    per_token += 4 * 6 * shape.hidden
    if lora and shape.lora_rank:
        io_per_layer = shape.lora_params / shape.lora_rank / shape.layers  # Σ(in + out) of one layer's adapters
        per_token += LORA_ACTIVATION[checkpointing] * 4 * io_per_layer * shape.layers
    return int(tokens * per_token * (0.5 if half else 1.0))


def head_bytes(shape: Shape, tokens: int, head_trains: bool = True) -> int:
    """The LM head's fp32 logits: all scored tokens at once, or one chunk at a time (logprobs/sequence.py),
    whose backward also holds [vocab, hidden] weight-gradient partials when the head trains."""
    from dpokit.logprobs.sequence import CHUNK_ELEMENTS
    chunk = max(1, CHUNK_ELEMENTS // shape.vocab)
    if tokens <= chunk:
        return HEAD_COPIES * 4 * tokens * shape.vocab
    return int(HEAD_COPIES * 4 * chunk * shape.vocab + head_trains * HEAD_GRAD_COPIES * 4 * shape.vocab * shape.hidden)


def estimate(cfg, shape: Shape, processes: int = 1, tokens: tuple[int, int] | None = None,
             ref_shape: Shape | None = None, device_type: str = "cpu") -> Estimate:
    """Expected peak memory of `dpokit train` with `cfg` per process (`processes` under torchrun);
    `tokens`: (computed, scored) per micro-batch (`batch_tokens`), by default the worst case of the limits."""
    from dpokit.objectives import OBJECTIVES, needs_reference
    model_dtype = getattr(cfg, "model_dtype", "fp32")
    pure_half = bool(getattr(cfg, "pure_half", False)) and model_dtype != "fp32"
    frozen_b = BYTES[model_dtype]
    train_b = frozen_b if pure_half else 4
    tokens, scored = tokens or batch_tokens(cfg)
    unpaired = any(OBJECTIVES[n].data == "unpaired" for n in cfg.loss_names)
    shard = processes if cfg.fsdp else 1
    notes = []

    if cfg.lora_r:
        trainable, frozen = shape.lora_params, shape.params
        train_b = 4  # adapters are created in fp32
    else:
        trainable, frozen = shape.params, 0
    moments = {"adamw": 2, "rmsprop": 1}[cfg.optimizer]
    parts = {"weights, trainable": trainable * train_b // shard, "weights, frozen": frozen * frozen_b // shard,
             "gradients": trainable * train_b // shard, "optimizer state": trainable * moments * train_b // shard}

    ref = ref_shape or shape
    with_ref = needs_reference(cfg.loss_names) if not cfg.online else cfg.kl_coef > 0
    cached = with_ref and cfg.ref_cache and not cfg.sync_ref_every and not unpaired and not cfg.online
    live = with_ref and not cached and (cfg.ref_model is not None or not cfg.lora_r)
    parts["reference"] = ref.params * frozen_b if live else 0
    if cached:
        notes.append("reference: log-probs from the cache (the model is released after the reference pass)")
    elif live:
        notes.append("reference: a live frozen copy in --model-dtype" + (", whole on every process" if shard > 1
                                                                        else ""))
    elif with_ref:
        notes.append("reference: the LoRA base with adapters off (no copy)")

    autocast = cfg.dtype in ("bf16", "fp16") or (cfg.dtype == "auto" and device_type == "cuda")
    # activations are half-size under autocast, or when the layers compute in the stored half dtype
    half = autocast or (model_dtype != "fp32" and (pure_half or bool(cfg.lora_r)))
    if autocast and model_dtype == "fp32":
        # autocast keeps the half copies of the weights it cast until the forward's autocast region ends
        parts["autocast weight copies"] = (trainable + frozen) * 2 // shard
    if model_dtype != "fp32" and (pure_half or cfg.lora_r):
        # the LM head runs in fp32 on half weights (logprobs/sequence.py _head_logits): an fp32 copy of it
        parts["fp32 head weight copy"] = 4 * shape.vocab * shape.hidden
    parts["activations"] = activation_bytes(shape, tokens, cfg.gradient_checkpointing, half, bool(cfg.lora_r))
    parts["LM head chunk"] = head_bytes(shape, scored, not cfg.lora_r)
    if cfg.lora_r:
        parts["LoRA backward buffers"] = LORA_BACKWARD_HEADS * 4 * shape.vocab * shape.hidden
    if cfg.attention == "dense":
        row = cfg.pack_tokens if cfg.prefix_sharing and cfg.pack_tokens else 2 * cfg.max_length
        parts["dense attention masks"] = tokens * min(row, tokens) * 4
    parts["other (data, allocator)"] = OTHER_BYTES + int(OTHER_SHARE * sum(parts.values()))
    train_phase = sum(parts.values())

    stored_b = BYTES[shape.stored_dtype]
    load_b = frozen_b if cfg.lora_r or model_dtype != "fp32" else 4  # load_model reads in --model-dtype
    policy_load = shape.params * load_b + (shape.params * stored_b if stored_b != load_b else 0)
    if model_dtype != "fp32" and not pure_half and not cfg.lora_r:  # then the fp32 master (keep_master_copy)
        policy_load = max(policy_load, shape.params * (4 + load_b))
    phases = {"training": train_phase, "loading": policy_load}
    if cached:  # the reference pass: the weights (and a separate --ref-model), forward only, eval batches
        # (reference batches: eval_batch_size pairs, at most 1024 computed tokens each: batches/budget.py)
        infer = activation_bytes(shape, min(tokens * cfg.eval_batch_size // cfg.batch_size,
                                            1024 * cfg.eval_batch_size), True, half)
        ref_model = ref.params * frozen_b if cfg.ref_model else 0
        phases["reference pass"] = (shape.params * (frozen_b if cfg.lora_r else train_b) + ref_model
                                    + infer + head_bytes(shape, scored, False))
    notes.append(f"{tokens:,} tokens per micro-batch; activations {'with' if cfg.gradient_checkpointing else 'without'}"
                 f" gradient checkpointing, {'bf16/fp16' if half else 'fp32'} compute")
    return Estimate(parts, phases, notes, processes)


def available_bytes(device_type: str = "cpu") -> int:
    """Free memory now: the GPU's (torch.cuda.mem_get_info) or the machine's MemAvailable (/proc/meminfo)."""
    if device_type == "cuda":
        import torch
        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # unknown: callers skip the check


def alternatives(cfg, shape: Shape, processes: int, tokens: int | None, device_type: str) -> list[tuple[str, Estimate]]:
    """Changes that lower the peak, each with its estimate: checkpointing, LoRA, bf16 weights, FSDP, batch."""
    import dataclasses

    def variant(label, **changes):
        try:
            changed = dataclasses.replace(cfg, **changes)
        except TypeError:  # a field this version lacks (model_dtype before it lands)
            return None
        s = shape
        if changed.lora_r and not shape.lora_params:
            s = dataclasses.replace(shape, lora_params=_lora_guess(shape, changed.lora_r), lora_rank=changed.lora_r)
        n = processes if changed.fsdp else 1
        return label, estimate(changed, s, n, _scaled(tokens, cfg, changed), device_type=device_type)

    out = []
    if not cfg.gradient_checkpointing:
        out.append(variant("--gradient-checkpointing", gradient_checkpointing=True))
    if not cfg.lora_r and not cfg.fsdp and not cfg.sync_ref_every:
        out.append(variant("--lora-r 16", lora_r=16))
        if getattr(cfg, "model_dtype", "fp32") == "fp32":
            out.append(variant("--lora-r 16 --model-dtype bf16", lora_r=16, model_dtype="bf16"))
    if getattr(cfg, "model_dtype", "fp32") == "fp32":
        if not cfg.lora_r and (cfg.sync_ref_every or not cfg.ref_cache):  # only the live reference shrinks
            out.append(variant("--model-dtype bf16", model_dtype="bf16"))
        if not cfg.lora_r:
            out.append(variant("--model-dtype bf16 --pure-half", model_dtype="bf16", pure_half=True))
    if not cfg.fsdp and not cfg.lora_r and processes > 1:
        out.append(variant(f"--fsdp over {processes} processes", fsdp=True))
    if cfg.batch_size > 1:
        out.append(variant(f"--batch-size {cfg.batch_size // 2} --grad-accum {cfg.grad_accum * 2}",
                           batch_size=cfg.batch_size // 2, grad_accum=cfg.grad_accum * 2))
    if cfg.batch_size > 1:
        out.append(variant("--gradient-checkpointing --batch-size 1", gradient_checkpointing=True, batch_size=1,
                           grad_accum=cfg.grad_accum * cfg.batch_size))
    return [v for v in out if v is not None]


def _lora_guess(shape: Shape, r: int) -> int:
    """all-linear adapters of a Llama-style layer: q,o (h→h), k,v (h→kv), gate,up (h→i), down (i→h)."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_width
    return shape.layers * r * (4 * h + 2 * (h + kv) + 3 * (h + i))


def _scaled(tokens, old, new):
    return None if tokens is None else tuple(max(1, t * new.batch_size // old.batch_size) for t in tokens)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def format_estimate(est: Estimate, title: str = "") -> str:
    lines = [title] if title else []
    for name, value in est.parts.items():
        if value:
            lines.append(f"  {name:<26} {value / GiB:8.2f} GiB")
    lines.append(f"  {'training phase':<26} {est.phases['training'] / GiB:8.2f} GiB")
    for name, value in est.phases.items():
        if name != "training":
            lines.append(f"  {name + ' phase':<26} {value / GiB:8.2f} GiB")
    lines.append(f"  {'peak (' + est.peak_phase + ')':<26} {est.peak / GiB:8.2f} GiB per process"
                 + (f" × {est.processes}" if est.processes > 1 else ""))
    lines += [f"  ({n})" for n in est.notes]
    return "\n".join(lines)


def fits(est: Estimate, available: int, margin: float = 1.1) -> bool:
    return not available or est.peak <= margin * available


def shapes_for(cfg) -> tuple[Shape, Shape | None]:
    """The policy's shape, and the --ref-model's when one is given."""
    shape = model_shape(load_config(cfg.model, cfg.trust_remote_code), cfg)
    ref = model_shape(load_config(cfg.ref_model, cfg.trust_remote_code)) if cfg.ref_model else None
    return shape, ref


def report(cfg, processes: int, device_type: str, tokens: int | None = None) -> tuple[str, bool, Estimate]:
    """The `dpokit estimate` text, whether it fits in what is available now, and the estimate."""
    shape, ref = shapes_for(cfg)
    est = estimate(cfg, shape, 1 if not cfg.fsdp else processes, tokens, ref, device_type)
    free = available_bytes(device_type)
    where = "GPU" if device_type == "cuda" else "machine"
    lines = [f"{cfg.model}: {shape.params:,} parameters" + (f", {shape.lora_params:,} in LoRA adapters"
                                                            if cfg.lora_r else ""),
             format_estimate(est, "expected peak memory by part (one process):")]
    if processes > 1 and not cfg.fsdp and not cfg.lora_r:
        sharded = estimate(_with(cfg, fsdp=True), shape, processes, tokens, ref, device_type)
        lines.append(f"  under FSDP over {processes} processes: {sharded.peak / GiB:.2f} GiB per process")
    ok = fits(est, free)
    lines.append(f"available now ({where}): {free / GiB:.2f} GiB — " + ("fits" if ok else "does NOT fit"))
    if not ok:
        lines.append("what would fit:" if any(fits(e, free) for _, e in alternatives(cfg, shape, processes, tokens,
                                                                                  device_type)) else "alternatives:")
        for label, alt in alternatives(cfg, shape, processes, tokens, device_type):
            lines.append(f"  {label:<48} {alt.peak / GiB:8.2f} GiB" + ("  fits" if fits(alt, free) else ""))
    return "\n".join(lines), ok, est


def _with(cfg, **changes):
    import dataclasses
    return dataclasses.replace(cfg, **changes)


def check_memory(cfg, pairs, device_type: str, processes: int, log=print) -> None:
    """Refuse a run whose estimated peak exceeds the memory available now by over 10 %, before it loads
    (a ConfigError with the estimate and what would fit). On a CPU the processes of this machine share it.
    A model whose config lacks what the estimate reads is logged and trained unchecked."""
    from dpokit.config import ConfigError
    from dpokit.models.load import ModelError
    free = available_bytes(device_type)
    if not free:
        log("memory check skipped: the available memory is unknown here")
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device_type == "cpu" else 1
    try:
        shape, ref = shapes_for(cfg)
    except (ModelError, AttributeError, TypeError, ValueError) as e:
        log(f"memory check skipped: cannot estimate this model from its config ({type(e).__name__}: {e})")
        return
    tokens = batch_tokens(cfg, pairs)
    est = estimate(cfg, shape, processes if cfg.fsdp else 1, tokens, ref, device_type)
    if fits(est, free / local):
        return
    alts = alternatives(cfg, shape, processes, tokens, device_type)
    good = [f"{label} ({alt.peak / GiB:.1f} GiB)" for label, alt in alts if fits(alt, free / local)]
    raise ConfigError(
        f"this run needs about {est.peak / GiB:.1f} GiB per process ({est.peak_phase}: "
        + ", ".join(f"{k} {v / GiB:.1f}" for k, v in est.parts.items() if v)
        + f") but {free / local / GiB:.1f} GiB is available" + (f" per process ({local} here)" if local > 1 else "")
        + "; " + ("what would fit: " + "; ".join(good) if good else "none of checkpointing, LoRA, bf16 weights, "
                  "FSDP or a smaller batch fits alone")
        + ". `dpokit estimate` with the same options shows the parts; --no-memory-check skips this check")
