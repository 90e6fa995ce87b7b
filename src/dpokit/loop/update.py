"""One optimizer update, the same in every loop (offline, online, and any loop added next), and what a loop does
with a step whose loss or gradients went NaN/inf.

    update:  [fp16: unscale] → clip ‖g‖₂ to max_grad_norm → non-finite check → optimizer step → schedule step → zero_grad

A loop runs its forward and backward passes (steps.py, or its own), then calls `update` once per optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dpokit.distributed import grad_norm_value
from dpokit.loop.steps import NonFiniteError


@dataclass
class Update:
    """What `update` did.

    grad_norm: ‖g‖₂ of the true (unscaled) gradients before clipping; lr: the rate the update used; loss_scale:
    fp16's scale after the update (None without a scaler); overflow_scale: set when fp16 gradients overflowed at
    that scale: the scaler skipped the update (weights, moments and schedule untouched) and lowered its scale."""
    grad_norm: float
    lr: float | None = None
    loss_scale: float | None = None
    overflow_scale: float | None = None

    @property
    def skipped(self) -> bool:
        return self.overflow_scale is not None


def update(params, optimizer, scheduler, max_grad_norm: float | None, scaler=None, step: int = 0,
           rows: Callable[[], list] | None = None) -> Update:
    """Apply the accumulated gradients of optimizer step `step` (1-based, for messages) and clear them.

    `params`: the parameters to clip (those without a gradient are ignored); `max_grad_norm` None or 0: no
    clipping (the norm is still measured); `scaler`: fp16's GradScaler (the backward passes scaled the loss).
    A non-finite norm raises NonFiniteError before any weight moves (`rows()` names the step's rows in it),
    except under fp16, where an overflow now and then is expected: the scaler skips that update and adapts."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # true gradients, so clipping and the logged norm mean what they say
    grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")))
    if scaler is not None and not math.isfinite(grad_norm):
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skips the update (it saw the inf)
        scaler.update()  # lowers the scale
        optimizer.zero_grad(set_to_none=True)
        return Update(grad_norm, loss_scale=scaler.get_scale(), overflow_scale=scale)
    if not math.isfinite(grad_norm):
        raise NonFiniteError(f"step {step}: non-finite gradient norm" + (f" on rows {rows()}" if rows else ""))
    lr = scheduler.get_last_lr()[0]
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return Update(grad_norm, lr, scaler.get_scale() if scaler is not None else None)


class NonFiniteSteps:
    """--on-nonfinite for every loop: a step that raised NonFiniteError leaves no gradient behind; 'stop' raises
    (with `stop_note()` appended, if given: what the user can do next), 'skip' counts the step, logs it and
    returns the step's metrics record."""

    def __init__(self, mode: str, log, stop_note: Callable[[], str] | None = None):
        self.mode, self.log, self.stop_note = mode, log, stop_note
        self.skipped = 0

    def handle(self, error: NonFiniteError, optimizer) -> dict:
        optimizer.zero_grad(set_to_none=True)  # nothing of this step reaches the weights
        if self.mode == "stop":
            if self.stop_note is None:
                raise error
            raise NonFiniteError(f"{error}; {self.stop_note()}") from None
        self.skipped += 1
        self.log(f"skipped: {error}")
        return {"skipped_nonfinite": self.skipped}
