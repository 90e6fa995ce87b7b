"""`dpokit train-rm`: the Bradley–Terry loss against its formula, margins read from rows, the options a reward
model refuses, a run end to end (metrics, final/ as --reward with the scores training computed), LoRA, resume to
bit-identical weights after SIGTERM, and the first-step loss against TRL 1.16's RewardTrainer."""

from __future__ import annotations

import copy
import json
import math
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from dpokit.cli import main
from dpokit.config import ConfigError, TrainConfig
from dpokit.data import DataError, builtin_path, load_pairs
from dpokit.evaluation.rewards import load_reward
from dpokit.loop.checkpoint import CheckpointError, check_same_run, complete_checkpoints
from dpokit.loop.reward_model import build_reward_model, load_reward_pairs, pair_scores, train_reward_model
from dpokit.objectives.reward_model import bradley_terry_loss

QUIET = dict(log=lambda *_: None)


def _rows(n: int, margins: bool = False) -> list[dict]:
    rows = [json.loads(line) for line in open(builtin_path("helpful_train"), encoding="utf-8")][:n]
    if margins:
        rows = [{**r, "margin": 0.25 * (i % 3)} for i, r in enumerate(rows)]
    return rows


def _cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(stage="reward_model", model=model, data=data, output_dir=str(out), batch_size=2, max_steps=4,
                lr=1e-3, warmup_steps=0, progress=False, memory_check=False, device="cpu")
    return TrainConfig.from_dict({**base, **kw})


# ---- the loss ---------------------------------------------------------------------------------------------

def test_bradley_terry_loss_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    rc, rr, m = (torch.randn(6, generator=gen, dtype=torch.float64) * 3 for _ in range(3))
    for margin, c in ((None, None), (m, None), (m, 0.05), (None, 0.3)):
        got = bradley_terry_loss(rc, rr, margin, c)
        for i in range(6):  # −log σ(z) = log(1 + e^{−z}), computed in Python floats
            z = rc[i].item() - rr[i].item() - (0.0 if margin is None else margin[i].item())
            want = math.log1p(math.exp(-z)) + (c or 0.0) * (rc[i].item() + rr[i].item()) ** 2
            assert got[i].item() == pytest.approx(want, abs=1e-12)
    assert torch.equal(bradley_terry_loss(rc, rr), bradley_terry_loss(rc, rr, torch.zeros(6, dtype=torch.float64)))


# ---- data and options -------------------------------------------------------------------------------------

def test_margin_is_read_and_a_bad_one_is_a_data_error(tmp_path):
    rows = _rows(3)
    pairs, _ = load_pairs(write_jsonl(tmp_path / "a.jsonl", [{**rows[0], "margin": 1.5}, rows[1]]))
    assert [p.margin for p in pairs] == [1.5, None]
    path = write_jsonl(tmp_path / "b.jsonl", [rows[0], {**rows[1], "margin": "big"}])
    with pytest.raises(DataError, match=r"b\.jsonl:2: field 'margin' expected a finite number"):
        load_pairs(path)
    pairs, report = load_pairs(path, on_bad_row="skip")
    assert len(pairs) == 1 and report.skipped["wrong_type"] == 1


def test_ranked_rows_give_their_pairs_kept_together(tmp_path, tokenizer):
    ranked = [{"prompt": "Name a fruit.", "completions": [" An apple.", " A chair.", " Pear."], "scores": [3, 1, 2]},
              {"prompt": "Say hi.", "completions": [" Hi!", " No."], "scores": [1, 0]}]
    cfg = TrainConfig.from_dict({"stage": "reward_model", "ranked_pairs": "best-rest"})
    rows = load_reward_pairs(write_jsonl(tmp_path / "r.jsonl", ranked), cfg, tokenizer, "train", lambda *_: None)
    assert [(r.chosen, r.rejected) for r in rows] == [(" An apple.", " Pear."), (" An apple.", " A chair."),
                                                      (" Hi!", " No.")]
    assert rows[0].group == rows[1].group != rows[2].group  # BatchSchedule keeps a row's pairs together


@pytest.mark.parametrize("key,value", [("beta", 0.2), ("loss", "ipo"), ("ref_model", "x"), ("reward", "sentiment"),
                                       ("prefix_sharing", False), ("max_prompt_length", 64), ("fsdp", True)])
