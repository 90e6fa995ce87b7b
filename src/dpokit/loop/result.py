"""What every run returns (`TrainResult`) and the device a one-process run trains on: here, below the offline
(loop/train.py), online (loop/online.py) and iterative (loop/iterative.py) loops, which all import them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit.distributed import Distributed


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    eval_before: dict | None  # at the start of this invocation: step 0, or the resumed step
    eval_after: dict | None
    final_dir: Path
    resumed_at: int = 0


def pick_device(name: str) -> torch.device:
    """The device of a one-process run (online training)."""
    return Distributed().device(name)
