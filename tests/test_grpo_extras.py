"""What GRPO users expect (issue 18 part 5), each against an independent computation: GSPO's sequence-level
ratio (importance_sampling_level, against a float64 loop and TRL 1.16's GRPOTrainer._compute_loss),
mask_truncated_completions and the logged token entropy (grpo_step on a tiny model against full-logits
log-softmax by hand), and per-reward-function metrics (rewards/<name>/mean, /std)."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from conftest import make_tiny_model
from dpokit import train
from dpokit.config import ConfigError, TrainConfig
from dpokit.evaluation.rewards import Scores, combine, reward_names
from dpokit.generation.sample import Samples
from dpokit.logprobs import sequence
from dpokit.loop import online, online_dist
from dpokit.objectives import OBJECTIVES, OnlineInputs
from dpokit.objectives.grpo import AGGREGATIONS, grpo_loss
from test_grpo import _trl_grpo_loss


def length_reward(prompts, completions):
    """A second reward for tests (spec `test_grpo_extras:length_reward`): the completion's length in characters."""
    return [float(len(c)) for c in completions]


# ---- GSPO: the sequence-level ratio --------------------------------------------------------------------------
def _gspo_batch():
    """4 completions; mean token log-ratios −0.4 (A < 0: s = 0.67, below 1 − 0.2), 0.4 (A > 0: s = 1.49, above
    1 + 0.28), 0.05 (inside) and a row with mask all 0 (a masked truncated completion); padding holds garbage."""
    g = torch.Generator().manual_seed(5)
    logps = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    log_ratio = torch.tensor([[-0.2, -0.6, -0.4, 9.0, 9.0],
                              [0.1, 0.7, 0.5, 0.3, 9.0],
                              [0.05, 0.15, -0.05, 0.05, 0.05],
                              [0.3, 0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    ref = logps + torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    advantages = torch.tensor([-0.7, 1.3, -0.4, 0.9], dtype=torch.float64)
    return logps, logps - log_ratio, ref, mask, advantages


def _naive_gspo(logps, old, ref, mask, adv, eps_low, eps_high, kl_coef, aggregation, max_len):
    per_seq, lens, low, high = [], [], 0, 0
    for i in range(logps.shape[0]):
        real = [t for t in range(logps.shape[1]) if mask[i, t]]
        s = math.exp(sum(logps[i, t].item() - old[i, t].item() for t in real) / max(len(real), 1))
        a = adv[i].item()
        term = -min(s * a, min(max(s, 1 - eps_low), 1 + eps_high) * a)
        kl = sum(math.exp(ref[i, t].item() - logps[i, t].item()) - (ref[i, t].item() - logps[i, t].item()) - 1
                 for t in real)
        per_seq.append(term * len(real) + kl_coef * kl)  # the sequence's ratio term on every one of its tokens
        lens.append(len(real))
        low += s < 1 - eps_low and a < 0
        high += s > 1 + eps_high and a > 0
    b, tokens = len(per_seq), sum(lens)
    loss = {"grpo": sum(x / max(n, 1) for x, n in zip(per_seq, lens)) / b, "dapo": sum(per_seq) / tokens,
            "dr_grpo": sum(per_seq) / (b * max_len)}[aggregation]
    return loss, low / b, high / b


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_gspo_matches_a_naive_loop(aggregation, kl_coef):
    logps, old, ref, mask, adv = _gspo_batch()
    loss, stats = grpo_loss(logps, old, adv, mask, ref, 0.2, 0.28, kl_coef, aggregation, 8,
                            importance_sampling_level="sequence")
    expected, low, high = _naive_gspo(logps, old, ref, mask, adv, 0.2, 0.28, kl_coef, aggregation, 8)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert (low, high) == (0.25, 0.25)  # one sequence clipped on each side, counted over the 4 completions
    assert stats["clip_fraction/low"].item() == low and stats["clip_fraction/high"].item() == high


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_gspo_trl_parity(aggregation, kl_coef):
    """Loss, gradient, clip fractions and KL equal TRL 1.16's _compute_loss with importance_sampling_level
    'sequence' (log_importance_weights = Σ log-ratio·mask / mask.sum, [B, 1])."""
    logps, old, ref, mask, adv = _gspo_batch()
    ours_in, trl_in = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    ours, stats = grpo_loss(ours_in, old, adv, mask, ref, 0.2, 0.28, kl_coef, aggregation, 8,
                            importance_sampling_level="sequence")
    theirs, metrics = _trl_grpo_loss(trl_in, old, ref, mask, adv, aggregation, kl_coef, 0.2, 0.28, 8,
                                     level="sequence")
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, trl_in.grad, rtol=1e-12, atol=1e-15)
    for key, theirs_key in (("clip_fraction/low", "clip_ratio/low_mean"), ("clip_fraction/high", "clip_ratio/high_mean"),
                            ("clip_fraction", "clip_ratio/region_mean")):
        assert stats[key].item() == pytest.approx(metrics[theirs_key], rel=1e-12)
    if kl_coef:
        assert stats["kl"].item() == pytest.approx(metrics["kl"], rel=1e-12)


def test_gspo_at_ratio_one_has_the_token_level_gradient():
    """On-policy (μ = 1) s_i = 1 and ∂s_i/∂log π(y_it) = 1/|y_i|: with the per-sequence 'grpo' aggregation the
    gradient is the token-level one, −A_i / (B |y_i|) (GSPO changes only what happens off-policy)."""
    logps, _, _, mask, adv = _gspo_batch()
    grads = []
    for level in ("token", "sequence"):
        x = logps.clone().requires_grad_(True)
        grpo_loss(x, x.detach(), adv, mask, aggregation="grpo", importance_sampling_level=level)[0].backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logps, logps, adv, mask, importance_sampling_level="group")


# ---- mask_truncated_completions and entropy in grpo_step -------------------------------------------------------
def _samples(tokenizer, eos_ends: list[bool]) -> Samples:
    """Two prompts × 2 completions of random tokens, ending in EOS where `eos_ends` says, else cut (truncated)."""
    g = torch.Generator().manual_seed(3)
    prompts = ["The film was", "My day"]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts for _ in range(2)]
    completions = []
    for i, ends in enumerate(eos_ends):
        ids = torch.randint(5, len(tokenizer), (3 + i,), generator=g).tolist()
        completions.append(ids[:-1] + [tokenizer.eos_token_id] if ends else ids)
    return Samples(prompts, 2, prompt_ids, completions, tokenizer.batch_decode(completions), [0.0] * 4,
                   sum(map(len, completions)), 1.0, [not c or c[-1] != tokenizer.eos_token_id for c in completions])


