"""The demo's budget planner: measure the machine for about two seconds, then size the run to `--minutes`.

Cost model. Every phase is counted in FLOPs of the model (N parameters, embeddings included: the tied
output projection is a real matmul per token) and divided by a measured rate:
  * matmul peak: `dpokit.bench.matmul_peak` (2048³ fp32 `a @ b` on CPU, best of a few);
  * sampling rate: a probe samples SAMPLE_PROBE rows × PROBE_TOKENS tokens from the model itself and
    gives FLOP/s counted as 2N per prompt and generated token. A probe batch of 8 decodes less
    efficiently than the demo's batches of 128, so the estimate errs long (safe for a budget).
  * training: 6N per token (forward + backward of the policy) at TRAIN_EFFICIENCY of the matmul peak.
    dpokit trains at 70 % of the peak on 512-token HH pairs (docs/PERFORMANCE.md, first table); the
    demo's pairs are ~85 tokens, padded per batch (pack_tokens 0), hence 0.5.
  * reference pass: 2N per token for REF_RECOMPUTED of the training pairs only — the others carry the
    sampler's log-probs (146 of 176 demo pairs, docs/PERFORMANCE.md "Reference log-probs from the
    sampler"); held-out pairs are always recomputed, and evaluated before and after training (3 × 2N).
  * tokens: a pair is its prompt once (prefix shared) plus two completions of `max_new_tokens` (124 of
    128 demo samples ran to the limit, same section); a sample is its prompt plus `max_new_tokens`.
  * pairs per prompt with `--pairing all`: s(s−1)/2 × DISTINCT_REWARDS (1,546 of 280 × 6 pairs had
    different rewards, issue 15); held-out pairs are best-vs-worst, one per prompt.
  * OVERHEAD_S: loading the model a few times, the weights digest, report and plots — an estimate, not
    a measurement; the recorded actual phase times (demo.json, eval.json) are there to check all of it.

Sizing. The plan starts from the task's full sizes and applies cuts in a fixed order until the predicted
total fits: training prompts, then samples per prompt (cheap to lose: training steps reuse the pairs),
then training steps, then held-out prompts, then k. The order is fixed and does not depend on the budget,
so a larger budget never gives a smaller plan. Each size has a floor; a plan at every floor that still
does not fit runs anyway, with a warning that the budget is too small.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

TRAIN_EFFICIENCY = 0.5
REF_RECOMPUTED = 0.2
DISTINCT_REWARDS = 0.92
OVERHEAD_S = 25.0
SAMPLE_PROBE, PROBE_TOKENS = 8, 8
FLOORS = dict(train_prompts=64, samples=3, steps=30, eval_prompts=24, k=2)


@dataclass
class Machine:
    """What the planner measured: the matmul peak, the sampler's rate, the model's size and prompt length."""
    matmul_gflops: float
    sample_gflops: float
    params: int
    prompt_tokens: float          # mean over the training prompts
    seconds: float = 0.0          # how long measuring took


@dataclass
class Plan:
    train_prompts: int
    samples: int
    steps: int
    eval_prompts: int
    k: int
    batch_size: int
    max_new_tokens: int
    pairing: str
    minutes: float
    predicted_s: dict = field(default_factory=dict)
    cuts: list = field(default_factory=list)
    warning: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def measure(model, tokenizer, prompts: list, log=print) -> Machine:
    """About two seconds: the fp32 matmul peak (the benchmark's own function) and a sampling probe."""
    from dpokit.bench import matmul_peak
    from dpokit.generation.sample import prompt_token_ids, sample
    start = time.perf_counter()
    peak = matmul_peak(bf16=False, cuda=False, repeats=3)
    probe = prompts[:max(1, SAMPLE_PROBE // 2)]
    sample(model, tokenizer, probe[:1], 1, 1)  # first call: allocator and kernel warm-up, not timed
    s = sample(model, tokenizer, probe, 2, PROBE_TOKENS, seed=0)
    params = sum(p.numel() for p in model.parameters())
    tokens = sum(len(p) for p in s.prompt_ids) + s.new_tokens
    lengths = [len(prompt_token_ids(p, tokenizer)) for p in prompts]
    machine = Machine(peak, 2 * params * tokens / max(s.seconds, 1e-6) / 1e9, params,
                      sum(lengths) / max(1, len(lengths)), time.perf_counter() - start)
    log(f"machine: fp32 matmul {machine.matmul_gflops:.0f} GFLOP/s, sampling {machine.sample_gflops:.1f} GFLOP/s "
        f"({machine.params / 1e6:.1f}M parameters; measured in {machine.seconds:.1f} s)")
    return machine


def pairs_per_prompt(samples: int, pairing: str) -> float:
    return samples * (samples - 1) / 2 * DISTINCT_REWARDS if pairing == "all" else 1.0


def predict(plan: Plan, m: Machine) -> dict:
    """Seconds per phase for `plan` on machine `m` (module docstring)."""
    n, prompt, new = m.params, m.prompt_tokens, plan.max_new_tokens
    sampling, compute = m.sample_gflops * 1e9, m.matmul_gflops * 1e9 * TRAIN_EFFICIENCY
    sample_s = lambda rows: rows * (prompt + new) * 2 * n / sampling  # noqa: E731
    pair_tokens = prompt + 2 * new
    train_pairs = plan.train_prompts * pairs_per_prompt(plan.samples, plan.pairing)
    pairs_s = sample_s((plan.train_prompts + plan.eval_prompts) * plan.samples)
    train_s = (plan.steps * plan.batch_size * pair_tokens * 6 * n
               + train_pairs * REF_RECOMPUTED * pair_tokens * 2 * n
               + plan.eval_prompts * pair_tokens * 3 * 2 * n) / compute
    # policy and reference each sample k per held-out prompt, then score the policy's samples under both
    scored = plan.eval_prompts * plan.k * (prompt + new)
    eval_s = sample_s(2 * plan.eval_prompts * plan.k) + scored * 2 * 2 * n / compute
    times = dict(pairs_s=pairs_s, train_s=train_s, eval_s=eval_s, overhead_s=OVERHEAD_S)
    return {k: round(v, 1) for k, v in times.items()} | {"total_s": round(sum(times.values()), 1)}


def full_steps(train_prompts: int, samples: int, pairing: str, batch_size: int, epochs: int) -> int:
    """Steps of `epochs` passes over the pairs the full task is expected to give."""
    return max(1, math.ceil(train_prompts * pairs_per_prompt(samples, pairing) / batch_size) * epochs)


def _cuts(plan: Plan):
    """The fixed sequence of smaller plans (module docstring: sizing)."""
    order = (("train_prompts", 0.8), ("samples", None), ("steps", 0.85), ("eval_prompts", 0.8), ("k", None))
    for name, factor in order:
        floor = min(FLOORS[name], getattr(plan, name))
        while getattr(plan, name) > floor:
            value = getattr(plan, name)
            smaller = max(floor, int(value * factor) if factor else value - 1)
            plan = replace(plan, **{name: smaller}, cuts=[*plan.cuts, f"{name} {value} → {smaller}"])
            yield plan


def make_plan(minutes: float, machine: Machine, train_prompts: int, samples: int, eval_prompts: int, k: int,
              batch_size: int, epochs: int, max_new_tokens: int, pairing: str) -> Plan:
    """The largest plan in the cut sequence whose predicted total fits `minutes`."""
    steps = full_steps(train_prompts, samples, pairing, batch_size, epochs)
    plan = Plan(train_prompts, samples, steps, eval_prompts, k, batch_size, max_new_tokens, pairing, minutes)
    plan.predicted_s = predict(plan, machine)
    budget = minutes * 60
    for smaller in _cuts(plan):
        if plan.predicted_s["total_s"] <= budget:
            break
        plan = replace(smaller, predicted_s=predict(smaller, machine))
    if plan.predicted_s["total_s"] > budget:
        plan.warning = (f"--minutes {minutes:g} is too small for this machine: even the smallest plan "
                        f"(at every floor) needs about {plan.predicted_s['total_s'] / 60:.1f} min; running it anyway")
    return plan


def describe(plan: Plan) -> str:
    p = plan.predicted_s
    lines = [f"plan for {plan.minutes:g} min: {plan.train_prompts} prompts × {plan.samples} samples → "
             f"~{plan.train_prompts * pairs_per_prompt(plan.samples, plan.pairing):.0f} pairs; {plan.steps} training "
             f"steps of {plan.batch_size} pairs; held-out {plan.eval_prompts} prompts × k={plan.k}",
             f"expected: pairs {p['pairs_s'] / 60:.1f} min, training {p['train_s'] / 60:.1f} min, evaluation "
             f"{p['eval_s'] / 60:.1f} min, loading/report {p['overhead_s'] / 60:.1f} min; total "
             f"{p['total_s'] / 60:.1f} min"]
    if plan.cuts:
        lines.append("cut to fit: " + ", ".join(plan.cuts))
    if plan.warning:
        lines.append("warning: " + plan.warning)
    return "\n".join(lines)
