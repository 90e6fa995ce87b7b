"""TokenizedPairs → padded tensors: rows [chosen_0 … chosen_{B-1}, rejected_0 … rejected_{B-1}]."""

from __future__ import annotations

import torch

from dpokit.batches.tokenize import TokenizedCompletion, TokenizedPair


def padded_rows(pairs: list[TokenizedPair]) -> tuple[list[tuple[list[int], list[int]]], list[int], list[int]]:
    """(distinct (prompt, completion) rows in order [chosen_0 … chosen_{B-1}, rejected_0 …], the pair row
    each stands for, seq_map [2B]: the pair row whose tokens each pair row takes). A completion several pairs
    share — the pairs of one ranked row — is one row, computed once."""
    b, first, rows, seqs = len(pairs), {}, [], []
    seq_map = list(range(2 * b))
    for seq in range(2 * b):
        p = pairs[seq % b]
        row = (p.prompt_ids, p.chosen_ids if seq < b else p.rejected_ids)
        key = (tuple(row[0]), tuple(row[1]))
        if key in first:
            seq_map[seq] = first[key]
        else:
            first[key] = seq
            rows.append(row)
            seqs.append(seq)
    return rows, seqs, seq_map


def collate(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of the 2B sequences, each distinct one once.

    Returns input_ids, attention_mask and completion_mask, each [N, T] (N ≤ 2B distinct sequences, T the
    longest); completion_mask is 1 exactly at completion tokens (the tokens whose log-probs are summed).
    When some completion repeats (N < 2B), also row_seqs [N] (the pair row each batch row stands for),
    seq_map [2B] (`packing.share`) and n_seqs = 2B.
    """
    rows, seqs, seq_map = padded_rows(pairs)
    batch = pad_rows(rows, pad_id)
    if len(rows) < 2 * len(pairs):
        batch.update(row_seqs=torch.tensor(seqs), seq_map=torch.tensor(seq_map), n_seqs=torch.tensor(2 * len(pairs)))
    return batch


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
