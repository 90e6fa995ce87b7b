"""The demo's budget planner: measure the machine for about two seconds, then size the run to `--minutes`.

Cost model. Every phase is counted in FLOPs of the model (N parameters, embeddings included: the tied
output projection is a real matmul per token) and divided by a measured rate:
  * matmul peak: `dpokit.bench_tools.matmul_peak` (2048³ fp32 `a @ b` on CPU, best of a few);
  * sampling: 2N per prompt and generated token at SAMPLE_EFFICIENCY of the matmul peak, plus a fixed
    cost per decode step of a batch (kernel launches, the sampler's per-row work, and threads that wait
    when other jobs share the cores). SAMPLE_EFFICIENCY 0.6: the sampler's 470 tokens/s at batch 128
    (docs/PERFORMANCE.md, sampling section; ~10-token prompts, 32 new tokens, 263 GFLOP/s peak) is
    2N × 42/32 × 470 = 166 GFLOP/s. The fixed cost is what the probe measures: SAMPLE_PROBE rows × 1
    token, then × (1 + PROBE_STEPS) tokens; the difference is PROBE_STEPS decode steps, less their FLOPs.
    On a loaded 2-core machine that fixed cost dominated (0.5 s a step at batch 8, 2026-12-02).
  * training: 6N per token (forward + backward of the policy) at TRAIN_EFFICIENCY of the matmul peak.
    Issue 15's run on the AVX2 EPYC (45 GFLOP/s peak) trained the demo at 34 s a step of 16 pairs of
    ~74 tokens by this count (10-token prompts, 2 × 32 new): 0.96 TFLOP / 34 s = 0.62 of the peak;
    dpokit reaches 0.70 on 512-token HH pairs (docs/PERFORMANCE.md, first table). Two full-size demos from fresh
    clones on the AVX2 EPYC (2026-12-03) trained at 0.60 and 0.55 of the peak their probe read; hence 0.55, the
    lower, so a budget is overrun less often.
  * reference pass: 2N per token for REF_RECOMPUTED of the training pairs only — the others carry the
    sampler's log-probs (146 of 176 demo pairs, docs/PERFORMANCE.md "Reference log-probs from the
    sampler"); held-out pairs are always recomputed, and evaluated before and after training (3 × 2N).
  * tokens: a sample is its prompt plus `max_new_tokens` (124 of 128 demo samples ran to the limit, same
    section). A best-vs-worst pair is its prompt once (prefix shared) plus two completions. With `--pairing
    all` the training file holds one ranked row per prompt and a micro-batch computes each of a row's
    completions once (batches/packing.py): a micro-batch of B pairs from rows of g pairs each touches about
    (B − 1)/g + 1 rows (its two ends cut rows), each computed whole — prompt + samples × max_new_tokens —
    an upper estimate, since a cut row computes only the completions of its pairs in the batch.
  * pairs per prompt with `--pairing all`: s(s−1)/2 × DISTINCT_REWARDS (1,546 of 280 × 6 pairs had
    different rewards, issue 15); held-out pairs are best-vs-worst, one per prompt.
  * OVERHEAD_S: loading the model a few times, the weights digest, report and plots — an estimate, not
    a measurement; the recorded actual phase times (demo.json, eval.json) are there to check all of it.

Learning rate. A plan cut to fewer steps than the full one trains with the demo's lr × full steps / planned
steps (at most LR_SCALE_MAX), so a slow machine still moves the policy as far. Measured on held-out win rate
(AVX2-only EPYC, 2026-12-03, docs/RESULTS.md): 35 steps on 99 prompts gave 65.0 % at lr 3e-5, 76.7 % at 6e-5 and
77.7 % at 9e-5 (the full plan: 77.3 % in 97 steps at 3e-5); 23 steps on 64 prompts at 1.2e-4 gave 83.3 %. The KL
to the reference grows with it (1.6, 5.5, 9.8 and 11.0 nats; 4.7 at full size); the report shows it beside the
win rate. With that, the step floor is 20 (it was 30), so a 45 GFLOP/s CPU (issue 15's slowest) is predicted to
fit 15 minutes (not yet run on one). A machine shared with another busy process is not: the best-of-5 matmul probe
reads its free moments (docs/RESULTS.md, "A slow day, simulated").

Re-plan. So sampling, minutes of it, is the second measurement, taken twice. The demo samples the held-out
prompts first: when they took more than REPLAN_SLACK × their prediction, `replan` predicts the rest on a machine
that many times slower and cuts steps (lr rescaled) — the training prompts, not sampled yet, following them down —
then k, to what is left of the budget; so a busy machine samples no more training prompts than its cut steps use (on the
simulated slow day before this, 99 prompts were sampled where the re-plan's 20 steps used ~56). After the
training pairs the same check runs once more on the whole pairs phase (prompts and held-out pairs now stay, so
only steps and k are cut), on the machine the first re-plan found when it cut (else the probe's). Sampling waits
for busy cores as training does, though not always as much (on the simulated slow day pairs ran 1.7×, training
2.0× the plan).

Sizing. The plan starts from the task's full sizes (one pass over every pair, or --epochs passes) and
applies cuts in a fixed order until the predicted total fits: training prompts down to those whose pairs
the planned steps use (more prompts only cost sampling), then training steps — the training prompts
following them down, so no pair is seen more often than the full plan sees it (docs/RESULTS.md: one pass
over all pairs generalises better than several, which memorise) — then held-out prompts, then k. Samples
per prompt are not cut: fewer samples give fewer pairs per prompt, so the same steps would need more
prompts and more sampling, not less. The order does not depend on the budget, so a larger budget never
gives a smaller plan. Each size has a floor; a plan at every floor that still does not fit runs anyway,
with a warning that the budget is too small.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

TRAIN_EFFICIENCY = 0.55
SAMPLE_EFFICIENCY = 0.6
SAMPLE_BATCH = 128            # make_pairs' and generation_metrics' batch size
REF_RECOMPUTED = 0.2
DISTINCT_REWARDS = 0.92
OVERHEAD_S = 25.0
SAMPLE_PROBE, PROBE_STEPS = 4, 4
FLOORS = dict(train_prompts=64, steps=20, eval_prompts=24, k=2)
LR_SCALE_MAX = 4.0
REPLAN_SLACK = 1.15           # replan: sampling slower than predicted by more than this re-sizes the rest


@dataclass
class Machine:
    """What the planner measured: the matmul peak, the sampler's fixed cost per decode step, the model's
    size and the mean prompt length in tokens."""
    matmul_gflops: float
    step_overhead_s: float
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
    passes: int = 1               # passes over the pairs the full plan makes (--epochs)
    lr_scale: float = 1.0         # the demo's lr × this when steps were cut (module docstring: learning rate)
    full_steps: int = 0           # the uncut plan's steps (0 in a demo.json from before it was recorded)
    predicted_s: dict = field(default_factory=dict)
    cuts: list = field(default_factory=list)
    warning: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def measure(model, tokenizer, prompts: list, log=print) -> Machine:
    """About two seconds on an idle machine: the fp32 matmul peak (the benchmark's own function) and the
    sampling probe (module docstring)."""
    from dpokit.bench_tools import matmul_peak
    from dpokit.generation.sample import prompt_token_ids, sample
    start = time.perf_counter()
    peak = matmul_peak(bf16=False, cuda=False, repeats=5)  # best of 5: 3 read 96 where the machine gave 97–127
    probe = prompts[:SAMPLE_PROBE]
    sample(model, tokenizer, probe[:1], 1, 1)  # first call: allocator and kernel warm-up, not timed
    one = sample(model, tokenizer, probe, 1, 1, seed=0)
    more = sample(model, tokenizer, probe, 1, 1 + PROBE_STEPS, seed=0)
    params = sum(p.numel() for p in model.parameters())
    step_flops = 2 * params * len(probe) / (peak * 1e9 * SAMPLE_EFFICIENCY)
    overhead = max(0.0, (more.seconds - one.seconds) / PROBE_STEPS - step_flops)
    lengths = [len(prompt_token_ids(p, tokenizer)) for p in prompts]
    machine = Machine(peak, overhead, params, sum(lengths) / max(1, len(lengths)), time.perf_counter() - start)
    log(f"machine: fp32 matmul {peak:.0f} GFLOP/s; sampling {overhead * 1e3:.0f} ms per decode step besides its "
        f"FLOPs ({params / 1e6:.1f}M parameters; measured in {machine.seconds:.1f} s)")
    return machine


def pairs_per_prompt(samples: int, pairing: str) -> float:
    return samples * (samples - 1) / 2 * DISTINCT_REWARDS if pairing == "all" else 1.0


def tokens_per_pair(prompt: float, new: int, samples: int, pairing: str, batch_size: int) -> float:
    """Tokens a training micro-batch computes per pair (module docstring: tokens)."""
    if pairing != "all":
        return prompt + 2 * new
    per_row = pairs_per_prompt(samples, pairing)
    rows_touched = (batch_size - 1) / per_row + 1
    return rows_touched * (prompt + samples * new) / batch_size


def predict(plan: Plan, m: Machine) -> dict:
    """Seconds per phase for `plan` on machine `m` (module docstring)."""
    n, prompt, new = m.params, m.prompt_tokens, plan.max_new_tokens
    compute = m.matmul_gflops * 1e9 * TRAIN_EFFICIENCY

    def sample_s(rows):
        return sampling_s(rows, plan, m)
    pair_tokens = prompt + 2 * new          # a held-out (best-vs-worst) pair
    train_pair_tokens = tokens_per_pair(prompt, new, plan.samples, plan.pairing, plan.batch_size)
    train_pairs = plan.train_prompts * pairs_per_prompt(plan.samples, plan.pairing)
    pairs_s = sample_s((plan.train_prompts + plan.eval_prompts) * plan.samples)
    train_s = (plan.steps * plan.batch_size * train_pair_tokens * 6 * n
               + train_pairs * REF_RECOMPUTED * train_pair_tokens * 2 * n
               + plan.eval_prompts * pair_tokens * 3 * 2 * n) / compute
    # the policy samples k per held-out prompt (the reference's are the pairs phase's held-out samples, and the
    # sampler gives the policy's log-probs), then the reference scores the policy's samples: one forward, 2N a token
    scored = plan.eval_prompts * plan.k * (prompt + new)
    eval_s = sample_s(plan.eval_prompts * plan.k) + scored * 2 * n / compute
    times = dict(pairs_s=pairs_s, train_s=train_s, eval_s=eval_s, overhead_s=OVERHEAD_S)
    return {k: round(v, 1) for k, v in times.items()} | {"total_s": round(sum(times.values()), 1)}


def sampling_s(rows: int, plan: Plan, m: Machine) -> float:
    """Seconds to sample `rows` continuations of plan.max_new_tokens tokens in batches of SAMPLE_BATCH."""
    flops = rows * (m.prompt_tokens + plan.max_new_tokens) * 2 * m.params
    return (math.ceil(rows / SAMPLE_BATCH) * plan.max_new_tokens * m.step_overhead_s
            + flops / (m.matmul_gflops * 1e9 * SAMPLE_EFFICIENCY))


def full_steps(train_prompts: int, samples: int, pairing: str, batch_size: int, epochs: int) -> int:
    """Steps of `epochs` passes over the pairs the full task is expected to give."""
    return max(1, math.ceil(train_prompts * pairs_per_prompt(samples, pairing) / batch_size) * epochs)


def prompts_for(plan: Plan) -> int:
    """Training prompts whose expected pairs fill `plan.steps` batches in `plan.passes` passes."""
    return math.ceil(plan.steps * plan.batch_size / (plan.passes * pairs_per_prompt(plan.samples, plan.pairing)))


def _cuts(full: Plan):
    """The fixed sequence of smaller plans (module docstring: sizing)."""
    def floor(name):
        return min(FLOORS[name], getattr(full, name))

    def cut(plan, name, value):
        return replace(plan, **{name: value}, cuts=[*plan.cuts, f"{name} {getattr(plan, name)} → {value}"])

    def prompts_follow(plan):
        target = max(floor("train_prompts"), min(plan.train_prompts, prompts_for(plan)))
        return cut(plan, "train_prompts", target) if target < plan.train_prompts else plan

    plan = prompts_follow(full)
    if plan is not full:
        yield plan
    for name in ("steps", "eval_prompts", "k"):
        while getattr(plan, name) > floor(name):
            plan = cut(plan, name, smaller(plan, name, floor(name)))
            plan = prompts_follow(plan) if name == "steps" else plan
            yield plan


CUT_FACTORS = {"steps": 0.85, "eval_prompts": 0.8, "k": None}  # None: one at a time


def smaller(plan: Plan, name: str, floor: int) -> int:
    """The next value of `name` in the cut sequence: × its CUT_FACTORS entry (k: minus one), not below `floor`."""
    value, factor = getattr(plan, name), CUT_FACTORS[name]
    return max(floor, int(value * factor) if factor else value - 1)


def make_plan(minutes: float, machine: Machine, train_prompts: int, samples: int, eval_prompts: int, k: int,
              batch_size: int, epochs: int, max_new_tokens: int, pairing: str) -> Plan:
    """The largest plan in the cut sequence whose predicted total fits `minutes`."""
    steps = full_steps(train_prompts, samples, pairing, batch_size, epochs)
    plan = Plan(train_prompts, samples, steps, eval_prompts, k, batch_size, max_new_tokens, pairing, minutes,
                passes=max(1, epochs))
    plan.predicted_s = predict(plan, machine)
    budget = minutes * 60
    for cut in _cuts(plan):
        if plan.predicted_s["total_s"] <= budget:
            break
        plan = replace(cut, predicted_s=predict(cut, machine))
    plan.full_steps = steps
    plan.lr_scale = lr_scale(plan)
    if plan.predicted_s["total_s"] > budget:
        plan.warning = (f"--minutes {minutes:g} is too small for this machine: even the smallest plan "
                        f"(at every floor) needs about {plan.predicted_s['total_s'] / 60:.1f} min; running it anyway")
    return plan


def lr_scale(plan: Plan) -> float:
    """full steps / planned steps, at most LR_SCALE_MAX; 1 for an uncut plan (module docstring: learning rate)."""
    full = plan.full_steps or round(plan.steps * plan.lr_scale)
    return round(min(LR_SCALE_MAX, full / plan.steps), 3) if plan.steps < full else 1.0


def slowed(machine: Machine, factor: float) -> Machine:
    """`machine` running `factor` times slower (a busy one: module docstring, re-plan)."""
    return replace(machine, matmul_gflops=machine.matmul_gflops / factor,
                   step_overhead_s=machine.step_overhead_s * factor)


def replan(plan: Plan, machine: Machine, pairs_s: float, elapsed_s: float,
           held_out_only: bool = False) -> tuple[Plan, float]:
    """(the plan for the rest of the budget, how many times slower sampling ran than predicted), once sampling
    has been timed. A machine shared with a busy process reads fast in the probe's best-of-5 matmul and then runs
    slower (module docstring); sampling and training wait for the cores alike, so when sampling took over
    REPLAN_SLACK × its prediction the rest is predicted on a machine that much slower and cut to what is left of
    `plan.minutes` after `elapsed_s`: steps first (lr rescaled), then k.
      * held_out_only: `pairs_s` timed the held-out samples alone (the demo draws them first), so the training
        prompts are still to sample: they follow the steps down (prompts_for) and their sampling is in the rest;
      * else `pairs_s` timed both pair files: what was sampled stays.
    A faster machine keeps its plan (the full plan's prompts bound the steps)."""
    predicted = sampling_s(plan.eval_prompts * plan.samples, plan, machine) if held_out_only \
        else plan.predicted_s.get("pairs_s", 0.0)
    slower = pairs_s / max(predicted, 1e-9)
    if slower <= REPLAN_SLACK:
        return plan, slower
    busy, left = slowed(machine, slower), plan.minutes * 60 - elapsed_s

    def to_sample(p: Plan) -> float:  # the training prompts' sampling, when it is still to come
        return sampling_s(p.train_prompts * p.samples, p, busy) if held_out_only else 0.0

    def rest(p: Plan) -> float:
        t = predict(p, busy)
        return to_sample(p) + t["train_s"] + t["eval_s"] + t["overhead_s"]

    def prompts_follow(p: Plan) -> Plan:
        floor = min(FLOORS["train_prompts"], plan.train_prompts)
        return replace(p, train_prompts=max(floor, min(p.train_prompts, prompts_for(p)))) if held_out_only else p

    new = prompts_follow(replace(plan, cuts=list(plan.cuts)))
    why = f"{'held-out samples' if held_out_only else 'pairs'} took {slower:.2f}× their prediction"
    for name in ("steps", "k"):
        floor = min(FLOORS[name], getattr(plan, name))
        while rest(new) > left and getattr(new, name) > floor:
            new = replace(new, **{name: smaller(new, name, floor)})
            new = prompts_follow(new) if name == "steps" else new
    for name in ("train_prompts", "steps", "k"):
        if getattr(new, name) != getattr(plan, name):
            new.cuts.append(f"{name} {getattr(plan, name)} → {getattr(new, name)} ({why})")
    over = rest(new) > left
    if (new.train_prompts, new.steps, new.k) == (plan.train_prompts, plan.steps, plan.k) and not over:
        return plan, slower  # it fits as planned (on a tiny model the fixed costs dwarf every prediction)
    new.predicted_s = predict(new, busy) | {"pairs_s": round(pairs_s + to_sample(new), 1),
                                            "total_s": round(elapsed_s + rest(new), 1)}
    new.lr_scale = lr_scale(new) if new.steps != plan.steps else plan.lr_scale  # unchanged steps: unchanged lr
    if over:
        new.warning = (f"sampling ran {slower:.2f}× slower than predicted: even at the floors the rest needs about "
                       f"{rest(new) / 60:.1f} min of the {max(left, 0) / 60:.1f} left; running it anyway")
    return new, slower


def describe(plan: Plan) -> str:
    p = plan.predicted_s
    lines = [f"plan for {plan.minutes:g} min: {plan.train_prompts} prompts × {plan.samples} samples → "
             f"~{plan.train_prompts * pairs_per_prompt(plan.samples, plan.pairing):.0f} pairs; {plan.steps} training "
             f"steps of {plan.batch_size} pairs; held-out {plan.eval_prompts} prompts × k={plan.k}",
             f"expected: pairs {p['pairs_s'] / 60:.1f} min, training {p['train_s'] / 60:.1f} min, evaluation "
             f"{p['eval_s'] / 60:.1f} min, loading/report {p['overhead_s'] / 60:.1f} min; total "
             f"{p['total_s'] / 60:.1f} min"]
    if plan.cuts:
        lines.append("cut to fit: " + ", ".join(plan.cuts)
                     + (f"; lr × {plan.lr_scale:g} for the fewer steps" if plan.lr_scale != 1 else ""))
    if plan.warning:
        lines.append("warning: " + plan.warning)
    return "\n".join(lines)
