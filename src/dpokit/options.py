"""What a training option is besides its value: its group, the runs that read it, what it needs, its range.

Each TrainConfig field carries these in its metadata (`opt`), and everything that used to be a hand-kept list
is derived from them: the `--help` sections (GROUPS), the options a resume may change and a sweep's result
ignores ("bookkeeping"), the options iterative DPO's offline rounds reset ("online"), and the refusals of
config_checks.py (an option set where nothing reads it, a value out of range). No torch here: imported by the
CLI before any command runs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A config key that is unknown, of the wrong type or out of range (re-exported by config.py)."""


# The `--help` sections, in order: (title, what the group holds). A group also says what the code may assume of
# its options: "bookkeeping" ones never change a run's numbers; "online" ones are reset for offline rounds.
GROUPS = {
    "model": ("model", "what to train and from where"),
    "data": ("data", "training and held-out pairs"),
    "lora": ("LoRA (PEFT)", "train low-rank adapters; the reference is the same weights with adapters disabled"),
    "objective": ("objective", "the loss and its options; `dpokit losses` lists which objective reads which"),
    "optimisation": ("optimisation", "steps, schedule, batches, data order"),
    "sequences": ("sequences", "lengths, and the layout of pairs in a batch"),
    "precision": ("precision, memory and devices", None),
    "online": ("online training (GRPO, RLOO, PPO, online DPO)", "each step samples completions from the current "
               "policy and scores them with --reward; --loss grpo, rloo or ppo, or --online-dpo turns it on. "
               "--batch-size then counts prompts "
               "per micro-batch, each with --num-generations completions"),
    "bookkeeping": ("bookkeeping", "where outputs go, checkpoint and evaluation cadence, start-up checks, progress: "
                    "never changes a run's numbers, so a resume may change these and a sweep's saved result ignores "
                    "them"),
}

# How a run trains, which decides the options it reads (`runs`): offline on a data file; online DPO (pairs
# sampled each step); iterative DPO (--online-dpo --rounds K: K offline runs on sampled pairs files); an online
# objective (registry data "online": --loss grpo) on sampled groups; a reward model (`dpokit train-rm`: a
# Bradley–Terry classifier fitted to a pairs file, loop/reward_model.py); supervised fine-tuning (`dpokit sft`: the
# NLL of demonstrations, loop/sft.py). TrainConfig.stage says which of the last two.
OFFLINE, ONLINE_DPO, ITERATIVE_DPO, ONLINE_OBJECTIVE = "offline", "online_dpo", "iterative_dpo", "online_objective"
REWARD_MODEL, SFT = "reward_model", "sft"
POLICY_RUNS = (OFFLINE, ONLINE_DPO, ITERATIVE_DPO, ONLINE_OBJECTIVE)  # `dpokit train`: a policy
LM_RUNS = POLICY_RUNS + (SFT,)  # train a causal LM: attention kernels, final/ as an adapter or merged
ALL_RUNS = LM_RUNS + (REWARD_MODEL,)
ON_FILES = (OFFLINE, REWARD_MODEL, SFT)  # train on a data file: --data, held-out rows, checkpoints, resume
PAIR_FILES = (OFFLINE, REWARD_MODEL)  # read pairs (ranked rows among them); SFT reads demonstrations
ON_STEPS = ON_FILES + (ONLINE_DPO, ONLINE_OBJECTIVE)  # loop/train.run_steps: checkpoints, resume, eval cadence
ONLINE_STEPS = (ONLINE_DPO, ONLINE_OBJECTIVE)  # the online loop (loop/online.py): --eval-prompts
CHECKPOINTED = ON_STEPS + (ITERATIVE_DPO,)  # --save-every, --keep-last, --resume (iterative DPO: per round)
ON_PAIRS = (OFFLINE, ONLINE_DPO, ITERATIVE_DPO)            # train a paired (or unpaired) objective
PACKED = ON_PAIRS + (SFT,)                                 # pack rows (--pack-tokens)
SAMPLING = (ONLINE_DPO, ITERATIVE_DPO, ONLINE_OBJECTIVE)   # sample their own completions
GROUP_RUNS = {"objective": ON_PAIRS, "online": SAMPLING}   # default `runs` of a group's options; others: ALL_RUNS


