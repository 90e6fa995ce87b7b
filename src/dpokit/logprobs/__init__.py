"""Stage 3 — log-probs: per-sequence sums of completion-token log-probabilities, in fp32."""

from dpokit.logprobs.sequence import (PairLogps, compute_precision, TokenLogps, completion_token_logps, pair_logps, sequence_logps,
                                      sequence_logps_full)

__all__ = ["PairLogps", "compute_precision", "TokenLogps", "completion_token_logps", "pair_logps", "sequence_logps",
           "sequence_logps_full"]
