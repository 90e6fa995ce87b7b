"""TokenizedPairs → padded tensors: rows [chosen_0 … chosen_{B-1}, rejected_0 … rejected_{B-1}]."""

from __future__ import annotations

import torch

from dpokit.batches.tokenize import TokenizedPair


def collate(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of 2B sequences.

    Returns input_ids, attention_mask and completion_mask, each [2B, T] (T = longest sequence);
    completion_mask is 1 exactly at completion tokens (the tokens whose log-probs are summed).
    """
    seqs, masks = [], []
    for completion in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            ids = getattr(p, completion)
            seqs.append(p.prompt_ids + ids)
            masks.append([0] * len(p.prompt_ids) + [1] * len(ids))
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = 1
        completion_mask[i, :len(m)] = torch.tensor(m)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
