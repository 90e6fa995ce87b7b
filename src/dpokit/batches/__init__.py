"""Stage 2 — batches: tokenize pairs (boundary-exact, truncated) and pad them into tensors."""

from dpokit.batches.collate import collate, collate_kto, pad_rows
from dpokit.batches.tokenize import (TokenizedCompletion, TokenizedPair, TokenizeReport, tokenize_completions,
                                     tokenize_pair, tokenize_pairs)

__all__ = ["TokenizedCompletion", "TokenizedPair", "TokenizeReport", "collate", "collate_kto", "pad_rows",
           "tokenize_completions", "tokenize_pair", "tokenize_pairs"]
