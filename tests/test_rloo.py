"""RLOO's tensor functions (objectives/rloo.py): the leave-one-out advantages by hand, the clipped sequence-level
loss (REINFORCE at ratio 1) and its parity with TRL 1.16's RLOOTrainer. RLOO runs: tests/test_ppo.py."""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.objectives.rloo import rloo_advantages, rloo_loss

MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])


def _rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- RLOO --------------------------------------------------------------------------------------------------
def test_rloo_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    kl = torch.tensor([0.5, -1.0, 2.0, 0.0, 4.0, 1.0], dtype=torch.float64)
    advantages, rewards = rloo_advantages(scores, 3, kl, 0.1)
    r = [s - 0.1 * k for s, k in zip(scores.tolist(), kl.tolist())]
    expected = [r[i] - sum(r[j] for j in range(3 * (i // 3), 3 * (i // 3) + 3) if j != i) / 2 for i in range(6)]
    assert advantages.tolist() == pytest.approx(expected, abs=1e-12) and rewards.tolist() == pytest.approx(r)
    assert rloo_advantages(scores, 2)[0][:2].tolist() == pytest.approx([-1.0, 1.0])
    with pytest.raises(ValueError, match="group size"):
        rloo_advantages(scores, 4)


def test_rloo_loss_is_reinforce_at_ratio_one_and_clips_the_sequence_ratio():
    logps = _rand(10, 3, 5).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    loss, stats = rloo_loss(logps, logps.detach(), adv, MASK)
    loss.backward()
    assert torch.allclose(logps.grad, -adv[:, None] * MASK / 3, atol=1e-15) and stats["ratio"].item() == 1.0
    # sequence log-ratios 0.5 (A > 0: ρ = 1.65 above 1.2, clipped), −0.5 (A < 0: ρ = 0.61 below 0.8, clipped), 0.1
    # spread over the tokens: one ratio per completion
    shift = torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.1], [-0.25, -0.25, 9, 9, 9], [0.05, 0.05, -0.05, 0.05, 9]],
                         dtype=torch.float64)
    loss, stats = rloo_loss(logps.detach(), logps.detach() - shift, adv, MASK)
    rho = [math.exp(0.5), math.exp(-0.5), math.exp(0.1)]
    expected = sum(-min(r * a, min(max(r, 0.8), 1.2) * a) for r, a in zip(rho, adv.tolist())) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert stats["clip_fraction/high"].item() == pytest.approx(1 / 3) and stats["clip_fraction/low"].item() == \
        pytest.approx(1 / 3)


def _trl_rloo_loss(logps, old, mask, adv, eps_low, eps_high):
    """TRL 1.16's RLOOTrainer._compute_loss, called unbound on a stand-in `self` holding only what it reads (one
    process, no aux loss), with the model's log-prob pass replaced by `logps`."""
    from collections import defaultdict
    from types import SimpleNamespace
    trainer = pytest.importorskip("trl.trainer.rloo_trainer")
    batch, length = logps.shape
    identity = SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x, gather_for_metrics=lambda x: x)
    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, epsilon_low=eps_low, epsilon_high=eps_high, model=SimpleNamespace(training=True),
        accelerator=identity, _metrics={"train": defaultdict(list)})
    m = mask.to(logps.dtype)
    inputs = {"prompt_ids": torch.zeros(batch, 2, dtype=torch.long), "prompt_mask": torch.ones(batch, 2),
              "completion_ids": torch.zeros(batch, length, dtype=torch.long), "completion_mask": m,
              "advantages": adv, "old_logps": (old * m).sum(1)}
    loss = trainer.RLOOTrainer._compute_loss(stand_in, None, inputs)
    return loss, {k: v[-1] for k, v in stand_in._metrics["train"].items()}


def test_rloo_loss_trl_parity():
    """Loss, gradient and clip fractions equal TRL 1.16's RLOOTrainer._compute_loss, with sequence ratios below,
    inside and above an asymmetric clip range and garbage in the padding."""
    logps = -_rand(11, 4, 5).abs()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    shift = torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.1], [-0.25, -0.25, 9, 9, 9], [0.05, 0.05, -0.05, 0.05, 9],
                          [0.2, 0.1, 0.05, 9, 9]], dtype=torch.float64)
    old = logps - shift
    adv = torch.tensor([1.0, -2.0, 0.5, 0.7], dtype=torch.float64)
    ours_in, trl_in = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    ours, stats = rloo_loss(ours_in, old, adv, mask, 0.2, 0.28)
    theirs, metrics = _trl_rloo_loss(trl_in, old, mask, adv, 0.2, 0.28)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, trl_in.grad, rtol=1e-12, atol=1e-15)
    assert stats["clip_fraction/low"].item() == pytest.approx(metrics["clip_ratio/low_mean"], rel=1e-12)
    assert stats["clip_fraction/high"].item() == pytest.approx(metrics["clip_ratio/high_mean"], rel=1e-12)
    assert stats["clip_fraction"].item() == pytest.approx(metrics["clip_ratio/region_mean"], rel=1e-12)
    assert stats["clip_fraction"].item() > 0
