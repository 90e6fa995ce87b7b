"""Reference log-probs computed once per (reference weights, exact token ids) and cached on disk.

The key hashes the reference's weights and every token id of every pair (which already reflects the
tokenizer, the data file's content, the chat template and the truncation settings), plus the options
that change the sums (ld_alpha). A different model, file or truncation gives a different key, so a
stale cache is never used. Reused across epochs, reruns and β sweeps; the reference model itself
need not be loaded when the cache hits.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpokit.batches import TokenizedPair, eval_batches, pair_batch
from dpokit.logprobs.sequence import PairLogps, pair_logps

FORMAT = "dpokit-refcache-1"


def weights_digest(model) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes): ~1 s for 135M parameters."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(weights: str, pairs: list[TokenizedPair], ld_alpha: float | None) -> str:
    h = hashlib.sha256(f"{FORMAT}:{weights}:{ld_alpha}".encode())
    for p in pairs:
        h.update(repr((p.prompt_ids, p.chosen_ids, p.rejected_ids)).encode())
    return h.hexdigest()[:32]


def cache_path(key: str) -> Path:
    from dpokit.models import cache_dir
    return cache_dir() / "refcache" / f"{key}.safetensors"


def load_cached(key: str) -> PairLogps | None:
    path = cache_path(key)
    if not path.is_file():
        return None
    t = load_file(path)
    return PairLogps(t["chosen"], t["rejected"], t["chosen_tokens"], t["rejected_tokens"])


@torch.no_grad()
def compute_reference(model, pairs: list[TokenizedPair], batch_size: int, pad_id: int, device,
                      ld_alpha: float | None, prefix_sharing: bool, pack_tokens: int, ctx=None) -> PairLogps:
    """Reference log-probs of every pair, in order, on CPU, in the run's layout (`pair_batch`) and batches
    (`eval_batches`: at most batch_size pairs and batch_size × 1024 computed tokens, so long rows are not
    padded to each other): the held-out evaluation computes the policy's with these very batches, so its
    margins before training are exactly 0 when `model` holds the weights the policy evaluates in (the policy
    itself, or its fp32 master copy under --model-dtype bf16: loop/reference.py), not a bf16 copy of them. Under torchrun (`ctx`) each rank computes every world-th batch —
    the same batches as one process, so the same sums."""
    from dpokit.distributed import map_batches
    ranges = eval_batches(pairs, batch_size, prefix_sharing, pack_tokens)

    def batch_logps(b: int) -> PairLogps:
        rows = pairs[ranges[b][0]:ranges[b][1]]
        batch = {k: v.to(device) for k, v in pair_batch(rows, pad_id, prefix_sharing, pack_tokens).items()}
        return pair_logps(model, batch, ld_alpha)

    parts = map_batches(batch_logps, len(ranges), ctx)
    return PairLogps(*(torch.cat([getattr(p, n) for p in parts]).cpu()
                       for n in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")))


def store(key: str, logps: PairLogps) -> Path:
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({n: getattr(logps, n).contiguous() for n in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")},
              tmp, metadata={"format": FORMAT, "pairs": str(len(logps.chosen))})
    os.replace(tmp, path)  # atomic: readers see a whole file or none
    return path
