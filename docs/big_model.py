"""Above 1B on a CPU: a random model of SmolLM2-1.7B's published architecture, estimated, refused, and trained.

1. Builds (once) a randomly initialised LlamaForCausalLM with SmolLM2-1.7B's config (hidden 2048, intermediate
   8192, 24 layers, 32 heads, 32 kv heads, vocab 49152, tied embeddings, rope_theta 130000, 8192 positions) and
   the embedded model's tokenizer (SmolLM2's), saved as bf16 safetensors in $DPOKIT_CACHE/models (~3.4 GB;
   never committed).
2. Prints `dpokit estimate` for full fine-tuning in fp32, and shows `dpokit train` refusing it before loading.
   Where the estimate fits the machine (over ~28 GiB free) the refusal step is skipped: train would really
   start the fp32 full fine-tuning.
3. Runs LoRA DPO (r 16, --model-dtype bf16 base) for a few steps on short synthetic rows, measured as
   docs/memory_calibration.py measures (`measure`: a forked child's VmHWM minus its RSS at start), with s/step,
   against the estimate for the same data.

    .venv/bin/python docs/big_model.py [--steps 2]     # ~4 min on the 2-core AMD EPYC (AVX512-BF16) of PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
PY = sys.executable


def build(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpokit.models import load_tokenizer
    if (folder / "config.json").is_file():
        return folder
    tokenizer = load_tokenizer("embedded")
    config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=True,
                         rope_theta=130000.0, max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: 3.4 GB, never an fp32 copy
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    print(f"built {sum(p.numel() for p in model.parameters()):,} parameters in {time.perf_counter() - t0:.0f} s "
          f"→ {folder}", flush=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    from memory_calibration import make_pairs, measure

    from dpokit.models import cache_dir
    folder = cache_dir() / "models" / "random-smollm2-1.7b-arch-bf16"
    folder.parent.mkdir(parents=True, exist_ok=True)
    model = str(build(folder))
    with tempfile.TemporaryDirectory() as tmp:
        data = make_pairs(f"{tmp}/pairs.jsonl", args.steps, words=28)
        options = {"model": model, "data": data, "max_length": 128, "max_prompt_length": 64, "batch_size": 1,
                   "max_steps": args.steps, "warmup_steps": 0, "output_dir": f"{tmp}/run"}
        rows = ["--model", model, "--data", data, "--max-length", "128", "--max-prompt-length", "64",
                "--batch-size", "1", "--max-steps", str(args.steps), "--warmup-steps", "0", "--no-progress",
                "--output-dir", f"{tmp}/run"]
        print("\n$ dpokit estimate (full fine-tuning, fp32)", " ".join(rows[:2] + rows[4:10]), flush=True)
        subprocess.run([PY, "-m", "dpokit", "estimate", *rows], check=True)
        if full_ft_fits(options):  # then `train` would really start an fp32 full fine-tuning of 1.7B
            print("\nthe estimate fits this machine: the refusal step is skipped", flush=True)
        else:
            t0 = time.perf_counter()
            refused = subprocess.run([PY, "-m", "dpokit", "train", *rows], capture_output=True, text=True)
            print(f"\n$ dpokit train (same options): exit {refused.returncode} after "
                  f"{time.perf_counter() - t0:.1f} s", refused.stderr.strip()[-1500:], sep="\n", flush=True)

        print("\n$ dpokit estimate --lora-r 16 --model-dtype bf16", flush=True)
        subprocess.run([PY, "-m", "dpokit", "estimate", *rows, "--lora-r", "16", "--model-dtype", "bf16"],
                       check=True)
        # measured as docs/memory_calibration.py measures (a forked child's VmHWM − its RSS at start), so the
        # ratio compares with its table
        t0 = time.perf_counter()
        r = measure({**options, "lora_r": 16, "model_dtype": "bf16"})
        wall = time.perf_counter() - t0
        steps = [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl") if '"loss"' in line]
        s_per_step = [round(1 / s["pairs_per_s"], 1) for s in steps]  # batch 1: one pair per step
        print(f"\nLoRA DPO, bf16 base: {wall:.0f} s in all, s/step {s_per_step}; peak RSS above the child's start "
              f"{r['measured'] / 2**30:.2f} GiB; estimated {r['estimated'] / 2**30:.2f} GiB ({r['phase']}; ratio "
              f"{r['estimated'] / r['measured']:.2f})")


def full_ft_fits(options: dict) -> bool:
    """Whether the pre-load check would let the fp32 full fine-tuning run on this machine now."""
    from dpokit.config import TrainConfig
    from dpokit.estimate import available_bytes, estimate, fits, shapes_for
    cfg = TrainConfig.from_dict(options)
    return fits(estimate(cfg, shapes_for(cfg)[0]), available_bytes("cpu"))


if __name__ == "__main__":
    main()
