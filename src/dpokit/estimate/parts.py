"""The arithmetic: bytes per part and per phase of a training run, from a `Shape` and the config.

How dpokit trains decides each part (docs/PERFORMANCE.md, "Knowing memory before loading"):
- weights: trainable ones as an fp32 master (half with --pure-half), frozen ones (LoRA base, live reference)
  in --model-dtype; gradients as the trainable weights; AdamW two moments, RMSprop one, fp32 (half with
  --pure-half). FSDP divides all three by the number of processes; DDP replicates them and keeps its
  gradient buckets (a second copy of the gradients: dpokit's DDP does not use them as views).
- the reference: a live frozen copy (TR-DPO, KTO, --no-ref-cache), nothing for LoRA (adapters off), or with
  the reference cache only its log-probs (a few bytes per pair) once the reference pass is done.
- activations: per token, per layer, from hidden, intermediate and key/value widths, times a constant
  measured on this code (ACTIVATION_FACTOR); with gradient checkpointing one hidden state per layer plus
  one layer's recompute. Autocast to bf16/fp16 halves them and caches a half copy of each weight it casts —
  only of leaf tensors that require grad, so of the trainable weights alone.
- the LM head: logits [tokens, vocab] in fp32 about three times over (logits, softmax, gradient), or at
  most one chunk of CHUNK_ELEMENTS when the head is chunked (logprobs/sequence.py).
- loading: safetensors are memory-mapped; a file in the dtype loaded becomes the weights (measured: no second
  copy), one in another dtype (bf16 file, fp32 weights) is read while the converted weights are built —
  in host memory: on a GPU only the weights moved there count.
- --resume: torch.load holds the saved (whole, unsharded) optimizer state beside the live one for a moment.
The peak is the largest phase: loading, the reference pass (no gradients yet), resuming, training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpokit.estimate.shape import Shape, micro_batch_tokens

GiB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Measured (docs/memory_calibration.py, docs/PERFORMANCE.md): stored activation bytes per token and layer,
# divided by 4 · (6·hidden + 2·intermediate + 3·kv width) — the tensors a Llama-style layer saves for backward
# with models/lean.py (norms and SwiGLU recompute their elementwise ops, and the norms' outputs and act(gate) · up
# are rebuilt rather than kept: 4·hidden + 2·intermediate less than stock transformers). 1.4, not the 1.0 fitted
# on a quiet machine: one CI run (a fresh venv, the cores shared) measured ~20 % more; not reproduced since
# (2026-12-03: the same source in that venv and the long-used one, 0.99–1.08 and 1.00–1.13 of the measured peaks
# with 1.4), so 1.4 stays, erring towards over-estimating, inside tests/test_estimate.py's ±25 % in both.
ACTIVATION_FACTOR = 1.4
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


def activation_bytes(shape: Shape, tokens: int, checkpointing: bool, half: bool, lora: bool = False,
                     autocast: bool = False) -> int:
    """Bytes kept for backward by the decoder: every layer's saved tensors, or with checkpointing one hidden
    state per layer plus one layer recomputed; plus embeddings, final norm and gradient buffers (6·hidden);
    plus, with LoRA, what the adapter paths keep (LORA_ACTIVATION). Under autocast the Linears keep autocast's
    half copies of the norms' outputs, which models/lean.py cannot rebuild: 2·hidden more."""
    widths = (8 if autocast else 6) * shape.hidden + 2 * shape.intermediate + 3 * shape.kv_width
    layer = ACTIVATION_FACTOR * 4 * widths
    per_token = (4 * shape.layers * shape.hidden + layer) if checkpointing else shape.layers * layer
    per_token += 4 * 6 * shape.hidden
    if lora and shape.lora_rank:
        per_token += LORA_ACTIVATION[checkpointing] * 4 * shape.lora_io
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
    """Expected peak memory of `dpokit train` with `cfg`, per process of `processes` (the torchrun world:
    FSDP shards by it, DDP replicates); `tokens`: (computed, scored) per micro-batch (`micro_batch_tokens`),
    by default the worst case of the limits."""
    from dpokit.objectives import OBJECTIVES, needs_reference
    if cfg.online:
        raise ValueError("online runs (GRPO, online DPO) are not modelled by the memory estimate")
    pure_half = cfg.pure_half and cfg.model_dtype != "fp32"
    frozen_b = BYTES[cfg.model_dtype]
    train_b = frozen_b if pure_half else 4
    tokens, scored = tokens or micro_batch_tokens(cfg)
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
    if processes > 1 and not cfg.fsdp:
        parts["DDP gradient buckets"] = trainable * train_b

    ref = ref_shape or shape
    with_ref = needs_reference(cfg.loss_names)
    cached = with_ref and cfg.ref_cache and not cfg.sync_ref_every and not unpaired
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
    half = autocast or (cfg.model_dtype != "fp32" and (pure_half or bool(cfg.lora_r)))
    if autocast and train_b == 4:
        # autocast caches half copies of the trainable fp32 leaves it casts, until its region ends
        parts["autocast weight copies"] = trainable * 2 // shard
    if cfg.model_dtype != "fp32" and (pure_half or cfg.lora_r):
        # the LM head runs in fp32 on half weights (logprobs/sequence.py _head_logits): an fp32 copy of it
        parts["fp32 head weight copy"] = 4 * shape.vocab * shape.hidden
    parts["activations"] = activation_bytes(shape, tokens, cfg.gradient_checkpointing, half, bool(cfg.lora_r),
                                            autocast)
    parts["LM head chunk"] = head_bytes(shape, scored, not cfg.lora_r)
    if cfg.lora_r:
        parts["LoRA backward buffers"] = LORA_BACKWARD_HEADS * 4 * shape.vocab * shape.hidden
    if cfg.attention == "dense":
        row = cfg.pack_tokens if cfg.prefix_sharing and cfg.pack_tokens else 2 * cfg.max_length
        parts["dense attention masks"] = tokens * min(row, tokens) * 4
    parts["other (data, allocator)"] = OTHER_BYTES + int(OTHER_SHARE * sum(parts.values()))
    phases = {"training": sum(parts.values()), "loading": _loading(cfg, shape, frozen_b, pure_half, device_type)}
    if cached:  # the reference passes: the weights (and a separate --ref-model), forward only
        # (batches of at most n pairs and n × 1024 computed tokens, batches/budget.py: n = batch_size for the
        # training pairs, eval_batch_size for held-out ones when there are some; the larger counts)
        held_out = cfg.eval_data is not None or cfg.data is None  # no --data: the built-in held-out set
        n = max(cfg.batch_size, cfg.eval_batch_size if held_out else 0)
        infer = activation_bytes(shape, min(tokens * n // cfg.batch_size, 1024 * n), True, half)
        ref_model = ref.params * frozen_b if cfg.ref_model else 0
        phases["reference pass"] = (shape.params * (frozen_b if cfg.lora_r else train_b) + ref_model
                                    + infer + head_bytes(shape, scored, False))
    if cfg.resume:  # the live state plus torch.load's whole saved optimizer state
        phases["resume"] = (sum(parts[k] for k in ("weights, trainable", "weights, frozen", "optimizer state",
                                                    "reference")) + trainable * moments * train_b + OTHER_BYTES)
    notes.append(f"{tokens:,} tokens per micro-batch; activations {'with' if cfg.gradient_checkpointing else 'without'}"
                 f" gradient checkpointing, {'bf16/fp16' if half else 'fp32'} compute")
    return Estimate(parts, phases, notes, processes)


def _loading(cfg, shape: Shape, frozen_b: int, pure_half: bool, device_type: str) -> int:
    """load_model reads in --model-dtype (host memory: the file, and a converted copy when its dtype differs),
    then moves the weights to the device; a half model that trains keeps an fp32 master (keep_master_copy)."""
    load_b = frozen_b if cfg.lora_r or cfg.model_dtype != "fp32" else 4
    stored_b = BYTES[shape.stored_dtype]
    conversion = shape.params * stored_b if stored_b != load_b and device_type == "cpu" else 0
    load = shape.params * load_b + conversion
    if cfg.model_dtype != "fp32" and not pure_half and not cfg.lora_r:
        load = max(load, shape.params * (4 + load_b))
    return load
