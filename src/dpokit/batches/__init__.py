"""Stage 2 — batches: tokenize pairs (boundary-exact, truncated) and pad them into tensors."""

from dpokit.batches.collate import collate
from dpokit.batches.tokenize import TokenizedPair, TokenizeReport, tokenize_pair, tokenize_pairs

__all__ = ["TokenizedPair", "TokenizeReport", "collate", "tokenize_pair", "tokenize_pairs"]
