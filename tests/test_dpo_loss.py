"""Stage 4: the DPO/cDPO loss against a naive float64 computation written from the paper's formula."""

from __future__ import annotations

import math

import torch

from dpokit.objectives import dpo_loss


def naive_dpo(pc, pr, rc, rr, beta, eps):
    h = (pc - rc) - (pr - rr)
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    return -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))


def test_matches_the_formula_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g, dtype=torch.float64) * 20 - 100 for _ in range(4))
    for beta in (0.01, 0.1, 0.5, 2.0):
        for eps in (0.0, 0.1, 0.3):
            losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta, eps)
            expected = [naive_dpo(*(t[i].item() for t in (pc, pr, rc, rr)), beta, eps) for i in range(64)]
            torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(r_c, beta * (pc - rc))
            torch.testing.assert_close(r_r, beta * (pr - rr))


def test_identical_policy_and_reference_gives_ln2():
    x = torch.tensor([-120.0, -3.5, -800.0])
    y = torch.tensor([-90.0, -7.0, -10.0])
    for eps in (0.0, 0.2):
        losses, _, _ = dpo_loss(x, y, x, y, 0.1, eps)
        torch.testing.assert_close(losses, torch.full((3,), math.log(2)))


def test_extreme_margins_give_finite_loss_and_gradient():
    for sign in (1.0, -1.0):
        pc = torch.tensor([sign * 1e4], requires_grad=True)
        zero = torch.zeros(1)
        losses, _, _ = dpo_loss(pc, zero, zero, zero, beta=1.0, label_smoothing=0.1)
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
    # |βh| = 1e4 with the wrong sign: loss ≈ βh (linear), gradient ≈ -β
    pc = torch.tensor([-1e4], requires_grad=True)
    losses, _, _ = dpo_loss(pc, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0)
    losses.sum().backward()
    assert abs(losses.item() - 1e4) < 1e-3 and abs(pc.grad.item() + 1.0) < 1e-6


def test_small_beta_approaches_ln2_minus_half_beta_h():
    h = torch.tensor([3.0, -2.0])
    beta = 1e-6
    losses, _, _ = dpo_loss(h, torch.zeros(2), torch.zeros(2), torch.zeros(2), beta)
    torch.testing.assert_close(losses, math.log(2) - 0.5 * beta * h, rtol=0, atol=1e-9)


def test_gradient_raises_chosen_relative_to_rejected():
    pc = torch.tensor([-10.0], requires_grad=True)
    pr = torch.tensor([-10.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-10.0]), torch.tensor([-10.0]), 0.1)
    losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises log π(y_w), lowers log π(y_l)
