"""Stage 4: every preference objective against a deliberately naive transcription of its paper formula.

Naive versions work on Python floats (float64) with `math`, pair by pair, and never call dpokit. On top
of the exactness checks: extreme margins (finite loss and gradient in fp32), policy == reference (closed
forms by hand), small β, the direction of one gradient-descent step, the LD-DPO / WPO modifiers of
`pair_logps` against a per-token loop on a tiny Llama, and config validation of the objective options.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import pytest
import torch

from conftest import make_tiny_model
from dpokit.batches import collate, tokenize_pair
from dpokit.config import ConfigError, TrainConfig
from dpokit.data.formats import Pair
from dpokit.logprobs import PairLogps, pair_logps
from dpokit.objectives import OBJECTIVES, combined_loss

LN2 = math.log(2.0)
PAIRED = [n for n, o in OBJECTIVES.items() if o.data == "paired"]
UNPAIRED = [n for n, o in OBJECTIVES.items() if o.data == "unpaired"]  # online ones: test_grpo.py
WITH_REFERENCE = [n for n in PAIRED if OBJECTIVES[n].reference]
# f-divergence scores are defined up to log Z(x), which cancels only in chosen − rejected differences:
# dpokit (like TRL) refuses f_divergence for objectives that use single scores or raw log-odds.
NO_F_DIVERGENCE = {"aot", "aot_unpaired", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "dpop"}
WITH_F_DIVERGENCE = [n for n in WITH_REFERENCE if n not in NO_F_DIVERGENCE]
REFERENCE_FREE = [n for n in PAIRED if not OBJECTIVES[n].reference]


# ---- scalar math, written out ------------------------------------------------------------------------

def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def f_prime(delta: float, cfg) -> float:
    """Wang et al. 2023 ("Beyond reverse KL"), Table 1: f'(u) at u = π/π_ref = e^Δ, shifted so f'(1) = 0
    (a constant cancels in every margin β(c − r); the shift is dpokit's convention for c, r used alone)."""
    u = math.exp(delta)
    if cfg.f_divergence == "reverse_kl":     # f(u) = u log u,  f'(u) = log u + 1
        return delta
    if cfg.f_divergence == "forward_kl":     # f(u) = −log u,   f'(u) = −1/u
        return 1.0 - 1.0 / u
    if cfg.f_divergence == "js":             # f'(u) = log(2u / (1 + u))
        return math.log(2.0 * u / (1.0 + u))
    if cfg.f_divergence == "alpha":          # Wang: f'(u) = (1 − u^(−α)) / α, reverse KL as α → 0.
        a = 1.0 - cfg.f_alpha                # dpokit's f_alpha is 1 − Wang's α (reverse KL as f_alpha → 1)
        return (1.0 - u ** (-a)) / a
    raise AssertionError(cfg.f_divergence)


def dpo_logistic(x: float, eps: float) -> float:
    """−(1 − ε) log σ(x) − ε log σ(−x): DPO / cDPO on a logit x."""
    return -(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)


@dataclass
class Batch:
    """B pairs as Python floats: policy/reference summed log-probs and completion lengths."""
    pc: list
    pr: list
    rc: list
    rr: list
    nc: list
    nr: list

    @property
    def n(self) -> int:
        return len(self.pc)

    def nll(self) -> float:  # token mean over every chosen token of the batch
        return -sum(self.pc) / max(sum(self.nc), 1)


def per_pair(fn):
    """A batch-level naive loss from fn(c, r, cfg, |y_w|, |y_l|) on the f-divergence scores of each pair."""
    def naive(b: Batch, cfg) -> list:
        return [fn(f_prime(b.pc[i] - b.rc[i], cfg), f_prime(b.pr[i] - b.rr[i], cfg), cfg, b.nc[i], b.nr[i])
                for i in range(b.n)]
    return naive


# ---- the naive objectives (paper formulas) ---------------------------------------------------------------

def _ipo(c, r, cfg, nc, nr):  # Azar 2023 Eq. 17, τ = β; TRL length-normalises the log-ratios ("token")
    h = c / nc - r / nr if cfg.ipo_normalize == "token" else c - r
    return (h - 1.0 / (2.0 * cfg.beta)) ** 2


def _exo(c, r, cfg, nc, nr):  # Ji 2024 Eq. 16, K = 2: KL(p_θ ‖ p_label), p_θ = σ(±βh), p_label = (1−ε, ε)
    x, eps = cfg.beta * (c - r), cfg.label_smoothing
    return (sigmoid(x) * (log_sigmoid(x) - math.log(1 - eps))
            + sigmoid(-x) * (log_sigmoid(-x) - math.log(eps)))


def _discopop(c, r, cfg, nc, nr):  # Lu 2024 Eq. 5
    rho = cfg.beta * (c - r)
    m = sigmoid(rho / cfg.discopop_tau)
    # m · e^{−ρ} = exp(log σ(ρ/τ) − ρ): the same product, without forming e^{−ρ} alone (it overflows first)
    return (1 - m) * -log_sigmoid(rho) + math.exp(log_sigmoid(rho / cfg.discopop_tau) - rho)


def _aot(b: Batch, cfg) -> list:
    """Melnyk 2024, paired: sorted policy log-odds minus sorted reference log-odds. The loss of rank k is
    not the loss of pair k: both sides sort the batch, so the per-"pair" outputs are in rank order. AOT
    works on raw log-probs: dpokit's aot ignores f_divergence (see report)."""
    pol = sorted(b.pc[i] - b.pr[i] for i in range(b.n))
    ref = sorted(b.rc[i] - b.rr[i] for i in range(b.n))
    return [dpo_logistic(cfg.beta * (p - q), cfg.label_smoothing) for p, q in zip(pol, ref)]


def _aot_unpaired(b: Batch, cfg) -> list:
    """Melnyk 2024, unpaired: sort the chosen and the rejected scores separately (rank order again)."""
    c = sorted(f_prime(b.pc[i] - b.rc[i], cfg) for i in range(b.n))
    r = sorted(f_prime(b.pr[i] - b.rr[i], cfg) for i in range(b.n))
    return [dpo_logistic(cfg.beta * (x - y), cfg.label_smoothing) for x, y in zip(c, r)]


def _orpo_log_odds(avg: float) -> float:  # log[P / (1 − P)], P = exp(average log-prob)
    return avg - math.log(-math.expm1(avg))


NAIVE = {
    "sigmoid": per_pair(lambda c, r, o, *_: dpo_logistic(o.beta * (c - r), o.label_smoothing)),
    "robust": per_pair(lambda c, r, o, *_: (-(1 - o.label_smoothing) * log_sigmoid(o.beta * (c - r))
                                            + o.label_smoothing * log_sigmoid(-o.beta * (c - r)))
                       / (1 - 2 * o.label_smoothing)),
    "ipo": per_pair(_ipo),
    "hinge": per_pair(lambda c, r, o, *_: max(0.0, 1.0 - o.beta * (c - r))),
    "exo_pair": per_pair(_exo),
    "nca_pair": per_pair(lambda c, r, o, *_: -log_sigmoid(o.beta * c) - 0.5 * log_sigmoid(-o.beta * c)
                         - 0.5 * log_sigmoid(-o.beta * r)),
    "bco_pair": per_pair(lambda c, r, o, *_: -log_sigmoid(o.beta * c) - log_sigmoid(-o.beta * r)),
    "sppo_hard": per_pair(lambda c, r, o, *_: (c - 1 / (2 * o.beta)) ** 2 + (r + 1 / (2 * o.beta)) ** 2),
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": per_pair(lambda c, r, o, *_: 1 - sigmoid(o.beta * c) + sigmoid(o.beta * r)),
    "apo_down": per_pair(lambda c, r, o, *_: sigmoid(o.beta * c) + 1 - sigmoid(o.beta * (c - r))),
    "discopop": per_pair(_discopop),
    "dpop": lambda b, o: [  # Pal 2024 Eq. 3: the penalty is on the raw chosen log-ratio, also under f-divergences
        -log_sigmoid(o.beta * (f_prime(b.pc[i] - b.rc[i], o) - f_prime(b.pr[i] - b.rr[i], o)
                               - o.dpop_lambda * max(0.0, -(b.pc[i] - b.rc[i])))) for i in range(b.n)],
    "sigmoid_norm": per_pair(lambda c, r, o, nc, nr: -log_sigmoid(o.beta * (c / nc - r / nr))),
    "sft": lambda b, o: [b.nll()] * b.n,
    "cpo": lambda b, o: [dpo_logistic(o.beta * (b.pc[i] - b.pr[i]), o.label_smoothing) + o.cpo_alpha * b.nll()
                         for i in range(b.n)],
    "simpo": lambda b, o: [dpo_logistic(o.beta * (b.pc[i] / b.nc[i] - b.pr[i] / b.nr[i]) - o.simpo_gamma,
                                        o.label_smoothing) for i in range(b.n)],
    "orpo": lambda b, o: [-o.orpo_lambda * log_sigmoid(_orpo_log_odds(b.pc[i] / b.nc[i])
                                                       - _orpo_log_odds(b.pr[i] / b.nr[i])) + b.nll()
                          for i in range(b.n)],
}


def naive_kto(r: list, desirable: list, z_ref: float, beta: float, w_d: float, w_u: float) -> list:
    """KTO (Ethayarajh 2024, Eq. 8): λ_y − v(x, y), v = λ_D σ(β(r − z₀)) or λ_U σ(β(z₀ − r))."""
    return [w_d * (1 - sigmoid(beta * (x - z_ref))) if d else w_u * (1 - sigmoid(beta * (z_ref - x)))
            for x, d in zip(r, desirable)]


NAIVE_UNPAIRED = {"kto": naive_kto}

# Values of each objective option to sweep (a new option without values here fails the exactness test).
OPTION_VALUES = {
    "label_smoothing": (0.0, 0.1, 0.3),
    "ipo_normalize": ("token", "sum"),
    "cpo_alpha": (1.0, 0.3),
    "simpo_gamma": (0.5, 1.6),
    "orpo_lambda": (0.1, 1.0),
    "dpop_lambda": (50.0, 2.0),
    "discopop_tau": (0.05, 0.5),
}
BETAS = (0.01, 0.1, 1.0)
F_DIVERGENCES = ({"f_divergence": "forward_kl"}, {"f_divergence": "js"},
                 {"f_divergence": "alpha", "f_alpha": 0.5}, {"f_divergence": "alpha", "f_alpha": 0.3})


# ---- building inputs and calling dpokit -------------------------------------------------------------------

def config(name: str, **options) -> TrainConfig:
    return TrainConfig.from_dict({"loss": name, **options})


def option_sweep(name: str) -> list[dict]:
    """Every combination of β and of the values of the options the objective reads."""
    axes = [[("beta", b) for b in BETAS]]
    for key in OBJECTIVES[name].options:
        values = OPTION_VALUES[key]
        if name == "exo_pair" and key == "label_smoothing":
            values = (0.01, 0.1, 0.3)  # EXO needs ε > 0 (log ε is in the loss)
        axes.append([(key, v) for v in values])
    return [dict(combo) for combo in itertools.product(*axes)]


def random_batch(seed: int, spread: float, n: int = 12) -> Batch:
    """Realistic summed log-probs (policy < 0, per-token average in [−3, −0.05]) and log-ratios in ±spread."""
    g = random.Random(seed)
    nc = [g.randint(1, 80) for _ in range(n)]
    nr = [g.randint(1, 80) for _ in range(n)]
    pc = [-g.uniform(0.05, 3.0) * k for k in nc]
    pr = [-g.uniform(0.05, 3.0) * k for k in nr]
    rc = [p - g.uniform(-spread, spread) for p in pc]
    rr = [p - g.uniform(-spread, spread) for p in pr]
    return Batch(pc, pr, rc, rr, nc, nr)


def to_logps(b: Batch, dtype=torch.float64, requires_grad=False) -> tuple[PairLogps, PairLogps]:
    """dpokit inputs: summed log-probs in `dtype`, token counts in float32 as `TokenLogps.counts` makes them."""
    nc, nr = torch.tensor(b.nc, dtype=torch.float32), torch.tensor(b.nr, dtype=torch.float32)
    pc = torch.tensor(b.pc, dtype=dtype, requires_grad=requires_grad)
    pr = torch.tensor(b.pr, dtype=dtype, requires_grad=requires_grad)
    policy = PairLogps(pc, pr, nc, nr)
    ref = PairLogps(torch.tensor(b.rc, dtype=dtype), torch.tensor(b.rr, dtype=dtype), nc, nr)
    return policy, ref


def dpokit_losses(name: str, cfg: TrainConfig, policy: PairLogps, ref: PairLogps) -> torch.Tensor:
    """Per-pair losses [B] of one objective, through `combined_loss` (weight 1, no WPO): exactly the
    objective's `compute` on the f-divergence scores the registry builds."""
    losses, _ = combined_loss([name], [1.0], policy, ref if OBJECTIVES[name].reference else None, cfg)
    return losses


def mismatches(actual: torch.Tensor, expected: list, context: str, rtol=1e-9, atol=1e-12) -> list[str]:
    out = []
    for i, (a, e) in enumerate(zip(actual.tolist(), expected)):
        if not math.isclose(a, e, rel_tol=rtol, abs_tol=atol):
            out.append(f"{context} pair {i}: dpokit {a!r} vs naive {e!r}")
    if len(actual) != len(expected):
        out.append(f"{context}: {len(actual)} losses vs {len(expected)}")
    return out


# ---- 1. exactness against the paper formulas -------------------------------------------------------------

def test_every_registered_objective_has_a_naive_reference():
    assert set(NAIVE) == set(PAIRED)
    assert set(NAIVE_UNPAIRED) == set(UNPAIRED)
    assert set(CLOSED_FORM_AT_IDENTITY) == set(WITH_REFERENCE)


@pytest.mark.parametrize("name", PAIRED)
def test_matches_naive_formula(name):
    bad = []
    for options in option_sweep(name):
        cfg = config(name, **options)
        for seed, spread in ((0, 0.5), (1, 5.0), (2, 30.0)):
            b = random_batch(seed, spread)
            if not OBJECTIVES[name].reference:
                b.rc = b.rr = [0.0] * b.n  # unused: no reference is loaded for these
            bad += mismatches(dpokit_losses(name, cfg, *to_logps(b)), NAIVE[name](b, cfg), f"{options} seed {seed}")
    assert not bad, f"{len(bad)} mismatches, first ones:\n" + "\n".join(bad[:10])


@pytest.mark.parametrize("name", WITH_F_DIVERGENCE)
def test_matches_naive_formula_under_f_divergence(name):
    """The registry hands every reference objective f'(π/π_ref) scores instead of the log-ratios
    (aot sorts raw log-odds and refuses f_divergence)."""
    bad = []
    for options, fdiv in itertools.product(option_sweep(name), F_DIVERGENCES):
        cfg = config(name, **options, **fdiv)
        for seed, spread in ((3, 0.5), (4, 5.0), (5, 30.0)):
            b = random_batch(seed, spread)
            bad += mismatches(dpokit_losses(name, cfg, *to_logps(b)), NAIVE[name](b, cfg),
                              f"{options} {fdiv} seed {seed}")
    assert not bad, f"{len(bad)} mismatches, first ones:\n" + "\n".join(bad[:10])


def test_weighted_combination_with_wpo_weights():
    """combined_loss = Σ_i w_i · loss_i, each re-weighted by WPO's exp(chosen_wpo + rejected_wpo) (Zhou 2024)."""
    cfg = config("sigmoid,ipo,sft", loss_weights="0.3,2,0.5", use_weighting=True, beta=0.2)
    b = random_batch(7, 5.0)
    policy, ref = to_logps(b)
    g = random.Random(8)
    cw, rw = [-g.uniform(0.1, 2.0) for _ in range(b.n)], [-g.uniform(0.1, 2.0) for _ in range(b.n)]
    policy.chosen_wpo = torch.tensor(cw, dtype=torch.float64)
    policy.rejected_wpo = torch.tensor(rw, dtype=torch.float64)
    total, metrics = combined_loss(cfg.loss_names, cfg.loss_weight_values, policy, ref, cfg)
    parts = [NAIVE[n](b, cfg) for n in ("sigmoid", "ipo", "sft")]
    expected = [math.exp(cw[i] + rw[i]) * (0.3 * parts[0][i] + 2 * parts[1][i] + 0.5 * parts[2][i])
                for i in range(b.n)]
    assert not mismatches(total, expected, "weighted")
    assert math.isclose(metrics["wpo/weight"].item(), sum(math.exp(x + y) for x, y in zip(cw, rw)) / b.n,
                        rel_tol=1e-12)


def test_kto_matches_naive_formula():
    from dpokit.objectives.kto import kto_loss, kto_reference_point
    g = random.Random(9)
    n = 16
    pol = [-g.uniform(5, 100) for _ in range(n)]
    ref = [p - g.uniform(-10, 10) for p in pol]
    kl_pol = [-g.uniform(5, 100) for _ in range(n)]
    kl_ref = [p - g.uniform(-3, 5) for p in kl_pol]
    labels = [g.random() < 0.5 for _ in range(n)]
    z = kto_reference_point(torch.tensor(kl_pol, dtype=torch.float64), torch.tensor(kl_ref, dtype=torch.float64))
    z_naive = max(0.0, sum(p - q for p, q in zip(kl_pol, kl_ref)) / n)  # z₀ = max(0, mean KL estimate)
    assert math.isclose(z.item(), z_naive, rel_tol=1e-12, abs_tol=1e-15)
    kl = torch.tensor(kl_pol, dtype=torch.float64)
    below = kto_reference_point(kl, kl + 1)
    assert below.item() == 0.0  # a negative KL estimate is clamped to 0
    for beta, w_d, w_u in ((0.1, 1.0, 1.0), (0.5, 1.0, 1.33), (0.01, 0.7, 1.0)):
        got = kto_loss(torch.tensor(pol, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                       torch.tensor(labels), z, beta, w_d, w_u)
        expected = naive_kto([p - q for p, q in zip(pol, ref)], labels, z_naive, beta, w_d, w_u)
        assert not mismatches(got, expected, f"kto beta {beta}")


# ---- 2. extreme margins: |β h| = 1e4 -------------------------------------------------------------------

# ipo and sppo_hard are quadratic in the log-ratios, yet at |β h| = 1e4 (h ≤ 1e6 for β ≥ 0.01) the square
# is ≤ 1e12, well inside fp32, so they too must stay finite. discopop's exp(−ρ) overflows for ρ < −88 in
# fp32, but the paper's formula multiplies it by σ(ρ/τ) ≈ e^{ρ/τ}: the product is e^{ρ(1/τ − 1)} → 0 for
# τ < 1, so the loss tends to −log σ(ρ) ≈ |ρ| and is finite; NaN there is a bug, not the formula.

def _extreme_case(name: str, beta: float, sign: float, fdiv: dict | None = None):
    """fp32 leaf policy log-probs and fixed reference log-probs with margin β h = sign · 1e4.

    With a reference: three pairs splitting h as (Δc, Δr) = (h, 0), (0, −h), (h/2, −h/2); policy log-probs
    stay ≤ 0. Reference-free: chosen − rejected = h. One token per completion, so averages equal sums."""
    h = sign * 1e4 / beta
    if OBJECTIVES[name].reference:
        deltas = [(h, 0.0), (0.0, -h), (h / 2, -h / 2)]
        rc = [-10.0 - max(dc, 0.0) for dc, _ in deltas]
        rr = [-10.0 - max(dr, 0.0) for _, dr in deltas]
        pc = [r + dc for r, (dc, _) in zip(rc, deltas)]
        pr = [r + dr for r, (_, dr) in zip(rr, deltas)]
    else:
        pc, pr = ([-10.0], [-10.0 - h]) if h > 0 else ([-10.0 + h], [-10.0])
        rc, rr = [0.0] * len(pc), [0.0] * len(pc)
    b = Batch(pc, pr, rc, rr, [1] * len(pc), [1] * len(pc))
    return to_logps(b, torch.float32, requires_grad=True)


def grad_or_zero(t: torch.Tensor) -> torch.Tensor:
    """An input the loss does not read (rejected, for sft) gets no .grad: its gradient is 0."""
    return t.grad if t.grad is not None else torch.zeros_like(t)


def _loss_and_grads(name, cfg, policy, ref):
    losses = dpokit_losses(name, cfg, policy, ref)
    losses.mean().backward()
    return losses.detach(), grad_or_zero(policy.chosen), grad_or_zero(policy.rejected)


def _extreme_options(name: str) -> list[dict]:
    opts = {"exo_pair": [{"label_smoothing": 0.1}]}
    if name in opts:
        return opts[name]
    if "label_smoothing" in OBJECTIVES[name].options:
        return [{}, {"label_smoothing": 0.1}]
    return [{}]


@pytest.mark.parametrize("name", PAIRED)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["right", "wrong"])
def test_extreme_margin_gives_finite_loss_and_gradient(name, sign):
    for beta, options in itertools.product((0.01, 0.1, 1.0), _extreme_options(name)):
        policy, ref = _extreme_case(name, beta, sign)
        losses, gc, gr = _loss_and_grads(name, config(name, beta=beta, **options), policy, ref)
        where = f"{name} beta={beta} {options} beta*h={sign * 1e4:g}: losses {losses.tolist()}"
        assert torch.isfinite(losses).all(), where
        assert torch.isfinite(gc).all() and torch.isfinite(gr).all(), \
            f"{where}, grads {gc.tolist()} {gr.tolist()}"


# Under f-divergences the scores of huge log-ratios are: js ≈ Δ + log 2 below, → log 2 above (finite);
# alpha: exponent clamped at 80, so |score| ≤ 2e^80 ≈ 1.1e35 (finite); forward_kl: 1 − e^{−Δ} is
# genuinely e^{|Δ|} for Δ ≪ 0 (e^{1e4} exists in no float format), so for it the log-ratios are kept ≥ −60.
# The quadratic objectives (ipo, sppo_hard) square scores of 1e26..1e35: the true loss is > 3.4e38 and +inf
# in fp32 is the honest answer; for them only "no NaN" is asserted.
QUADRATIC = {"ipo", "sppo_hard"}


@pytest.mark.parametrize("name", WITH_F_DIVERGENCE)
@pytest.mark.parametrize("fdiv", ["js", "alpha", "forward_kl"])
def test_extreme_log_ratios_under_f_divergence(name, fdiv):
    options = {"f_divergence": fdiv, **({"label_smoothing": 0.1} if name == "exo_pair" else {})}
    beta = 0.1
    for sign in (1.0, -1.0):
        policy, ref = _extreme_case(name, beta, sign)
        if fdiv == "forward_kl":
            with torch.no_grad():  # keep Δ ≥ −60 (see above): policy = max(policy, ref − 60)
                policy.chosen.copy_(torch.maximum(policy.chosen, ref.chosen - 60))
                policy.rejected.copy_(torch.maximum(policy.rejected, ref.rejected - 60))
        losses, gc, gr = _loss_and_grads(name, config(name, beta=beta, **options), policy, ref)
        where = f"{name} {fdiv} sign {sign}: losses {losses.tolist()}, grads {gc.tolist()} {gr.tolist()}"
        if name in QUADRATIC and fdiv != "js":
            assert not torch.isnan(losses).any() and not torch.isnan(gc).any() and not torch.isnan(gr).any(), where
        else:
            assert torch.isfinite(losses).all() and torch.isfinite(gc).all() and torch.isfinite(gr).all(), where


@pytest.mark.parametrize("avg", [-1e-9, -1e-7, -1e-4])
def test_orpo_is_finite_for_a_near_certain_chosen_completion(avg):
    """ORPO's log-odds log(P/(1 − P)) at P = exp(ā) ≈ 1 is large but finite for ā < 0, and so is its gradient:
    d/dā_w [−λ log σ(z)] = −λ σ(−z) / (1 − e^{ā_w}) → a finite limit. In fp32, e^{−1e-9} rounds to 1."""
    policy = PairLogps(torch.tensor([avg], requires_grad=True), torch.tensor([-2.0], requires_grad=True),
                       torch.ones(1), torch.ones(1))
    losses, gc, gr = _loss_and_grads("orpo", config("orpo"), policy, None)
    z = _orpo_log_odds(avg) - _orpo_log_odds(-2.0)
    expected_gc = -0.1 * sigmoid(-z) / -math.expm1(avg) - 1.0  # odds-ratio term + NLL term (one token)
    assert torch.isfinite(losses).all() and torch.isfinite(gc).all() and torch.isfinite(gr).all(), \
        f"orpo at chosen average log-prob {avg}: loss {losses.tolist()}, grads {gc.tolist()} {gr.tolist()}"
    assert math.isclose(gc.item(), expected_gc, rel_tol=1e-3)


# ---- 3. policy == reference: closed forms by hand -----------------------------------------------------

def _exo_identity(cfg):  # p_θ = (½, ½): KL((½, ½) ‖ (1 − ε, ε))
    eps = cfg.label_smoothing
    return 0.5 * (math.log(0.5) - math.log(1 - eps)) + 0.5 * (math.log(0.5) - math.log(eps))


CLOSED_FORM_AT_IDENTITY = {
    "sigmoid": lambda o: LN2,                        # −(1−ε) log ½ − ε log ½
    "robust": lambda o: LN2,                         # [(1−ε) − ε] ln 2 / (1 − 2ε)
    "ipo": lambda o: (1 / (2 * o.beta)) ** 2,        # (0 − 1/(2β))²
    "hinge": lambda o: 1.0,                          # max(0, 1 − 0)
    "exo_pair": _exo_identity,
    "nca_pair": lambda o: 2 * LN2,                   # −log ½ − ½ log ½ − ½ log ½
    "bco_pair": lambda o: 2 * LN2,                   # −log ½ − log ½
    "sppo_hard": lambda o: 2 * (1 / (2 * o.beta)) ** 2,
    "aot": lambda o: LN2,                            # sort(x) − sort(x) = 0
    "aot_unpaired": lambda o: LN2,
    "apo_zero": lambda o: 1.0,                       # 1 − ½ + ½
    "apo_down": lambda o: 1.0,                       # ½ + 1 − ½
    "discopop": lambda o: 0.5 * LN2 + 0.5,           # m = σ(0) = ½: ½ ln 2 + ½ e⁰
    "dpop": lambda o: LN2,                           # no penalty at Δc = 0
    "sigmoid_norm": lambda o: LN2,
}


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_identical_policy_and_reference_gives_the_closed_form(name):
    b = random_batch(10, 0.0)
    b.rc, b.rr = list(b.pc), list(b.pr)
    policy, ref = to_logps(b)
    extra = ({"label_smoothing": 0.1},) if "label_smoothing" in OBJECTIVES[name].options else ({},)
    if name == "exo_pair":
        extra = ({"label_smoothing": 0.01}, {"label_smoothing": 0.3})
    # every f-divergence score is 0 at π = π_ref, so the closed form holds for all of them
    fdivs = ({},) + (F_DIVERGENCES if name in WITH_F_DIVERGENCE else ())
    for beta, options, fdiv in itertools.product((0.1, 0.7), extra, fdivs):
        cfg = config(name, beta=beta, **options, **fdiv)
        expected = CLOSED_FORM_AT_IDENTITY[name](cfg)
        got = dpokit_losses(name, cfg, policy, ref)
        assert not mismatches(got, [expected] * b.n, f"{name} beta={beta} {options} {fdiv}", rtol=1e-12)


# ---- 4. small β -------------------------------------------------------------------------------------------

def test_sigmoid_small_beta_is_ln2_minus_half_beta_h():
    """−log σ(x) = ln 2 − x/2 + x²/8 + O(x⁴): at β = 1e-6 the loss is ln 2 − βh/2 within (βh)²/8."""
    beta = 1e-6
    b = random_batch(11, 60.0)
    losses = dpokit_losses("sigmoid", config("sigmoid", beta=beta), *to_logps(b))
    for i, loss in enumerate(losses.tolist()):
        x = beta * ((b.pc[i] - b.rc[i]) - (b.pr[i] - b.rr[i]))
        assert abs(loss - (LN2 - x / 2)) <= 1.01 * x * x / 8 + 1e-15, (i, x, loss)
        assert abs(loss - (LN2 - x / 2)) < 1e-9


# ---- 5. direction of one gradient-descent step ---------------------------------------------------------

# (Δc, Δr) starting points at β = 0.1, |βΔ| ≤ 0.5. There, by the formulas, every reference objective has
# ∂L/∂(log π(y_w)) < ∂L/∂(log π(y_l)) per pair, so a plain GD step widens log π(y_w) − log π(y_l):
#   sigmoid/cDPO: pushes up while βh < log((1−ε)/ε) (cDPO has a finite target), here βh ≤ 0.2;
#   ipo: pulls h toward 1/(2β) = 5, so only for h < 5 (here h ≤ 2 summed and per token);
#   hinge: zero gradient once βh ≥ 1; exo_pair: only while σ(βh) < 1 − ε;
#   nca_pair: the −½ log σ(−βc) term lowers chosen once βc > ln 2 (here βc ≤ 0.4);
#   sppo_hard: pulls c toward +1/(2β) and r toward −1/(2β): needs c − r < 1/β;
#   apo_down: lowers both likelihoods by design; the margin still grows when σ'(βc) < 2σ'(βh), true here;
#   bco_pair, robust, aot, aot_unpaired, apo_zero, dpop, sigmoid_norm: always.
DEFAULT_POINTS = [(0.0, 0.0), (1.0, -1.0), (-2.0, 3.0), (4.0, 2.0), (-3.0, -5.0)]
# DiscoPOP (τ = 0.05) is non-convex: ∂L/∂ρ > 0 for ρ = βh ∈ (−0.118, 0.072), around ρ = 0 itself (the
# formula's local minimum is at ρ ≈ −0.118), so there GD lowers the margin; take points outside that band.
POINTS = {"discopop": [(5.0, 0.0), (-5.0, 0.0), (10.0, -10.0), (-10.0, 10.0), (2.0, 0.0)]}
# Reference-free: (log π(y_w), log π(y_l), |y_w|, |y_l|); cpo, simpo (ε = 0), orpo and sft always widen it.
REFERENCE_FREE_POINTS = [(-10.0, -12.0, 5, 6), (-30.0, -5.0, 20, 4), (-2.0, -40.0, 3, 30), (-8.0, -8.0, 8, 8)]
DIRECTION_OPTIONS = {"exo_pair": {"label_smoothing": 0.1}}


@pytest.mark.parametrize("name", PAIRED)
def test_gradient_step_widens_the_chosen_rejected_gap(name):
    if OBJECTIVES[name].reference:
        points = POINTS.get(name, DEFAULT_POINTS)
        g = random.Random(12)
        nc, nr = [g.randint(1, 40) for _ in points], [g.randint(1, 40) for _ in points]
        pc, pr = [-1.5 * k for k in nc], [-1.5 * k for k in nr]
        b = Batch(pc, pr, [p - dc for p, (dc, _) in zip(pc, points)], [p - dr for p, (_, dr) in zip(pr, points)],
                  nc, nr)
    else:
        pc, pr, nc, nr = (list(t) for t in zip(*REFERENCE_FREE_POINTS))
        b = Batch(pc, pr, [0.0] * len(pc), [0.0] * len(pc), nc, nr)
    variants = [DIRECTION_OPTIONS.get(name, {})]
    if name == "sigmoid":
        variants.append({"label_smoothing": 0.1})
    for options in variants:
        policy, ref = to_logps(b, requires_grad=True)
        dpokit_losses(name, config(name, beta=0.1, **options), policy, ref).mean().backward()
        lr = 1e-2
        before = [c - r for c, r in zip(b.pc, b.pr)]
        with torch.no_grad():
            after = ((policy.chosen - lr * grad_or_zero(policy.chosen))
                     - (policy.rejected - lr * grad_or_zero(policy.rejected))).tolist()
        assert all(a > x for a, x in zip(after, before)), (name, options, list(zip(before, after)))


# ---- 6. pair_logps modifiers (LD-DPO, WPO) against a per-token loop ---------------------------------------

@pytest.fixture
def tiny_batch(tokenizer, explicit_rows):
    pairs = [tokenize_pair(Pair(r["prompt"], r["chosen"], r["rejected"], f"x:{i}"), tokenizer, 512, None)
             for i, r in enumerate(explicit_rows)]
    model = make_tiny_model(len(tokenizer)).double()  # fp64: the two paths differ only by summation order
    return model, pairs, collate(pairs, tokenizer.pad_token_id)


def _per_token_logps(model, prompt_ids, completion_ids):
    """[(log p(y_t), log Σ_v p(v)²)] for each completion token, from the full logits of the unpadded sequence."""
    x = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), dim=-1)
    out = []
    for t, token in enumerate(completion_ids):
        row = logp[len(prompt_ids) - 1 + t]  # position i predicts token i + 1
        out.append((row[token].item(), math.log((row.exp() ** 2).sum().item())))  # log Σ_v p(v)²
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ld_alpha_weights_tokens_beyond_the_shorter_completion(tiny_batch, alpha):
    """LD-DPO (Liu 2024): weight 1 on the first min(|y_w|, |y_l|) tokens of each completion, α after."""
    model, pairs, batch = tiny_batch
    assert any(len(p.chosen_ids) != len(p.rejected_ids) for p in pairs)  # otherwise α would not matter
    with torch.no_grad():
        got = pair_logps(model, batch, ld_alpha=alpha)
    for i, p in enumerate(pairs):
        shared = min(len(p.chosen_ids), len(p.rejected_ids))
        for ids, value, count in ((p.chosen_ids, got.chosen[i], got.chosen_tokens[i]),
                                  (p.rejected_ids, got.rejected[i], got.rejected_tokens[i])):
            tokens = _per_token_logps(model, p.prompt_ids, ids)
            expected = sum(lp * (1.0 if t < shared else alpha) for t, (lp, _) in enumerate(tokens))
            assert count.item() == len(ids)
            assert math.isclose(value.item(), expected, rel_tol=1e-9, abs_tol=1e-9), (i, alpha, value.item(), expected)


