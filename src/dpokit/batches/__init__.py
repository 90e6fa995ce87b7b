"""Stage 2 — batches: tokenize pairs (boundary-exact, truncated) and pad them into tensors."""

from dpokit.batches.budget import TOKENS_PER_PAIR, batch_tokens, eval_batches
from dpokit.batches.collate import collate, collate_kto, pad_rows
from dpokit.batches.packing import collate_packed
from dpokit.batches.tokenize import (TokenizedCompletion, TokenizedPair, TokenizeReport, tokenize_completions,
                                     tokenize_pair, tokenize_pairs)

def pair_batch(pairs: list[TokenizedPair], pad_id: int, prefix_sharing: bool, pack_tokens: int):
    """The batch layout the config asks for: prefix-shared (and packed), or padded separate rows."""
    return collate_packed(pairs, pad_id, pack_tokens) if prefix_sharing else collate(pairs, pad_id)

__all__ = ["TOKENS_PER_PAIR", "TokenizeReport", "batch_tokens", "eval_batches", "TokenizedCompletion", "TokenizedPair", "collate", "collate_kto", "collate_packed",
           "pad_rows", "pair_batch", "tokenize_completions", "tokenize_pair", "tokenize_pairs"]
