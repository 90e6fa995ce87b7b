"""Reference log-probs computed once per (reference weights, exact token ids) and cached on disk.

The key hashes the reference's weights and every token id of every pair (which already reflects the
tokenizer, the data file's content, the chat template and the truncation settings), plus the options
that change the sums (ld_alpha). A different model, file or truncation gives a different key, so a
stale cache is never used. Reused across epochs, reruns and β sweeps; the reference model itself
need not be loaded when the cache hits. The sums themselves come from `logprobs.pairs.pairs_logps`; the
caller (loop/reference.py) puts the precision, device and batch layout they were computed in into `weights`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpokit.batches import TokenizedPair
from dpokit.logprobs.sequence import PairLogps

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
    from dpokit.cache import cache_dir
    return cache_dir() / "refcache" / f"{key}.safetensors"


def load_cached(key: str) -> PairLogps | None:
    path = cache_path(key)
    if not path.is_file():
        return None
    t = load_file(path)
    return PairLogps(t["chosen"], t["rejected"], t["chosen_tokens"], t["rejected_tokens"])


def store(key: str, logps: PairLogps) -> Path:
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({n: getattr(logps, n).contiguous() for n in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")},
              tmp, metadata={"format": FORMAT, "pairs": str(len(logps.chosen))})
    os.replace(tmp, path)  # atomic: readers see a whole file or none
    return path
