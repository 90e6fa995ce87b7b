"""`dpokit demo`: the DPO paper's controlled-sentiment experiment in miniature, offline, end to end.

The paper (Sec. 6.1) continues IMDb review prefixes with GPT-2 and rewards positive sentiment. Here:
the prompts are 280 + 60 movie-review openings written for dpokit (data/builtin/sentiment_*.jsonl), the
reference is the embedded SmolLM2-135M-Instruct continuing them as plain text, and the ground-truth
reward is VADER sentiment. Steps, each logged with its time:
  1. pairs: n samples per prompt from the reference, scored; held-out pairs (best vs worst) first, timed, so a
     machine slower than the plan assumed samples fewer training prompts; for training one ranked row per
     prompt (all pairs with different rewards, each completion computed once);
  2. DPO on the training pairs (held-out pairs from the eval prompts give implicit-reward accuracy);
  3. generation metrics on the held-out prompts: policy vs reference win rate, rewards, KL, length — the
     reference's side is the held-out samples of step 1 (drawn once, at T = 1 as evaluation draws);
  4. eval.json and report.html with plots.
Before step 1 the demo measures the machine and sizes the run to `--minutes` (tasks/demo_plan.py); it
records its options, plan and phases in demo.json, so `--resume` continues an interrupted run
(tasks/demo_state.py).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dpokit.config import TrainConfig
from dpokit.data import builtin_path, load_prompts
from dpokit.evaluation.generation import generation_metrics
from dpokit.evaluation.rewards import load_reward
from dpokit.logprobs.refcache import weights_digest
from dpokit.loop.checkpoint import checkpoint_root
from dpokit.models import load_model, load_tokenizer
from dpokit.generation import Samples, sample
from dpokit.tasks.pairs import make_pairs, pairs_from_samples, write_jsonl

HELD_OUT_SAMPLES = "reference_eval_samples.json"  # the reference's held-out samples, drawn once (make_part_pairs)


@dataclass
class SentimentTask:
    """Everything that defines the built-in task's data; the demo and the sweep share it."""
    model: str = "embedded"
    train_prompts: str | None = None     # default: the built-in 280 openings
    eval_prompts: str | None = None      # default: the built-in 60 held-out openings
    limit: int = 0                        # use only the first N prompts of each file (0: all)
    reward: str = "sentiment"
    samples: int = 4                      # samples per prompt for pair making
    pairing: str = "all"                  # every two samples with different rewards (more data than best-worst)
    k: int = 4                            # samples per held-out prompt for generation metrics
    max_new_tokens: int = 32
    seed: int = 0
    train_count: int = 0                  # the demo's budget plan: first N training prompts (0: all)
    eval_count: int = 0                   # the same for held-out prompts

    def prompts(self) -> tuple[list, list]:
        train, _ = load_prompts(self.train_prompts or builtin_path("sentiment_train"))
        held, _ = load_prompts(self.eval_prompts or builtin_path("sentiment_eval"))
        if self.limit:
            train, held = train[:self.limit], held[:self.limit]
        return train[:self.train_count or None], held[:self.eval_count or None]


DEMO_LR = 3e-5  # the full-size plan's; tasks/demo_plan.py scales it up when it cuts steps


def demo_train_config(output_dir: Path, task: SentimentTask, pairs_dir: Path | None = None,
                      **overrides) -> TrainConfig:
    """DPO settings for the task (short completions, so short sequences), on the pairs in pairs_dir
    (default: output_dir). Chosen by the experiments recorded in docs/RESULTS.md."""
    pairs_dir = pairs_dir or output_dir
    values = dict(model=task.model, data=str(pairs_dir / "pairs_train.jsonl"),
                  eval_data=str(pairs_dir / "pairs_eval.jsonl"), output_dir=str(output_dir), beta=0.1,
                  # one pass over all pairs generalises better than three over best-vs-worst, which memorise
                  # their 280 pairs (held-out win rate 75.8 % vs 71.7 %, docs/RESULTS.md); with each ranked row's
                  # pairs in one micro-batch, lr 3e-5 reached 76.7 % where 2e-5 reached 72.9 % (same pairs)
                  lr=DEMO_LR,
                  batch_size=16, epochs=1, warmup_steps=5, max_length=128, max_prompt_length=64,
                  # short rows (~140 tokens: a prompt and its 4 samples): one prompt per row; pairs of ~75 tokens one per
                  # row were faster than packed into 1024-token rows
                  # with block masks (2.45 vs 1.4 pairs/s measured here, batch 16)
                  pack_tokens=0, seed=task.seed)
    values.update(overrides)
    return TrainConfig.from_dict(values, source="demo")


