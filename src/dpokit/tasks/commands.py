"""Command-line wiring of the sampling side: `demo`, `make-pairs`, `sweep`, `report`, and the generation
options of `eval`. (cli.py holds the training-side commands and the entry point.)"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path


def add_sampling_flags(p: argparse.ArgumentParser, samples_default: int, samples_help: str) -> None:
    p.add_argument("--reward", default="sentiment", help="reward function: 'sentiment' (VADER), a local HF "
                   "sequence-classification folder (DIR or DIR#LABEL), or module:function taking (prompts, "
                   "completions) and returning floats (default: sentiment)")
    p.add_argument("--samples", type=int, default=samples_default, help=samples_help)
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens sampled per completion (default: 32)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0; "
                   "KL estimates assume 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0, off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--gen-batch-size", type=int, default=128, help="rows sampled at once (default: 128)")


def cmd_make_pairs(args) -> int:
    from dpokit.config import ConfigError
    from dpokit.data import load_prompts
    from dpokit.evaluation.rewards import load_reward
    from dpokit.models import load_model, load_tokenizer
    from dpokit.tasks.pairs import make_pairs, write_jsonl
    if args.ranked and (args.pairing is not None or args.min_gap is not None):
        raise ConfigError("--ranked writes every sample with its reward; pairs are chosen when training reads the "
                          "rows (--ranked-pairs all|best-worst|best-rest): drop --pairing/--min-gap")
    prompts, report = load_prompts(args.prompts, args.on_bad_row)
    print(report.summary())
    rows, stats = make_pairs(load_model(args.model), load_tokenizer(args.model), prompts, load_reward(args.reward),
                             args.samples, args.pairing or "best-worst", args.min_gap or 0.0, args.max_new_tokens,
                             args.temperature, args.top_p, args.seed, args.gen_batch_size, ranked=args.ranked)
    print(f"{stats.summary()} → {write_jsonl(rows, args.output)}")
    return 0


def generation_eval(args, model_dir: str, ref_model: str) -> dict:
    from dpokit.data import load_prompts
    from dpokit.evaluation.generation import generation_metrics
    from dpokit.evaluation.rewards import load_reward
    from dpokit.models import load_model, load_tokenizer
    prompts, report = load_prompts(args.prompts, getattr(args, "on_bad_row", "error"))  # a config flag: may be unset
    print(report.summary())
    dtype = getattr(args, "model_dtype", "fp32")  # eval's --model-dtype: both models sample in it
    metrics, _ = generation_metrics(load_model(model_dir, dtype=dtype), load_model(ref_model, dtype=dtype),
                                    load_tokenizer(model_dir), prompts,
                                    load_reward(args.reward), args.samples, args.max_new_tokens, args.temperature,
                                    args.top_p, args.seed, args.gen_batch_size)
    return metrics


def write_eval(result: dict, output: str, model_dir: str) -> None:
    """eval.json, and report.html + PNGs beside it (training curves too when model_dir is a run's final/)."""
    from dpokit.report import write_report
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    run_dir = Path(model_dir).parent if (Path(model_dir).parent / "metrics.jsonl").is_file() else out.parent
    report = write_report(run_dir, result, out_path=out.parent / "report.html")
    print(f"wrote {out} and {report}")


TRAIN_OVERRIDES = (("beta", float), ("lr", float), ("epochs", int), ("batch_size", int))


def add_task_flags(p: argparse.ArgumentParser) -> None:
    """The sentiment task's options (shared by demo and sweep) and the training options they may override."""
    p.add_argument("--model", default="embedded", help="reference and starting policy (default: embedded)")
    p.add_argument("--train-prompts", default=None, help="prompts to make training pairs from (default: the "
                   "built-in 280 movie-review openings)")
    p.add_argument("--eval-prompts", default=None, help="held-out prompts (default: the built-in 60)")
    p.add_argument("--reward", default="sentiment", help="ground-truth reward (see `dpokit eval --help`)")
    p.add_argument("--samples", type=int, default=4, help="samples per training prompt to pair (default: 4)")
    p.add_argument("--pairing", choices=("best-worst", "all"), default="all",
                   help="pair every two samples whose rewards differ, or only best vs worst (default: all)")
    p.add_argument("--k", type=int, default=4, help="samples per held-out prompt, each model (default: 4)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts of each split (quick look)")
    p.add_argument("--seed", type=int, default=0)
    for name, kind in TRAIN_OVERRIDES:
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help="training option (default: the demo's, see docs/RESULTS.md)")