def test_options_a_reward_model_does_not_read_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_dict({"stage": "reward_model", key: value})


def test_reward_model_options_are_refused_on_a_policy_run():
    with pytest.raises(ConfigError, match="center_rewards_coefficient.*only applies to `dpokit train-rm`"):
        TrainConfig.from_dict({"center_rewards_coefficient": 0.01})
    cfg = TrainConfig.from_dict({"stage": "reward_model", "center_rewards_coefficient": 0.01, "lora_r": 4,
                                 "save_every": 2, "eval_every": 2})
    assert cfg.run_kind == "reward_model" and not cfg.online


def test_cli_refuses_before_loading(capsys):
    assert main(["train-rm", "--beta", "0.3"]) == 2
    assert "is not read by `dpokit train-rm`" in capsys.readouterr().err


# ---- a run ------------------------------------------------------------------------------------------------

def test_train_rm_end_to_end_final_scores_as_training_did(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", _rows(6, margins=True))
    out = tmp_path / "rm"
    cfg = _cfg(tiny_model_dir, data, out, eval_data=data, eval_every=2, center_rewards_coefficient=0.01)
    result = train_reward_model(cfg, **QUIET)
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 4]
    for key in ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "lr", "grad_norm"):
        assert all(math.isfinite(x[key]) for x in lines[:4]), key
    assert "eval/accuracy" in lines[1] and "eval/accuracy" not in lines[0]
    assert set(result.eval_after) >= {"eval/accuracy", "eval/loss", "eval/margin"}
    assert result.eval_after["eval/loss"] < result.eval_before["eval/loss"]  # it learns the (seen) pairs

    from transformers import AutoModelForSequenceClassification
    final = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    assert final.config.num_labels == 1 and final.config.pad_token_id is not None
    # the scores the trainer's evaluation computed, recomputed from --reward DIR's: to 1e-5
    rows = load_reward_pairs(data, cfg, _saved_tokenizer(result.final_dir), "eval", lambda *_: None)
    reward = load_reward(str(result.final_dir))
    rc = torch.tensor(reward([r.prompt for r in rows], [r.chosen for r in rows]), dtype=torch.float64)
    rr = torch.tensor(reward([r.prompt for r in rows], [r.rejected for r in rows]), dtype=torch.float64)
    margin = torch.tensor([r.margin for r in rows], dtype=torch.float64)
    assert result.eval_after["eval/margin"] == pytest.approx((rc - rr).mean().item(), abs=1e-5)
    assert result.eval_after["eval/accuracy"] == (rc > rr).double().mean().item()
    assert result.eval_after["eval/loss"] == pytest.approx(bradley_terry_loss(rc, rr, margin, 0.01).mean().item(),
                                                           abs=1e-5)
    # row by row: the training-side scorer on the saved model gives --reward's scores
    with torch.no_grad():
        c, r = pair_scores(final.eval(), _saved_tokenizer(result.final_dir), rows, torch.device("cpu"), "fp32")
    assert torch.allclose(c.double(), rc, atol=1e-5) and torch.allclose(r.double(), rr, atol=1e-5)
    assert TrainConfig.from_yaml(str(out / "config.yaml")).stage == "reward_model"