def make_task_pairs(task: SentimentTask, output_dir: Path, log=print, reuse: bool = False,
                    models=None) -> tuple[Path, Path]:
    """Pairs for training (train prompts) and held-out preference metrics (eval prompts), sampled from
    the reference; written as pairs_train.jsonl / pairs_eval.jsonl in output_dir (`make_part_pairs`).
    `models`: (tokenizer, reference) already loaded."""
    tokenizer, reference = models or (load_tokenizer(task.model), load_model(task.model))
    reward, digest = load_reward(task.reward), {}
    return tuple(make_part_pairs(name, task, output_dir, (tokenizer, reference), reward, log, reuse, digest)
                 for name in ("train", "eval"))


def make_part_pairs(name: str, task: SentimentTask, output_dir: Path, models, reward, log=print,
                    reuse: bool = False, digest: dict | None = None) -> Path:
    """pairs_{name}.jsonl ("train": the train prompts, "eval": the held-out ones) sampled from the reference
    `models` = (tokenizer, reference), scored by `reward`. With pairing "all" the training file holds ranked rows
    (one per prompt: its samples and rewards), which training reads as every pair with different rewards and
    computes each sample once (batches/packing.py); held-out pairs are always best-vs-worst: one per prompt
    keeps evaluation cheap and its prompts equal. With `reuse`, a file already there is kept (write_jsonl
    renames a complete temporary file into place, so one that exists is whole). `digest`: a dict shared by the
    calls of one run, so the reference's weights are hashed once."""
    path = output_dir / f"pairs_{name}.jsonl"
    if reuse and path.is_file():
        log(f"{name} pairs: reusing {path}")
        return path
    tokenizer, reference = models
    digest = {} if digest is None else digest
    if "weights" not in digest:
        digest["weights"] = weights_digest(reference)
    train_prompts, eval_prompts = task.prompts()
    if name == "train":
        ranked = task.pairing == "all"
        rows, stats = make_pairs(reference, tokenizer, train_prompts, reward, task.samples,
                                 "best-worst" if ranked else task.pairing, max_new_tokens=task.max_new_tokens,
                                 seed=task.seed, digest=digest["weights"], ranked=ranked)
    else:  # kept: the held-out win rate compares the policy with these same reference samples (T = 1)
        drawn = sample(reference, tokenizer, eval_prompts, task.samples, task.max_new_tokens, seed=task.seed + 100)
        scores = reward([drawn.prompt_of(i) for i in range(len(drawn.texts))], drawn.texts)
        rows, stats = pairs_from_samples(drawn, scores, tokenizer, "best-worst", digest=digest["weights"])
        write_json({"samples": asdict(drawn), "rewards": scores, "max_new_tokens": task.max_new_tokens},
                   output_dir / HELD_OUT_SAMPLES)
    write_jsonl(rows, path)
    log(f"{name} pairs: {stats.summary()} → {path}")
    return path


def held_out_reference_samples(output_dir: Path, task: SentimentTask) -> tuple[Samples, list[float]] | None:
    """The reference's held-out samples make_part_pairs kept, when they can stand for the k samples generation
    metrics would draw (as many per prompt, the same prompts and length; all are T = 1 draws); else None (a demo
    folder from before they were kept: evaluation samples the reference again)."""
    path = output_dir / HELD_OUT_SAMPLES
    if not path.is_file():
        return None
    kept = json.loads(path.read_text(encoding="utf-8"))
    drawn = Samples(**kept["samples"])
    _, eval_prompts = task.prompts()
    if drawn.n < task.k or drawn.prompts != eval_prompts or kept["max_new_tokens"] != task.max_new_tokens:
        return None
    return drawn, kept["rewards"]


def write_json(value, path: Path) -> Path:
    """`value` as JSON at `path`, whole or not at all (a temporary file renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value), encoding="utf-8")
    os.replace(tmp, path)
    return path


def evaluate_generation(policy_dir: str | Path, task: SentimentTask, reference_samples=None, log=print):
    """Generation metrics of a trained policy on the task's held-out prompts (module docstring, step 3);
    `reference_samples` (samples, rewards): the reference's, drawn before (else sampled here)."""
    _, eval_prompts = task.prompts()
    tokenizer = load_tokenizer(task.model)
    metrics, reference_samples = generation_metrics(
        load_model(str(policy_dir)), load_model(task.model), tokenizer, eval_prompts, load_reward(task.reward),
        k=task.k, max_new_tokens=task.max_new_tokens, seed=task.seed + 200, reference_samples=reference_samples)
    return metrics, reference_samples


