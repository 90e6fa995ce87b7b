"""Attention alone, dense mask vs segments, fwd+bwd (docs/PERFORMANCE.md): python docs/attention_bench.py"""
import torch, time, sys
import torch.nn.functional as F
from dpokit.logprobs.attention import segment_attention, dense_mask
torch.manual_seed(0)
def row(P, C, R, n):  # n pairs of (P, C, R) in one row
    segs, o = [], 0
    for _ in range(n):
        segs += [(0, o, o, o, o + P + C), (0, o, o + P, o + P + C, o + P + C + R)]; o += P + C + R
    return o, segs
for P, C, R, n in ((100, 60, 60, 4), (2048, 256, 256, 1), (1024, 128, 128, 1), (512, 64, 64, 1)):
    T, segs = row(P, C, R, n)
    q = torch.randn(1, 9, T, 64, requires_grad=True); k = torch.randn(1, 3, T, 64, requires_grad=True); v = torch.randn(1, 3, T, 64, requires_grad=True)
    add = torch.zeros(()).masked_fill(~dense_mask(torch.tensor(segs), 1, T), torch.finfo(torch.float32).min)
    def dense():
        F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=add).sum().backward()
    def seg():
        segment_attention(None, q, k, v, tuple(segs)).sum().backward()
    res = {"dense": [], "seg": []}
    reps = 10 if T < 1500 else 3
    for _ in range(reps):
        for name, f in (("dense", dense), ("seg", seg)):
            t = time.perf_counter(); f(); res[name].append(time.perf_counter() - t)
    print(f"T={T} pairs={n} P/C/R={P}/{C}/{R}: dense min {min(res['dense'])*1e3:.1f} ms, segments min {min(res['seg'])*1e3:.1f} ms", flush=True)
