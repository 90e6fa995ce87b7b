"""PPO (objectives/ppo.py, loop/ppo.py) and RLOO runs (loop/online.py's group step): GAE and returns against a
float64 loop by hand, whitening, both sides of the policy and value clips, the KL-penalty bookkeeping, the first pass
at ratio 1, micro-batch additivity, short runs on a tiny model (metrics, final/, determinism, the value model's
start) and the refusals. RLOO's tensor functions: tests/test_rloo.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model, quiet, write_jsonl
from dpokit import ConfigError, TrainConfig, train
from dpokit.evaluation.rewards import RewardError, load_reward
from dpokit.objectives import OBJECTIVES, OnlineInputs
from dpokit.objectives.ppo import explained_variance, gae, ppo_policy_loss, ppo_value_loss, token_rewards, whiten

REWARD = "conftest:letter_reward"
CPU = torch.device("cpu")
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])


def _rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- GAE, returns, whitening -------------------------------------------------------------------------------
def _gae_by_hand(rewards, values, mask, gamma, lam):
    advantages, returns = [], []
    for i in range(rewards.shape[0]):
        n = int(mask[i].sum())
        r, v = rewards[i, :n].tolist(), values[i, :n].tolist()
        adv, last = [0.0] * n, 0.0
        for t in reversed(range(n)):
            delta = r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t]
            last = delta + gamma * lam * last
            adv[t] = last
        advantages.append(adv + [0.0] * (rewards.shape[1] - n))
        returns.append([a + b for a, b in zip(adv, v)] + [0.0] * (rewards.shape[1] - n))
    return advantages, returns


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.7), (0.99, 1.0), (1.0, 0.0)])
def test_gae_and_returns_match_a_loop_by_hand_with_padding(gamma, lam):
    rewards, values = _rand(0, 3, 5), _rand(1, 3, 5)
    rewards[MASK == 0] = 7.0  # padding carries garbage: must be ignored
    values[MASK == 0] = -3.0
    advantages, returns = gae(rewards, values, MASK, gamma, lam)
    expected_adv, expected_ret = _gae_by_hand(rewards, values, MASK, gamma, lam)
    assert torch.allclose(advantages, torch.tensor(expected_adv, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(returns, torch.tensor(expected_ret, dtype=torch.float64), atol=1e-12, rtol=0)


def test_gae_with_lambda_one_and_no_discount_is_reward_to_go_minus_value():
    rewards, values = _rand(2, 2, 4), _rand(3, 2, 4)
    mask = torch.ones(2, 4)
    advantages, returns = gae(rewards, values, mask, 1.0, 1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    assert torch.allclose(returns, to_go, atol=1e-12) and torch.allclose(advantages, to_go - values, atol=1e-12)


def test_whiten_over_real_tokens():
    x = _rand(4, 3, 5)
    real = x[MASK == 1].tolist()
    mean = sum(real) / len(real)
    std = math.sqrt(sum((v - mean) ** 2 for v in real) / (len(real) - 1) + 1e-8)
    out = whiten(x, MASK)
    assert out[MASK == 1].tolist() == pytest.approx([(v - mean) / std for v in real], abs=1e-12)
    assert out[MASK == 0].abs().sum() == 0
    kept = whiten(x, MASK, shift_mean=False)
    assert kept[MASK == 1].tolist() == pytest.approx([(v - mean) / std + mean for v in real], abs=1e-12)


def test_explained_variance():
    returns = _rand(12, 3, 5)
    assert explained_variance(returns, returns, MASK) == 1.0
    real = returns[MASK == 1]
    mean_only = torch.full_like(returns, real.mean().item())
    assert explained_variance(mean_only, returns, MASK) == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(returns, torch.ones_like(returns), MASK) is None  # returns that do not vary


# ---- the clipped losses ---------------------------------------------------------------------------------------
def test_policy_clip_both_sides_and_both_signs():
    # ratios 0.5, 0.9, 1.1, 1.5 with A > 0 and A < 0: clip [0.8, 1.2]
    ratio = torch.tensor([[0.5, 0.9, 1.1, 1.5], [0.5, 0.9, 1.1, 1.5]], dtype=torch.float64)
    old = _rand(5, 2, 4)
    logps = (old + ratio.log()).requires_grad_(True)
    adv = torch.tensor([[1.0] * 4, [-1.0] * 4], dtype=torch.float64)
    mask = torch.ones(2, 4)
    loss, stats = ppo_policy_loss(logps, old, adv, mask, 0.2)
    per_token = [[-min(r * a, min(max(r, 0.8), 1.2) * a) for r in ratio[i].tolist()] for i, a in ((0, 1.0), (1, -1.0))]
    assert loss.item() == pytest.approx(sum(map(sum, per_token)) / 8, abs=1e-12)
    loss.backward()
    # A > 0: the clip removes the gradient above 1 + ε (1.5) and keeps it below 1 − ε (0.5: min picks the ratio);
    # A < 0: it removes it below 1 − ε (0.5) and keeps it above 1 + ε
    moving = (logps.grad != 0).tolist()
    assert moving == [[True, True, True, False], [False, True, True, True]]
    assert stats["clip_fraction/high"].item() == 1 / 8 and stats["clip_fraction/low"].item() == 1 / 8
    assert stats["clip_fraction"].item() == 2 / 8
    # an asymmetric clip: ε_high = 0.6 keeps 1.5 inside
    _, stats = ppo_policy_loss(logps.detach(), old, adv, mask, 0.2, 0.6)
    assert stats["clip_fraction/high"].item() == 0.0


def test_value_clip_both_sides():
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    # moved past +0.2 toward the return (clipped term larger: no gradient) / away from it (kept) / mirrored
    values = torch.tensor([[0.5, -0.5, -0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    loss, stats = ppo_value_loss(values, old, returns, torch.ones(1, 4), 0.2)
    expected = 0.5 * sum(max((v - g) ** 2, (min(max(v, -0.2), 0.2) - g) ** 2)
                         for v, g in zip(values[0].tolist(), returns[0].tolist())) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    assert (values.grad != 0).tolist() == [[False, True, False, True]]
    assert stats["value_clip_fraction"].item() == 0.5


def test_at_ratio_one_nothing_is_clipped_and_the_gradient_is_the_policy_gradient():
    logps = _rand(6, 3, 5).requires_grad_(True)
    adv = _rand(7, 3, 5)
    loss, stats = ppo_policy_loss(logps, logps.detach(), adv, MASK, 0.2)
    assert stats["ratio"].item() == 1.0 and stats["clip_fraction"].item() == 0.0 and stats["approx_kl"].item() == 0
    loss.backward()
    assert torch.allclose(logps.grad, -adv * MASK / MASK.sum(), atol=1e-15)


# ---- rewards: the KL penalty's bookkeeping -------------------------------------------------------------------
def test_kl_penalty_at_every_token_and_the_score_at_the_last_real_token():
    old, ref = _rand(8, 3, 5), _rand(9, 3, 5)
    scores = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    rewards, non_score = token_rewards(scores, old, ref, MASK, 0.05)
    kl = ((old - ref) * MASK).sum(1)
    assert non_score.sum(1).tolist() == pytest.approx((-0.05 * kl).tolist(), abs=1e-12)
    assert (non_score[MASK == 0] == 0).all() and (rewards[MASK == 0] == 0).all()
    score_part = rewards - non_score
    last = [4, 1, 3]
    for i in range(3):
        assert score_part[i, last[i]].item() == pytest.approx(scores[i].item(), abs=1e-12)
        assert score_part[i].abs().sum().item() == pytest.approx(abs(scores[i].item()), abs=1e-12)
    assert rewards.sum(1).tolist() == pytest.approx((scores - 0.05 * kl).tolist(), abs=1e-12)
    rewards, non_score = token_rewards(scores, old, None, MASK, 0.05)  # no reference: the score alone
    assert non_score.abs().sum() == 0 and rewards.sum(1).tolist() == pytest.approx(scores.tolist())


# ---- micro-batch additivity on the tiny model ---------------------------------------------------------------
def test_micro_batch_gradients_add_up_to_the_batch_gradient(tokenizer):
    from dpokit.loop.online import token_logps
    from dpokit.loop.ppo import micro_batch_backward, token_values
    cfg = TrainConfig.from_dict({"loss": "ppo", "kl_coef": 0.05, "device": "cpu"})
    policy = make_tiny_model(len(tokenizer), seed=1)
    value_model = _value_model(tokenizer)
    rows = [([5, 6, 7], [8, 9, 10, 11]), ([12, 13], [14]), ([15, 16, 17, 18], [19, 20, 21]), ([3], [4, 5])]
    mask_lengths = [len(c) for _, c in rows]
    width = max(mask_lengths)
    g = torch.Generator().manual_seed(0)
    old, adv, old_v, ret = (torch.randn(4, width, generator=g) * 0.3 for _ in range(4))
    tokens = float(sum(mask_lengths))

    def grads(parts, one_model_at_a_time=False):
        for p in list(policy.parameters()) + list(value_model.parameters()):
            p.grad = None
        for part in parts:
            sub = [rows[i] for i in part]
            if one_model_at_a_time:  # as ppo_step takes them: the policy's backward, then the value model's
                with torch.no_grad():
                    now = token_logps(policy, sub, 0, CPU, cfg)[0]
                rollout = (old[part, :now.shape[1]] + now, adv[part], old_v[part], ret[part])
                micro_batch_backward(policy, value_model, sub, rollout, tokens, 1.0, 0, CPU, cfg, 0)
                continue
            logps, mask = token_logps(policy, sub, 0, CPU, cfg)
            values = token_values(value_model, sub, 0, CPU, cfg)
            w = logps.shape[1]
            loss, _ = OBJECTIVES["ppo"].compute(OnlineInputs(
                logps, old[part, :w] + logps.detach(), adv[part, :w], mask, None, tokens, values, old_v[part, :w],
                ret[part, :w]), cfg)
            loss.backward()
        return [p.grad.clone() for p in list(policy.parameters()) + list(value_model.parameters())]
    whole, halves = grads([[0, 1, 2, 3]]), grads([[0, 1], [2, 3]])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole, halves))
    # backpropagated one model at a time: the joint loss's gradients, exactly (the two terms share no parameter)
    assert all(torch.equal(a, b) for a, b in zip(halves, grads([[0, 1], [2, 3]], one_model_at_a_time=True)))
    assert any(a.abs().sum() > 0 for a in whole[-1:])  # the value head gets a gradient


def _value_model(tokenizer):
    from transformers import LlamaForSequenceClassification
    config = make_tiny_model(len(tokenizer)).config
    config.num_labels = 1
    torch.manual_seed(2)
    return LlamaForSequenceClassification(config).eval()


# ---- runs on the tiny model ---------------------------------------------------------------------------------
def _run(model, prompts, out, **extra):
    options = dict(model=model, prompts=prompts, reward=REWARD, output_dir=str(out), max_new_tokens=6, batch_size=2,
                   lr=1e-2, warmup_steps=0, progress=False, max_steps=2, num_generations=2, log=quiet)
    return train(**{**options, **extra})


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]


PPO_KEYS = ("loss", "loss/policy", "loss/value", "reward", "kl", "kl_seq", "non_score_reward", "rlhf_reward",
            "clip_fraction", "clip_fraction/low", "clip_fraction/high", "value_clip_fraction", "ratio", "approx_kl",
            "explained_variance", "value", "lr", "grad_norm", "completion_length", "generation_s", "step_s")


def _check_kl(metrics, kl_coef):
    """kl: the k1 per-token mean over the step's completion tokens (as GRPO's, a token mean); kl_seq: its sum per
    completion, averaged over completions; so kl = kl_seq / mean completion length."""
    for m in metrics:
        assert m["kl"] == pytest.approx(m["kl_seq"] / m["completion_length"], rel=1e-5, abs=1e-12)
        assert m["non_score_reward"] == pytest.approx(-kl_coef * m["kl_seq"], rel=1e-5, abs=1e-12)
    assert metrics[0]["kl_seq"] == 0.0 and metrics[-1]["kl_seq"] != 0.0  # π_ref = the start; then the policy moved


def test_ppo_runs_logs_moves_the_weights_and_is_deterministic(tmp_path, tiny_model_dir, prompts_file):
    runs = [_run(tiny_model_dir, prompts_file, tmp_path / name, loss="ppo", kl_coef=0.05, grad_accum=2,
                 num_mini_batches=2, num_ppo_epochs=2, lam=0.9, gamma=0.99, whiten_rewards=True) for name in "ab"]
    metrics = _metrics(runs[0].output_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    for key in PPO_KEYS:
        assert all(key in m and math.isfinite(m[key]) for m in metrics), key
    assert metrics[0]["kl"] == 0.0  # the reference is the starting policy
    _check_kl(metrics, 0.05)
    assert (runs[0].final_dir / "model.safetensors").is_file()
    a, b, start = (load_file(f"{p}/model.safetensors") for p in (runs[0].final_dir, runs[1].final_dir, tiny_model_dir))
    assert any(not torch.equal(a[k], start[k]) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed: same samples, layouts, updates
    timeless = [[{k: v for k, v in m.items() if not k.endswith("_s") and k != "generation_share"} for m in _metrics(o)]
                for o in (runs[0].output_dir, runs[1].output_dir)]
    assert timeless[0] == timeless[1]


def test_ppo_first_pass_ratio_is_exactly_one(tmp_path, tiny_model_dir, prompts_file):
    # lr > 0, one pass, one mini-batch: each step's one update is taken at π_θ = π_old and V = V_old exactly (the
    # micro-batches the rollout passes used), and the policy moves between steps
    result = _run(tiny_model_dir, prompts_file, tmp_path / "run", loss="ppo", kl_coef=0.05, num_ppo_epochs=1,
                  num_mini_batches=1, num_generations=1, batch_size=3)
    metrics = _metrics(result.output_dir)
    for m in metrics:
        assert m["ratio"] == 1.0 and m["clip_fraction"] == 0.0 and m["approx_kl"] == 0.0
        assert m["value_clip_fraction"] == 0.0 and "reward_std" in m
    assert metrics[0]["kl"] == 0.0 and metrics[1]["kl"] != 0.0  # π_ref is the start; step 1's update moved π


def test_a_ppo_update_does_not_depend_on_the_micro_batch_size(tmp_path, tiny_model_dir, prompts_file):
    """One update (one pass, one mini-batch) on the same rollout of 2 prompts × 2 samples, accumulated over two
    micro-batches (batch_size 1, grad_accum 2) or one (batch_size 2): ppo_step divides each micro-batch's loss by
    its mini-batch's token count, so the gradients and the updated weights agree."""
    runs = [_run(tiny_model_dir, prompts_file, tmp_path / f"b{b}", loss="ppo", kl_coef=0.05, batch_size=b,
                 grad_accum=2 // b, num_ppo_epochs=1, max_steps=1, lr=1e-4) for b in (1, 2)]
    metrics = [_metrics(r.output_dir)[0] for r in runs]
    for key in ("reward", "completion_length"):  # the same rollout
        assert metrics[0][key] == metrics[1][key], key
    assert metrics[0]["grad_norm"] == pytest.approx(metrics[1]["grad_norm"], rel=1e-5)
    assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-5, abs=1e-7)
    small, big, start = (load_file(f"{p}/model.safetensors") for p in (*(r.final_dir for r in runs), tiny_model_dir))
    assert any((small[k] - start[k]).abs().max() > 5e-5 for k in small)  # the update moved the weights
    assert all(torch.allclose(small[k], big[k], rtol=0, atol=1e-5) for k in small)


def test_rloo_runs_with_the_sentiment_reward_and_logs(tmp_path, tiny_model_dir, prompts_file):
    result = _run(tiny_model_dir, prompts_file, tmp_path / "run", loss="rloo", reward="sentiment", kl_coef=0.05,
                  grpo_iterations=2, num_generations=3)
    metrics = _metrics(result.output_dir)
    for key in ("loss", "reward", "kl", "kl_seq", "non_score_reward", "clip_fraction", "ratio", "advantage_std",
                "lr", "grad_norm", "frac_reward_zero_std"):
        assert all(key in m for m in metrics), key
    _check_kl(metrics, 0.05)
    assert (result.final_dir / "model.safetensors").is_file()


def test_rloo_first_pass_ratio_is_exactly_one(tmp_path, tiny_model_dir, prompts_file, monkeypatch):
    """μ = 2, lr > 0: the first pass over each batch is at ρ = 1 exactly (π_old taken in the same micro-batches),
    the second is not (the first pass's update moved π)."""
    import dataclasses
    rloo, ratios = OBJECTIVES["rloo"], []

    def compute(inputs, cfg):
        loss, stats = rloo.compute(inputs, cfg)
        ratios.append((stats["ratio"].item(), stats["clip_fraction"].item()))
        return loss, stats
    monkeypatch.setitem(OBJECTIVES, "rloo", dataclasses.replace(rloo, compute=compute))
    result = _run(tiny_model_dir, prompts_file, tmp_path / "run", loss="rloo", kl_coef=0.05, grpo_iterations=2,
                  num_generations=3)
    assert len(ratios) == 4  # 2 steps × 2 passes × one micro-batch
    assert all(r == (1.0, 0.0) for r in ratios[0::2]) and all(r[0] != 1.0 for r in ratios[1::2])
    assert _metrics(result.output_dir)[0]["kl"] == 0.0


def _classifier_dir(tmp_path, tokenizer, labels: int) -> str:
    from transformers import LlamaForSequenceClassification
    config = make_tiny_model(len(tokenizer), seed=3).config
    config.num_labels = labels
    torch.manual_seed(3)
    path = tmp_path / f"rm{labels}"
    LlamaForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def test_the_value_model_starts_from_a_one_label_reward_model_else_from_the_policy(tmp_path, tokenizer,
                                                                                   tiny_model_dir, prompts_file):
    from dpokit.loop.ppo import load_value_model
    from dpokit.models import load_model
    policy = load_model(tiny_model_dir)
    rm = _classifier_dir(tmp_path, tokenizer, 1)
    said, ppo = [], {"loss": "ppo", "kl_coef": 0.0}
    value = load_value_model(TrainConfig.from_dict({**ppo, "reward": rm}), policy, tokenizer, "cpu", said.append)
    assert "reward model" in said[-1]
    assert torch.equal(value.score.weight, load_file(f"{rm}/model.safetensors")["score.weight"])
    value = load_value_model(TrainConfig.from_dict(ppo), policy, tokenizer, "cpu", said.append)
    assert "from the policy" in said[-1]
    theirs = policy.base_model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in value.base_model.state_dict().items())
    two = _classifier_dir(tmp_path, tokenizer, 2)
    with pytest.raises((ConfigError, RewardError), match=r"2 labels"):  # refused by the reward, or the value model
        _run(tiny_model_dir, prompts_file, tmp_path / "x", loss="ppo", kl_coef=0.0, reward=two)
    load_value_model(TrainConfig.from_dict({**ppo, "reward": two + "#LABEL_1"}), policy, tokenizer, "cpu", said.append)
    assert "several labels" in said[-2] and "from the policy" in said[-1]


