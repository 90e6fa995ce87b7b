"""What TrainConfig.validate refuses, in one style: each check yields the message of a problem, naming the
option and what would be allowed; validate raises the first. In the order checked:

  1. loss_problems: known objectives, each once, one non-negative weight each, of data kinds that go together
  2. unread_problems: an option the caller set (TrainConfig.requested) that this run would not read: another
     kind of run reads it (field `runs`), or a condition it needs does not hold (field `needs`: NEEDS below;
     an objective's option needs a selected objective that reads it, from the registry's Objective.options)
  3. value_problems: each option's range (field `valid`) and choices; report_problems: --report-to's trackers
     known, and their packages installed (before any model loads)
  4. combination_problems: values that would train wrongly together: each objective's own check and traits
     (registry), online training, LoRA, precision, FSDP

What depends on the objective comes from objectives/registry.py, so adding an objective adds no rule here.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import fields
from typing import Iterator

from dpokit.objectives.registry import DATA, OBJECTIVES, needs_reference
from dpokit.options import (ITERATIVE_DPO, OFFLINE, ONLINE_DPO, ONLINE_OBJECTIVE, REWARD_MODEL, SFT, as_list, data_files,
                            in_range, weight_values)


def problems(cfg) -> Iterator[str]:
    yield from loss_problems(cfg)
    yield from unread_problems(cfg)
    yield from value_problems(cfg)
    yield from report_problems(cfg)
    yield from mixture_problems(cfg)
    yield from objective_combinations(cfg)
    yield from online_combinations(cfg)
    yield from precision_combinations(cfg)


def _said(cfg, key: str) -> str:
    return f"{key} = {getattr(cfg, key)!r}"


# ---- 1. the objectives ------------------------------------------------------------------------------------

def loss_problems(cfg) -> Iterator[str]:
    names = cfg.loss_names
    unknown = [n for n in names if n not in OBJECTIVES]
    if not names or unknown:
        yield (f"loss = {cfg.loss!r}: unknown objective(s) {unknown}; choose from {', '.join(OBJECTIVES)} "
               "(`dpokit losses` describes them)")
        return  # the checks below look the names up
    if len(set(names)) != len(names):
        yield f"loss = {cfg.loss!r}: an objective is listed twice"
    try:
        weights = cfg.loss_weight_values
    except (TypeError, ValueError):
        yield f"loss_weights = {cfg.loss_weights!r}: expected numbers"
        return
    if len(weights) != len(names) or any(w < 0 for w in weights):
        yield (f"loss_weights = {cfg.loss_weights!r}: need {len(names)} non-negative weight(s), one per objective "
               f"in {names}")
    for o in cfg.objectives:  # paired objectives combine; an unpaired or online one trains alone
        if o.data != "paired" and (len(names) > 1 or cfg.online_dpo and o.data == "online"):
            yield (f"loss = {cfg.loss!r}: {o.name} is an {o.data} objective on its own (it trains on {DATA[o.data]}); "
                   "it cannot be combined with other objectives" + (" or --online-dpo" if o.data == "online" else ""))
        if cfg.online_dpo and o.data != "paired":
            yield f"--online-dpo pairs completions: {o.name} ({o.data}) does not apply"


# ---- 2. options set where nothing reads them ----------------------------------------------------------------

def unread_problems(cfg) -> Iterator[str]:
    run = cfg.run_kind
    for key in sorted(cfg.requested()):  # alphabetically: the first one gets the message
        meta = cfg.__dataclass_fields__[key].metadata
        if run not in meta["runs"]:
            yield f"{_said(cfg, key)} {_not_read_by(run, meta['runs'], cfg.loss)}"
        read_by_objective = any(key in o.options for o in OBJECTIVES.values())
        for need in meta["needs"] + (("objective",) if read_by_objective else ()):
            problem = NEEDS[need](cfg, key)
            if problem:
                yield problem


def _not_read_by(run: str, runs: tuple[str, ...], loss) -> str:
    if runs == (REWARD_MODEL,):
        return "only applies to `dpokit train-rm` (a reward model)"
    if run == REWARD_MODEL:  # a Bradley–Terry classifier on the pairs file (loop/reward_model.py)
        return ("is not read by `dpokit train-rm`: a reward model has no --loss, reference or sampling; it trains in "
                "one process on padded prompt+completion rows (no prompt cap, packing, attention kernels or "
                "--pure-half) and always merges LoRA into final/")
    if run == SFT:  # the NLL of demonstrations (loop/sft.py)
        return ("is not read by `dpokit sft`: supervised fine-tuning has no --loss (always the NLL of the completion "
                "or assistant tokens), reference, pair options or sampling; it reads demonstrations (rows cut at "
                "--max-length keeping their start, no prompt cap) and runs DDP under torchrun (no --fsdp, no "
                "--pure-half)")
    if run == OFFLINE:
        return "only applies to online training: add --loss grpo, rloo or ppo, or --online-dpo"
    if runs == (ONLINE_OBJECTIVE,):
        return "only applies to --loss grpo, rloo or ppo, not --online-dpo"
    if run == ONLINE_OBJECTIVE and ONLINE_DPO in runs:
        return f"has no effect on loss {loss} (its KL weight is --kl-coef)"
    if run == ITERATIVE_DPO and ONLINE_DPO in runs:  # held-out prompts: per-step online runs only
        return ("is not read by iterative DPO (--rounds) yet: its rounds do not evaluate on --eval-prompts; "
                "per-step online DPO (--online-dpo without --rounds) does")
    return ("is not used by online training (it samples its own data from --prompts and evaluates on "
            "--eval-prompts; no held-out pairs; under torchrun it runs DDP, without --fsdp)")


def _needs_lora(cfg, key: str) -> str | None:
    return None if cfg.lora_r else f"{_said(cfg, key)} has no effect without LoRA: set --lora-r"


def _needs_reference(cfg, key: str) -> str | None:
    if needs_reference(cfg.loss_names, cfg):
        return None
    gated = [o for o in cfg.objectives if isinstance(o.reference, str)]
    if gated:
        return f"{key} is only used by {gated[0].name} with {gated[0].reference} > 0 (0 loads no reference)"
    return (f"{_said(cfg, key)} needs a reference model, but loss {','.join(cfg.loss_names)} is reference-free; "
            "remove it or add a reference objective")


def _needs_paired(cfg, key: str) -> str | None:
    other = [o.name for o in cfg.objectives if o.data != "paired"]
    return f"{_said(cfg, key)} is a paired-DPO modifier; {', '.join(other)} does not use it" if other else None


def _needs_objective(cfg, key: str) -> str | None:
    if any(key in o.options for o in cfg.objectives):
        return None
    owners = [n for n, o in OBJECTIVES.items() if key in o.options]
    return (f"{_said(cfg, key)} has no effect on loss {','.join(cfg.loss_names)}: it is used by {', '.join(owners)}; "
            "remove it or change --loss")


NEEDS = {  # name (a field's `needs`) → (cfg, key) → why setting `key` has no effect here, or None
    "lora": _needs_lora,
    "reference": _needs_reference,
    "paired": _needs_paired,
    "objective": _needs_objective,
    "alpha_divergence": lambda cfg, key: None if cfg.f_divergence == "alpha" else (
        f"{_said(cfg, key)} only applies with f_divergence alpha"),
    "moving_reference": lambda cfg, key: None if cfg.sync_ref_every else (
        f"{_said(cfg, key)} only applies with sync_ref_every > 0"),
    "prefix_sharing": lambda cfg, key: None if cfg.prefix_sharing or not cfg.pack_tokens else (
        "pack_tokens needs prefix_sharing (packing places prompt+chosen+rejected segments); set --pack-tokens 0 "
        "or drop --no-prefix-sharing"),
}


# ---- 3. values ------------------------------------------------------------------------------------------

def value_problems(cfg) -> Iterator[str]:
    run = cfg.run_kind
    for f in fields(cfg):
        if run not in f.metadata["runs"]:  # not read by this run (set, unread_problems refused it): any value is moot
            continue
        value, choices, valid = getattr(cfg, f.name), f.metadata["choices"], f.metadata["valid"]
        if choices and value not in choices:
            yield f"{_said(cfg, f.name)} is out of range: must be one of {', '.join(choices)}"
        elif valid and value is not None:  # null: the option is off
            ok, allowed = in_range(valid, value, cfg)
            if not ok:
                yield f"{_said(cfg, f.name)} is out of range: {allowed}"


# --report-to name → (modules it imports, pyproject extra that installs them); TRL's names (loop/trackers.py)
TRACKERS = {"tensorboard": (("tensorboard",), "tensorboard"), "wandb": (("wandb",), "wandb"),
            "trackio": (("trackio",), "trackio"), "mlflow": (("mlflow",), "mlflow")}
# MLflow's default store (no MLFLOW_TRACKING_URI: sqlite:///mlflow.db) needs these; mlflow-skinny lacks them
MLFLOW_SQL = ("sqlalchemy", "alembic")


def mixture_problems(cfg) -> Iterator[str]:
    """Several --data files (data/mixture.py): offline pair and KTO runs mix them; weights, one positive per file."""
    files = data_files(cfg.data)
    if len(files) > 1 and cfg.stage in (REWARD_MODEL, SFT):
        yield (f"data = {files}: `dpokit {'train-rm' if cfg.stage == REWARD_MODEL else 'sft'}` reads one --data file "
               "for now (offline `dpokit train` mixes several); join the files, or train on one")
    if cfg.data_weights is None:
        return
    try:
        weights = weight_values(cfg.data_weights)
    except (TypeError, ValueError):
        yield f"data_weights = {cfg.data_weights!r}: expected numbers, one per --data file"
        return
    if len(files) < 2:
        yield f"data_weights = {cfg.data_weights!r} has no effect on one --data file: give several, or drop it"
    elif len(weights) != len(files):
        yield f"data_weights = {cfg.data_weights!r}: {len(weights)} weight(s) for {len(files)} --data files {files}"
    elif not all(math.isfinite(w) and w > 0 for w in weights):
        yield f"data_weights = {cfg.data_weights!r}: each weight must be a positive number"


def report_problems(cfg) -> Iterator[str]:
    names = as_list(cfg.report_to)
    unknown = [n for n in names if n not in TRACKERS and n != "none"]
    if unknown or not names:
        yield (f"report_to = {cfg.report_to!r}: " + (f"unknown tracker {', '.join(unknown)}; " if unknown else "")
               + f"choose 'none' or one or more of {', '.join(TRACKERS)}, comma-separated")
    elif "none" in names and len(names) > 1 or len(set(names)) != len(names):
        yield f"report_to = {cfg.report_to!r}: name each tracker once, or 'none' alone"
    for name in tracker_names(cfg) if not unknown else ():
        modules, extra = TRACKERS[name]
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if name == "mlflow" and (not uri or uri.startswith("sqlite")):
            modules += MLFLOW_SQL
        missing = [m for m in modules if not _installed(m)]
        if missing:
            store = " for MLflow's default store sqlite:///mlflow.db" if missing[0] in MLFLOW_SQL else ""
            yield (f"report_to = {cfg.report_to!r}: {name} needs {', '.join(missing)}{store}, not installed: "
                   f"pip install 'dpokit[{extra}]'" + (" (or set MLFLOW_TRACKING_URI to an MLflow server)"
                                                        if store else ""))


def tracker_names(cfg) -> list[str]:
    """The trackers --report-to names ('none' names none)."""
    return [n for n in as_list(cfg.report_to) if n != "none"]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # sys.modules[module] = None (blocked) or a module without a spec
        return False


# ---- 4. combinations that would train wrongly -------------------------------------------------------------

def objective_combinations(cfg) -> Iterator[str]:
    for o in cfg.objectives:
        problem = o.check(cfg) if o.check else None
        if problem:
            yield problem
    averaged = [o.name for o in cfg.objectives if o.averaged]
    if cfg.ld_alpha is not None and averaged:  # TRL's CPOTrainer/ORPOTrainer have no ld_alpha either
        yield (f"ld_alpha = {cfg.ld_alpha} with loss {', '.join(averaged)}: their per-token averages would divide an "
               "LD-weighted sum by the unweighted token count; remove --ld-alpha or use another objective")
    # f-divergence scores f'(π/π_ref) are defined up to β·log Z(x), which cancels only in chosen − rejected
    # differences; objectives that use each score alone (or raw log-odds) would be silently wrong.
    undefined = [o.name for o in cfg.objectives if o.reference is True and not o.f_divergence]
    if cfg.f_divergence != "reverse_kl" and undefined:
        defined = [n for n, o in OBJECTIVES.items() if o.data == "paired" and o.reference is True and o.f_divergence]
        yield (f"f_divergence = {cfg.f_divergence!r} is not defined for {', '.join(undefined)}: the partition term "
               f"log Z(x) only cancels in chosen − rejected differences; use {', '.join(defined[:-1])} or "
               f"{defined[-1]}")
    if cfg.lora_r and cfg.sync_ref_every:
        yield ("sync_ref_every (TR-DPO) with LoRA is not supported: the reference is the base model with adapters "
               "disabled and cannot drift toward the policy")


def online_combinations(cfg) -> Iterator[str]:
    if cfg.online and not cfg.rounds and cfg.prompts and not cfg.eval_prompts:  # loop/online_eval.eval_prompts_path
        for key in sorted({"eval_every", "eval_max_prompts"} & cfg.requested()):
            yield (f"{key} = {getattr(cfg, key)} has no effect without held-out prompts: with --prompts given there is "
                   "no default held-out set; add --eval-prompts")
    if cfg.online and cfg.dtype == "fp16":
        yield "dtype = 'fp16' is for offline training (it needs a loss scaler); online training takes fp32 or bf16"
    if cfg.online and cfg.num_generations < 2 and cfg.loss_names != ["ppo"]:  # PPO's rollouts need no group
        yield (f"num_generations = {cfg.num_generations} is out of range: must be >= 2 (a group, or a pair, needs "
               "two; only ppo samples one completion per prompt)")
    if cfg.loss_names in (["ppo"], ["rloo"]) and cfg.given is not None and "kl_coef" not in cfg.given:
        # kl_coef's default 0 is GRPO's (TRL 1.16's beta); PPO and RLOO without the penalty are not RLHF
        yield (f"loss {cfg.loss_names[0]}: set --kl-coef, the weight of the KL penalty in the reward: 0.05 is TRL's "
               "default; 0 trains on the raw reward with no reference loaded")
    rows = cfg.batch_size * cfg.grad_accum * cfg.num_generations  # one rollout batch; the scheduler counts its
    if cfg.loss_names == ["ppo"] and rows % cfg.num_mini_batches:  # num_mini_batches updates per pass: equal parts
        yield (f"num_mini_batches = {cfg.num_mini_batches} does not divide the {rows} rows of a rollout batch "
               f"(batch_size {cfg.batch_size} × grad_accum {cfg.grad_accum} × num_generations {cfg.num_generations}): "
               "each PPO pass splits them into equal mini-batches, one optimizer update each; use a divisor of "
               f"{rows}")
    if cfg.rounds and cfg.run_kind == ONLINE_OBJECTIVE:
        yield f"rounds = {cfg.rounds} is iterative DPO: it needs --online-dpo, not --loss {cfg.loss}"
    if cfg.rounds and cfg.lora_r and not cfg.merge_lora:  # loop/iterative.py: each round loads the last one's final/
        yield (f"rounds = {cfg.rounds} with LoRA needs --merge-lora: each round samples from and trains the previous "
               "round's model, so every round saves its adapters merged into a whole model")
    if cfg.reward_weights is not None:
        try:
            weights = [float(w) for w in as_list(cfg.reward_weights)]
        except (TypeError, ValueError):
            yield f"reward_weights = {cfg.reward_weights!r}: expected numbers"
            return
        specs = as_list(cfg.reward or [])
        if len(weights) != len(specs):
            yield (f"reward_weights = {cfg.reward_weights!r}: need one weight per --reward function "
                   f"({len(specs)} given)")


def precision_combinations(cfg) -> Iterator[str]:
    """--model-dtype, --pure-half, --dtype and --fsdp values that would train wrongly together."""
    halves = {"bf16", "fp16"}
    if cfg.pure_half and cfg.model_dtype == "fp32":
        yield "pure_half = True needs --model-dtype bf16: with fp32 weights there is no half precision to train in"
    if cfg.pure_half and cfg.model_dtype == "fp16":
        yield ("pure_half with model_dtype = 'fp16' is not supported: fp16 gradients underflow without loss scaling, "
               "and torch's GradScaler refuses to unscale gradients of fp16 weights; use --model-dtype bf16 "
               "--pure-half, or drop --pure-half (fp32 master copy)")
    if cfg.pure_half and cfg.lora_r:
        yield ("pure_half with LoRA is not supported: the adapters are the only trained weights, well under 1 % of "
               "the model, so their fp32 master copy costs next to nothing while half precision would round away "
               "their updates; drop --pure-half (the base already stays in --model-dtype)")
    if cfg.pure_half and cfg.fsdp:
        yield ("fsdp with pure_half = True is not supported (untested); use DDP (torchrun without --fsdp) or drop "
               "--pure-half")
    if cfg.model_dtype in halves and cfg.dtype in halves and cfg.model_dtype != cfg.dtype:
        yield (f"model_dtype = {cfg.model_dtype!r} with dtype = {cfg.dtype!r}: two half precisions would round the "
               "weights twice; use the same one for both")
    if cfg.model_dtype == "fp16" and cfg.dtype == "auto" and _auto_is_gpu(cfg.device):
        yield ("model_dtype = 'fp16' with dtype = 'auto' on a GPU: auto is bf16 there, and two half precisions would "
               "round the weights twice; pass --dtype fp16 (or fp32) explicitly")
    if cfg.model_dtype == "fp16" and cfg.lora_r and cfg.dtype != "fp16":
        yield ("model_dtype = 'fp16' with LoRA needs --dtype fp16: the adapters' gradients flow through the fp16 "
               "base and underflow without the loss scaler that --dtype fp16 adds; or use --model-dtype bf16")
    for key, active, why in (
            ("lora_r", cfg.lora_r, "LoRA under FSDP is not supported: adapters are small, so use DDP (torchrun "
             "without --fsdp), which keeps the base model whole"),
            ("sync_ref_every", cfg.sync_ref_every, "TR-DPO's moving reference is a whole copy of the policy, which "
             "FSDP shards: use DDP (torchrun without --fsdp)"),
            ("dtype", cfg.dtype == "fp16", "fp16's loss scaler is not sharding-aware here: use --dtype bf16 with "
             "FSDP")):
        if cfg.fsdp and active:
            yield f"fsdp with {_said(cfg, key)}: {why}"


def _auto_is_gpu(device: str) -> bool:
    """Whether --dtype auto means bf16 autocast on `device` (logprobs.sequence.autocast_dtype: bf16 on CUDA, fp32
    elsewhere); --device auto is CUDA when one is available."""
    if device == "auto":
        import torch  # late: refusals, like --help, answer without loading torch
        return torch.cuda.is_available()
    return device.split(":")[0] == "cuda"
