"""Stage 3 — log-probs: per-sequence sums of completion-token log-probabilities, in fp32."""

from dpokit.logprobs.sequence import pair_logps, sequence_logps, sequence_logps_full

__all__ = ["pair_logps", "sequence_logps", "sequence_logps_full"]
