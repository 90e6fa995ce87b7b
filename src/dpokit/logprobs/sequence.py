"""Summed completion log-probs log π(y|x) for each row of a batch.

`sequence_logps` runs the transformer body once, keeps the hidden states only at positions that
predict a completion token, and applies the LM head to those alone, in chunks: the [rows, T, vocab]
fp32 logits tensor (49k vocab here, 128k+ for Llama 3) never exists. `sequence_logps_full` is the
plain textbook computation from the full logits; tests hold the two equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Above this many logit elements per chunk the head is recomputed in backward instead of storing
# logits: 2**25 fp32 values is 128 MB, small next to activations yet large enough to keep matmuls fast.
CHUNK_ELEMENTS = 2**25


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _token_logps(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    logits = _at_least_fp32(head(hidden))
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _has_plain_head(model) -> bool:
    """True when logits are exactly lm_head(last hidden state): no scaling or soft-capping after it."""
    cfg = model.config
    return (getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None
            and model.get_output_embeddings() is not None)


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of log π(token | prefix) over completion tokens, per row.

    input_ids, attention_mask, completion_mask: [N, T]; completion_mask marks the tokens to score.
    Returns [N] in fp32 (fp64 for an fp64 model). Token t is predicted from position t-1, so the first token of a row is never scored.
    """
    if not _has_plain_head(model):
        return sequence_logps_full(model, input_ids, attention_mask, completion_mask, position_ids)
    body = model.get_decoder()
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state
    scored = completion_mask[:, 1:].bool()
    states = hidden[:, :-1][scored]                               # [K, H] only the positions that matter
    targets = input_ids[:, 1:][scored]                            # [K]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(scored)[scored]
    head = model.get_output_embeddings()
    chunk = max(1, CHUNK_ELEMENTS // head.out_features)
    if states.shape[0] <= chunk:
        token_logps = _token_logps(states, head, targets)
    else:
        recompute = torch.is_grad_enabled()
        parts = []
        for s, t in zip(states.split(chunk), targets.split(chunk)):
            parts.append(checkpoint(_token_logps, s, head, t, use_reentrant=False) if recompute
                         else _token_logps(s, head, t))
        token_logps = torch.cat(parts)
    out = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=input_ids.device)
    return out.index_add(0, rows, token_logps)


def sequence_logps_full(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Same result as `sequence_logps`, from the model's full [N, T, vocab] logits (simple, memory-hungry)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits[:, :-1]
    logits = _at_least_fp32(logits)
    token_logps = F.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


def pair_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_logps [B], rejected_logps [B]) for a batch built by `batches.collate` (chosen rows first)."""
    logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    return logps.chunk(2)
