"""What the estimate needs of a model and of the data: the model's config → `Shape` (counted on the meta
device, no weights read), and the tokens one micro-batch computes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Shape:
    """What the estimate needs of a model, counted on the meta device."""
    params: int
    layers: int
    hidden: int
    intermediate: int
    kv_width: int
    vocab: int
    lora_io: int = 0    # Σ(in + out) of the Linears --lora-target-modules adapts: r·lora_io adapter parameters
    lora_rank: int = 0
    stored_dtype: str = "fp32"  # of the checkpoint's weights (config.torch_dtype), for the loading phase

    @property
    def lora_params(self) -> int:
        return self.lora_rank * self.lora_io


def load_config(spec: str, trust_remote_code: bool = False):
    """The model's config: 'embedded', a .gguf, a folder (weights optional), a config.json or a cached hub id.

    A GGUF is never dequantized here (that takes the whole model's memory, which the check exists to guard):
    the config of its cached safetensors folder when it was converted before, else its header alone (the
    converted weights are fp32, which is also what a header config without a dtype means to the estimate)."""
    from transformers import AutoConfig

    from dpokit.models.load import ModelError, embedded_gguf_path, gguf_cache_path
    try:
        if spec == "embedded" or spec.endswith(".gguf"):
            gguf = embedded_gguf_path() if spec == "embedded" else Path(spec)
            if not gguf.is_file():
                raise ModelError(f"{spec}: no such GGUF file")
            cached = gguf_cache_path(gguf)
            if (cached / "config.json").is_file():
                return AutoConfig.from_pretrained(str(cached))
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        return AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{spec}: cannot read the model's config (a folder, config.json, 'embedded', or a hub "
                         f"id that is cached when offline): {e}") from None


def model_shape(config, cfg=None) -> Shape:
    """Parameter counts (tied weights once), widths, and the adapted Linears' sizes of a model built from
    `config` on the meta device (LoRA counted exactly for any rank: r·Σ(in + out))."""
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
    targets = cfg.lora_target_modules if cfg is not None else "all-linear"
    return Shape(sum(p.numel() for p in model.parameters()), text.num_hidden_layers, hidden,
                 getattr(text, "intermediate_size", None) or 4 * hidden, kv, text.vocab_size,
                 lora_io=lora_io(model, targets), lora_rank=cfg.lora_r if cfg is not None else 0,
                 stored_dtype=stored)


def lora_io(model, targets: str) -> int:
    """Σ(in + out) over the adapted Linears: every Linear but the LM head for 'all-linear' (peft's rule), else
    those whose last name part is listed."""
    import torch
    head = model.get_output_embeddings()
    names = None if targets == "all-linear" else {t.strip() for t in targets.split(",") if t.strip()}
    return sum(m.in_features + m.out_features for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head
               and (names is None or name.rsplit(".", 1)[-1] in names))


def shapes_for(cfg) -> tuple[Shape, Shape | None]:
    """The policy's shape, and the --ref-model's when one is given."""
    shape = model_shape(load_config(cfg.model, cfg.trust_remote_code), cfg)
    ref = model_shape(load_config(cfg.ref_model, cfg.trust_remote_code)) if cfg.ref_model else None
    return shape, ref


def micro_batch_tokens(cfg, pairs=None) -> tuple[int, int]:
    """(tokens a micro-batch computes, padding included; completion tokens it scores): from the data when
    given — its batch_size longest examples in one batch, in the layout training collates them
    (batches/budget.batch_tokens: packed rows, or padded rows each as wide as the batch's widest) — else the
    worst case of the length limits (prompt + chosen + rejected ≤ 2·max_length per pair)."""
    from dpokit.batches.budget import batch_tokens
    from dpokit.batches.packing import segment_length
    if pairs and not hasattr(pairs[0], "chosen_ids"):  # KTO completions: each row and a KL row (another
        # example's completion on this prompt), padded to the longest: about twice the largest rows
        sizes = sorted((len(p.prompt_ids) + len(p.completion_ids), len(p.completion_ids)) for p in pairs)[::-1]
        largest = sizes[:cfg.batch_size]
        return 2 * len(largest) * largest[0][0], 2 * sum(k for _, k in largest)
    if pairs:
        width = (segment_length if cfg.prefix_sharing
                 else lambda p: len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)))
        largest = sorted(pairs, key=width, reverse=True)[:cfg.batch_size]
        return (batch_tokens(largest, cfg.prefix_sharing, cfg.pack_tokens),
                sum(len(p.chosen_ids) + len(p.rejected_ids) for p in largest))
    return cfg.batch_size * 2 * cfg.max_length, cfg.batch_size * 2 * cfg.max_length


def data_for(cfg, log=lambda *a, **k: None) -> list:
    """The tokenized training examples `train` would check with (--data given; else []): loading the
    tokenizer converts a GGUF model once, as `train` does too."""
    if not cfg.data:
        return []
    from dpokit.batches.inputs import load_data
    from dpokit.models import load_tokenizer
    from dpokit.objectives import OBJECTIVES
    unpaired = any(OBJECTIVES[n].data == "unpaired" for n in cfg.loss_names)
    return load_data(cfg, load_tokenizer(cfg.model, cfg.trust_remote_code), unpaired, log)[0]
