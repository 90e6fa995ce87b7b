"""Supervised fine-tuning's loss on demonstrations (`dpokit sft`, loop/sft.py): the negative log-likelihood of
the trained tokens (completions, assistant turns). Not a `--loss` of `dpokit train`: that one's `sft` is the NLL
of the chosen side of pairs (objectives/paired.sft_loss, RPO's term); this one trains on demonstrations alone."""

from __future__ import annotations

from torch import Tensor


def demonstration_nll(token_logps: Tensor, step_tokens: float) -> Tensor:
    """A micro-batch's part of a step's SFT loss:

        L = −(1/N) Σ_{demonstrations d of the step} Σ_{t trained in d} log π(y_t | y_<t)

    token_logps: log π(y_t | y_<t) of the micro-batch's trained tokens, [K]; step_tokens: N, the trained tokens
    of the whole optimizer step (every micro-batch of the gradient accumulation, every process). Summed over the
    step's micro-batches this is the mean NLL per trained token of the step, so a long demonstration weighs by its
    tokens, as TRL 1.16's SFTTrainer (completion_only_loss / assistant_only_loss: the sum over label tokens ÷
    num_items_in_batch, the label tokens of the whole accumulated batch and of every process) and not the mean of
    per-micro-batch means. An N of 0 (no trained token) gives 0, as TRL's clamp(min=1)."""
    return -token_logps.sum() / max(step_tokens, 1)