def test_a_folder_named_sentiment_is_not_a_reward_model(tmp_path, monkeypatch):
    """load_reward and the value model read --reward alike (evaluation/rewards.py's classifier_folder): `sentiment`
    is VADER even where a folder of that name exists."""
    from dpokit.evaluation.rewards import classifier_folder
    from dpokit.loop.ppo import _reward_folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sentiment").mkdir()
    assert classifier_folder("sentiment") is None and classifier_folder("sentiment#X") == ("sentiment", "X")
    assert _reward_folder(TrainConfig.from_dict({"loss": "ppo", "kl_coef": 0.0, "reward": "sentiment"})) is None
    assert load_reward("sentiment")(["A"], [" great movie"])[0] > 0


def test_cli_ppo_against_a_reward_model_from_train_rm(tmp_path, tiny_model_dir, prompts_file, explicit_rows, capsys):
    from dpokit.cli import main
    pairs = write_jsonl(tmp_path / "pairs.jsonl", explicit_rows)
    assert main(["train-rm", "--model", tiny_model_dir, "--data", pairs, "--max-steps", "1", "--batch-size", "2",
                 "--output-dir", str(tmp_path / "rm"), "--no-progress", "--no-memory-check"]) == 0
    assert main(["train", "--model", tiny_model_dir, "--loss", "ppo", "--reward", str(tmp_path / "rm" / "final"),
                 "--kl-coef", "0.05", "--prompts", prompts_file, "--max-steps", "1", "--num-generations", "1",
                 "--batch-size", "3", "--max-new-tokens", "4", "--output-dir", str(tmp_path / "ppo"),
                 "--no-progress"]) == 0
    assert "value model: initialised from the reward model" in capsys.readouterr().out
    assert "loss/value" in _metrics(tmp_path / "ppo")[0] and (tmp_path / "ppo" / "final" / "config.json").is_file()