def _saved_tokenizer(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def test_the_score_head_is_seeded(tiny_model_dir, tokenizer):
    heads = [build_reward_model(_cfg(tiny_model_dir, None, "x", seed=s), tokenizer, "cpu").score.weight
             for s in (1, 1, 2)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


def test_lora_trains_the_score_head_and_final_is_merged(tmp_path, tiny_model_dir, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", _rows(4))
    cfg = _cfg(tiny_model_dir, data, tmp_path / "lora", lora_r=4, max_steps=2)
    start = build_reward_model(cfg, tokenizer, "cpu").score.weight.detach().clone()
    result = train_reward_model(cfg, **QUIET)
    saved = load_file(result.final_dir / "model.safetensors")
    assert not any("lora" in k for k in saved)  # a plain classifier: --reward loads it
    assert not torch.equal(saved["score.weight"], start)  # the head trained
    assert len(load_reward(str(result.final_dir))(["Hi"], [" there"])) == 1


def test_bf16_weights_and_gradient_checkpointing(tmp_path, tiny_model_dir, tokenizer):
    """--model-dtype bf16 trains an fp32 master copy and writes final/ in bf16; gradient checkpointing recomputes
    the same numbers in backward (after two updates, the same gradient norms and weights as the plain run)."""
    data = write_jsonl(tmp_path / "d.jsonl", _rows(4))
    runs = [train_reward_model(_cfg(tiny_model_dir, data, tmp_path / name, max_steps=2, gradient_checkpointing=gc),
                               **QUIET) for name, gc in (("plain", False), ("gc", True))]
    norms = [[m["grad_norm"] for m in map(json.loads, open(r.output_dir / "metrics.jsonl")) if "grad_norm" in m]
             for r in runs]
    assert len(norms[0]) == 2 and norms[0] == pytest.approx(norms[1], rel=1e-5) and min(norms[0]) > 0
    plain, ckpt = (load_file(r.final_dir / "model.safetensors") for r in runs)
    start = build_reward_model(_cfg(tiny_model_dir, None, "x"), tokenizer, "cpu")
    assert not torch.equal(plain["score.weight"], start.score.weight.detach())  # the updates moved the weights
    assert all(torch.allclose(plain[k], ckpt[k], rtol=0, atol=1e-6) for k in plain)
    half = train_reward_model(_cfg(tiny_model_dir, data, tmp_path / "bf16", max_steps=2, model_dtype="bf16"), **QUIET)
    assert {t.dtype for t in load_file(half.final_dir / "model.safetensors").values()} == {torch.bfloat16}
    assert len(load_reward(str(half.final_dir))(["Hi"], [" there"])) == 1


# ---- resume -----------------------------------------------------------------------------------------------

STEPS = 12


def _args(model, data, out, *extra):
    return ["train-rm", "--model", model, "--data", data, "--output-dir", str(out), "--max-steps", str(STEPS),
            "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "3", "--lr-scheduler", "cosine",
            "--save-every", "4", "--keep-last", "2", "--no-progress", "--no-memory-check", "--device", "cpu", *extra]


def test_sigterm_then_resume_gives_bit_identical_weights(tmp_path, tiny_model_dir, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", _rows(10))
    assert main(_args(tiny_model_dir, data, tmp_path / "full")) == 0
    expected = load_file(tmp_path / "full" / "final" / "model.safetensors")
    # a real SIGTERM to this process in the middle of step 7 (no subprocess: ~10 s less)
    import dpokit.loop.reward_model as rm
    step_fn = rm.optimizer_step

    def interrupted(run, step):
        if step == 6:
            signal.raise_signal(signal.SIGTERM)
        return step_fn(run, step)
    monkeypatch.setattr(rm, "optimizer_step", interrupted)
    out = tmp_path / "stopped"
    assert main(_args(tiny_model_dir, data, out)) == 128 + signal.SIGTERM
    monkeypatch.setattr(rm, "optimizer_step", step_fn)
    assert [p.name for p in complete_checkpoints(str(out))] == ["step-0000004", "step-0000007"]  # --keep-last 2
    assert not (out / "final").exists()
    # a policy run cannot resume it: the stage is part of the run
    policy = TrainConfig.from_dict({**TrainConfig.from_yaml(str(out / "config.yaml")).to_dict(), "stage": "policy"})
    with pytest.raises(CheckpointError, match="stage: 'reward_model' → 'policy'"):
        check_same_run(complete_checkpoints(str(out))[-1], policy.to_dict())
    assert main(_args(tiny_model_dir, data, out, "--resume", "auto")) == 0
    got = load_file(out / "final" / "model.safetensors")
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1))


# ---- parity with TRL --------------------------------------------------------------------------------------

def test_first_step_loss_equals_trl_reward_trainer(tmp_path, tiny_model_dir, tokenizer):
    """Both start from the same classifier (score head included: saved once, loaded by both) and see the same
    four pairs' token ids in one batch; dpokit's logged first-step loss is TRL's compute_loss on that batch.

    Tokenization differs (docs/OBJECTIVES.md): TRL appends EOS to plain-text rows and filters rows over
    max_length; dpokit reads what --reward DIR reads (chat-rendered with a template, else prompt + completion,
    no EOS added) and truncates. So TRL is handed dpokit's ids (its pre-tokenized `chosen_ids` path); for a
    tokenizer without a chat template, TRL's own ids are asserted to be dpokit's plus the EOS."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    start = tmp_path / "start"
    seed_cfg = _cfg(tiny_model_dir, None, tmp_path / "unused")
    build_reward_model(seed_cfg, tokenizer, "cpu").save_pretrained(start, safe_serialization=True)
    tokenizer.save_pretrained(start)
    data = write_jsonl(tmp_path / "d.jsonl", _rows(4, margins=True))
    cfg = _cfg(str(start), data, tmp_path / "ours", batch_size=4, max_steps=1, center_rewards_coefficient=0.05)
    train_reward_model(cfg, **QUIET)
    ours = json.loads(open(tmp_path / "ours" / "metrics.jsonl").readline())["loss"]

    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = cfg.max_length
    rows = load_reward_pairs(data, cfg, tok, "train", lambda *_: None)
    dataset = datasets.Dataset.from_list([{"chosen_ids": r.chosen_ids, "rejected_ids": r.rejected_ids,
                                           "margin": r.margin} for r in rows])
    from transformers import AutoModelForSequenceClassification
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, report_to=[], bf16=False,
                            use_cpu=True, save_strategy="no", center_rewards_coefficient=0.05)
    trainer = trl.RewardTrainer(model=AutoModelForSequenceClassification.from_pretrained(start), args=args,
                                train_dataset=dataset, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch).item()
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert abs(ours - theirs) < 1e-5  # the same math on the same ids: fp32 rounding only

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    raw = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in _rows(4)])
    prepared = trainer._prepare_dataset(raw, plain, args, "raw")
    ids = load_reward_pairs(data, cfg, plain, "train", lambda *_: None)
    assert [p["chosen_ids"] for p in prepared] == [r.chosen_ids + [plain.eos_token_id] for r in ids]


def test_each_distinct_row_is_scored_once_with_the_same_losses_and_gradients(tmp_path, tiny_model_dir, tokenizer):
    # ranked rows' pairs repeat completions: 4 scored completions give 6 pairs, 12 rows, 4 of them distinct
    ranked = [{"prompt": "Name a fruit.", "completions": [" An apple.", " A chair.", " Pear.", " Plum!"],
               "scores": [3, 1, 2, 0]},
              {"prompt": "Say hi.", "completions": [" Hi!", " No."], "scores": [1, 0]}]
    cfg = _cfg(tiny_model_dir, write_jsonl(tmp_path / "r.jsonl", ranked), tmp_path / "rm")
    rows = load_reward_pairs(cfg.data, cfg, tokenizer, "train", lambda *_: None)
    assert len(rows) == 7
    model, seen = build_reward_model(cfg, tokenizer, torch.device("cpu")), []
    model.register_forward_hook(lambda _m, args, kwargs, _o: seen.append(kwargs["input_ids"].shape[0]),
                                with_kwargs=True)
    margin = torch.zeros(len(rows))
    c, r = pair_scores(model, tokenizer, rows, torch.device("cpu"), "fp32")
    assert seen == [6]  # 4 + 2 distinct rows, not 14
    bradley_terry_loss(c, r, margin, 0.01).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # every pair's two rows scored in a batch of their own, as before the rows were shared
    from dpokit.evaluation.rewards import reward_model_batch
    one = [model(**reward_model_batch(tokenizer, [x.chosen_ids, x.rejected_ids])).logits.squeeze(-1) for x in rows]
    c1, r1 = torch.stack([s[0] for s in one]), torch.stack([s[1] for s in one])
    assert torch.allclose(c, c1, atol=1e-6, rtol=1e-5) and torch.allclose(r, r1, atol=1e-6, rtol=1e-5)
    bradley_terry_loss(c1, r1, margin, 0.01).sum().backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6, rtol=1e-5)
    # with dropout active (LoRA's --lora-dropout) each row draws its own mask: no row is shared
    model.add_module("some_dropout", torch.nn.Dropout(0.1))
    seen.clear()
    pair_scores(model.train(), tokenizer, rows, torch.device("cpu"), "fp32")
    assert seen == [14]
