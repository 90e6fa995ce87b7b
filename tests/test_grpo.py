"""GRPO objective (objectives/grpo.py): advantages, the clipped objective against a naive loop, the plain
policy gradient at ratio 1, the k3 KL estimator, micro-batch additivity, and parity with TRL 1.16's loss."""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.objectives.grpo import AGGREGATIONS, group_advantages, grpo_loss, k3_kl, normalizer


# ---- advantages ---------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    centred = [-1.5, -0.5, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0]
    # group 1: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; group 2: all equal → 0
    group_std = math.sqrt(5 / 3)
    expected = [c / (group_std + 1e-4) for c in centred[:4]] + [0.0] * 4
    assert group_advantages(rewards, 4, "group").tolist() == pytest.approx(expected, abs=1e-12)
    # batch: mean 1.25, Σ squared deviations 17.5, unbiased variance 17.5 / 7 = 2.5
    expected = [c / (math.sqrt(2.5) + 1e-4) for c in centred]
    assert group_advantages(rewards, 4, "batch").tolist() == pytest.approx(expected, abs=1e-12)
    assert group_advantages(rewards, 4, "none").tolist() == pytest.approx(centred, abs=1e-12)
    # groups of 2: [1, 2] → ±0.5 / (std 0.7071 + 1e-4)
    assert group_advantages(rewards, 2)[:2].tolist() == pytest.approx(
        [-0.5 / (math.sqrt(0.5) + 1e-4), 0.5 / (math.sqrt(0.5) + 1e-4)], abs=1e-12)


def test_group_advantages_refuses_bad_shapes():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, "mean")


# ---- the clipped objective against a naive loop ----------------------------------------------------------
def _batch():
    """3 completions of lengths 5, 2, 4 (T = 5), log-ratios chosen to fall below, inside and above the clip
    range [1 − 0.2, 1 + 0.28], advantages of both signs."""
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    log_ratio = torch.tensor([[-0.5, -0.1, 0.0, 0.1, 0.5],
                              [0.4, -0.3, 9.0, 9.0, 9.0],      # padding carries garbage: must be ignored
                              [-0.25, 0.2, 0.3, -0.05, 9.0]], dtype=torch.float64)
    old = logps - log_ratio
    ref = logps + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    advantages = torch.tensor([1.3, -0.7, -0.4], dtype=torch.float64)
    return logps, old, ref, mask, advantages


def _naive(logps, old, ref, mask, adv, eps_low, eps_high, kl_coef, aggregation, max_len):
    per_seq_sums, per_seq_lens, low, high = [], [], 0, 0
    for i in range(logps.shape[0]):
        total, n = 0.0, 0
        for t in range(logps.shape[1]):
            if not mask[i, t]:
                continue
            lp, lo, lr, a = logps[i, t].item(), old[i, t].item(), ref[i, t].item(), adv[i].item()
            ratio = math.exp(lp - lo)
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            kl = math.exp(lr - lp) - (lr - lp) - 1
            total += -min(ratio * a, clipped * a) + kl_coef * kl
            n += 1
            low += ratio < 1 - eps_low and a < 0
            high += ratio > 1 + eps_high and a > 0
        per_seq_sums.append(total)
        per_seq_lens.append(n)
    tokens, b = sum(per_seq_lens), len(per_seq_sums)
    loss = {"grpo": sum(s / n for s, n in zip(per_seq_sums, per_seq_lens)) / b,
            "dapo": sum(per_seq_sums) / tokens,
            "dr_grpo": sum(per_seq_sums) / (b * max_len)}[aggregation]
    return loss, low / tokens, high / tokens


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_clipped_objective_matches_a_naive_loop(aggregation, kl_coef):
    logps, old, ref, mask, adv = _batch()
    loss, stats = grpo_loss(logps, old, adv, mask, ref, epsilon_low=0.2, epsilon_high=0.28, kl_coef=kl_coef,
                            aggregation=aggregation, max_completion_length=8)
    expected, low, high = _naive(logps, old, ref, mask, adv, 0.2, 0.28, kl_coef, aggregation, 8)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["clip_fraction/low"].item() == pytest.approx(low)
    assert stats["clip_fraction/high"].item() == pytest.approx(high)
    assert low > 0 and high > 0  # the batch exercises both sides of the clip
    assert stats["clip_fraction"].item() == pytest.approx(low + high)


def test_symmetric_clip_by_default():
    logps, old, ref, mask, adv = _batch()
    loss, _ = grpo_loss(logps, old, adv, mask)
    expected, _, _ = _naive(logps, old, ref, mask, adv, 0.2, 0.2, 0.0, "dapo", 1)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


# ---- one optimisation pass per batch: ratio 1 and the plain policy gradient --------------------------
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_at_ratio_one_the_gradient_is_the_plain_policy_gradient(aggregation):
    logps, _, _, mask, adv = _batch()
    logps = logps.clone().requires_grad_(True)
    loss, stats = grpo_loss(logps, logps.detach(), adv, mask, aggregation=aggregation, max_completion_length=8)
    loss.backward()
    assert stats["ratio"].item() == 1.0
    assert stats["clip_fraction"].item() == 0.0
    lengths = mask.sum(1).double()
    weight = {"dapo": torch.full((3,), 1 / lengths.sum().item(), dtype=torch.float64),
              "grpo": 1 / (lengths * 3),
              "dr_grpo": torch.full((3,), 1 / (3 * 8), dtype=torch.float64)}[aggregation]
    # ∂loss/∂log π(y_it) = −A_i · w_i at real tokens, 0 at padding: the REINFORCE gradient −A ∇log π
    expected = -(adv * weight).unsqueeze(1) * mask
    torch.testing.assert_close(logps.grad, expected, rtol=1e-12, atol=1e-15)


