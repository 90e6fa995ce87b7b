"""`dpokit` command line. Flags are generated from TrainConfig, so `--help` always matches the code."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import yaml

from dpokit.config import ConfigError, TrainConfig
from dpokit.options import GROUPS, SEVERAL_VALUES
from dpokit.tasks.commands import add_commands, add_sampling_flags


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)
    parse.__name__ = kind.__name__
    return parse


# Options a command sets, never a flag: the stage (train: a policy, train-rm: a reward model, sft: SFT)
SET_BY_COMMAND = ("stage",)


def add_config_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One flag per TrainConfig field (or those in `only`), in one `--help` section per option group
    (options.GROUPS); unset flags stay absent so YAML values are not overridden."""
    parser.add_argument("--config", help="YAML file of options (keys as below, with _ or -); flags override it")
    # remembered so that a subcommand's own flags (eval's --seed, --max-new-tokens) never reach TrainConfig
    parser.set_defaults(config_keys=only)
    for group, (title, description) in GROUPS.items():
        members = [f for f in fields(TrainConfig) if f.metadata["group"] == group and f.name not in SET_BY_COMMAND
                   and (only is None or f.name in only)]
        section = parser.add_argument_group(title, description) if members else None
        for f in members:
            _add_flag(section, f)


def _add_flag(section, f) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata["help"] + (f" (default: {f.default})" if f.default is not None else "")
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    base = kind.replace("| None", "").replace("| list", "").strip()  # lists come in as "a,b" on the CLI
    if base == "bool":
        section.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                             help=help_text)
        return
    convert = {"int": int, "float": float, "str": str}[base]
    if "None" in kind:
        convert = _parse_optional(convert)
    choices = f.metadata.get("choices")
    several = {"nargs": "+"} if f.name in SEVERAL_VALUES else {}  # `--data a b`: paths may hold commas, no "a,b"
    section.add_argument(flag, dest=f.name, type=convert, default=argparse.SUPPRESS, choices=choices,
                         metavar=None if choices else base.upper(), help=help_text, **several)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    keys = args.config_keys if args.config_keys is not None else [f.name for f in fields(TrainConfig)]
    # one value of a several-values flag stays a string: a one-file run's config is what it was
    values = {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k in keys if hasattr(args, k)
              for v in [getattr(args, k)]}
    if args.config:
        return TrainConfig.from_yaml(args.config, overrides=values)
    return TrainConfig.from_dict(values, source="command line")


def given_options(args: argparse.Namespace) -> dict[str, tuple]:
    """{key: (value, where from)} of the TrainConfig options the user set: flags, and the keys of a
    --config file (flags win). eval and score take the others from the run."""
    given = {}
    if args.config:
        from_file = TrainConfig.from_yaml(args.config)  # refuses an unreadable or invalid file first
        keys = (yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}).keys()
        given = {k.replace("-", "_"): (getattr(from_file, k.replace("-", "_")), args.config) for k in keys}
    flags = args.config_keys if args.config_keys is not None else [f.name for f in fields(TrainConfig)]
    return given | {k: (getattr(args, k), "--" + k.replace("_", "-")) for k in flags if hasattr(args, k)}


def cmd_train(args) -> int:
    cfg = config_from_args(args)  # refuses a bad option before torch loads
    from dpokit.loop import train
    from dpokit.loop.signals import TrainingInterrupted
    try:
        result = train(cfg)
    except TrainingInterrupted as e:
        print(f"dpokit: {e}", file=sys.stderr)
        return 128 + e.signum
    if result.eval_before and result.eval_after and os.environ.get("RANK", "0") == "0":  # once under torchrun
        b, a = result.eval_before, result.eval_after
        start = f"at resume (step {result.resumed_at})" if result.resumed_at else "before"
        print(f"held-out implicit-reward accuracy: {b['eval/rewards/accuracies']:.3f} {start} → "
              f"{a['eval/rewards/accuracies']:.3f} after")
    return 0


