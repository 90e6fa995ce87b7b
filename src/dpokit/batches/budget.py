"""Evaluation and reference batches cut by a token budget as well as a pair count.

A fixed pair count pads every row of a batch to its longest one: one 4k-token pair among short ones makes
every row 4k tokens wide, and several long pairs in one batch multiply the activation memory of a pass
whose per-token cost does not improve past a few thousand tokens a batch. So a batch ends after
`batch_size` pairs or before its collated tensor (rows × width, padding included) would exceed
`batch_size × TOKENS_PER_PAIR` tokens, whichever comes first; a pair longer than that has a batch of its own.
At the default lengths (max_length ≤ 512, pack_tokens 1024) no batch reaches the budget, so batches are
the plain pair-count ones. Batches stay consecutive, in file order: the held-out evaluation and the
reference cache use this same plan, so their float sums are computed in the very same batches.
"""

from __future__ import annotations

from dpokit.batches.collate import padded_rows
from dpokit.batches.packing import packed_width
from dpokit.batches.tokenize import TokenizedPair

TOKENS_PER_PAIR = 1024  # the budget per pair of --eval-batch-size; a key part of cached reference sums


def batch_tokens(pairs: list[TokenizedPair], prefix_sharing: bool, pack_tokens: int) -> int:
    """Tokens the collated batch computes (rows × width, padding included) in the layout `pair_batch` builds."""
    if not prefix_sharing:  # collate: right-padded rows prompt+completion, each distinct one once
        rows = padded_rows(pairs)[0]
        return len(rows) * max(len(p) + len(c) for p, c in rows)
    rows, width = packed_width(pairs, pack_tokens)
    return rows * width


def eval_batches(pairs: list[TokenizedPair], batch_size: int, prefix_sharing: bool,
                 pack_tokens: int) -> list[tuple[int, int]]:
    """[start, end) of each batch: consecutive pairs, at most `batch_size` of them and at most
    batch_size × TOKENS_PER_PAIR computed tokens (a pair alone may exceed it)."""
    budget = batch_size * TOKENS_PER_PAIR
    ranges, start = [], 0
    while start < len(pairs):
        end = start + 1
        while (end < len(pairs) and end - start < batch_size
               and batch_tokens(pairs[start:end + 1], prefix_sharing, pack_tokens) <= budget):
            end += 1
        ranges.append((start, end))
        start = end
    return ranges