@pytest.mark.parametrize("options, message", [
    (dict(loss="ppo,sigmoid"), r"ppo is an online objective on its own"),
    (dict(loss="rloo,sigmoid"), r"rloo is an online objective on its own"),
    (dict(loss="ppo", online_dpo=True), r"ppo is an online objective on its own"),
    (dict(loss="ppo", eval_data="x.jsonl"), r"eval_data = 'x.jsonl' is not used by online training"),
    (dict(loss="rloo", prompts="p.jsonl", eval_every=5), r"eval_every = 5 has no effect without held-out prompts"),
    (dict(loss="grpo", num_ppo_epochs=2), r"num_ppo_epochs = 2 has no effect on loss grpo: it is used by ppo"),
    (dict(loss="rloo", vf_coef=0.5), r"vf_coef = 0.5 has no effect on loss rloo: it is used by ppo"),
    (dict(loss="ppo", grpo_iterations=2), r"grpo_iterations = 2 has no effect on loss ppo"),
    (dict(cliprange_value=0.1), r"cliprange_value = 0.1 only applies to online training"),
    (dict(online_dpo=True, gamma=0.9), r"gamma = 0.9 only applies to --loss grpo, rloo or ppo"),
    (dict(loss="ppo", lam=1.5), r"lam = 1.5 is out of range"),
    (dict(loss="rloo", num_generations=1), r"num_generations = 1 is out of range: must be >= 2"),
    (dict(loss="ppo", num_generations=0), r"num_generations = 0 is out of range"),
    (dict(loss="ppo"), r"loss ppo: set --kl-coef, the weight of the KL penalty in the reward: 0.05 is TRL's"),
    (dict(loss="rloo", reward="sentiment"), r"loss rloo: set --kl-coef"),
    (dict(loss="ppo", kl_coef=0.05, batch_size=2, num_generations=3, num_mini_batches=4),
     r"num_mini_batches = 4 does not divide the 6 rows of a rollout batch \(batch_size 2 × grad_accum 1 × "
     r"num_generations 3\)"),
])
def test_refusals(options, message):
    with pytest.raises(ConfigError, match=message):
        train(**options)


def test_ppo_accepts_one_sample_per_prompt_and_the_losses_list_them(capsys):
    assert TrainConfig.from_dict({"loss": "ppo", "kl_coef": 0.05, "num_generations": 1}).num_generations == 1
    from dpokit.cli import main
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    assert "ppo" in out and "rloo" in out