def cmd_train_rm(args) -> int:
    cfg = config_from_args(args)  # stage = reward_model (set by the subparser); refuses unread options first
    if "output_dir" not in cfg.given:  # not beside a policy's runs/dpo
        cfg = TrainConfig.from_dict({**{k: getattr(cfg, k) for k in cfg.given}, "output_dir": "runs/rm"})
    from dpokit.loop import train
    from dpokit.loop.signals import TrainingInterrupted
    try:
        result = train(cfg)
    except TrainingInterrupted as e:
        print(f"dpokit: {e}", file=sys.stderr)
        return 128 + e.signum
    if result.eval_before and result.eval_after:
        start = f"at resume (step {result.resumed_at})" if result.resumed_at else "before"
        print(f"held-out reward-model accuracy: {result.eval_before['eval/accuracy']:.3f} {start} → "
              f"{result.eval_after['eval/accuracy']:.3f} after; use it with --reward {result.final_dir}")
    return 0


def cmd_sft(args) -> int:
    cfg = config_from_args(args)  # stage = sft (set by the subparser); refuses unread options first
    if "output_dir" not in cfg.given:  # not beside a DPO run's runs/dpo
        cfg = TrainConfig.from_dict({**{k: getattr(cfg, k) for k in cfg.given}, "output_dir": "runs/sft"})
    from dpokit.loop import train
    from dpokit.loop.signals import TrainingInterrupted
    try:
        result = train(cfg)
    except TrainingInterrupted as e:
        print(f"dpokit: {e}", file=sys.stderr)
        return 128 + e.signum
    if result.eval_before and result.eval_after and os.environ.get("RANK", "0") == "0":
        start = f"at resume (step {result.resumed_at})" if result.resumed_at else "before"
        print(f"held-out loss (NLL per trained token): {result.eval_before['eval/loss']:.4f} {start} → "
              f"{result.eval_after['eval/loss']:.4f} after; DPO from it: dpokit train --model {result.final_dir}")
    return 0


def cmd_estimate(args) -> int:
    from dpokit.estimate import report, world_size
    from dpokit.loop.result import pick_device
    cfg = config_from_args(args)
    text, _, _ = report(cfg, args.processes or world_size(), pick_device(cfg.device))
    print(text)
    return 0


def cmd_cache_ref(args) -> int:
    from dpokit.loop.reference import cache_reference
    cache_reference(config_from_args(args))
    return 0


def cmd_data_check(args) -> int:
    """Report on every file, listing all invalid rows; exit 1 if a file is unusable, or has invalid rows
    and --on-bad-row is error (training would stop on them)."""
    from dpokit.data import DataError
    from dpokit.data.check import check_file, format_check, format_totals
    from dpokit.models import load_tokenizer
    tokenizer = load_tokenizer(args.model)
    all_stats, unusable = [], 0
    for path in args.files:
        try:
            stats = check_file(path, tokenizer, args.max_length, args.max_prompt_length, args.ranked_pairs,
                               args.ultrafeedback_score)
        except DataError as e:  # the whole file is unreadable
            print(f"dpokit: error: {e}", file=sys.stderr)
            unusable += 1
            continue
        print(format_check(stats))
        all_stats.append(stats)
        unusable += stats[stats["unit"]] == 0  # no pair (or, unpaired, no completion) to train on
    if len(all_stats) > 1:
        print(format_totals(all_stats))
    invalid = sum(s["invalid"]["count"] for s in all_stats) if args.on_bad_row == "error" else 0
    problems = ([f"{unusable} unusable file(s)"] if unusable else []) + (
        [f"{invalid} invalid row(s) (--on-bad-row skip would skip them)"] if invalid else [])
    if problems:
        print("dpokit: error: " + "; ".join(problems), file=sys.stderr)
    return 1 if problems else 0