# ---- k3 --------------------------------------------------------------------------------------------------
def test_k3_is_nonnegative_zero_at_equality_and_unbiased():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1000, generator=g, dtype=torch.float64), torch.randn(1000, generator=g, dtype=torch.float64)
    assert (k3_kl(a, b) >= 0).all()
    assert torch.equal(k3_kl(a, a), torch.zeros_like(a))
    # E_{y~p}[k3] = Σ_y p(y) (q/p − log(q/p) − 1) = KL(p‖q) exactly
    p = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    expectation = (p * k3_kl(p.log(), q.log())).sum()
    assert expectation.item() == pytest.approx((p * (p.log() - q.log())).sum().item(), rel=1e-12)


def test_kl_stat_and_zero_kl_when_reference_is_the_policy():
    logps, old, _, mask, adv = _batch()
    plain, _ = grpo_loss(logps, old, adv, mask)
    with_ref, stats = grpo_loss(logps, old, adv, mask, ref_logps=logps.clone(), kl_coef=0.5)
    assert with_ref.item() == pytest.approx(plain.item(), rel=1e-12)
    assert stats["kl"].item() == 0.0
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, adv, mask, kl_coef=0.1)


# ---- micro-batches ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batch_losses_add_up_to_the_batch_loss(aggregation):
    logps, old, ref, mask, adv = _batch()
    whole, _ = grpo_loss(logps, old, adv, mask, ref, kl_coef=0.1, aggregation=aggregation, max_completion_length=8)
    norm = normalizer(aggregation, int(mask.sum()), 3, 8)
    parts = sum(grpo_loss(logps[s], old[s], adv[s], mask[s], ref[s], kl_coef=0.1, aggregation=aggregation,
                          max_completion_length=8, normalizer_value=norm)[0] for s in (slice(0, 2), slice(2, 3)))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12)


def test_bad_aggregation_and_missing_length_are_refused():
    logps, old, _, mask, adv = _batch()
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logps, old, adv, mask, aggregation="mean")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, old, adv, mask, aggregation="dr_grpo")


# ---- parity with TRL 1.16's GRPOTrainer._compute_loss ----------------------------------------------------
TRL_LOSS_TYPE = {"dapo": "dapo", "grpo": "grpo", "dr_grpo": "dr_grpo"}  # the same names, the same formulas


def _trl_grpo_loss(logps, old, ref, mask, adv, loss_type, beta, eps_low, eps_high, max_len, level="token"):
    """TRL 1.16 computes the GRPO loss inline in GRPOTrainer._compute_loss. Called unbound on a stand-in `self`
    holding only what that method reads for the plain configuration (token-level ratios, or GSPO's sequence
    ratio with level "sequence"; no vLLM, no entropy mask or bonus, one process, no accumulation), with the
    model's log-prob pass replaced by `logps`."""
    from collections import defaultdict
    from types import SimpleNamespace
    trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    batch, length = logps.shape
    identity = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x,
                               reduce=lambda x, reduction: x, gather_for_metrics=lambda x: x)
    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=identity, _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    inputs = {"prompt_ids": torch.zeros(batch, 2, dtype=torch.long), "prompt_mask": torch.ones(batch, 2),
              "completion_ids": torch.zeros(batch, length, dtype=torch.long), "completion_mask": mask.to(logps.dtype),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum().to(logps.dtype)}
    loss = trainer.GRPOTrainer._compute_loss(stand_in, None, inputs)
    return loss, {k: v[-1] for k, v in stand_in._metrics["train"].items()}


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_trl_parity(aggregation, kl_coef):
    """Loss, gradient w.r.t. the policy's log-probs, clip fractions and KL equal TRL 1.16's on a batch whose
    ratios fall below, inside and above the asymmetric clip range, with padding carrying garbage."""
    logps, old, ref, mask, adv = _batch()
    ours_in, trl_in = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    ours, stats = grpo_loss(ours_in, old, adv, mask, ref, epsilon_low=0.2, epsilon_high=0.28, kl_coef=kl_coef,
                            aggregation=aggregation, max_completion_length=8)
    theirs, metrics = _trl_grpo_loss(trl_in, old, ref, mask, adv, TRL_LOSS_TYPE[aggregation], kl_coef, 0.2, 0.28, 8)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, trl_in.grad, rtol=1e-12, atol=1e-15)
    assert stats["clip_fraction/low"].item() == pytest.approx(metrics["clip_ratio/low_mean"], rel=1e-12)
    assert stats["clip_fraction/high"].item() == pytest.approx(metrics["clip_ratio/high_mean"], rel=1e-12)
    assert stats["clip_fraction"].item() == pytest.approx(metrics["clip_ratio/region_mean"], rel=1e-12)
    if kl_coef:
        assert stats["kl"].item() == pytest.approx(metrics["kl"], rel=1e-12)