# the demo's options recorded in demo.json (task flags, training overrides, budget)
DEMO_OPTIONS = ("model", "train_prompts", "eval_prompts", "limit", "reward", "samples", "pairing", "k",
                "max_new_tokens", "seed", *(name for name, _ in TRAIN_OVERRIDES), "minutes")


def task_from_args(args):
    from dpokit.tasks.demo import SentimentTask
    task = SentimentTask(model=args.model, train_prompts=args.train_prompts, eval_prompts=args.eval_prompts,
                         limit=args.limit, reward=args.reward, samples=args.samples, pairing=args.pairing, k=args.k,
                         max_new_tokens=args.max_new_tokens, seed=args.seed)
    overrides = {k: getattr(args, k) for k, _ in TRAIN_OVERRIDES if getattr(args, k) is not None}
    return task, overrides


def cmd_demo(args) -> int:
    from dpokit.tasks.demo import run_demo
    from dpokit.tasks.demo_state import DemoInterrupted, resume_options
    if args.resume:  # options left at their defaults take the interrupted demo's values
        defaults = vars(args.demo_defaults())  # the demo parser's defaults (no import of the CLI above)
        names = [k for k in DEMO_OPTIONS if hasattr(args, k)]
        merged = resume_options(Path(args.output_dir), {k: getattr(args, k) for k in names},
                                {k: defaults[k] for k in names})
        for k, v in merged.items():
            setattr(args, k, v)
    task, overrides = task_from_args(args)
    try:
        run_demo(args.output_dir, task, minutes=args.minutes, resume=args.resume, progress=args.progress,
                 started_at=args.started_at,
                 **overrides)
    except DemoInterrupted as e:  # one line, no traceback: the user asked it to stop
        print(f"dpokit demo: {e}", file=sys.stderr)
        return 128 + e.signum
    return 0


def cmd_sweep(args) -> int:
    from dpokit.tasks.sweep import run_sweep
    task, overrides = task_from_args(args)
    best_of = args.best_of  # a tuple: parsed by int_list
    # --online, --rlhf-kl and --ppo-gt-kl are checked by run_sweep before it samples anything (tasks/sweep_rl.py)
    from dpokit.loop.signals import TrainingInterrupted
    try:
        run_sweep(args.output_dir, args.axis, task, args.checkpoints, best_of, args.preferred_ft,
                  args.keep_checkpoints, args.online, args.online_steps, args.rlhf_kl, args.ppo_gt_kl, progress=False,
                  **overrides)
    except TrainingInterrupted as e:  # one line, no traceback: the user asked it to stop
        print(f"dpokit sweep: stopped by {signal.Signals(e.signum).name} (checkpoint {e.checkpoint}); the same "
              "command continues: finished runs are reused and this one resumes from its checkpoint", file=sys.stderr)
        return 128 + e.signum
    return 0


def _read_json(path: Path):
    from dpokit.data import DataError
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # a damaged file is the user's to fix, not a dpokit bug
        raise DataError(str(path), None, None, f"not valid JSON: {e}", "invalid_json") from None


def int_list(text: str) -> tuple[int, ...]:
    """'1,4,16' → (1, 4, 16); argparse reports a ValueError here as a usage error."""
    return tuple(int(n) for n in text.split(",") if n.strip())