def cmd_losses(args) -> int:
    from dpokit.objectives import OBJECTIVES
    print(f"{'name':<13} {'data':<9} {'reference':<10} {'options':<46} description — paper")
    for o in OBJECTIVES.values():
        ref = "needed" if o.reference is True else "none" if o.reference is False else f"{o.reference}>0"
        options = textwrap.wrap(", ".join(o.options), 46) or ["-"]  # long lists go on to the next lines
        print(f"{o.name:<13} {o.data:<9} {ref:<10} {options[0]:<46} {o.summary} — {o.paper}")
        for more in options[1:]:
            print(f"{'':<34} {more}")
    print("\nOnline DPO: --online-dpo --reward R trains any paired objective above on best-vs-worst pairs sampled "
          "from the policy each step (Guo et al. 2024, arXiv:2402.04792); --rounds K makes it iterative DPO.")
    print("\nCombine with weights: --loss sigmoid,sft --loss-weights 1.0,0.2 (RPO). Modifiers for objectives with a "
          "reference: --f-divergence, --use-weighting (WPO), --ld-alpha (LD-DPO), --sync-ref-every (TR-DPO).")
    return 0


def cmd_eval(args) -> int:
    from dpokit.evaluation.offline import evaluate_file, resolve
    from dpokit.tasks.commands import generation_eval, write_eval
    if not args.pairs and not args.prompts:
        raise ConfigError("eval needs held-out PAIRS, --prompts for generation metrics, or both")
    settings = resolve(args.model_dir, given_options(args), args.against)
    ref_model = settings.ref_model
    if args.pairs:
        print(f"implicit reward β·(log π − log π_ref): {settings.describe()}")
    result = {"model": args.model_dir, "ref_model": ref_model}
    if args.pairs:
        result.update(evaluate_file(args.model_dir, settings, args.pairs))
    if args.prompts:
        result["generation"] = generation_eval(args, args.model_dir, ref_model)
    for key, value in result.items():
        if key != "generation":
            print(f"{key:<28} {value:.4f}" if isinstance(value, float) else f"{key:<28} {value}")
    if args.prompts:
        from dpokit.tasks.demo import headline
        print(f"generation ({args.samples} samples × {result['generation']['prompts']} prompts): "
              f"{headline(result['generation'])}")
    if args.output:
        write_eval(result, args.output, args.model_dir)
    return 0


def cmd_score(args) -> int:
    from dpokit.evaluation.offline import resolve, reward_formula, score_completions
    settings = resolve(args.model_dir, given_options(args), args.against, reference="if_needed")
    ranked = score_completions(args.model_dir, settings, args.prompt, args.completion)
    note = "; ld_alpha not applied (candidates are not a pair)" if settings.cfg.ld_alpha is not None else ""
    print(f"implicit reward {reward_formula(settings)}: {settings.describe()}{note}; best first:")
    for reward, completion in ranked:
        print(f"{reward:+10.4f}  {completion!r}")
    return 0


def cmd_bench(args) -> int:
    from dpokit import bench
    bench.run(args)
    return 0


