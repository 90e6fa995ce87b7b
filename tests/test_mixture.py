"""Several --data files mixed by weight (data/mixture.py): the counts are the weights' shares of the epoch, the
draw is seeded and repeats or leaves out rows as the weights ask, each file keeps its own format and report, a
resumed run trains on the same mixture in the same order, and bad weights are refused before loading."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from dpokit import ConfigError, train
from dpokit.batches.inputs import load_data
from dpokit.cli import build_parser, config_from_args
from dpokit.config import TrainConfig
from dpokit.data import builtin_path
from dpokit.data.mixture import draw_rows, mixture_counts
from dpokit.models import load_tokenizer


def _rows(start: int, count: int) -> list[dict]:
    return [json.loads(line) for line in open(builtin_path("helpful_train"), encoding="utf-8")][start:start + count]


@pytest.fixture
def two_files(tmp_path):
    """A: 6 plain pairs (.jsonl); B: 3 other pairs as conversational rows (.json) — two formats."""
    a = write_jsonl(tmp_path / "a.jsonl", _rows(0, 6))
    b_rows = [{"chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
               "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]}
              for r in _rows(6, 3)]
    b = tmp_path / "b.json"
    b.write_text(json.dumps(b_rows), encoding="utf-8")
    return a, str(b)


def test_counts_follow_the_weights_and_add_up_to_the_epoch():
    assert mixture_counts([6, 3], None) == [6, 3]
    assert mixture_counts([6, 3], [0.25, 0.75]) == [2, 7]  # 2.25 and 6.75 of 9
    assert mixture_counts([10, 10, 10], [1, 1, 1]) == [10, 10, 10]
    counts = mixture_counts([7, 5, 1], [0.5, 0.3, 0.2])  # 6.5, 3.9, 2.6 of 13: remainders .9 and .6 round up
    assert sum(counts) == 13 and counts == [6, 4, 3]
    drawn = draw_rows(3, 7, seed=0, file_index=1)
    assert sorted(drawn[:3]) == [0, 1, 2] and sorted(drawn[3:6]) == [0, 1, 2]  # whole passes, then a cut one
    assert drawn == draw_rows(3, 7, seed=0, file_index=1) != draw_rows(3, 7, seed=1, file_index=1)


def test_each_file_is_read_in_its_own_format_then_mixed_by_weight(tmp_path, tiny_model_dir, two_files):
    a, b = two_files
    tokenizer = load_tokenizer(tiny_model_dir)
    logs = []
    cfg = TrainConfig.from_dict({"model": tiny_model_dir, "data": [a, b], "data_weights": "0.25,0.75"})
    train_rows, _ = load_data(cfg, tokenizer, False, logs.append)
    assert len(train_rows) == 9
    by_file = Counter(r.source.split(":")[0] for r in train_rows)
    assert by_file == {a: 2, b: 7}  # B's 3 rows weighted up: each at least twice
    assert sum(f"({a})" in line for line in logs) == 1 and sum(f"({b})" in line for line in logs) == 1
    assert any(line.startswith(f"mixture: {b}: 7 rows from 3 (3 distinct, 4 repeats, 0 left out)") for line in logs)
    assert any(line.startswith(f"mixture: {a}: 2 rows from 6 (2 distinct, 0 repeats, 4 left out)") for line in logs)
    plain = TrainConfig.from_dict({"model": tiny_model_dir, "data": [a, b]})  # no weights: every row once
    assert Counter(r.source.split(":")[0] for r in load_data(plain, tokenizer, False, lambda *_: None)[0]) == \
        {a: 6, b: 3}


def test_a_resumed_mixture_run_ends_with_the_uninterrupted_weights(tmp_path, tiny_model_dir, two_files):
    common = dict(model=tiny_model_dir, data=list(two_files), data_weights=[1, 3], batch_size=2, max_steps=6,
                  lr=1e-3, warmup_steps=0, progress=False, log=lambda *_: None)
    full = train(output_dir=str(tmp_path / "full"), **common)
    part = tmp_path / "part"
    train(output_dir=str(part), save_every=3, **common)
    (part / "final" / "model.safetensors").unlink()  # steps 4–6 are redone from the step-3 checkpoint
    resumed = train(output_dir=str(part), save_every=3, resume=str(part / "checkpoints" / "step-0000003"), **common)
    assert resumed.resumed_at == 3
    a, b = (load_file(r.final_dir / "model.safetensors") for r in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = (part / "config.yaml").read_text(encoding="utf-8")
    assert "data_weights:" in config and two_files[1] in config


def test_unpaired_files_mix_too(tmp_path, tiny_model_dir):
    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in _rows(0, 4) for side in ("chosen", "rejected")]
    a, b = write_jsonl(tmp_path / "a.jsonl", rows[:6]), write_jsonl(tmp_path / "b.jsonl", rows[6:])
    cfg = TrainConfig.from_dict({"model": tiny_model_dir, "loss": "kto", "data": [a, b], "data_weights": [1, 1]})
    train_rows, _ = load_data(cfg, load_tokenizer(tiny_model_dir), True, lambda *_: None)
    assert Counter(r.source.split(":")[0] for r in train_rows) == {a: 4, b: 4}


def test_bad_mixtures_are_refused_before_loading(tmp_path, two_files, capsys):
    a, b = two_files
    for values, match in (({"data": [a, b], "data_weights": "1"}, r"1 weight\(s\) for 2 --data files"),
                          ({"data": [a, b], "data_weights": "1,0"}, "each weight must be a positive number"),
                          ({"data": [a, b], "data_weights": "1,x"}, "expected numbers"),
                          ({"data": a, "data_weights": "1"}, "no effect on one --data file"),
                          ({"data": [a, b], "stage": "sft"}, "reads one --data file")):
        with pytest.raises(ConfigError, match=match):
            TrainConfig.from_dict(values)
    args = build_parser().parse_args(["train", "--data", a, b, "--data-weights", "0.7,0.3"])
    cfg = config_from_args(args)
    assert cfg.data == [a, b] and cfg.data_weights == "0.7,0.3"
    assert config_from_args(build_parser().parse_args(["train", "--data", a])).data == a  # one file: a string
