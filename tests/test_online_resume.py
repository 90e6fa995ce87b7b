"""Online runs checkpoint and resume exactly (loop/online_resume.py), and evaluate on held-out prompts while
training (loop/online_eval.py): GRPO (μ = 2), RLOO, PPO (its value model in the checkpoint) and online DPO with
TR-DPO (its moving reference in the checkpoint) stopped by SIGTERM mid-run, then resumed with --resume auto, end
with the uninterrupted run's weights bit for bit and every step logged once."""

from __future__ import annotations

import importlib
import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import quiet, write_jsonl
from dpokit import ConfigError, train
from dpokit.data import DataError, builtin_path
from dpokit.loop import online, online_dist
from dpokit.loop.checkpoint import CheckpointError, complete_checkpoints
from dpokit.loop.signals import TrainingInterrupted

REWARD = "conftest:letter_reward"
STEPS = 4
METHODS = {
    "grpo": dict(loss="grpo", num_generations=3, grpo_iterations=2, kl_coef=0.05),
    "rloo": dict(loss="rloo", num_generations=2, kl_coef=0.05),
    "ppo": dict(loss="ppo", num_generations=2, kl_coef=0.05, num_ppo_epochs=2, num_mini_batches=2),
    "online_dpo": dict(online_dpo=True, num_generations=3, sync_ref_every=1, sync_ref_alpha=0.5),
}


def _run(model, prompts, out, **extra):
    options = dict(model=model, prompts=prompts, reward=REWARD, output_dir=str(out), max_new_tokens=5, batch_size=2,
                   lr=1e-2, warmup_steps=1, lr_scheduler="cosine", progress=False, max_steps=STEPS, log=quiet)
    return train(**{**options, **extra})


def _weights(out) -> dict:
    return load_file(out / "final" / "model.safetensors")


def _steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl", encoding="utf-8")]


@pytest.mark.parametrize("name", list(METHODS))
def test_sigterm_then_resume_gives_the_uninterrupted_weights(tmp_path, tiny_model_dir, prompts_file, monkeypatch,
                                                             name):
    options = METHODS[name]
    full = _run(tiny_model_dir, prompts_file, tmp_path / "full", **options)
    expected = _weights(full.output_dir)
    real = online_dist.sample
    seeds = []

    def interrupted(*args, **kwargs):  # a real SIGTERM in the middle of step 2: the loop finishes it, then saves
        seeds.append(kwargs["seed"])
        if len(seeds) == 2:
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(online_dist, "sample", interrupted)
    out = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted):
        _run(tiny_model_dir, prompts_file, out, save_every=3, **options)
    monkeypatch.setattr(online_dist, "sample", real)
    assert [p.name for p in complete_checkpoints(str(out))] == ["step-0000002"]
    saved = {p.name for p in complete_checkpoints(str(out))[0].iterdir()}
    assert ("value.safetensors" in saved) == (name == "ppo") and ("reference.safetensors" in saved) == \
        (name == "online_dpo")
    assert not (out / "final").exists()
    resumed = _run(tiny_model_dir, prompts_file, out, save_every=3, resume="auto", **options)
    assert resumed.resumed_at == 2
    got = _weights(out)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert _steps(out) == list(range(1, STEPS + 1))  # each step once, none missing
    assert [p.name for p in complete_checkpoints(str(out))] == ["step-0000002", "step-0000003"]


