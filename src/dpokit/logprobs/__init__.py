"""Stage 3 — log-probs: per-sequence sums of completion-token log-probabilities, in fp32."""

from dpokit.logprobs.pairs import pairs_logps
from dpokit.logprobs.sequence import (PairLogps, TokenLogps, completion_token_logps, compute_precision, pair_logps,
                                      sequence_logps, sequence_logps_full)

__all__ = ["PairLogps", "TokenLogps", "completion_token_logps", "compute_precision", "pair_logps", "pairs_logps",
           "sequence_logps", "sequence_logps_full"]
