"""Measured peak memory of `dpokit train` against `dpokit.estimate`, on random Llama models built from a config.

Each configuration trains one step in a child forked from a parent that has imported torch, transformers and
dpokit; measured = the child's peak RSS (VmHWM) minus its RSS when it started (the imported libraries, which the
estimate leaves out too). Pairs are synthetic and long enough to be cut at --max-length, so every micro-batch
has the size the estimate is given (`batch_tokens` of the data, as `train` checks).

    .venv/bin/python docs/memory_calibration.py             # the table of docs/PERFORMANCE.md (~5 min, 2 cores)

tests/test_estimate.py runs `measure` on a smaller model.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the children are forked after tokenizing


def vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def make_model(folder: str, tokenizer, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
               dtype: str = "float32") -> str:
    """A random Llama of these widths, saved as safetensors with the tokenizer (a valid --model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_pairs(path: str, n: int, words: int = 400, seed: int = 0) -> str:
    """n pairs of random words, prompt and completions each longer than any --max-length used here."""
    rng = random.Random(seed)
    vocab = ["alpha", "river", "stone", "quiet", "number", "garden", "light", "seven", "paper", "orbit", "cloud"]
    text = lambda: " ".join(rng.choice(vocab) for _ in range(words))  # noqa: E731
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(), "chosen": text(), "rejected": text()}) + "\n")
    return path


def _child(options: dict, queue) -> None:
    try:
        from dpokit.loop import train
        start = vm("VmRSS")
        train(log=lambda *a, **k: None, **options)
        queue.put({"measured": vm("VmHWM") - start})
    except BaseException as e:  # noqa: BLE001 — reported to the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def measure(options: dict) -> dict:
    """{'measured', 'estimated', 'tokens', 'parts'} in bytes for one `train` configuration (one step)."""
    from dpokit.config import TrainConfig
    from dpokit.estimate import estimate, micro_batch_tokens, shapes_for
    from dpokit.batches.inputs import load_data
    from dpokit.models import load_tokenizer
    options = {"max_steps": 2, "progress": False, "memory_check": False, "warmup_steps": 0, "lr": 1e-4, **options}
    cfg = TrainConfig.from_dict(options)
    train_set, _ = load_data(cfg, load_tokenizer(cfg.model), False, lambda *a, **k: None)
    tokens = micro_batch_tokens(cfg, train_set)
    shape, ref = shapes_for(cfg)
    est = estimate(cfg, shape, 1, tokens, ref)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(options, queue))
    child.start()
    result = queue.get()
    child.join()
    if "error" in result:
        raise RuntimeError(result["error"])
    return {"measured": result["measured"], "estimated": est.peak, "phase": est.peak_phase, "tokens": tokens,
            "parts": est.parts, "params": shape.params}


CONFIGS = [  # (label, options beyond model/data/output)
    ("full FT fp32, ref cache", {}),
    ("+ gradient checkpointing", {"gradient_checkpointing": True}),
    ("live reference (--no-ref-cache)", {"ref_cache": False}),
    ("LoRA r=16", {"lora_r": 16}),
    ("pack 2× longer rows (max_length 512)", {"max_length": 512, "max_prompt_length": 256}),
    ("batch 4, no prefix sharing", {"batch_size": 4, "prefix_sharing": False, "pack_tokens": 0}),
    ("LoRA r=16 + checkpointing, batch 4", {"lora_r": 16, "gradient_checkpointing": True, "batch_size": 4}),
    ("LoRA r=16, --model-dtype bf16 base", {"lora_r": 16, "model_dtype": "bf16"}),
    ("live reference in bf16 (--model-dtype bf16 --no-ref-cache)", {"model_dtype": "bf16", "ref_cache": False}),
]


def table(model: str, data: str, out: str, base: dict, configs=CONFIGS) -> list[tuple[str, dict]]:
    rows = []
    for label, extra in configs:
        options = {"model": model, "data": data, "output_dir": out, **base, **extra}
        r = measure(options)
        rows.append((label, r))
        print(f"| {label} | {r['tokens'][0]} | {r['measured'] / 2**20:.0f} | {r['estimated'] / 2**20:.0f} | "
              f"{r['estimated'] / r['measured']:.2f} | {r['phase']} |", flush=True)
    return rows


def main() -> None:
    """No arguments: the docs table on a 123M model (embedded tokenizer). With --model/--data: JSON lines of
    `measure` for the configurations named in --configs (indices into CONFIGS), as tests/test_estimate.py runs."""
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--out", default=None)
    parser.add_argument("--base", default='{"batch_size": 2, "max_length": 256, "max_prompt_length": 128}')
    parser.add_argument("--configs", default=None, help="comma-separated indices into CONFIGS")
    args = parser.parse_args()
    configs = CONFIGS if args.configs is None else [CONFIGS[int(i)] for i in args.configs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DPOKIT_CACHE", f"{tmp}/cache")
        if args.model:
            for label, extra in configs:
                r = measure({"model": args.model, "data": args.data, "output_dir": args.out or f"{tmp}/run",
                             **json.loads(args.base), **extra})
                print(json.dumps({"label": label, **r}), flush=True)
            return
        from dpokit.models import load_tokenizer
        tokenizer = load_tokenizer("embedded")
        model = make_model(f"{tmp}/model", tokenizer, hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4)
        data = make_pairs(f"{tmp}/pairs.jsonl", 8)
        print("| configuration | tokens/micro-batch | measured MiB | estimated MiB | est/meas | peak phase |")
        print("|---|---|---|---|---|---|")
        table(model, data, f"{tmp}/run", json.loads(args.base), configs)


if __name__ == "__main__":
    main()