def test_resume_from_an_earlier_checkpoint_drops_later_lines_and_refuses_changed_options(tmp_path, tiny_model_dir,
                                                                                         prompts_file):
    options = dict(loss="grpo", num_generations=3, grpo_iterations=2, kl_coef=0.05)
    full = _run(tiny_model_dir, prompts_file, tmp_path / "full", **options)
    out = tmp_path / "run"
    _run(tiny_model_dir, prompts_file, out, save_every=1, keep_last=2, **options)
    assert [p.name for p in complete_checkpoints(str(out))] == ["step-0000002", "step-0000003"]
    import shutil  # as after a kill -9 between the checkpoint of step 2 and the end: later lines are redone
    shutil.rmtree(out / "checkpoints" / "step-0000003")
    shutil.rmtree(out / "final")
    with pytest.raises(CheckpointError, match=r"num_generations: 3 → 4"):
        _run(tiny_model_dir, prompts_file, out, save_every=1, resume="auto", **{**options, "num_generations": 4})
    with pytest.raises(CheckpointError, match=r"grpo_iterations: 2 → 1"):
        _run(tiny_model_dir, prompts_file, out, save_every=1, resume="auto", **{**options, "grpo_iterations": 1})
    resumed = _run(tiny_model_dir, prompts_file, out, save_every=1, resume="auto", **options)
    assert resumed.resumed_at == 2 and _steps(out) == [1, 2, 3, 4]
    a, b = _weights(full.output_dir), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_held_out_evaluation_logs_reward_win_rate_and_kl_and_changes_no_weight(tmp_path, tiny_model_dir,
                                                                             prompts_file):
    rows = [json.loads(line) for line in open(builtin_path("sentiment_eval"), encoding="utf-8")][:5]
    held_out = write_jsonl(tmp_path / "held_out.jsonl", rows)
    options = dict(loss="grpo", num_generations=2, kl_coef=0.05)
    plain = _run(tiny_model_dir, prompts_file, tmp_path / "plain", **options)
    result = _run(tiny_model_dir, prompts_file, tmp_path / "eval", eval_prompts=held_out, eval_every=2,
                  eval_max_prompts=4, **options)
    lines = [json.loads(line) for line in open(result.output_dir / "metrics.jsonl", encoding="utf-8")]
    evals = [m for m in lines if "eval/reward" in m]
    assert [m["step"] for m in evals] == [2, STEPS]  # every 2 steps (not at the last: the final evaluation is)
    for m in evals:
        for key in ("eval/reward_ci95", "eval/win_rate", "eval/win_rate_ci95", "eval/reference_reward", "eval/kl",
                    "eval/kl_seq", "eval/completion_length"):
            assert key in m, key
        assert 0 <= m["eval/win_rate"] <= 1
    assert result.eval_after == {k: v for k, v in evals[-1].items() if k != "step"}
    from dpokit.report.plots import PANELS, plot_training_curves  # report.html draws the eval/ keys too
    drawn = {k for _, keys in PANELS for k in keys}
    assert {"reward", "kl", "win_rate"} <= drawn
    assert plot_training_curves(result.output_dir / "metrics.jsonl", tmp_path / "curves.png").is_file()
    # one fixed sampling seed and the reference's samples drawn once: the same policy gives the same evaluation
    a, b = _weights(plain.output_dir), _weights(result.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)  # evaluating changes nothing in training
    again = _run(tiny_model_dir, prompts_file, tmp_path / "again", eval_prompts=held_out, eval_every=2,
                 eval_max_prompts=4, **options)
    assert again.eval_after == result.eval_after


def test_eval_prompts_default_bad_file_and_refusals(tmp_path, tiny_model_dir, prompts_file):
    from dpokit.config import TrainConfig
    from dpokit.loop.online_eval import cap_prompts, eval_prompts_path
    assert eval_prompts_path(TrainConfig(loss="grpo")) == builtin_path("sentiment_eval")  # the task's held-out
    assert eval_prompts_path(TrainConfig(loss="grpo", prompts=prompts_file)) is None
    cfg = TrainConfig(loss="grpo", eval_max_prompts=3)
    assert cap_prompts(list("abcdefg"), cfg) == cap_prompts(list("abcdefg"), cfg) and \
        len(cap_prompts(list("abcdefg"), cfg)) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl.*2"):
        _run(tiny_model_dir, prompts_file, tmp_path / "x", loss="grpo", num_generations=2, eval_prompts=str(bad))
    with pytest.raises(ConfigError, match=r"eval_every = 2 is not read by iterative DPO \(--rounds\)"):
        train(online_dpo=True, rounds=2, eval_every=2)
    with pytest.raises(ConfigError, match=r"eval_prompts = 'p.jsonl' only applies to online training"):
        train(eval_prompts="p.jsonl")
    with pytest.raises(ConfigError, match=r"eval_every = 2 has no effect without held-out prompts"):
        train(loss="grpo", prompts="p.jsonl", eval_every=2)


def test_iterative_dpo_resumes_at_round_granularity(tmp_path, tiny_model_dir, prompts_file, monkeypatch):
    options = dict(online_dpo=True, rounds=2, max_steps=3, num_generations=3)
    full = _run(tiny_model_dir, prompts_file, tmp_path / "full", **options)
    offline = importlib.import_module("dpokit.loop.train")  # (dpokit.loop.train the attribute is the function)
    real, calls = offline.optimizer_step, []

    def interrupted(run, step):  # SIGTERM in round 2's second step: that round checkpoints its step 2
        calls.append(step)
        if len(calls) == 5:
            signal.raise_signal(signal.SIGTERM)
        return real(run, step)
    monkeypatch.setattr(offline, "optimizer_step", interrupted)
    out = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted):
        _run(tiny_model_dir, prompts_file, out, save_every=2, **options)
    monkeypatch.setattr(offline, "optimizer_step", real)
    assert (out / "round-1" / "final").is_dir() and not (out / "round-2" / "final").exists()
    with pytest.raises(CheckpointError, match=r"num_generations: 3 → 2"):
        _run(tiny_model_dir, prompts_file, out, save_every=2, resume="auto", **{**options, "num_generations": 2})
    logs: list[str] = []
    _run(tiny_model_dir, prompts_file, out, save_every=2, resume="auto", **{**options, "log": logs.append})
    assert any("rounds 1 complete; going on from round 2" in m for m in logs)
    assert any("resumed from" in m and "round-2" in m for m in logs)
    assert [json.loads(line)["round"] for line in open(out / "metrics.jsonl", encoding="utf-8")] == [1, 2]
    a, b = _weights(full.output_dir), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
