"""The run's inputs: read, check and tokenize training and held-out data, reporting every row's fate."""

from __future__ import annotations

from dpokit.batches import TokenizedPair, tokenize_completions, tokenize_pairs
from dpokit.config import TrainConfig
from dpokit.data import DataError, builtin_path, load_completions, load_pairs


def load_data(cfg: TrainConfig, tokenizer, unpaired: bool, log) -> tuple[list, list[TokenizedPair]]:
    """Read, check and tokenize the training and held-out data, reporting what happened to every row.

    Training rows are pairs, or labelled completions for unpaired objectives (KTO); held-out rows are
    always pairs, so every objective reports the same implicit-reward accuracy."""
    train_path = cfg.data or builtin_path("helpful_train")
    eval_path = cfg.eval_data or (None if cfg.data else builtin_path("helpful_eval"))
    out = []
    for role, path in (("train", train_path), ("eval", eval_path)):
        if path is None:
            out.append([])
            continue
        if unpaired and role == "train":
            examples, report = load_completions(path, cfg.on_bad_row)
            tokenized, tok_report = tokenize_completions(examples, tokenizer, cfg.max_length, cfg.max_prompt_length)
        else:
            pairs, report = load_pairs(path, cfg.on_bad_row)
            tokenized, tok_report = tokenize_pairs(pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
        log(f"{role} data: {report.summary()}")
        log(f"  {tok_report.summary()}")
        if not tokenized:
            raise DataError(path, None, None, f"no pair survived tokenization ({tok_report.summary()})", "empty")
        out.append(tokenized)
    return out[0], out[1]
