"""Stage 5 — loop: the training loop, optimizer and schedule, checkpoints."""

from dpokit.loop.train import TrainResult, train

__all__ = ["TrainResult", "train"]
