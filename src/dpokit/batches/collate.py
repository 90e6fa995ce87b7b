"""TokenizedPairs → padded tensors: rows [chosen_0 … chosen_{B-1}, rejected_0 … rejected_{B-1}]."""

from __future__ import annotations

import torch

from dpokit.batches.tokenize import TokenizedCompletion, TokenizedPair


def collate(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of 2B sequences.

    Returns input_ids, attention_mask and completion_mask, each [2B, T] (T = longest sequence);
    completion_mask is 1 exactly at completion tokens (the tokens whose log-probs are summed).
    """
    rows = [(p.prompt_ids, getattr(p, completion)) for completion in ("chosen_ids", "rejected_ids") for p in pairs]
    return pad_rows(rows, pad_id)


def collate_kto(examples: list[TokenizedCompletion], pad_id: int, max_length: int,
                kl_partners: list[TokenizedCompletion] | None = None) -> dict[str, torch.Tensor]:
    """KTO batch: rows [x_i + y_i for i < B] then the mismatched [x_i + y_{i−1} for i < B] used to
    estimate the KL reference point (as the KTO paper and TRL: completions cycled by one in the batch).
    `kl_partners`: the examples whose completions the mismatched rows take instead (under torchrun, the
    neighbours in the whole micro-batch, some held by other ranks). Mismatched completions are cut to fit
    max_length. Adds `labels` [B] (bool)."""
    rows = [(e.prompt_ids, e.completion_ids) for e in examples]
    shifted = kl_partners if kl_partners is not None else [examples[-1]] + examples[:-1]
    rows += [(e.prompt_ids, s.completion_ids[:max_length - len(e.prompt_ids)]) for e, s in zip(examples, shifted)]
    batch = pad_rows(rows, pad_id)
    batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    return batch


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(prompt ids, completion ids) rows → right-padded input_ids, attention_mask, completion_mask."""
    seqs = [p + c for p, c in rows]
    masks = [[0] * len(p) + [1] * len(c) for p, c in rows]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = 1
        completion_mask[i, :len(m)] = torch.tensor(m)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