def cmd_report(args) -> int:
    from dpokit.report import write_report
    run = Path(args.run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    eval_path = Path(args.eval) if args.eval else run / "eval.json"
    result = _read_json(eval_path) if eval_path.is_file() else None
    frontier = _read_json(run / "frontier.json") if (run / "frontier.json").is_file() else {}
    print(f"wrote {write_report(run, result, frontier=frontier)}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="the DPO paper's sentiment experiment in miniature: sample pairs from the "
                       "embedded model, train DPO, evaluate win rate and KL, write report.html; sized to "
                       "--minutes, resumable")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--minutes", type=float, default=15.0, help="time budget: the demo measures the machine "
                   "(~2 s), then sizes training steps, training prompts and evaluation to fit it and prints the "
                   "plan (default: 15)")
    p.add_argument("--started-at", type=float, default=None, help="Unix time the budget counts from (`make demo` "
                   "passes the time before its install, so the install comes out of --minutes; default: now)")
    p.add_argument("--resume", action="store_true", help="continue the demo recorded in --output-dir "
                   "(demo.json): reuse its pairs, resume training from the newest checkpoint, redo what is "
                   "missing; options not given are taken from the record, different ones are refused")
    add_task_flags(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=cmd_demo, demo_defaults=lambda demo=p: demo.parse_args([]))

    p = sub.add_parser("sweep", help="the reward–KL frontier: DPO runs differing in one option (e.g. "
                       "beta=0.05,0.1,0.5,1), checkpoints evaluated along each, with Preferred-FT and Best-of-N "
                       "baselines and optionally online ones (GRPO, online DPO, RLHF = reward model + PPO, PPO-GT), "
                       "on one plot (frontier.png, frontier.json with each series' costs, report.html)")
    p.add_argument("axis", help="OPTION=V1,V2,… any training option, e.g. beta=0.05,0.1,0.5,1")
    p.add_argument("--output-dir", default="runs/sweep")
    add_task_flags(p)
    p.add_argument("--checkpoints", type=int, default=3, help="evaluated checkpoints per run besides the final "
                   "model (default: 3)")
    p.add_argument("--best-of", type=int_list, default="1,4,16",
                   help="N of the Best-of-N baseline (default: 1,4,16; '' for none)")
    p.add_argument("--preferred-ft", action=argparse.BooleanOptionalAction, default=True,
                   help="train the Preferred-FT baseline (SFT on chosen completions)")
    p.add_argument("--online", default="", help="also train online methods on the training prompts and put their "
                   "checkpoints and final models on the plot (comma-separated): grpo, online-dpo, rlhf (a reward "
                   "model trained on the sweep's pairs, then PPO against it, one series per --rlhf-kl), ppo-gt (PPO "
                   "on --reward directly)")
    p.add_argument("--online-steps", type=int, default=35, help="steps of each online run, 16 prompts × --samples "
                   "completions each: every online method samples as many (default: 35)")
    p.add_argument("--rlhf-kl", default=None, help="KL coefficients of the rlhf series (PPO's --kl-coef), "
                   "comma-separated (default: 0.02,0.05,0.1)")
    p.add_argument("--ppo-gt-kl", default=None, help="KL coefficient of the ppo-gt series (default: 0.05)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints (default: deleted "
                   "once evaluated; each holds optimizer state)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("make-pairs", help="preference pairs from prompts: sample completions, score them with a "
                       "reward function, pair best vs worst (or all; or --ranked: one row of all scored samples "
                       "per prompt); rows keep the model's log-probs of the sampled ids, which training with it as "
                       "reference uses instead of recomputing them")
    p.add_argument("--prompts", required=True, help="file with a 'prompt' field per row (string or messages)")
    p.add_argument("--output", required=True, help="pairs file to write (.jsonl)")
    p.add_argument("--model", default="embedded")
    add_sampling_flags(p, 4, "completions sampled per prompt (default: 4)")
    p.add_argument("--pairing", choices=("best-worst", "all"), default=None, help="pair best vs worst sample, or "
                   "every two whose rewards differ (default: best-worst)")
    p.add_argument("--min-gap", type=float, default=None, help="leave out pairs whose rewards differ by at most this "
                   "(counted; default 0: only exact ties)")
    p.add_argument("--ranked", action="store_true", help="write one ranked row per prompt instead of pairs: its "
                   "distinct non-empty samples, their rewards as scores, truncated flags and the model's log-probs "
                   "per sample; training pairs them by --ranked-pairs and computes each completion once")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error")
    p.set_defaults(func=cmd_make_pairs)

    p = sub.add_parser("report", help="(re)write RUN_DIR/report.html from metrics.jsonl, config.yaml, eval.json "
                       "and a sweep's frontier.json")
    p.add_argument("run_dir")
    p.add_argument("--eval", default=None, help="eval.json to show (default: RUN_DIR/eval.json if present)")
    p.set_defaults(func=cmd_report)
