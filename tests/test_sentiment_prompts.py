"""The built-in `sentiment` task's prompts: neutral, original movie-review openings."""

from __future__ import annotations

import difflib
import json
import re
import string
from importlib.resources import files
from pathlib import Path

import pytest

SPLITS = {"train": 280, "eval": 60}
IMDB_SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "imdb_train_5k.jsonl"


def _lines(split: str) -> list[str]:
    path = files("dpokit") / f"data/builtin/sentiment_{split}.jsonl"
    return path.read_text(encoding="utf-8").splitlines()


def _prompts(split: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in _lines(split)]


def _norm(text: str) -> str:
    text = text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    return " ".join(text.split())


@pytest.fixture(scope="module")
def analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@pytest.mark.parametrize("split", SPLITS)
def test_count_and_row_shape(split):
    lines = _lines(split)
    assert len(lines) == SPLITS[split]
    for i, line in enumerate(lines, 1):
        row = json.loads(line)
        assert isinstance(row, dict) and set(row) == {"prompt"}, f"{split}:{i}"
        assert isinstance(row["prompt"], str) and row["prompt"], f"{split}:{i}"


@pytest.mark.parametrize("split", SPLITS)
def test_text_form(split):
    for p in _prompts(split):
        assert p.isascii(), p
        assert p == p.strip(), repr(p)
        assert "\n" not in p and "\r" not in p, repr(p)
        assert 3 <= len(p.split()) <= 20, p


def test_distinct_and_no_overlap_between_splits():
    train, eval_ = _prompts("train"), _prompts("eval")
    assert len(set(train)) == len(train)
    assert len(set(eval_)) == len(eval_)
    ntrain = {_norm(p) for p in train}
    neval = {_norm(p) for p in eval_}
    assert len(ntrain) == len(train) and len(neval) == len(eval_)
    assert not ntrain & neval, sorted(ntrain & neval)


def test_no_near_duplicates_across_splits():
    train = [_norm(p).split() for p in _prompts("train")]
    for e in (_norm(p).split() for p in _prompts("eval")):
        for t in train:
            ratio = difflib.SequenceMatcher(None, t, e).ratio()
            assert ratio < 0.8, (" ".join(t), " ".join(e), ratio)


@pytest.mark.parametrize("split", SPLITS)
def test_openings_are_sentiment_neutral(split, analyzer):
    scores = [analyzer.polarity_scores(p)["compound"] for p in _prompts(split)]
    mean = sum(scores) / len(scores)
    strong = sum(abs(s) > 0.3 for s in scores) / len(scores)
    assert abs(mean) <= 0.1, mean
    assert strong <= 0.15, strong


def test_not_copied_from_imdb_sample():
    if not IMDB_SAMPLE.is_file():
        pytest.skip(f"{IMDB_SAMPLE} not present")
    reviews = []
    with IMDB_SAMPLE.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                text = re.sub(r"<br\s*/?>", " ", json.loads(line)["text"])
                reviews.append(" " + _norm(text) + " ")
    corpus = "\n".join(reviews)
    for split in SPLITS:
        for p in _prompts(split):
            words = _norm(p)
            if len(words.split()) >= 6:
                assert f" {words} " not in corpus, f"{split} opening found in IMDb sample: {p}"
