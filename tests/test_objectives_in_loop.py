"""Every objective trains in the real loop; KTO's unpaired data path; TR-DPO; `dpokit losses`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_tiny_model, write_jsonl
from dpokit import train
from dpokit.batches import collate_kto, tokenize_completions
from dpokit.cli import main
from dpokit.data import DataError, load_completions
from dpokit.loop.reference import sync_reference
from dpokit.objectives import OBJECTIVES
from dpokit.objectives.kto import kto_loss, kto_reference_point

EXTRA = {"exo_pair": {"label_smoothing": 1e-3}}


@pytest.mark.parametrize("name", [n for n, o in OBJECTIVES.items() if o.data != "online"])  # grpo: test_online
def test_every_objective_trains_in_the_loop(tmp_path, tiny_model_dir, explicit_rows, name):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    messages = []
    result = train(model=tiny_model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"), loss=name,
                   max_steps=2, batch_size=4, lr=1e-3, warmup_steps=0, progress=False, log=messages.append,
                   **EXTRA.get(name, {}))
    records = [json.loads(line) for line in open(result.output_dir / "metrics.jsonl")]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert math.isfinite(result.eval_after["eval/rewards/margins"])
    assert ("eval/loss" in result.eval_after) == (OBJECTIVES[name].data == "paired")
    reference_free = not OBJECTIVES[name].reference
    assert any("no reference model loaded" in m for m in messages) == reference_free


def test_weighted_combination_logs_each_term(tmp_path, tiny_model_dir, explicit_rows):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    result = train(model=tiny_model_dir, data=data, output_dir=str(tmp_path / "run"), loss="sigmoid,sft",
                   loss_weights="1.0,0.2", max_steps=1, batch_size=4, progress=False, log=lambda *_: None)
    first = json.loads(open(result.output_dir / "metrics.jsonl").readline())
    assert first["loss"] == pytest.approx(first["loss/sigmoid"] + 0.2 * first["loss/sft"], rel=1e-6)
    assert first["nll"] == pytest.approx(first["loss/sft"], rel=1e-6)


def test_kto_reads_unpaired_rows_and_splits_pairs(tmp_path, explicit_rows):
    unpaired = [{"prompt": "Q?", "completion": " yes", "label": True},
                {"prompt": "Q?", "completion": " no", "label": "false"}]
    examples, report = load_completions(write_jsonl(tmp_path / "u.jsonl", unpaired))
    assert report.format == "unpaired" and [e.label for e in examples] == [True, False]
    split, report = load_completions(write_jsonl(tmp_path / "p.jsonl", explicit_rows[:3]))
    assert len(split) == 6 and [e.label for e in split] == [True, False] * 3
    assert split[0].completion == explicit_rows[0]["chosen"] and split[1].completion == explicit_rows[0]["rejected"]
    with pytest.raises(DataError, match=r"b\.jsonl:1: field 'label' expected true/false, got 2"):
        load_completions(write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Q", "completion": " a", "label": 2}]))


def test_paired_objective_refuses_unpaired_data(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "Q?", "completion": " yes", "label": True}])
    with pytest.raises(DataError, match="--loss kto"):
        train(model=tiny_model_dir, data=data, output_dir=str(tmp_path / "r"), progress=False, log=lambda *_: None)


def test_kto_batch_pairs_each_prompt_with_the_previous_completion(tokenizer, explicit_rows, tmp_path):
    examples, _ = load_completions(write_jsonl(tmp_path / "p.jsonl", explicit_rows[:2]))
    tokenized, _ = tokenize_completions(examples, tokenizer, 512, None)
    batch = collate_kto(tokenized, tokenizer.pad_token_id, 512)
    n = len(tokenized)
    assert batch["input_ids"].shape[0] == 2 * n and batch["labels"].tolist() == [True, False, True, False]
    for i in range(n):
        prev = tokenized[i - 1]
        row = batch["input_ids"][n + i][batch["attention_mask"][n + i].bool()].tolist()
        assert row == tokenized[i].prompt_ids + prev.completion_ids


def test_kto_loss_formula_and_gradient_direction():
    pol = torch.tensor([-10.0, -12.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-11.0, -11.0], dtype=torch.float64)
    labels = torch.tensor([True, False])
    z = kto_reference_point(torch.tensor([-5.0, -6.0]), torch.tensor([-5.5, -6.1]))
    assert z.item() == pytest.approx(0.3)
    assert kto_reference_point(torch.tensor([-6.0]), torch.tensor([-5.0])).item() == 0.0  # clamped at 0
    losses = kto_loss(pol, ref, labels, z, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert losses[0].item() == pytest.approx(1 - sig(0.5 * (1.0 - 0.3)))
    assert losses[1].item() == pytest.approx(2 * (1 - sig(0.5 * (0.3 - (-1.0)))))
    losses.sum().backward()
    assert pol.grad[0] < 0 < pol.grad[1]  # descent raises the desirable, lowers the undesirable


def test_kto_trains_on_paired_file(tmp_path, tiny_model_dir, explicit_rows):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    result = train(model=tiny_model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"), loss="kto",
                   max_steps=3, batch_size=4, lr=1e-3, warmup_steps=0, progress=False, log=lambda *_: None)
    first = json.loads(open(result.output_dir / "metrics.jsonl").readline())
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # r = z_ref = 0 at step 0: 1 − σ(0)
    for key in ("kto/kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert key in first


def test_tr_dpo_sync_moves_reference_toward_policy(tokenizer):
    policy, reference = make_tiny_model(len(tokenizer), 0), make_tiny_model(len(tokenizer), 1)
    before = [p.detach().clone() for p in reference.parameters()]
    sync_reference(reference, policy, 0.6)
    for b, r, p in zip(before, reference.parameters(), policy.parameters()):
        torch.testing.assert_close(r, 0.6 * p + 0.4 * b)


def test_losses_command_lists_every_objective(capsys):
    assert main(["losses"]) == 0
    text = capsys.readouterr().out
    for name, o in OBJECTIVES.items():
        assert name in text and o.paper.split(" ")[0] in text
