"""`dpokit sweep`: the reward–KL frontier, the DPO paper's Fig. 2 (left), on the built-in sentiment task.

Several DPO runs that differ in one option (e.g. `beta=0.05,0.1,0.5,1`) train on one shared pairs file
(the reference log-probs are computed once: the on-disk cache is keyed by reference weights and token
ids, so every later run finds them). Checkpoints along each run are sampled on the held-out prompts and
placed at (KL(π‖π_ref), mean reward). Baselines on the same axes, as in the paper:
- Preferred-FT: supervised fine-tuning on the chosen completions only (`--loss sft`), checkpoints too;
- Best-of-N from the reference (N = 1, 4, 16): reward of the best of N samples, KL log N − (N−1)/N.
The reference's held-out samples are drawn once (max(N), k per prompt) and shared by every evaluation.
Online methods (`--online grpo,online-dpo`, issue 8's comparison) train on their own samples of the
training prompts and add their checkpoints and final models to the same axes.
Each finished run leaves RUN/points.json with the options it was trained with; a later sweep into the
same folder reuses a run whose options match (e.g. adding online methods or a β to an existing sweep).
Writes frontier.json, frontier.png and report.html in the sweep folder.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml

from dpokit.config import BOOKKEEPING, ConfigError, TrainConfig
from dpokit.data import builtin_path
from dpokit.evaluation.generation import best_of_n, generation_metrics
from dpokit.evaluation.rewards import load_reward
from dpokit.generation import sample
from dpokit.loop.checkpoint import complete_checkpoints
from dpokit.models import load_model, load_tokenizer
from dpokit.tasks.demo import SentimentTask, demo_train_config, make_task_pairs


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


def evaluate_run(run_dir: Path, method: str, series: str, task: SentimentTask, eval_prompts: list, reward,
                 reference, tokenizer, reference_samples, keep_checkpoints: bool, log) -> list[dict]:
    """One frontier point per checkpoint of a finished run, plus its final model."""
    points = []
    folders = [(c, f"step {int(c.name.split('-')[-1])}") for c in complete_checkpoints(str(run_dir))]
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


def _result_options(cfg: TrainConfig) -> dict:
    """The options that change a run's result: all but the bookkeeping ones (checkpoint cadence, progress bar, …)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in BOOKKEEPING}


def online_train_config(run_dir: Path, task: SentimentTask, method: str, steps: int, **overrides) -> TrainConfig:
    """GRPO or online DPO on the task's training prompts, sampling as the task does."""
    values = dict(model=task.model, output_dir=str(run_dir), prompts=task.train_prompts or builtin_path("sentiment_train"),
                  reward=task.reward, num_generations=task.samples, max_new_tokens=task.max_new_tokens,
                  batch_size=16, max_steps=steps, warmup_steps=5, max_length=128, max_prompt_length=64, seed=task.seed,
                  lr=2e-5, **({"loss": "grpo"} if method == "GRPO" else {"online_dpo": True, "pack_tokens": 0}))
    values.update(overrides)
    return TrainConfig.from_dict(values, source=f"sweep {method}")


def run_sweep(output_dir: str | Path, axis: str, task: SentimentTask | None = None, checkpoints: int = 3,
              best_of: tuple[int, ...] = (1, 4, 16), preferred_ft: bool = True, keep_checkpoints: bool = False,
              online: tuple[str, ...] = (), online_steps: int = 35, log=print, **train_overrides) -> dict:
    from dpokit.loop import train
    from dpokit.report import write_report
    task, out, start = task or SentimentTask(), Path(output_dir), time.perf_counter()
    name, values = parse_axis(axis)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "pairs_train.jsonl").is_file():
        make_task_pairs(task, out, log)
    else:
        log(f"reusing {out / 'pairs_train.jsonl'} and pairs_eval.jsonl")

    _, eval_prompts = task.prompts()
    tokenizer, reference, reward = load_tokenizer(task.model), load_model(task.model), load_reward(task.reward)
    n_ref = max([task.k, *best_of])
    log(f"sampling {n_ref} reference continuations per held-out prompt (shared by every evaluation)")
    ref_s = sample(reference, tokenizer, eval_prompts, n_ref, task.max_new_tokens, seed=task.seed + 201)
    ref_rewards = reward([ref_s.prompt_of(i) for i in range(len(ref_s.texts))], ref_s.texts)
    points = [{"method": "Best-of-N", "series": "Best-of-N", "label": f"N={b['n']}", "kl": b["kl"],
               "reward": b["reward_mean"], "reward_ci95": b["reward_ci95"]}
              for b in (best_of_n(ref_s, ref_rewards, n) for n in best_of)]

    runs = [("DPO", f"{name}={v}", {name: v}) for v in values]
    if preferred_ft:
        runs.append(("Preferred-FT", "Preferred-FT", {"loss": "sft"}))
    runs += [({"grpo": "GRPO", "online-dpo": "Online DPO"}[m], m, {}) for m in online]
    for method, series, options in runs:
        run_dir = out / series.replace("=", "-").replace("Preferred-FT", "preferred-ft")
        if method in ("GRPO", "Online DPO"):
            cfg = online_train_config(run_dir, task, method, online_steps,
                                      progress=train_overrides.get("progress", True))
            steps = online_steps
        else:
            cfg = demo_train_config(run_dir, task, out, **{**train_overrides, **options})
            steps = cfg.max_steps or cfg.epochs * -(-count_pairs(out / "pairs_train.jsonl", cfg) // cfg.batch_size)
        # checkpoints evenly along the run (online runs too): the frontier's points between the reference and the
        # final model (rounded up, so the last checkpoint is not a near-copy of the final model)
        cfg.save_every = max(1, -(-steps // (checkpoints + 1))) if checkpoints else 0
        saved = run_dir / "points.json"
        if saved.is_file() and json.loads(saved.read_text())["options"] == json.loads(json.dumps(_result_options(cfg))):
            points += json.loads(saved.read_text())["points"]
            log(f"[{series}] reusing the finished run in {run_dir}")
            continue
        log(f"[{series}] training {steps} steps → {run_dir}")
        t = time.perf_counter()
        train(cfg, log=lambda *a, **k: None)
        seconds = time.perf_counter() - t
        run_points = evaluate_run(run_dir, method, series, task, eval_prompts, reward, reference, tokenizer,
                                  (ref_s, ref_rewards), keep_checkpoints, log)
        for p in run_points:
            p["train_seconds"] = seconds
        saved.write_text(json.dumps({"options": _result_options(cfg), "points": run_points}, indent=1))
        points += run_points

    frontier = {"axis": name, "values": values, "task": vars(task), "train_overrides": train_overrides,
                "reference_reward": points[0]["reward"], "points": points,
                "seconds": time.perf_counter() - start}
    (out / "frontier.json").write_text(json.dumps(frontier, indent=1), encoding="utf-8")
    report = write_report(out, None, frontier_points=points)
    log(f"sweep done in {frontier['seconds'] / 60:.1f} min: {out / 'frontier.json'}, {report}")
    return frontier


def count_pairs(path: Path, cfg) -> int:
    """Pairs training reads from `path` (a ranked row gives several)."""
    from dpokit.data import load_pairs
    return len(load_pairs(str(path), cfg.on_bad_row, ranked_pairs=cfg.ranked_pairs,
                          ultrafeedback_score=cfg.ultrafeedback_score)[0])
