"""Several training files, mixed by weight: `--data a.jsonl b.parquet --data-weights 0.7,0.3` (or lists in the
YAML). Each file is read, checked and tokenized on its own (its format detected and reported separately); then

  * without --data-weights the rows are the files' rows one after another, each once per epoch;
  * with weights w_i the epoch holds N = Σ n_i rows (n_i: file i's rows), of which file i gives
    round(N · w_i / Σ w) — largest remainders, so the counts add up to N — taken from a seeded permutation of
    its rows, cycling through it again when it must give more rows than it has (a small file weighted up repeats
    rows, a large one weighted down leaves some out; both counted in the log).

The draw is a pure function of (--seed, the files' row counts, the weights), made once per run, so a resumed
run trains on the same mixture in the same order (the epoch order on top of it is BatchSchedule's, by seed and
epoch). Rows repeated by the draw are the same pairs: the reference cache computes each once.
"""

from __future__ import annotations

import math
from dataclasses import replace

from dpokit.options import data_files, weight_values  # noqa: F401 (the option parsing lives with the options)


def mixture_counts(sizes: list[int], weights: list[float] | None) -> list[int]:
    """Rows each file gives to an epoch (module docstring): its own size without weights, else
    round(N · w_i / Σ w) by largest remainders, N = Σ sizes."""
    if weights is None:
        return list(sizes)
    total, weight_sum = sum(sizes), sum(weights)
    exact = [total * w / weight_sum for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))  # largest remainder first
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def draw_rows(n_rows: int, count: int, seed: int, file_index: int) -> list[int]:
    """`count` row indices of a file of `n_rows`: a seeded permutation, repeated as often as needed, cut at count."""
    import torch  # late: config checks read this module's other functions
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (file_index + 1))
    order: list[int] = []
    while len(order) < count:
        order += torch.randperm(n_rows, generator=generator).tolist()
    return order[:count]


def mix(parts: list[list], weights: list[float] | None, seed: int, names: list[str]) -> tuple[list, list[str]]:
    """(the epoch's rows, one log line per file) from each file's tokenized rows. A ranked row's pairs share a
    `group`; it is made unique per file and per repetition, so two copies of one row stay two rows."""
    counts = mixture_counts([len(p) for p in parts], weights)
    rows, lines = [], []
    for index, (part, count, name) in enumerate(zip(parts, counts, names)):
        picked = draw_rows(len(part), count, seed, index) if weights is not None else list(range(len(part)))
        seen: dict[int, int] = {}
        for i in picked:
            copy = seen.get(i, 0)
            seen[i] = copy + 1
            row = part[i]
            if getattr(row, "group", None) is not None:  # a ranked row's pairs: this file's, this copy's
                row = replace(row, group=(index, copy, row.group))
            rows.append(row)
        share = f"{count / max(1, sum(counts)):.1%} of the epoch"
        detail = (f"{count:,} rows from {len(part):,} ({len(seen):,} distinct, "
                  f"{count - len(seen):,} repeats, {len(part) - len(seen):,} left out)") if weights is not None \
            else f"{count:,} rows"
        lines.append(f"mixture: {name}: {detail}, {share}")
    return rows, lines
