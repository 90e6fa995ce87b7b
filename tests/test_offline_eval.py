"""`dpokit eval` and `dpokit score` on a tiny trained run: the implicit reward ranks like training did."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from dpokit import train
from dpokit.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("offline")
    rows = [json.loads(line) for line in open(__import__("dpokit").data.builtin_path("helpful_train"))][:8]
    data = write_jsonl(base / "d.jsonl", rows)
    result = train(model=tiny_model_dir, data=data, eval_data=data, output_dir=str(base / "run"), max_steps=30,
                   batch_size=8, lr=3e-3, warmup_steps=0, beta=0.5, progress=False, log=lambda *_: None)
    return result, data, rows


def test_eval_reproduces_the_final_training_evaluation(trained, tmp_path, tiny_model_dir):
    result, data, _ = trained
    out = tmp_path / "eval.json"
    assert main(["eval", str(result.final_dir), data, "--beta", "0.5", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["ref_model"] == tiny_model_dir  # the run's starting model, read from its config.yaml
    for key in ("eval/rewards/accuracies", "eval/rewards/margins", "eval/logps/chosen_shift"):
        assert metrics[key] == pytest.approx(result.eval_after[key], rel=1e-4, abs=1e-5)
    assert metrics["eval/rewards/accuracies"] == 1.0


def test_score_ranks_the_trained_preference_first(trained, capsys):
    result, _, rows = trained
    row = rows[0]
    assert main(["score", str(result.final_dir), "--prompt", row["prompt"], "--completion", row["rejected"],
                 "--completion", row["chosen"], "--beta", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert repr(row["chosen"]) in lines[1] and repr(row["rejected"]) in lines[2]


def test_eval_needs_a_reference_outside_a_run_folder(tiny_model_dir, trained, capsys):
    _, data, _ = trained
    assert main(["eval", tiny_model_dir, data]) == 2
    assert "--ref-model is needed" in capsys.readouterr().err