def headline(g: dict) -> str:
    return (f"win rate over the reference {g['win_rate']:.1%} ± {g['win_rate_ci95']:.1%}; "
            f"{g['reward']} reward {g['reference']['reward_mean']:+.3f} → {g['policy']['reward_mean']:+.3f}; "
            f"KL(π‖π_ref) {g['kl_mean']:.2f} ± {g['kl_ci95']:.2f} nats; "
            f"length {g['reference']['length_mean']:.1f} → {g['policy']['length_mean']:.1f} tokens")


def make_demo_pairs(state, plan, task: SentimentTask, out: Path, models, log=print):
    """The pairs phase of the demo: (plan, task) for what follows. The held-out pairs are sampled first and timed:
    on a machine slower than its probe read, the plan is cut (`replan` with held_out_only) before the training
    prompts are sampled, so a busy machine samples no more prompts than its cut steps use; then the training
    pairs. A file made by an earlier invocation is reused, and the re-plan is recorded in demo.json once."""
    models = models or (load_tokenizer(task.model), load_model(task.model))
    reward, digest = load_reward(task.reward), {}
    fresh = not (out / "pairs_eval.jsonl").is_file() and not (out / "pairs_train.jsonl").is_file()
    if fresh:  # hashed outside the timed part, whose prediction is sampling only (the second re-plan times the
        digest["weights"] = weights_digest(models[1])  # whole pairs phase, hashing and scoring included, as before)
    start = time.perf_counter()
    make_part_pairs("eval", task, out, models, reward, log, reuse=True, digest=digest)
    if fresh and "held_out_replan" not in state.data:
        plan = replan_and_record(state, plan, time.perf_counter() - start, log, held_out_only=True)
        task = replace(task, train_count=plan.train_prompts, k=plan.k)
    make_part_pairs("train", task, out, models, reward, log, reuse=True, digest=digest)
    return plan, task


def replan_and_record(state, plan, sampled_s: float, log=print, held_out_only: bool = False):
    """The plan for the rest once sampling's actual time is known (demo_plan.replan): after the held-out samples
    (held_out_only, recorded as held_out_replan) and after both pair files (recorded as replan), each once and
    before training starts, so a resumed demo trains with the steps it started with. After a held-out re-plan
    that cut the plan, predictions are on the machine it found (the probe's, that many times slower)."""
    from dpokit.tasks import demo_plan
    machine = demo_plan.Machine(**state.data["machine"])
    early = state.data.get("held_out_replan") or {}
    if not held_out_only and early.get("cut"):
        machine = demo_plan.slowed(machine, early["slower"])
    elapsed = state.timings()["total_s"]
    new, slower = demo_plan.replan(plan, machine, sampled_s, elapsed, held_out_only)
    what = "the held-out samples" if held_out_only else "the pairs"
    predicted = sampled_s / slower if slower else 0.0  # what replan compared sampled_s with
    record = {"sampled_s": round(sampled_s, 1), "predicted_s": round(predicted, 1), "slower": round(slower, 3),
              "cut": new is not plan, "train_prompts": [plan.train_prompts, new.train_prompts],
              "steps": [plan.steps, new.steps], "k": [plan.k, new.k]}
    # the record and the plan it describes in one update: a stop between the two would leave a cut recorded on
    # the uncut plan (a resume would then sample every training prompt and slow the machine twice)
    state.data.update({"held_out_replan" if held_out_only else "replan": record, "plan": new.to_dict()})
    state.save()
    if new is not plan:
        log(f"re-plan: {what} took {sampled_s / 60:.1f} min, {slower:.2f}× the {predicted / 60:.1f} predicted (the "
            f"machine is busier than its probe read); for the {(plan.minutes * 60 - elapsed) / 60:.1f} min left: "
            + (f"{new.train_prompts} training prompts, " if held_out_only else "")
            + f"{new.steps} steps, k={new.k}, lr × {new.lr_scale:g}; total now predicted "
            f"{new.predicted_s['total_s'] / 60:.1f} min"
            + (f"\nwarning: {new.warning}" if new.warning and new.warning != plan.warning else ""))
    return new