def opt(group: str, default, help: str, choices: tuple | None = None, valid: str | None = None,
        runs: tuple[str, ...] | None = None, needs: tuple[str, ...] = (), resume_may_change: bool = False):
    """A TrainConfig field.

    group     a GROUPS key: its `--help` section, and what the group means to the code (see GROUPS)
    choices   the values allowed;  valid: the range allowed, e.g. "> 0", "[0, 0.5)", "[1, max_length)" (`in_range`)
    runs      the kinds of run that read it (default: GROUP_RUNS of its group); set in another, it is refused
    needs     names of config_checks.NEEDS conditions without which setting it has no effect (refused)
    resume_may_change: a resume may change it although it is not bookkeeping (device's name, eval_data, …)
    """
    if group not in GROUPS:
        raise ValueError(f"unknown option group {group!r}; one of {', '.join(GROUPS)}")
    return field(default=default, metadata={
        "group": group, "help": help, "choices": choices, "valid": valid, "needs": tuple(needs),
        "runs": tuple(runs) if runs is not None else GROUP_RUNS.get(group, ALL_RUNS),
        "resume_may_change": resume_may_change})


_BOUND = re.compile(r"^(>=|>)\s*([\w.-]+)(.*)$")                 # "> 0", ">= 1 (0: …)"
_INTERVAL = re.compile(r"^([\[(])\s*([\w.-]+),\s*([\w.-]+)([\])])(.*)$")  # "[0, 0.5)", "[1, max_length) …"


def in_range(spec: str, value, cfg) -> tuple[bool, str]:
    """(value within `spec`, "must be …" for the message). A bound is a number or the name of another option
    of `cfg` (read now, and shown with its value); text after the range is kept as a note."""
    def bound(text: str) -> tuple[float, str]:
        try:
            return float(text), text
        except ValueError:
            return getattr(cfg, text), f"{text}={getattr(cfg, text)}"

    if m := _BOUND.match(spec):
        op, (limit, shown), note = m.group(1), bound(m.group(2)), m.group(3)
        return (value >= limit if op == ">=" else value > limit), f"must be {op} {shown}{note}"
    if m := _INTERVAL.match(spec):
        (lo, lo_shown), (hi, hi_shown) = bound(m.group(2)), bound(m.group(3))
        above = value >= lo if m.group(1) == "[" else value > lo
        below = value <= hi if m.group(4) == "]" else value < hi
        return above and below, f"must be in {m.group(1)}{lo_shown}, {hi_shown}{m.group(4)}{m.group(5)}"
    raise ValueError(f"range {spec!r}: expected '> x', '>= x' or an interval such as '[0, 1)'")


# Options given as several space-separated values on the command line (a list in YAML), not as "a,b".
SEVERAL_VALUES = ("data",)


def data_files(data) -> list[str]:
    """--data as a list of files: one path (a string, never split: paths may hold commas) or a list of them."""
    if data is None:
        return []
    return [data] if isinstance(data, str) else [str(d) for d in data]


def weight_values(weights) -> list[float] | None:
    """--data-weights as floats: "0.7,0.3" or [0.7, 0.3]; None when not given (config_checks checks them)."""
    return None if weights is None else [float(w) for w in as_list(weights)]


def as_list(value) -> list:
    """'a, b' or [a, b] → [a, b] (the comma-separated options: loss, loss_weights, reward, reward_weights)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def coerce(key: str, value: Any, f: dataclasses.Field, source: str) -> Any:
    """Check a YAML/CLI value against the field's annotated type; ints are accepted where floats are."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key} cannot be null")
    base = kind.replace("| None", "").strip()
    if base == "str | list":  # "a,b" or [a, b]; anything else would reach list(value) (list(3): TypeError)
        scalar = (str, int, float)
        if not (isinstance(value, str) or isinstance(value, list) and all(
                isinstance(v, scalar) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"{source}: {key} expects a comma-separated string or a list, got "
                              f"{type(value).__name__} {value!r}")
        return value
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
    }.get(base, True)
    if not ok:
        raise ConfigError(f"{source}: {key} expects {base}, got {type(value).__name__} {value!r}")
    return float(value) if base == "float" else value
