"""Prefix sharing and padding-free packing (Wang & Hegde 2024, arXiv:2410.20305).

Each pair becomes one segment `prompt | chosen | rejected`: the prompt is computed once instead of
twice. Chosen tokens see the prompt and earlier chosen tokens, and rejected tokens see the prompt and
earlier rejected tokens — never the chosen ones; position ids restart at the prompt length for the
rejected part, so every token sees exactly what it would see in its own sequence. Segments are packed
first-fit-decreasing into rows of at most `capacity` tokens, so almost no pad tokens are computed.
Who sees whom is described per row by attention segments (logprobs/attention.py), not by a [T, T] mask:
the dense path builds that mask from them only when it runs.

The batch carries a score index (row, source position, target position, sequence, position in the
completion) for every scored token: the first rejected token is predicted from the last prompt
position, not from the position just before it in the row.
"""

from __future__ import annotations

import torch

from dpokit.batches.tokenize import TokenizedPair


def segment_length(p: TokenizedPair) -> int:
    return len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)


def pack_rows(pairs: list[TokenizedPair], capacity: int) -> list[list[int]]:
    """Indices of the pairs in each row: first-fit decreasing into rows of ≤ capacity tokens
    (a segment longer than capacity gets a row of its own). capacity 0: one pair per row."""
    order = sorted(range(len(pairs)), key=lambda i: -segment_length(pairs[i]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = segment_length(pairs[i])
        for r, free in enumerate(room):
            if capacity and n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(capacity, n) - n)
    return rows


def collate_packed(pairs: list[TokenizedPair], pad_id: int, capacity: int = 0) -> dict[str, torch.Tensor]:
    """Prefix-shared, packed batch of B pairs.

    Returns input_ids, position_ids [R, T]; segments [S, 5] (row, p0, p1, q0, q1: queries q0…q1−1 see keys
    p0…p1−1 and, causally, q0…q1−1; per pair prompt+chosen, then rejected over the prompt); score_row,
    score_src, score_tgt, score_seq, score_pos [K] for the K completion tokens, where score_seq is i for
    pair i's chosen and B + i for its rejected completion; n_seqs = 2B.
    """
    b = len(pairs)
    layout = pack_rows(pairs, capacity)
    width = max(sum(segment_length(pairs[i]) for i in row) for row in layout)
    input_ids = torch.full((len(layout), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(layout), width), dtype=torch.long)
    segments: list[tuple[int, int, int, int, int]] = []
    index: list[tuple[int, int, int, int, int]] = []
    for r, row in enumerate(layout):
        o = 0
        for i in row:
            p = pairs[i]
            P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
            L = P + C + R
            input_ids[r, o:o + L] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
            position_ids[r, o:o + L] = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])
            segments += [(r, o, o, o, o + P + C), (r, o, o + P, o + P + C, o + L)]  # rejected never sees chosen
            for seq, start, n in ((i, o + P, C), (b + i, o + P + C, R)):
                for j in range(n):
                    src = (o + P - 1) if j == 0 else start + j - 1
                    if src >= o:  # an empty prompt leaves the first token unscored, as in the padded layout
                        index.append((r, src, start + j, seq, j))
            o += L
    score = torch.tensor(index, dtype=torch.long).reshape(-1, 5).T
    return {"input_ids": input_ids, "position_ids": position_ids,
            "segments": torch.tensor(segments, dtype=torch.long).reshape(-1, 5),
            "score_row": score[0], "score_src": score[1], "score_tgt": score[2], "score_seq": score[3],
            "score_pos": score[4], "n_seqs": torch.tensor(2 * b)}