def test_with_wpo_is_the_mean_aligned_log_prob(tiny_batch):
    """WPO (Zhou 2024, Eq. 2): mean over completion tokens of log p(y_t) − log Σ_v p(v)²; sums unchanged."""
    model, pairs, batch = tiny_batch
    with torch.no_grad():
        got = pair_logps(model, batch, with_wpo=True)
        plain = pair_logps(model, batch)
    torch.testing.assert_close(got.chosen, plain.chosen, rtol=0, atol=0)
    torch.testing.assert_close(got.rejected, plain.rejected, rtol=0, atol=0)
    for i, p in enumerate(pairs):
        for ids, value in ((p.chosen_ids, got.chosen_wpo[i]), (p.rejected_ids, got.rejected_wpo[i])):
            tokens = _per_token_logps(model, p.prompt_ids, ids)
            expected = sum(lp - lsq for lp, lsq in tokens) / len(tokens)
            assert math.isclose(value.item(), expected, rel_tol=1e-9, abs_tol=1e-9), (i, value.item(), expected)
    assert got.chosen_wpo.requires_grad is False


# ---- 7. config validation of objective options ---------------------------------------------------------

REFUSED = [
    ({"loss": "ipo", "label_smoothing": 0.1}, r"\blabel_smoothing\b"),
    ({"loss": "hinge", "label_smoothing": 0.1}, r"\blabel_smoothing\b"),
    ({"loss": "exo_pair"}, r"\blabel_smoothing\b"),
    ({"loss": "exo_pair", "label_smoothing": 0.0}, r"\blabel_smoothing\b"),
    *[({"loss": lf, key: value}, rf"\b{key}\b") for lf in ("cpo", "simpo", "orpo", "sft")
      for key, value in (("f_divergence", "js"), ("ld_alpha", 0.5), ("sync_ref_every", 10), ("ref_model", "x"))],
    *[({"loss": name, "f_divergence": "js"}, r"\bf_divergence\b") for name in sorted(NO_F_DIVERGENCE)],
    ({"loss": "kto", "use_weighting": True}, r"\buse_weighting\b"),
    ({"loss": "kto,sft"}, r"^loss = "),
    ({"loss": "kto", "batch_size": 1}, r"\bbatch_size\b"),
    ({"loss": "sigmoid,ipo", "loss_weights": "1"}, r"\bloss_weights\b"),
    ({"loss": "sigmoid", "loss_weights": [1.0, 2.0]}, r"\bloss_weights\b"),
    ({"loss": "nope"}, r"^loss = "),
    ({"loss": "sigmoid,nope"}, r"^loss = "),
    ({"loss": "sigmoid,sigmoid"}, r"^loss = "),
    ({"loss": "sigmoid, ipo ,sigmoid"}, r"^loss = "),
    ({"loss": "sigmoid", "simpo_gamma": 1.0}, r"\bsimpo_gamma\b"),
]


@pytest.mark.parametrize("values,key", REFUSED, ids=[str(v) for v, _ in REFUSED])
def test_bad_objective_options_are_refused_naming_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_dict(values)


@pytest.mark.parametrize("values", [
    {"loss": "exo_pair", "label_smoothing": 0.01}, {"loss": "simpo", "simpo_gamma": 1.0},
    {"loss": "cpo", "label_smoothing": 0.1}, {"loss": "sigmoid,sft", "f_divergence": "js", "ld_alpha": 0.5},
    {"loss": "ipo", "ipo_normalize": "sum"}, {"loss": "sigmoid,ipo", "loss_weights": "1,0.5", "label_smoothing": 0.1},
], ids=str)
def test_good_objective_options_are_accepted(values):
    TrainConfig.from_dict(values)
