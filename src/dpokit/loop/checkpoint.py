"""Resumable checkpoints: policy weights (safetensors), optimizer/scheduler state, RNG, position, config.

Each checkpoint is written to a temporary folder and renamed into place, so a checkpoint folder that
exists is complete; `state.pt` holds only tensors and plain Python values and is read with
`weights_only=True` (no arbitrary unpickling).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE = "state.pt"
REFERENCE = "reference.safetensors"


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str, step: int, policy, tokenizer, optimizer, scheduler, config_yaml: str,
                    reference=None, eval_ref=None) -> Path:
    """Write a complete checkpoint atomically. `reference` is saved only when it moves (TR-DPO);
    `eval_ref` (held-out reference log-probs) so a resumed run compares with the same starting point."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if reference is not None:
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp / REFERENCE)
    torch.save({
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": list(random.getstate()[1]),
        "eval_ref": None if eval_ref is None else {k: v for k, v in vars(eval_ref).items()},
    }, tmp / STATE)
    (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def find_checkpoint(output_dir: str, resume: str) -> Path:
    """The folder named by --resume, or with 'auto' the newest complete one under output_dir."""
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE).is_file():
            raise FileNotFoundError(f"--resume {resume}: not a dpokit checkpoint (no {STATE})")
        return path
    found = sorted(p for p in checkpoint_root(output_dir).glob("step-*") if (p / STATE).is_file())
    if not found:
        raise FileNotFoundError(f"--resume auto: no checkpoint under {checkpoint_root(output_dir)}")
    return found[-1]


def load_checkpoint(path: Path, policy, optimizer, scheduler, reference=None, eval_ref=None):
    """Restore everything saved by `save_checkpoint`; return (step to continue from, eval_ref)."""
    _load_weights(policy, path / "model.safetensors")
    if (path / REFERENCE).is_file():
        if reference is None:
            raise FileNotFoundError(f"{path}: holds a moving (TR-DPO) reference but this run has none")
        _load_weights(reference, path / REFERENCE)
    state = torch.load(path / STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    py = random.getstate()
    random.setstate((py[0], tuple(state["python_rng"]), py[2]))
    if state.get("eval_ref") is not None:
        from dpokit.logprobs import PairLogps
        eval_ref = PairLogps(**state["eval_ref"])
    return int(state["step"]), eval_ref


def _load_weights(model, file: Path) -> None:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing from the checkpoint")
    state = load_file(file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{file}: does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
