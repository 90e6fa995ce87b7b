"""`dpokit sweep`: the reward–KL frontier, the DPO paper's Fig. 2 (left), on the built-in sentiment task.

Several DPO runs that differ in one option (e.g. `beta=0.05,0.1,0.5,1`) train on one shared pairs file
(the reference log-probs are computed once: the on-disk cache is keyed by reference weights and token
ids, so every later run finds them). Checkpoints along each run are sampled on the held-out prompts and
placed at (KL(π‖π_ref), mean reward). Baselines on the same axes, as in the paper:
- Preferred-FT: supervised fine-tuning on the chosen completions only (`--loss sft`), checkpoints too;
- Best-of-N from the reference (N = 1, 4, 16): reward of the best of N samples, KL log N − (N−1)/N.
The reference's held-out samples are drawn once (max(N), k per prompt), shared by every evaluation and kept
in the sweep folder (reference_samples.json) for a later sweep into it.
Online methods (`--online grpo,online-dpo,rlhf,ppo-gt`: GRPO, online DPO, RLHF = a reward model fitted to the
same pairs + PPO against it at several KL coefficients, PPO on the ground-truth reward; tasks/sweep_rl.py) train
on their own samples of the training prompts, each the same number of samples, and add their checkpoints and
final models to the same axes.
Each finished run leaves RUN/points.json with the options it was trained with; a later sweep into the
same folder reuses a run whose options match (e.g. adding online methods or a β to an existing sweep), and a run
stopped by a signal (SIGTERM, Ctrl-C: it checkpoints first) resumes from its checkpoint (its measured time then
covers the steps after it: its costs record `resumed_at_step`, and the cost table extrapolates and flags it).
Writes frontier.json (points, and per series the costs of tasks/sweep_rl.py: wall time, peak RSS, samples,
reward calls, models held), frontier.png and report.html in the sweep folder.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import yaml

from dpokit.config import ConfigError, TrainConfig
from dpokit.evaluation.generation import best_of_n, generation_metrics
from dpokit.evaluation.rewards import load_reward
from dpokit.generation import Samples, sample
from dpokit.loop.checkpoint import complete_checkpoints
from dpokit.models import load_model, load_tokenizer
from dpokit.report.costs import cost_markdown
from dpokit.tasks.demo import SentimentTask, demo_train_config, make_task_pairs, write_json
from dpokit.tasks.sweep_runs import continue_or_start, count_pairs, online_train_config, result_options
from dpokit.tasks.sweep_rl import (BUDGET, ONLINE_METHODS, Meter, check_rl_options, parse_online, rl_runs, rm_note,
                                   run_cost)


def parse_axis(spec: str) -> tuple[str, list]:
    """"beta=0.05,0.1" → ("beta", [0.05, 0.1]), each value checked as that TrainConfig option."""
    name, sep, values = spec.partition("=")
    name = name.strip().lstrip("-").replace("-", "_")
    if not sep or not values:
        raise ConfigError(f"sweep axis {spec!r}: expected OPTION=V1,V2,… e.g. beta=0.05,0.1,0.5,1")
    parsed = []
    for v in values.split(","):  # each value read as YAML (0.1 → float, true → bool), then checked by TrainConfig
        parsed.append(getattr(TrainConfig.from_dict({name: yaml.safe_load(v.strip())}, source=f"sweep axis {name}"),
                              name))
    return name, parsed


def _point(method: str, series: str, label: str, g: dict) -> dict:
    return {"method": method, "series": series, "label": label, "kl": g["kl_mean"], "kl_ci95": g["kl_ci95"],
            "reward": g["policy"]["reward_mean"], "reward_ci95": g["policy"]["reward_ci95"],
            "win_rate": g["win_rate"], "length": g["policy"]["length_mean"]}


def evaluate_run(run_dir: Path, method: str, series: str, save_every: int, task: SentimentTask, eval_prompts: list,
                 reward, reference, tokenizer, reference_samples, keep_checkpoints: bool, log) -> list[dict]:
    """One frontier point per checkpoint of a finished run on its `save_every` spacing (not the one a signal wrote
    before the run was resumed: the frontier is the uninterrupted run's), plus its final model."""
    points = []
    steps = [(c, int(c.name.split('-')[-1])) for c in complete_checkpoints(str(run_dir))]
    folders = [(c, f"step {step}") for c, step in steps if save_every and step % save_every == 0]
    for folder, label in folders + [(run_dir / "final", "final")]:
        g, _ = generation_metrics(load_model(str(folder)), reference, tokenizer, eval_prompts, reward, task.k,
                                  task.max_new_tokens, seed=task.seed + 200, reference_samples=reference_samples,
                                  keep_samples=0)
        points.append(_point(method, series, label, g))
        log(f"  {series} {label}: reward {g['policy']['reward_mean']:+.3f}, KL {g['kl_mean']:.2f}, "
            f"win rate {g['win_rate']:.1%}")
    if not keep_checkpoints:  # each holds optimizer state (~3× the weights): the sweep needs only its point
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return points


def train_series(method: str, series: str, run_dir: Path, cfg: TrainConfig, depends: dict, steps: int,
                 checkpoints: int, evaluate, log) -> tuple[list[dict], dict]:
    """(frontier points, costs) of one series: trained and evaluated, or read back from RUN/points.json when that
    run finished with the same options (and the same `depends`, e.g. the reward model PPO trained against)."""
    from dpokit.loop import train
    # checkpoints evenly along the run (online runs too): the frontier's points between the reference and the
    # final model (rounded up, so the last checkpoint is not a near-copy of the final model)
    cfg.save_every = max(1, -(-steps // (checkpoints + 1))) if checkpoints else 0
    saved, cost = run_dir / "points.json", {"method": method, **run_cost(cfg, steps)}
    options, depends = json.loads(json.dumps(result_options(cfg))), json.loads(json.dumps(depends))
    if saved.is_file():
        record = json.loads(saved.read_text())
        if record["options"] == options and record.get("depends", {}) == depends:
            log(f"[{series}] reusing the finished run in {run_dir}")
            measured = record.get("measured") or {"train_seconds": record["points"][0].get("train_seconds")}
            return record["points"], {**cost, **measured}
    log(f"[{series}] training {steps} steps → {run_dir}")
    continue_or_start(cfg, log)
    with Meter() as meter:
        result = train(cfg, log=lambda *a, **k: None)
    measured = meter.fields() | ({"resumed_at_step": result.resumed_at} if result.resumed_at else {})
    points = evaluate(run_dir, method, series, cfg.save_every)
    for p in points:
        p["train_seconds"] = meter.seconds
    saved.write_text(json.dumps({"options": options, "depends": depends, "points": points,
                                 "measured": measured}, indent=1))
    return points, {**cost, **measured}


def make_pairs_once(task: SentimentTask, out: Path, log) -> dict:
    """pairs_train.jsonl and pairs_eval.jsonl in `out` (made, or reused), and what making them cost (pairs.json:
    prompts and samples of the training pairs; seconds for both files, when this folder made them)."""
    record_path = out / "pairs.json"
    if (out / "pairs_train.jsonl").is_file():
        log(f"reusing {out / 'pairs_train.jsonl'} and pairs_eval.jsonl")
        return json.loads(record_path.read_text()) if record_path.is_file() else {}
    with Meter() as meter:
        make_task_pairs(task, out, log)
    train_prompts, _ = task.prompts()
    record = {"train_prompts": len(train_prompts), "samples": len(train_prompts) * task.samples,
              "reward_calls": len(train_prompts) * task.samples, **meter.fields()}
    record["seconds"] = record.pop("train_seconds")  # sampling and scoring both files
    record_path.write_text(json.dumps(record, indent=1))
    return record


REFERENCE_SAMPLES = "reference_samples.json"


def reference_continuations(out: Path, task: SentimentTask, eval_prompts: list, n: int, reference, tokenizer, reward,
                            log) -> tuple[Samples, list[float]]:
    """The reference's n held-out continuations per prompt and their rewards, shared by every evaluation: sampled
    once per sweep folder and kept in REFERENCE_SAMPLES (minutes of sampling a later sweep into the folder skips),
    reused only when drawn the same way (model, n, length, seed, reward, the same prompts)."""
    path, seed = out / REFERENCE_SAMPLES, task.seed + 201
    drawn_as = {"model": task.model, "n": n, "max_new_tokens": task.max_new_tokens, "seed": seed, "reward": task.reward}
    if path.is_file():
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept["drawn_as"] == drawn_as and kept["samples"]["prompts"] == eval_prompts:
            log(f"reusing the reference's {n} held-out continuations per prompt in {path}")
            return Samples(**kept["samples"]), kept["rewards"]
    log(f"sampling {n} reference continuations per held-out prompt (shared by every evaluation)")
    drawn = sample(reference, tokenizer, eval_prompts, n, task.max_new_tokens, seed=seed)
    rewards = reward([drawn.prompt_of(i) for i in range(len(drawn.texts))], drawn.texts)
    write_json({"drawn_as": drawn_as, "samples": asdict(drawn), "rewards": rewards}, path)
    return drawn, rewards


def run_sweep(output_dir: str | Path, axis: str, task: SentimentTask | None = None, checkpoints: int = 3,
              best_of: tuple[int, ...] = (1, 4, 16), preferred_ft: bool = True, keep_checkpoints: bool = False,
              online: tuple[str, ...] | str = (), online_steps: int = 35, rlhf_kl=None, ppo_gt_kl: float | None = None,
              log=print, **train_overrides) -> dict:
    from dpokit.report import write_report
    task, out, start = task or SentimentTask(), Path(output_dir), time.perf_counter()
    name, values = parse_axis(axis)
    online = parse_online(online)
    rlhf_kl, ppo_gt_kl = check_rl_options(online, rlhf_kl, ppo_gt_kl)  # before any sampling: refusals first
    out.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs_once(task, out, log)

    _, eval_prompts = task.prompts()
    tokenizer, reference, reward = load_tokenizer(task.model), load_model(task.model), load_reward(task.reward)
    ref_s, ref_rewards = reference_continuations(out, task, eval_prompts, max([task.k, *best_of]), reference,
                                                 tokenizer, reward, log)
    points = [{"method": "Best-of-N", "series": "Best-of-N", "label": f"N={b['n']}", "kl": b["kl"],
               "reward": b["reward_mean"], "reward_ci95": b["reward_ci95"]}
              for b in (best_of_n(ref_s, ref_rewards, n) for n in best_of)]
    evaluate = partial(evaluate_run, task=task, eval_prompts=eval_prompts, reward=reward, reference=reference,
                       tokenizer=tokenizer, reference_samples=(ref_s, ref_rewards), keep_checkpoints=keep_checkpoints,
                       log=log)

    progress = train_overrides.get("progress", True)
    offline = [("DPO", f"{name}={v}", {name: v}) for v in values] + \
        ([("Preferred-FT", "Preferred-FT", {"loss": "sft"})] if preferred_ft else [])
    runs = []  # (method, series, run folder, config, what else its result depends on)
    for method, series, options in offline:
        folder = out / series.replace("=", "-").replace("Preferred-FT", "preferred-ft")
        cfg = demo_train_config(folder, task, out, **{**train_overrides, **options})
        runs.append((method, series, folder, cfg, {}))
    for m in (m for m in online if m in ("grpo", "online-dpo")):
        runs.append((ONLINE_METHODS[m], m, out / m,
                     online_train_config(out / m, task, ONLINE_METHODS[m], online_steps, progress=progress), {}))
    # rlhf (its reward model trains here, on the DPO runs' base settings) and ppo-gt
    rl, rm = rl_runs(out, task, online, online_steps, rlhf_kl, ppo_gt_kl,
                     demo_train_config(out, task, out, **train_overrides), progress, log)
    costs = {}
    for method, series, run_dir, cfg, depends in runs + rl:
        steps = cfg.max_steps or cfg.epochs * -(-count_pairs(out / "pairs_train.jsonl", cfg) // cfg.batch_size)
        run_points, costs[series] = train_series(method, series, run_dir, cfg, depends, steps, checkpoints, evaluate,
                                                 log)
        points += run_points

    notes = ([f"Budget: {BUDGET}."] if online else []) + ([rm_note(rm)] if rm else [])
    frontier = {"axis": name, "values": values, "task": vars(task), "train_overrides": train_overrides,
                "reference_reward": sum(ref_rewards) / len(ref_rewards), "points": points, "costs": costs, "pairs": pairs,
                **({"reward_model": {k: v for k, v in rm.items() if k != "options"}} if rm else {}),
                "notes": notes, "seconds": time.perf_counter() - start}
    (out / "frontier.json").write_text(json.dumps(frontier, indent=1), encoding="utf-8")
    report = write_report(out, None, frontier=frontier)
    costs_table = cost_markdown(frontier)
    if costs_table:
        log("what each method cost (report/costs.py: wall time from the reference model on, evaluation excluded):\n"
            + costs_table)
    log(f"sweep done in {frontier['seconds'] / 60:.1f} min: {out / 'frontier.json'}, {report}")
    return frontier
