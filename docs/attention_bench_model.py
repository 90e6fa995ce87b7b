"""Whole model, dense vs segments alternated (docs/PERFORMANCE.md): python docs/attention_bench_model.py long 1"""
import json, sys, time
import torch
from dpokit.batches import collate_packed, tokenize_pairs
from dpokit.batches.tokenize import TokenizedPair
from dpokit.data import builtin_path, load_pairs
from dpokit.logprobs import pair_logps
from dpokit.logprobs.attention import use_attention
from dpokit.models import load_model, load_tokenizer

case, reps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = load_model("embedded")
if case == "long":
    ids = lambda n: torch.randint(100, 40000, (n,)).tolist()
    batches = [collate_packed([TokenizedPair(ids(2048), ids(256), ids(256), "x")], 0, 0)]
else:
    tok = load_tokenizer("embedded")
    pairs, _ = load_pairs(builtin_path("helpful_train"), "error")
    tp, _ = tokenize_pairs(pairs[:32], tok, 512, 256)
    batches = [collate_packed(tp[i:i + 4], tok.pad_token_id, 1024) for i in range(0, 32, 4)]
times = {"dense": [], "segments": []}
for _ in range(reps):
    for kind in (("segments", "dense") if case == "long" else ("dense", "segments")):
        use_attention(kind, log=lambda m: None)
        t = time.perf_counter()
        for b in batches:
            out = pair_logps(model, b)
            (out.chosen.sum() - out.rejected.sum()).backward()
            model.zero_grad(set_to_none=True)
        times[kind].append(round(time.perf_counter() - t, 2))
        print(kind, times[kind][-1], flush=True)
print(json.dumps({"case": case, "row_tokens": [b["input_ids"].shape[1] for b in batches], **times}))
