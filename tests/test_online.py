"""Online training (loop/online.py) on a tiny random model with the `conftest:letter_reward` reward: GRPO and
online DPO steps run and log, weights move, kl_coef = 0 loads no reference, runs are deterministic,
iterative DPO rounds, and meaningless option combinations are refused at start-up."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import quiet
from dpokit import ConfigError, train
from dpokit.cli import main
from dpokit.loop import online, online_dist

REWARD = "conftest:letter_reward"
GRPO_KEYS = ("loss", "reward", "reward_std", "advantage_std", "completion_length", "clip_fraction",
             "clip_fraction/low", "clip_fraction/high", "ratio", "generation_s", "generation_share", "lr", "grad_norm",
             "frac_reward_zero_std", "step_s")


def _common(model, prompts, out, **extra) -> dict:
    return dict(model=model, prompts=prompts, reward=REWARD, output_dir=str(out), max_new_tokens=6, batch_size=2,
                lr=1e-2, warmup_steps=0, progress=False, log=quiet, **extra)


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]


def _changed(before_dir, after_dir) -> bool:
    before, after = load_file(f"{before_dir}/model.safetensors"), load_file(f"{after_dir}/model.safetensors")
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_grpo_steps_log_every_metric_move_the_weights_and_are_deterministic(tmp_path, tiny_model_dir, prompts_file):
    runs = [train(**_common(tiny_model_dir, prompts_file, tmp_path / name, loss="grpo", max_steps=2,
                            num_generations=3, grpo_iterations=2, kl_coef=0.05, epsilon_high=0.28))
            for name in ("a", "b")]
    metrics = _metrics(runs[0].output_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    for key in GRPO_KEYS + ("kl",):
        assert all(key in m for m in metrics), key
    assert all(0 < m["generation_share"] < 1 and m["kl"] >= 0 for m in metrics)
    assert _changed(tiny_model_dir, runs[0].final_dir)
    a, b = (load_file(r.final_dir / "model.safetensors") for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed → same samples, same updates, same weights
    assert _metrics(runs[1].output_dir)[-1]["loss"] == metrics[-1]["loss"]


def test_grpo_without_kl_loads_no_reference_and_old_logps_are_exact(tmp_path, tiny_model_dir, prompts_file, monkeypatch):
    loaded = []
    original = online.load_reference
    monkeypatch.setattr(online, "load_reference", lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1])
    # lr 0 with μ = 2: the weights stay π_old, so the no-grad π_old pass must give exactly the log-probs of the
    # passes with grad (same micro-batches, same padding): ratio exactly 1, nothing clipped
    result = train(**{**_common(tiny_model_dir, prompts_file, tmp_path / "run", loss="grpo", max_steps=2,
                                num_generations=2, grpo_iterations=2, grpo_aggregation="dr_grpo",
                                scale_rewards="none"), "lr": 0.0})
    assert loaded == [None]
    for m in _metrics(result.output_dir):
        assert "kl" not in m
        assert m["ratio"] == 1.0 and m["clip_fraction"] == 0.0


def test_online_dpo_steps_pair_best_with_worst_and_move_the_weights(tmp_path, tiny_model_dir, prompts_file):
    result = train(**_common(tiny_model_dir, prompts_file, tmp_path / "run", online_dpo=True, max_steps=2,
                             num_generations=3, beta=0.5))
    metrics = _metrics(result.output_dir)
    for key in ("loss", "rewards/chosen", "rewards/margins", "pairs", "ties", "identical", "reward", "reward_std",
                "completion_length", "generation_s", "generation_share", "lr"):
        assert all(key in m for m in metrics), key
    assert metrics[0]["pairs"] + metrics[0]["ties"] + metrics[0]["identical"] == 2  # one candidate per prompt
    assert metrics[0]["rewards/margins"] == 0.0  # the reference is the starting policy
    assert _changed(tiny_model_dir, result.final_dir)


def test_best_vs_worst_keeps_sampled_ids_and_counts_ties():
    from dpokit.generation import Samples
    samples = Samples(["p", "q"], 3, [[1]] * 6, [[5], [6], [7], [8], [9], [10]], ["a", "b", "c", "d", "d", "e"],
                      [0.0] * 6)
    pairs, left_out = online.best_vs_worst(samples, [0.1, 0.9, 0.5, 0.3, 0.3, 0.3], step=0)
    assert [(p.chosen_ids, p.rejected_ids) for p in pairs] == [([6], [5])]
    assert left_out == {"ties": 1, "identical": 0}


def test_iterative_dpo_rounds(tmp_path, tiny_model_dir, prompts_file):
    result = train(**_common(tiny_model_dir, prompts_file, tmp_path / "run", online_dpo=True, rounds=2, max_steps=1,
                             num_generations=2))
    assert [m["round"] for m in _metrics(result.output_dir)] == [1, 2]
    assert (result.output_dir / "round-2" / "pairs.jsonl").is_file()
    assert _changed(tiny_model_dir, result.final_dir)


def test_cli_routes_grpo_and_refuses_reward_without_an_online_method(tmp_path, tiny_model_dir, prompts_file, capsys):
    assert main(["train", "--model", tiny_model_dir, "--loss", "grpo", "--reward", REWARD, "--prompts", prompts_file,
                 "--max-steps", "1", "--num-generations", "2", "--max-new-tokens", "4", "--batch-size", "2",
                 "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "clip_fraction" in _metrics(tmp_path / "run")[0]
    assert main(["train", "--reward", "sentiment"]) == 2
    assert "only applies to online training" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (dict(reward="sentiment"), r"reward = 'sentiment' only applies to online training"),
    (dict(kl_coef=0.1), r"kl_coef = 0.1 only applies to online training"),
    (dict(loss="grpo,sigmoid"), r"grpo is an online objective on its own"),
    (dict(loss="grpo", online_dpo=True), r"grpo is an online objective on its own"),
    (dict(loss="grpo", beta=0.5), r"beta = 0.5 has no effect on loss grpo"),
    (dict(loss="grpo", data="pairs.jsonl"), r"data = 'pairs.jsonl' is not used by online training"),
    (dict(loss="grpo", ref_model="x"), r"ref_model is only used by grpo with kl_coef > 0"),
    (dict(loss="grpo", rounds=2), r"rounds = 2 is iterative DPO"),
    (dict(loss="grpo", num_generations=1), r"num_generations = 1 is out of range"),
    (dict(loss="grpo", temperature=0.0), r"temperature = 0.0 is out of range"),
    (dict(loss="grpo", reward="a:b,c:d", reward_weights="1"), r"need one weight per --reward"),
    (dict(online_dpo=True, kl_coef=0.1), r"kl_coef = 0.1 only applies to --loss grpo"),
    (dict(online_dpo=True, loss="kto"), r"kto \(unpaired\) does not apply"),
    (dict(online_dpo=True, rounds=2, eval_every=5), r"eval_every = 5 is not read by iterative DPO \(--rounds\)"),
])
def test_meaningless_combinations_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        train(**options)


@pytest.mark.parametrize("steps", [1, 2])
def test_online_dpo_tr_dpo_moves_the_reference_every_n_steps(tmp_path, tiny_model_dir, prompts_file, monkeypatch,
                                                              steps):
    loaded = []
    original = online.load_reference
    monkeypatch.setattr(online, "load_reference", lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1])
    result = train(**_common(tiny_model_dir, prompts_file, tmp_path / "run", online_dpo=True, max_steps=steps,
                             num_generations=3, sync_ref_every=2, sync_ref_alpha=0.6))
    start, final = (load_file(f"{d}/model.safetensors") for d in (tiny_model_dir, result.final_dir))
    reference = dict(loaded[0].named_parameters())
    for name, ref in reference.items():
        if name not in start:  # a tied weight, saved once
            continue
        if steps == 1:  # no sync before step N = 2
            assert torch.equal(ref, start[name]), name
        else:  # after step 2 the policy is the final model: π_ref ← α·π + (1 − α)·π_ref0
            torch.testing.assert_close(ref, 0.6 * final[name] + 0.4 * start[name], rtol=1e-6, atol=1e-7)
    if steps == 2:
        assert _changed(tiny_model_dir, result.final_dir)
        assert any(not torch.equal(reference[k], start[k]) for k in start)


def test_online_tr_dpo_refuses_a_reference_of_another_architecture(tmp_path, tokenizer, tiny_model_dir,
                                                                  prompts_file):
    """--online-dpo --ref-model X --sync-ref-every N: X must have the policy's parameter names and shapes (the
    soft update mixes them one by one); refused at start-up, before any sampling."""
    from conftest import make_tiny_model
    from dpokit.models.load import ModelError
    from transformers import LlamaForCausalLM
    small = make_tiny_model(len(tokenizer))
    other = LlamaForCausalLM(small.config.__class__(**{**small.config.to_dict(), "num_hidden_layers": 1}))
    other.save_pretrained(tmp_path / "ref", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "ref")
    with pytest.raises(ModelError, match=r"--ref-model .*--sync-ref-every"):
        train(**_common(tiny_model_dir, prompts_file, tmp_path / "run", online_dpo=True, max_steps=1,
                        num_generations=2, ref_model=str(tmp_path / "ref"), sync_ref_every=1))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_iterative_dpo_rounds_train_tr_dpo_offline(tmp_path, tiny_model_dir, prompts_file, monkeypatch):
    """--rounds hands --sync-ref-every to each round's offline run, whose loop moves that round's reference."""
    offline = importlib.import_module("dpokit.loop.train")  # the module (dpokit.loop.train is also a function)
    calls = []
    original = offline.sync_reference
    monkeypatch.setattr(offline, "sync_reference", lambda *a: calls.append(a[2]) or original(*a))
    train(**_common(tiny_model_dir, prompts_file, tmp_path / "run", online_dpo=True, rounds=2, max_steps=2,
                    num_generations=2, sync_ref_every=1, sync_ref_alpha=0.5))
    assert calls == [0.5] * 4  # 2 rounds × 2 steps, every step


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_grpo_log_probs_are_those_of_the_tempered_sampling_distribution(tokenizer, temperature):
    """GRPO's π_θ, π_old and π_ref per-token log-probs are log softmax(logits / T) — the distribution the samples
    were drawn from, as TRL 1.16 (its fused LM head divides by args.temperature for the policy and reference)."""
    from conftest import make_tiny_model
    from dpokit.config import TrainConfig
    from dpokit.generation import sample
    model = make_tiny_model(len(tokenizer))
    s = sample(model, tokenizer, ["How do I boil an egg?", "Hi"], n=2, max_new_tokens=8, temperature=temperature)
    rows = list(zip(s.prompt_ids, s.completion_ids))
    logps, mask = online.token_logps(model, rows, tokenizer.pad_token_id, torch.device("cpu"),
                                     TrainConfig(loss="grpo", temperature=temperature))
    for i, (p, c) in enumerate(rows):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1]
        expected = torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(logps[i, :len(c)], expected, rtol=1e-5, atol=1e-5)
        assert mask[i].sum().item() == len(c)


def test_grpo_trains_on_the_sampled_ids_and_adds_no_eos_to_cut_samples(tmp_path, tiny_model_dir, prompts_file,
                                                                       monkeypatch):
    drawn, scored = [], []
    original_sample, original_logps = online_dist.sample, online.token_logps
    monkeypatch.setattr(online_dist, "sample", lambda *a, **k: drawn.append(original_sample(*a, **k)) or drawn[-1])
    monkeypatch.setattr(online, "token_logps", lambda model, rows, *a, **k: scored.append(rows) or original_logps(
        model, rows, *a, **k))
    train(**_common(tiny_model_dir, prompts_file, tmp_path / "run", loss="grpo", max_steps=1, num_generations=2))
    s = drawn[0]
    assert scored[0] == list(zip(s.prompt_ids, s.completion_ids))
    assert any(s.truncated) and all(len(c) == 6 for c, cut in zip(s.completion_ids, s.truncated) if cut)
