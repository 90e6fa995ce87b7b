"""`dpokit demo`: the DPO paper's controlled-sentiment experiment in miniature, offline, end to end.

The paper (Sec. 6.1) continues IMDb review prefixes with GPT-2 and rewards positive sentiment. Here:
the prompts are 280 + 60 movie-review openings written for dpokit (data/builtin/sentiment_*.jsonl), the
reference is the embedded SmolLM2-135M-Instruct continuing them as plain text, and the ground-truth
reward is VADER sentiment. Steps, each logged with its time:
  1. pairs: n samples per prompt from the reference, scored, best vs worst (or all pairs);
  2. DPO on the training pairs (held-out pairs from the eval prompts give implicit-reward accuracy);
  3. generation metrics on the held-out prompts: policy vs reference win rate, rewards, KL, length;
  4. eval.json and report.html with plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dpokit.config import TrainConfig
from dpokit.data import builtin_path, load_prompts
from dpokit.evaluation.generation import generation_metrics
from dpokit.evaluation.rewards import load_reward
from dpokit.models import load_model, load_tokenizer
from dpokit.tasks.pairs import make_pairs, write_jsonl


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

    def prompts(self) -> tuple[list, list]:
        train, _ = load_prompts(self.train_prompts or builtin_path("sentiment_train"))
        held, _ = load_prompts(self.eval_prompts or builtin_path("sentiment_eval"))
        return (train[:self.limit], held[:self.limit]) if self.limit else (train, held)


def demo_train_config(output_dir: Path, task: SentimentTask, pairs_dir: Path | None = None,
                      **overrides) -> TrainConfig:
    """DPO settings for the task (short completions, so short sequences), on the pairs in pairs_dir
    (default: output_dir). Chosen by the experiments recorded in docs/RESULTS.md."""
    pairs_dir = pairs_dir or output_dir
    values = dict(model=task.model, data=str(pairs_dir / "pairs_train.jsonl"),
                  eval_data=str(pairs_dir / "pairs_eval.jsonl"), output_dir=str(output_dir), beta=0.1, lr=2e-5,
                  # one pass over all pairs generalises better than three over best-vs-worst, which memorise
                  # their 280 pairs (held-out win rate 75.8 % vs 71.7 %, docs/RESULTS.md)
                  batch_size=16, epochs=1, warmup_steps=5, max_length=128, max_prompt_length=64,
                  # pairs of ~75 tokens: one pair per row is faster than packing them into 1024-token rows
                  # with block masks (2.45 vs 1.4 pairs/s measured here, batch 16)
                  pack_tokens=0, seed=task.seed)
    values.update(overrides)
    return TrainConfig.from_dict(values, source="demo")


def make_task_pairs(task: SentimentTask, output_dir: Path, log=print) -> tuple[Path, Path]:
    """Pairs for training (train prompts) and held-out preference metrics (eval prompts), sampled from
    the reference; written as pairs_train.jsonl / pairs_eval.jsonl in output_dir."""
    train_prompts, eval_prompts = task.prompts()
    tokenizer, reference = load_tokenizer(task.model), load_model(task.model)
    reward = load_reward(task.reward)
    paths = []
    # held-out pairs are always best-vs-worst: one per prompt keeps evaluation cheap and its prompts equal
    for name, prompts, seed, pairing in (("train", train_prompts, task.seed, task.pairing),
                                         ("eval", eval_prompts, task.seed + 100, "best-worst")):
        rows, stats = make_pairs(reference, tokenizer, prompts, reward, task.samples, pairing,
                                 max_new_tokens=task.max_new_tokens, seed=seed)
        paths.append(write_jsonl(rows, output_dir / f"pairs_{name}.jsonl"))
        log(f"{name} pairs: {stats.summary()} → {paths[-1]}")
    return paths[0], paths[1]


def evaluate_generation(policy_dir: str | Path, task: SentimentTask, reference_samples=None, log=print):
    """Generation metrics of a trained policy on the task's held-out prompts (module docstring, step 3)."""
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


def run_demo(output_dir: str | Path = "runs/demo", task: SentimentTask | None = None, log=print,
             **train_overrides) -> dict:
    """Make pairs, train DPO, evaluate, write eval.json and report.html; returns the eval result."""
    from dpokit.loop import train
    from dpokit.report import write_report
    task, out, start = task or SentimentTask(), Path(output_dir), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    log("[1/4] sampling preference pairs from the reference")
    t = time.perf_counter()
    make_task_pairs(task, out, log)
    timings["pairs_s"] = time.perf_counter() - t

    log("[2/4] training DPO")
    t = time.perf_counter()
    result = train(demo_train_config(out, task, **train_overrides), log=log)
    timings["train_s"] = time.perf_counter() - t

    log("[3/4] sampling held-out continuations from the policy and the reference")
    t = time.perf_counter()
    generation, _ = evaluate_generation(result.final_dir, task, log=log)
    timings["eval_s"] = time.perf_counter() - t

    eval_result = {"model": str(result.final_dir), "ref_model": task.model, "task": asdict(task),
                   **(result.eval_after or {}), "generation": generation}
    log("[4/4] writing the report")
    timings["total_s"] = time.perf_counter() - start
    eval_result["timings"] = timings
    (out / "eval.json").write_text(json.dumps(eval_result, indent=2, ensure_ascii=False), encoding="utf-8")
    report = write_report(out, eval_result)
    log(f"held-out: {headline(generation)}")
    log(f"done in {timings['total_s'] / 60:.1f} min; report: {report}")
    return eval_result