def _by_hand(model, samples, rewards, keep, temperature):
    """The GRPO loss at ratio 1 (μ = 1, dapo) whose gradient the step takes, and the mean token entropy, from
    the model's full logits: every kept completion's tokens, advantages from all rewards (group std + 1e-4)."""
    groups = torch.tensor(rewards, dtype=torch.float64).view(-1, 2)
    adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
    total, entropy_sum, tokens = 0.0, 0.0, 0
    for i, (p, c) in enumerate(zip(samples.prompt_ids, samples.completion_ids)):
        if not keep[i]:
            continue
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1] / temperature
        logp = torch.log_softmax(logits, -1)
        total = total - adv[i] * logp.gather(-1, torch.tensor(c)[:, None]).sum()
        entropy_sum += -(logp.exp() * logp).sum().item()
        tokens += len(c)
    return total / tokens, entropy_sum / tokens


@pytest.mark.parametrize("mask_truncated", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_grpo_step_masks_truncated_completions_and_logs_the_entropy(tokenizer, monkeypatch, mask_truncated, chunked):
    if chunked:  # the head in chunks of a few tokens, each recomputed in backward: entropy per chunk
        monkeypatch.setattr(sequence, "CHUNK_ELEMENTS", 2 * len(tokenizer))
    model, reference = make_tiny_model(len(tokenizer)), make_tiny_model(len(tokenizer))  # fp32: as the loop runs
    reference.load_state_dict(model.state_dict())
    samples = _samples(tokenizer, [True, False, False, True])
    assert samples.truncated == [False, True, True, False]
    rewards = [0.3, 0.9, -0.2, 0.5]
    cfg = TrainConfig(loss="grpo", num_generations=2, batch_size=1, temperature=0.7, max_new_tokens=8,
                      max_grad_norm=0.0, mask_truncated_completions=mask_truncated)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = online.grpo_step(model, None, samples, rewards, cfg, optimizer, scheduler, tokenizer.pad_token_id,
                              torch.device("cpu"), 0)
    keep = [not (mask_truncated and t) for t in samples.truncated]
    loss, entropy = _by_hand(reference, samples, rewards, keep, 0.7)
    loss.backward()
    assert record["entropy"] == pytest.approx(entropy, rel=1e-5)
    for name, p in reference.named_parameters():  # SGD at lr 1, no clipping: the step moved each weight by −grad
        torch.testing.assert_close(before[name] - model.state_dict()[name], p.grad, rtol=1e-4, atol=1e-6)


def test_mask_truncated_completions_and_gspo_are_refused_where_unread():
    def config(**values):
        return TrainConfig.from_dict(values)
    assert config(loss="rloo", kl_coef=0.05, mask_truncated_completions=True).mask_truncated_completions
    assert config(loss="grpo", importance_sampling_level="sequence").importance_sampling_level == "sequence"
    for values in ({"loss": "rloo", "kl_coef": 0.05, "importance_sampling_level": "sequence"},
                   {"loss": "ppo", "kl_coef": 0.05, "mask_truncated_completions": True},
                   {"loss": "sigmoid", "mask_truncated_completions": True},
                   {"loss": "grpo", "importance_sampling_level": "group"}):
        key = next(k for k in values if k not in ("loss", "kl_coef"))
        with pytest.raises(ConfigError, match=key):
            config(**values)


# ---- several rewards: each function's mean and std ------------------------------------------------------------
def test_combined_rewards_log_each_function_as_trl():
    prompts, completions = ["a", "b", "c"], ["see the tree", "no", "eleven"]
    fn = combine(["conftest:letter_reward", "test_grpo_extras:length_reward"], [0.5, 2.0])
    rewards = fn(prompts, completions)
    letters = [c.count("e") / sum(ch.isalpha() for ch in c) for c in completions]
    lengths = [float(len(c)) for c in completions]
    assert isinstance(rewards, Scores) and rewards == pytest.approx([0.5 * a + 2 * b for a, b in zip(letters, lengths)])
    cfg = TrainConfig(loss="grpo", num_generations=3)
    samples = Samples(prompts[:1], 3, [[1]] * 3, [[2]] * 3, completions, [0.0] * 3, 3, 1.0, [False] * 3)
    record = online_dist.step_record(cfg, 0, 1, {}, samples, rewards, 0.1, 1.0)
    for name, column in (("letter_reward", letters), ("length_reward", lengths)):
        values = torch.tensor(column, dtype=torch.float64)  # TRL: nanmean and the Bessel-corrected nanstd
        assert record[f"rewards/{name}/mean"] == pytest.approx(values.mean().item(), rel=1e-12)
        assert record[f"rewards/{name}/std"] == pytest.approx(values.std().item(), rel=1e-12)
    assert record["reward"] == pytest.approx(statistics.fmean(rewards)) and record["truncated"] == 0.0
    assert "rewards/letter_reward/mean" not in online_dist.step_record(cfg, 0, 1, {}, samples, list(rewards), 0.1, 1.0)


def test_reward_names_are_short_and_unique(tmp_path):
    (tmp_path / "rm").mkdir()
    assert reward_names(["sentiment", "pkg.mod:score", "other:score", f"{tmp_path}/rm#POSITIVE", "x:score_2"]) == \
        ["sentiment", "score", "score_2", "rm#POSITIVE", "score_2_2"]


def test_the_registry_passes_the_level_and_a_run_logs_every_new_metric(tmp_path, tiny_model_dir):
    logps, old, ref, mask, adv = _gspo_batch()
    cfg = TrainConfig.from_dict({"loss": "grpo", "importance_sampling_level": "sequence", "grpo_aggregation": "grpo"})
    got, _ = OBJECTIVES["grpo"].compute(OnlineInputs(logps, old, adv, mask, None), cfg)
    assert got.item() == grpo_loss(logps, old, adv, mask, aggregation="grpo", max_completion_length=cfg.max_new_tokens,
                                   importance_sampling_level="sequence")[0].item()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The film was"}\n{"prompt": "My day was"}\n', encoding="utf-8")
    result = train(model=tiny_model_dir, prompts=str(prompts), output_dir=str(tmp_path / "run"), loss="grpo",
                   reward="conftest:letter_reward,test_grpo_extras:length_reward", reward_weights="1,0.1",
                   importance_sampling_level="sequence", mask_truncated_completions=True, grpo_iterations=2,
                   num_generations=2, max_new_tokens=4, batch_size=2, max_steps=1, warmup_steps=0, progress=False,
                   log=lambda *a: None)
    record = json.loads((result.output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[0])
    for key in ("entropy", "truncated", "rewards/letter_reward/mean", "rewards/letter_reward/std",
                "rewards/length_reward/mean", "rewards/length_reward/std", "ratio", "clip_fraction"):
        assert key in record, key
    assert record["entropy"] >= 0 and 0 <= record["truncated"] <= 1