RUN_SETTINGS = ("For a model saved by a dpokit run (runs/x/final or a checkpoint folder), β, the loss and its "
                "options, ld_alpha and the length limits come from the run's config.yaml unless given here (the "
                "defaults shown below apply otherwise); the reference is the run's. Printed: which were used, "
                "and where from.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpokit", description="Align a language model from preference pairs "
                                     "with Direct Preference Optimization.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train with DPO on preference pairs or ranked rows (k scored "
                             "completions per prompt) (no arguments: embedded model and built-in pairs)",
                             description="Train with DPO. Every option can also be set in a YAML --config.")
    add_config_flags(p_train)
    p_train.set_defaults(func=cmd_train)

    p_rm = sub.add_parser("train-rm", help="train a Bradley–Terry reward model on preference pairs or ranked rows "
                          "(the RLHF reward model; its final/ works as --reward DIR)",
                          description="Fit a reward model r(x, y), a one-label sequence classifier built from "
                          "--model's weights with a fresh score head, to the pairs by −log σ(r_chosen − r_rejected "
                          "− margin) (a row's optional numeric `margin`; --center-rewards-coefficient adds TRL's "
                          "c·mean((r_c + r_r)²)). A row reads the chat-rendered conversation when the tokenizer has "
                          "a chat template, else prompt + completion, cut at --max-length: exactly what --reward "
                          "DIR scores with final/. Same data, optimisation, LoRA, checkpoint and resume options as "
                          "`train`; those a reward model does not read (--loss, --beta, the reference, online and "
                          "packing options, …) are refused. Metrics: loss, accuracy, margin, rewards/chosen, "
                          "rewards/rejected; held-out eval/accuracy, eval/loss, eval/margin. Default --output-dir: "
                          "runs/rm.")
    add_config_flags(p_rm)
    p_rm.set_defaults(func=cmd_train_rm, stage="reward_model")

    p_sft = sub.add_parser("sft", help="supervised fine-tuning on demonstrations (prompt/completion or messages "
                           "rows, or the chosen side of pairs), the stage before DPO (no arguments: embedded model, "
                           "built-in pairs' chosen completions)",
                           description="Fine-tune --model on demonstrations by the mean negative log-likelihood of "
                           "their trained tokens over each step, L = −(1/N) Σ log π(y_t | y_<t), N the step's trained "
                           "tokens (TRL's SFTTrainer with completion_only_loss / assistant_only_loss). Rows: prompt + "
                           "completion (strings, EOS added, or message lists: the completion is trained on), messages "
                           "(a conversation through the chat template: every assistant turn is trained on), or a "
                           "preference file (each pair's chosen completion). Rows over --max-length keep their start. "
                           "Same data, optimisation, packing (--pack-tokens: demonstrations per row), LoRA, checkpoint, "
                           "resume and torchrun (DDP) options as `train`; those SFT does not read (--loss, --beta, the "
                           "reference, --max-prompt-length, --fsdp, online options, …) are refused. Metrics: loss, "
                           "num_tokens; held-out eval/loss. Default --output-dir: runs/sft; then `dpokit train --model "
                           "runs/sft/final` trains DPO from it.")
    add_config_flags(p_sft)
    p_sft.set_defaults(func=cmd_sft, stage="sft")

    p_est = sub.add_parser("estimate", help="expected peak memory of `train` with the same options, by part, from "
                           "the model's config alone (no weights loaded), and what would fit if it does not",
                           description="Takes the same options as `train`. Lengths: --data's own (its "
                           "--batch-size longest examples, as train checks), else the worst case of --max-length. "
                           "Options that do not change memory (learning rate, beta, schedule, --eval-data, "
                           "--output-dir, logging) are accepted and ignored. Online runs (GRPO, online DPO) are "
                           "not modelled (docs/PERFORMANCE.md).")
    add_config_flags(p_est)
    p_est.add_argument("--processes", type=int, default=None, help="processes of the run (default: the torchrun world "
                       "size, else 1): FSDP's share; on a CPU they share the machine, so each is compared with "
                       "1/N of its free memory")
    p_est.set_defaults(func=cmd_estimate)

    p_cache = sub.add_parser("cache-ref", help="compute the reference log-probs a `train` with the same options "
                             "will reuse (cached on disk), then stop",
                             description="Takes the same options as `train`; only those that change the "
                             "reference log-probs matter (models, data, eval-data, lengths, ld-alpha, batch sizes).")
    add_config_flags(p_cache)
    p_cache.set_defaults(func=cmd_cache_ref)

    p_eval = sub.add_parser("eval", help="a trained model against its reference: held-out preference metrics "
                            "(accuracy, margins, log-prob shift) and/or generation metrics (reward, win rate, KL, "
                            "length) from sampled completions; --output writes eval.json and report.html",
                            description=RUN_SETTINGS)
    p_eval.add_argument("model_dir", help="trained model (e.g. runs/x/final)")
    p_eval.add_argument("pairs", nargs="?", default=None, help="held-out pairs file (any supported format)")
    p_eval.add_argument("--prompts", default=None, help="prompts file for generation metrics (a 'prompt' field "
                        "per row; a pairs file works)")
    add_sampling_flags(p_eval, 4, "completions per prompt from each model (default: 4)")
    p_eval.add_argument("--against", default=None, help="reference model (default: the run's reference or "
                        "starting model, read from runs/x/config.yaml)")
    p_eval.add_argument("--output", default=None, help="write the metrics as JSON here (e.g. runs/x/eval.json), "
                        "and report.html with plots beside it")
    add_config_flags(p_eval, only=("beta", "loss", "ld_alpha", "max_length", "max_prompt_length", "eval_batch_size",
                                   "on_bad_row", "ranked_pairs", "ultrafeedback_score", "device", "dtype", "model_dtype",
                                   "prefix_sharing", "pack_tokens"))
    p_eval.set_defaults(func=cmd_eval)

    p_score = sub.add_parser("score", help="rank candidate completions of a prompt by the implicit reward "
                             "β·(log π − log π_ref): your language model is secretly a reward model",
                             description=RUN_SETTINGS + " Without a reference (a reference-free loss, no --against) "
                             "the reward is that objective's: β·log π, or β·(mean token log π) for simpo and orpo.")
    p_score.add_argument("model_dir", help="trained model (e.g. runs/x/final)")
    p_score.add_argument("--prompt", required=True)
    p_score.add_argument("--completion", action="append", required=True, help="a candidate (repeat the flag)")
    p_score.add_argument("--against", default=None, help="reference model (default: the run's reference or "
                         "starting model; none for a reference-free --loss such as simpo)")
    add_config_flags(p_score, only=("beta", "loss", "max_length", "max_prompt_length", "device", "dtype", "model_dtype"))
    p_score.set_defaults(func=cmd_score)

    from dpokit import bench
    p_bench = sub.add_parser("bench", help="time dpokit against TRL's DPOTrainer on the same pairs (each tool in "
                             "its own process): s/pair, tokens/s, GFLOP/s vs measured peak, peak RSS, ratios")
    bench.add_arguments(p_bench)
    p_bench.set_defaults(func=cmd_bench)

    p_losses = sub.add_parser("losses", help="list every objective: description, paper, data, reference")
    p_losses.set_defaults(func=cmd_losses)

    add_commands(sub)

    p_data = sub.add_parser("data", help="inspect preference (and demonstration) files")
    data_sub = p_data.add_subparsers(dest="data_command", required=True)
    p_check = data_sub.add_parser("check", help="load and tokenize files, reporting formats, every invalid row, "
                                  "duplicates, token lengths, truncation and chosen/rejected length bias; unpaired "
                                  "(KTO) files: label balance and completions labelled both ways; ranked files: "
                                  "completions per prompt, pairs per pairing, tokens with each completion once; "
                                  "demonstrations (`dpokit sft`): trained tokens, assistant turns, truncation",
                                  description="Exits 1 if a file is unusable, or has invalid rows and "
                                  "--on-bad-row is error (the default); with skip, invalid rows are listed only.")
    p_check.add_argument("files", nargs="+")
    p_check.add_argument("--model", default="embedded", help="tokenizer to use (default: embedded)")
    p_check.add_argument("--max-length", type=int, default=TrainConfig.max_length)
    p_check.add_argument("--max-prompt-length", type=_parse_optional(int), default=TrainConfig.max_prompt_length)
    p_check.add_argument("--on-bad-row", choices=("error", "skip"), default="error")
    for name in ("ranked_pairs", "ultrafeedback_score"):  # ranked files: the pairs loaded, as `train` takes them
        f = next(f for f in fields(TrainConfig) if f.name == name)
        p_check.add_argument("--" + name.replace("_", "-"), choices=f.metadata["choices"], default=f.default,
                             help=f.metadata["help"] + f" (default: {f.default})")
    p_check.set_defaults(func=cmd_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is not cmd_losses:  # the table alone needs neither torch nor transformers
        # transformers' per-load progress bars ("Loading weights …") drown dpokit's own report
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except Exception as e:
        if not isinstance(e, _own_errors()):  # dpokit's own types only: any other error is a bug, shown as one
            raise
        print(f"dpokit: error: {e}", file=sys.stderr)
        return 2


# dpokit's error types, by module: a command that never loaded a module cannot have raised its error
_ERRORS = {"dpokit.data.errors": "DataError", "dpokit.models.load": "ModelError",
           "dpokit.loop.checkpoint": "CheckpointError", "dpokit.loop.steps": "NonFiniteError",
           "dpokit.evaluation.rewards": "RewardError", "dpokit.distributed": "DistributedError"}


def _own_errors() -> tuple[type, ...]:
    loaded = tuple(getattr(sys.modules[m], name) for m, name in _ERRORS.items() if m in sys.modules)
    return (ConfigError, FileNotFoundError) + loaded


if __name__ == "__main__":
    sys.exit(main())
