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
from safetensors.torch import load_model as load_safetensors_into

STATE = "state.pt"


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str, step: int, policy, tokenizer, optimizer, scheduler, config_yaml: str) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save({
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": list(random.getstate()[1]),
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


def load_checkpoint(path: Path, policy, optimizer, scheduler) -> int:
    """Restore everything saved by `save_checkpoint`; return the step to continue from."""
    weights = sorted(path.glob("*.safetensors"))
    if len(weights) != 1:
        raise FileNotFoundError(f"{path}: expected one model.safetensors, found {[w.name for w in weights]}")
    load_safetensors_into(policy, weights[0], strict=False)  # tied lm_head is stored once
    state = torch.load(path / STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    py = random.getstate()
    random.setstate((py[0], tuple(state["python_rng"]), py[2]))
    return int(state["step"])
