"""Issue 15 part 2 measurement (docs/PERFORMANCE.md, "Reference log-probs from the sampler"): how many demo-style
sampled pairs training can take from the sampler, and the reference pass time that saves (embedded model,
demo settings). Run: .venv/bin/python docs/sampler_ref_measure.py (about 6 min on a 2-core CPU)."""
import tempfile
import time
from pathlib import Path

import torch
from dpokit.batches import tokenize_pairs
from dpokit.data import builtin_path, load_pairs, load_prompts
from dpokit.evaluation.rewards import load_reward
from dpokit.logprobs import compute_precision, pairs_logps
from dpokit.logprobs.refcache import weights_digest
from dpokit.logprobs.sampler_ref import sort_pairs
from dpokit.models import load_model, load_tokenizer
from dpokit.tasks.pairs import make_pairs, write_jsonl

a = torch.randn(2048, 2048); b = torch.randn(2048, 2048); a @ b
t = time.perf_counter(); r = 10
for _ in range(r): a @ b
print(f"fp32 matmul 2048^3: {2 * 2048**3 * r / (time.perf_counter() - t) / 1e9:.0f} GFLOP/s")
tok, model = load_tokenizer("embedded"), load_model("embedded")
prompts, _ = load_prompts(builtin_path("sentiment_train"))
t = time.perf_counter(); d = weights_digest(model); print(f"weights digest {time.perf_counter() - t:.2f} s")
t = time.perf_counter()
rows, stats = make_pairs(model, tok, prompts[:32], load_reward("sentiment"), 4, "all", max_new_tokens=32, seed=0)
print(f"make_pairs {time.perf_counter() - t:.1f} s: {stats.summary()}")
path = write_jsonl(rows, Path(tempfile.mkdtemp()) / "pairs32.jsonl")
pairs, _ = tokenize_pairs(load_pairs(str(path))[0], tok, 128, 64)  # demo limits
usable, why = sort_pairs(pairs, d)
print(f"demo limits: {len(usable)} of {len(pairs)} pairs usable; {dict(why)}")
full, _ = tokenize_pairs(load_pairs(str(path))[0], tok, 1 << 30, None)
print(f"no limits: {len(sort_pairs(full, d)[0])} of {len(full)}")
cpu = torch.device("cpu")
def ref(ps):
    t = time.perf_counter()
    with compute_precision(cpu, "fp32"):
        out = pairs_logps(model, ps, 8, tok.pad_token_id, cpu, pack_tokens=0)
    return out, time.perf_counter() - t
ref(pairs[:8])  # warm-up
allp, t_all = ref(pairs)
rest = [p for i, p in enumerate(pairs) if i not in set(usable)]
_, t_rest = ref(rest) if rest else (None, 0.0)
print(f"reference pass: all {len(pairs)} pairs {t_all:.1f} s; only the {len(rest)} recomputed {t_rest:.1f} s")
st = torch.tensor([[pairs[i].sampler_ref.chosen_logp, pairs[i].sampler_ref.rejected_logp] for i in usable],
                  dtype=torch.float64)
rc = torch.stack([allp.chosen[usable], allp.rejected[usable]], 1).double()
rel = ((st - rc).abs() / rc.abs()).max().item()
print(f"stored vs recomputed: max |diff| {(st - rc).abs().max().item():.2e} nats, max rel {rel:.2e}")
