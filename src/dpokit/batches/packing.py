"""Prefix sharing and padding-free packing (Wang & Hegde 2024, arXiv:2410.20305), each sequence computed once.

The pairs of a micro-batch that share a prompt (every pair of a ranked row with k completions, or repeated
prompts in plain pair data) become one unit `prompt | y_1 | … | y_m`, where y_1 … y_m are their distinct
completions: the prompt is computed once instead of twice per pair, and a completion that appears in several
pairs (up to k − 1 of them in a ranked row) once instead of once per pair. Each completion's tokens see the
prompt and their own earlier tokens — never another completion's; position ids restart at the prompt length
for every completion after the first, so every token sees exactly what it would see in its own sequence.
Units are packed first-fit-decreasing into rows of at most `capacity` tokens, so almost no pad tokens are
computed. Who sees whom is described per row by attention segments (logprobs/attention.py), not by a [T, T]
mask: the dense path builds that mask from them only when it runs.

The batch carries a score index (row, source position, target position, sequence, position in the
completion) for every scored token: the first token of every completion after the first is predicted from
the last prompt position, not from the position just before it in the row. A completion shared by several
pairs is scored under the sequence number of its first occurrence; `seq_map` [2B] tells each of the 2B
pair rows (B chosen, then B rejected) whose tokens are its own (`TokenLogps.shared`), so every objective
sees the same per-pair sums, and gradients, as the pairs written out one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dpokit.batches.collate import padded_rows
from dpokit.batches.tokenize import TokenizedPair


@dataclass
class Unit:
    """One prompt of a micro-batch and its distinct completions; `seqs[j]` is the sequence number (pair row
    i for a chosen completion, B + i for a rejected one) completion j is scored under."""
    prompt: list[int]
    completions: list[list[int]] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt) + sum(len(c) for c in self.completions)


def share(pairs: list[TokenizedPair]) -> tuple[list[Unit], list[int]]:
    """(units in order of first appearance, seq_map [2B]: the sequence number each pair row takes its
    tokens from — itself unless the same prompt and completion came earlier in the batch)."""
    rows, seqs, seq_map = padded_rows(pairs)
    units: dict[tuple, Unit] = {}
    for (prompt, completion), seq in zip(rows, seqs):
        unit = units.setdefault(tuple(prompt), Unit(prompt))
        unit.completions.append(completion)
        unit.seqs.append(seq)
    return list(units.values()), seq_map


def segment_length(p: TokenizedPair) -> int:
    """Tokens of one pair alone in the shared layout: prompt + chosen + rejected."""
    return len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)


def layout_tokens(pairs: list[TokenizedPair]) -> int:
    """Real (non-pad) tokens the shared layout computes for these pairs as one micro-batch."""
    return sum(u.length for u in share(pairs)[0])


def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the units in each row: first-fit decreasing into rows of ≤ capacity tokens
    (a unit longer than capacity gets a row of its own). capacity 0: one unit per row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r, free in enumerate(room):
            if capacity and n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(capacity, n) - n)
    return rows


def _packed(pairs: list[TokenizedPair], capacity: int):
    """(units, seq_map, unit lengths, unit indices per row, row width) of the packed layout."""
    units, seq_map = share(pairs)
    lengths = [u.length for u in units]
    layout = pack_lengths(lengths, capacity)
    return units, seq_map, lengths, layout, max(sum(lengths[i] for i in row) for row in layout)


def packed_width(pairs: list[TokenizedPair], capacity: int) -> tuple[int, int]:
    """(rows, width) of `collate_packed(pairs, ·, capacity)`'s tensors."""
    _, _, _, layout, width = _packed(pairs, capacity)
    return len(layout), width


def collate_packed(pairs: list[TokenizedPair], pad_id: int, capacity: int = 0) -> dict[str, torch.Tensor]:
    """Prefix-shared, packed batch of B pairs.

    Returns input_ids, position_ids [R, T]; segments [S, 5] (row, p0, p1, q0, q1: queries q0…q1−1 see keys
    p0…p1−1 and, causally, q0…q1−1; per unit prompt+first completion, then each further completion over the
    prompt); score_row, score_src, score_tgt, score_seq, score_pos [K] for the K distinct completion tokens,
    where score_seq is i for pair i's chosen and B + i for its rejected completion (the first occurrence's
    number for a repeated one); n_seqs = 2B; seq_map [2B] when some completion is repeated (see `share`).
    """
    units, seq_map, lengths, layout, width = _packed(pairs, capacity)
    input_ids = torch.full((len(layout), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(layout), width), dtype=torch.long)
    segments: list[tuple[int, int, int, int, int]] = []
    index: list[tuple[int, int, int, int, int]] = []
    for r, row in enumerate(layout):
        o = 0
        for i in row:
            u = units[i]
            P = len(u.prompt)
            input_ids[r, o:o + lengths[i]] = torch.tensor(u.prompt + [t for c in u.completions for t in c])
            position_ids[r, o:o + P] = torch.arange(P)
            start = o + P
            for j, (completion, seq) in enumerate(zip(u.completions, u.seqs)):
                n = len(completion)
                position_ids[r, start:start + n] = torch.arange(P, P + n)
                # the first completion continues the prompt causally; the others see it as a prefix only
                segments.append((r, o, o, o, start + n) if j == 0 else (r, o, o + P, start, start + n))
                for t in range(n):
                    src = (o + P - 1) if t == 0 else start + t - 1
                    if src >= o:  # an empty prompt leaves the first token unscored, as in the padded layout,
                        # which then numbers the scored tokens from 0: so does this (LD-DPO's weights compare them)
                        index.append((r, src, start + t, seq, t if P else t - 1))
                start += n
            o += lengths[i]
    score = torch.tensor(index, dtype=torch.long).reshape(-1, 5).T
    batch = {"input_ids": input_ids, "position_ids": position_ids,
             "segments": torch.tensor(segments, dtype=torch.long).reshape(-1, 5),
             "score_row": score[0], "score_src": score[1], "score_tgt": score[2], "score_seq": score[3],
             "score_pos": score[4], "n_seqs": torch.tensor(2 * len(pairs))}
    if seq_map != list(range(2 * len(pairs))):
        batch["seq_map"] = torch.tensor(seq_map, dtype=torch.long)
    return batch