def run_demo(output_dir: str | Path = "runs/demo", task: SentimentTask | None = None, log=print,
             minutes: float = 15.0, resume: bool = False, started_at: float | None = None,
             **train_overrides) -> dict:
    """Measure, plan, make pairs, train DPO, evaluate, write eval.json and report.html; returns the eval
    result. `resume`: continue the demo recorded in output_dir (demo_state). A signal raises DemoInterrupted.
    `started_at` (Unix time): the budget began then (before `make demo`'s install), so the plan gets what is left."""
    from dpokit.loop import train
    from dpokit.loop.signals import TrainingInterrupted
    from dpokit.report import write_report
    from dpokit.tasks import demo_plan
    from dpokit.tasks.demo_state import DemoInterrupted, DemoState, stop_on_signals
    spent = max(0.0, time.time() - started_at) / 60 if started_at is not None else 0.0
    task, out = task or SentimentTask(), Path(output_dir)
    options = {"task": asdict(task), "train": {k: v for k, v in train_overrides.items() if k != "progress"},
               "minutes": minutes}
    state = DemoState.open(out, options, resume, log)
    with stop_on_signals(out) as phase, state.timing():
        if state.plan is None:
            phase.name = "measuring"
            train_prompts, eval_prompts = task.prompts()
            with state.phase("measure"):
                models = load_tokenizer(task.model), load_model(task.model)
                machine = demo_plan.measure(models[1], models[0], train_prompts, log)
            cfg = demo_train_config(out, task, **train_overrides)
            if spent >= 0.05:
                log(f"{spent:.1f} of the {minutes:g} minutes went before the demo started (install): planning for "
                    f"{minutes - spent:.1f}")
            plan = demo_plan.make_plan(round(max(minutes - spent, 0.1), 1), machine, len(train_prompts), task.samples,
                                       len(eval_prompts), task.k,
                                       cfg.batch_size, cfg.epochs, task.max_new_tokens, task.pairing)
            state.record_plan(plan.to_dict(), asdict(machine))
        else:
            models = None
            log(f"resuming {out}: the plan recorded in demo.json (done: {', '.join(state.done) or 'nothing'})")
        plan = demo_plan.Plan(**state.plan)
        log(demo_plan.describe(plan))
        sized = replace(task, train_count=plan.train_prompts, eval_count=plan.eval_prompts, samples=plan.samples,
                        k=plan.k)

        log("[1/4] sampling preference pairs from the reference")
        phase.name = "sampling pairs"
        with state.phase("pairs"):
            plan, sized = make_demo_pairs(state, plan, sized, out, models, log)
        del models
        # once, before training starts (a demo.json from before re-planning may hold a checkpoint of its plan)
        if "train" not in state.done and "replan" not in state.data and not checkpoint_root(out).is_dir():
            plan = replan_and_record(state, plan, state.timings()["pairs_s"], log)
            sized = replace(sized, k=plan.k)

        log("[2/4] training DPO")
        phase.name = "training"
        if "train" in state.done:
            log(f"training: done before ({out / 'final'})")
        else:
            with state.phase("train"):
                try:
                    # a cut plan trains with a larger lr (tasks/demo_plan.py), unless --lr was given
                    scaled = {} if "lr" in train_overrides else {"lr": DEMO_LR * plan.lr_scale}
                    cfg = demo_train_config(out, sized, max_steps=plan.steps, resume="auto" if resume else None,
                                            **scaled, **train_overrides)
                    result = train(cfg, log=log)
                except TrainingInterrupted as e:
                    raise DemoInterrupted(e.signum, "training", out, e.checkpoint) from None
                state.results["eval_after"] = result.eval_after

        if (out / "eval.json").is_file():
            log(f"[3/4] evaluation: done before ({out / 'eval.json'})")
            eval_result = state.read_json("eval.json")
            if not (out / "report.html").is_file():  # stopped between eval.json and the report
                log(f"[4/4] writing the report: {write_report(out, eval_result)}")
            return eval_result
        log("[3/4] sampling held-out continuations from the policy and the reference")
        phase.name = "evaluation"
        with state.phase("eval"):
            generation, _ = evaluate_generation(out / "final", sized, held_out_reference_samples(out, sized), log)
        phase.name = "writing the report"
        log("[4/4] writing the report")
        eval_result = {"model": str(out / "final"), "ref_model": task.model, "task": asdict(sized),
                       **(state.results.get("eval_after") or {}), "generation": generation,
                       "plan": state.plan, "replan": state.data.get("replan"),
                       "held_out_replan": state.data.get("held_out_replan"),
                       "timings": state.timings()}
        state.write_json("eval.json", eval_result)
        report = write_report(out, eval_result)
    log(f"held-out: {headline(generation)}")
    log(f"done in {eval_result['timings']['total_s'] / 60:.1f} min (predicted "
        f"{plan.predicted_s['total_s'] / 60:.1f}); report: {report}")
    return eval_result
