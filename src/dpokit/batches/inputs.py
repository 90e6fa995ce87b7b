"""A run's inputs: read, check and tokenize training and held-out data, reporting every row's fate; the order
the rows are trained in and each process's share. Used by the loops and by `dpokit estimate`, below both."""

from __future__ import annotations

import torch

from dpokit.batches.tokenize import TokenizedPair, tokenize_completions, tokenize_pairs
from dpokit.batches.packing import layout_tokens
from dpokit.config import TrainConfig
from dpokit.data import DataError, builtin_path, load_completions, load_pairs
from dpokit.data.mixture import data_files, mix, weight_values


def data_paths(cfg: TrainConfig) -> tuple[str, str | None]:
    """(training file, held-out file or None): --data, else the built-in helpful-vs-unhelpful set; --eval-data,
    else the built-in held-out set when --data is not given. (One training file: `dpokit sft` and `train-rm`;
    config_checks refuses several there.)"""
    return (data_files(cfg.data)[0] if cfg.data else builtin_path("helpful_train"),
            cfg.eval_data or (None if cfg.data else builtin_path("helpful_eval")))


def load_data(cfg: TrainConfig, tokenizer, unpaired: bool, log) -> tuple[list, list[TokenizedPair]]:
    """Read, check and tokenize the training and held-out data, reporting what happened to every row.

    Training rows are pairs, or labelled completions for unpaired objectives (KTO); held-out rows are
    always pairs, so every objective reports the same implicit-reward accuracy. Several --data files are read
    one by one, each with its own format and report, then mixed (data/mixture.py)."""
    _, eval_path = data_paths(cfg)
    train_paths = data_files(cfg.data) or [builtin_path("helpful_train")]
    parts = [_load_file(cfg, tokenizer, unpaired, "train", path, log) for path in train_paths]
    train = parts[0]
    if len(parts) > 1:
        train, lines = mix(parts, weight_values(cfg.data_weights), cfg.seed, train_paths)
        for line in lines:
            log(line)
    return train, _load_file(cfg, tokenizer, False, "eval", eval_path, log) if eval_path else []


def _load_file(cfg: TrainConfig, tokenizer, unpaired: bool, role: str, path: str, log) -> list:
    if unpaired:
        examples, report = load_completions(path, cfg.on_bad_row)
        tokenized, tok_report = tokenize_completions(examples, tokenizer, cfg.max_length, cfg.max_prompt_length)
    else:
        pairs, report = load_pairs(path, cfg.on_bad_row, ranked_pairs=cfg.ranked_pairs,
                                   ultrafeedback_score=cfg.ultrafeedback_score)
        tokenized, tok_report = tokenize_pairs(pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
    log(f"{role} data{f' ({path})' if len(data_files(cfg.data)) > 1 and role == 'train' else ''}: "
        f"{report.summary()}")
    log(f"  {tok_report.summary()}")
    if not tokenized:
        raise DataError(path, None, None, f"no pair survived tokenization ({tok_report.summary()})", "empty")
    return tokenized


# ---- ranked rows: the pairs of one row stay together, so each completion is computed once ------------------

def pair_groups(rows: list) -> list[list[int]] | None:
    """Indices of the pairs of each ranked row (`TokenizedPair.group`; a plain pair is a group of its own), in
    file order; None when no two pairs share a row, so plain pair data keeps today's order exactly."""
    groups: dict[object, list[int]] = {}
    for i, r in enumerate(rows):
        key = getattr(r, "group", None)
        groups.setdefault(("row", i) if key is None else key, []).append(i)
    return list(groups.values()) if len(groups) < len(rows) else None


def epoch_order(n: int, groups: list[list[int]] | None, seed: int, shuffle: bool) -> list[int]:
    """The epoch's row order, a pure function of the seed: a permutation of the rows, or with ranked rows a
    permutation of the rows' groups with each group's pairs kept next to each other (in file order), so a
    micro-batch computes a shared completion once rather than once per pair."""
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed)
    if groups is None:
        return torch.randperm(n, generator=generator).tolist()
    return [i for g in torch.randperm(len(groups), generator=generator).tolist() for i in groups[g]]


def rank_share(idx: list[int], rank: int, world: int, grouped: bool) -> list[int]:
    """This process's rows of a micro-batch: every world-th row, or with ranked rows a contiguous slice (sizes
    differ by at most one), so a row's pairs mostly stay on one process."""
    if not grouped or world == 1:
        return idx[rank::world]
    return idx[len(idx) * rank // world:len(idx) * (rank + 1) // world]


def sharing_summary(rows: list[TokenizedPair], micro_batches: list[list[list[int]]]) -> str:
    """Tokens an epoch computes with each distinct completion once per micro-batch (`micro_batches`: per
    micro-batch, each process's row indices), against the pairs written out (two sequences per pair) and
    against prefix sharing per pair alone."""
    written = sum(2 * len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in rows)
    per_pair = sum(len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in rows)
    computed = sum(layout_tokens([rows[i] for i in share]) for micro in micro_batches for share in micro if share)
    return (f"ranked rows: an epoch computes {computed:,} tokens with each completion once per micro-batch "
            f"(pairs written out: {written:,}, {written / computed:.2f}×; one prompt per pair: {per_pair:,}, "
            f"{per_pair / computed:.2f}×)")
