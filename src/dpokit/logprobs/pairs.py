"""Log-prob summaries of a whole list of pairs: the one forward pass over a dataset, no gradients.

Used wherever a table of per-pair sums is needed rather than a training step: the reference cache
(logprobs/refcache.py, via loop/reference.py), the held-out evaluation of the policy and of its starting
reference (evaluation/preference.py), and `dpokit eval` after training (evaluation/offline.py). One function,
so that a held-out reference table and the evaluation that subtracts it from the policy's are computed by
the same code in the same batches: their sums then differ only where the weights do (step-0 margins exactly 0).
"""

from __future__ import annotations

import torch

from dpokit.batches import TokenizedPair, eval_batches, pair_batch
from dpokit.distributed import Distributed, map_batches
from dpokit.logprobs.sequence import PairLogps, pair_logps

FIELDS = ("chosen", "rejected", "chosen_tokens", "rejected_tokens", "chosen_wpo", "rejected_wpo", "chosen_plain")


@torch.no_grad()
def pairs_logps(model, pairs: list[TokenizedPair], batch_size: int, pad_id: int, device, *,
                ld_alpha: float | None = None, with_wpo: bool = False, prefix_sharing: bool = True,
                pack_tokens: int = 0, ctx: Distributed | None = None) -> PairLogps:
    """`pair_logps` of every pair under `model`, in order, concatenated over batches, on the CPU: [N] each.

    Batches (`batches.eval_batches`): consecutive pairs, at most `batch_size` of them and at most
    batch_size × TOKENS_PER_PAIR computed tokens, in the run's layout (`pair_batch`: prefix-shared and packed,
    or padded rows). A float sum depends on the batch it was computed in (in its last bits under fp32, by
    the half precision's rounding under autocast), so two tables compare exactly only when computed with the
    same `batch_size`, layout and precision. The caller sets the precision (`compute_precision`).

    Under torchrun (`ctx`) each rank computes every world-th batch — the same batches as one process, so the
    same sums — and every rank gets the whole table. A model sharded by FSDP2 (DTensor parameters) runs
    collectives in its forward, so then every rank makes the same number of forward calls (lockstep)."""
    ranges = eval_batches(pairs, batch_size, prefix_sharing, pack_tokens)

    def batch_logps(b: int) -> PairLogps:
        batch = pair_batch(pairs[ranges[b][0]:ranges[b][1]], pad_id, prefix_sharing, pack_tokens)
        return pair_logps(model, {k: v.to(device) for k, v in batch.items()}, ld_alpha, with_wpo)

    parts = map_batches(batch_logps, len(ranges), ctx, lockstep=is_sharded(model))

    if not parts:
        return PairLogps(*(torch.zeros(0) for _ in range(4)))

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values).cpu()
    return PairLogps(*(cat(n) for n in FIELDS))


def is_sharded(model) -> bool:
    """Whether `model` holds FSDP2 shards (DTensor parameters): its forward is then a collective."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 kept it under its private name; builds without distributed have none
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return False
    return any(isinstance(p, DTensor) for p in model.parameters())
