"""Stage 5 — loop: the training loop, optimizer and schedule, checkpoints."""

from dpokit.loop.result import TrainResult
from dpokit.loop.run import train

__all__ = ["TrainResult", "train"]
