"""Issue 15 part 1 measurement (docs/PERFORMANCE.md, "Each completion computed once"): the demo's training pairs
as ranked rows (each sample computed once per micro-batch) against the same pairs written out as pair rows (each
sample computed in every pair it is in), side by side on one machine: tokens per epoch, seconds per training
step, the reference pass. Needs a demo's pairs (`dpokit demo` writes pairs_train.jsonl as ranked rows).
Run: .venv/bin/python docs/ranked_measure.py runs/demo [steps]   (about 5 min on a 2-core CPU at 20 steps)."""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from dpokit.data import load_pairs
from dpokit.loop import train
from dpokit.tasks.demo import SentimentTask, demo_train_config

demo, steps = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 20
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
model_name = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name"))
flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in cpu.split()]
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
a @ b
t = time.perf_counter()
for _ in range(10):
    a @ b
print(f"{model_name} ({', '.join(flags)}); fp32 matmul 2048^3: {2 * 2048**3 * 10 / (time.perf_counter() - t) / 1e9:.0f} "
      f"GFLOP/s; {torch.get_num_threads()} threads")

work = Path(tempfile.mkdtemp())
# a fresh reference cache (so both reference passes are computed), the converted model shared with the user's
from dpokit.cache import cache_dir
(work / "cache").mkdir()
(work / "cache" / "models").symlink_to(cache_dir() / "models", target_is_directory=True)
os.environ["DPOKIT_CACHE"] = str(work / "cache")
pairs, _ = load_pairs(str(demo / "pairs_train.jsonl"))
written = work / "pairs_written_out.jsonl"
with open(written, "w", encoding="utf-8") as f:
    for p in pairs:
        s = p.sampler_ref  # the same stored reference sums, as pair rows carry them
        f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                            "chosen_truncated": not p.chosen_ends, "rejected_truncated": not p.rejected_ends,
                            "ref_digest": s.digest, "ref_prompt_ids": s.prompt_ids, "chosen_ref_ids": s.chosen_ids,
                            "rejected_ref_ids": s.rejected_ids, "chosen_ref_logp": s.chosen_logp,
                            "rejected_ref_logp": s.rejected_logp}) + "\n")
for name, data in (("ranked rows", demo / "pairs_train.jsonl"), ("pairs written out", written)):
    log = []
    cfg = demo_train_config(work / name.replace(" ", "-"), SentimentTask(), demo, data=str(data), max_steps=steps,
                            eval_data=None, progress=False)
    start = time.perf_counter()
    train(cfg, log=log.append)
    total = time.perf_counter() - start
    out = Path(cfg.output_dir)
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    step_s = [cfg.batch_size / m["pairs_per_s"] for m in metrics if "pairs_per_s" in m][2:]  # after warm-up
    notes = [m for m in log if m.startswith(("ranked rows:", "training reference log-probs"))]
    print(f"{name}: {len(pairs)} pairs; {sum(step_s) / len(step_s):.2f} s/step of {cfg.batch_size} pairs "
          f"(steps 3–{steps}); run {total:.0f} s with loading and reference pass", *notes, sep="\n  ")

# The reference pass over every training pair (none taken from the sampler), in the training reference's
# batches of --batch-size consecutive pairs: in file order a batch holds whole rows, so each completion is
# computed once; shuffled, almost every pair computes its own two completions, as every pair did before.
import random
from dpokit.batches import tokenize_pairs
from dpokit.batches.packing import layout_tokens
from dpokit.logprobs import compute_precision, pairs_logps
from dpokit.models import load_model, load_tokenizer
tokenizer, model = load_tokenizer("embedded"), load_model("embedded")
tokenized, _ = tokenize_pairs(pairs, tokenizer, 128, 64)
shuffled = random.Random(0).sample(tokenized, len(tokenized))
device = torch.device("cpu")
for name, order in (("file order (rows whole)", tokenized), ("shuffled pairs", shuffled)):
    tokens = sum(layout_tokens(order[i:i + 16]) for i in range(0, len(order), 16))
    start = time.perf_counter()
    with torch.no_grad(), compute_precision(device, "fp32"):
        pairs_logps(model, order, 16, tokenizer.pad_token_id, device, pack_tokens=0)
    print(f"reference pass, {len(order)} pairs in batches of 16, {name}: {tokens:,} tokens, "
          f"{time.perf_counter() - start:.1f} s")
