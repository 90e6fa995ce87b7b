"""Which rows each optimizer step trains on, for every loop: a pure function of (seed, step), so a resumed run sees
exactly the batches an uninterrupted run would have seen."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpokit.batches.inputs import epoch_order


@dataclass(frozen=True)
class BatchSchedule:
    """An epoch is `epoch_order`'s permutation of the `rows` (seeded seed + epoch; ranked rows' pairs kept together
    by `groups`) cut into micro-batches of `micro_size` rows (all processes together); a step takes `grad_accum`
    consecutive micro-batches, so the epoch's last step may take fewer rows.

    `no_lone_tail` (KTO): a last micro-batch of a single row joins the previous one, since KTO's KL estimate
    needs another example's completion in the batch."""
    rows: int
    micro_size: int
    grad_accum: int
    seed: int
    shuffle: bool
    groups: list[list[int]] | None = None
    no_lone_tail: bool = False

    @property
    def steps_per_epoch(self) -> int:
        micro_per_epoch = math.ceil(self.rows / self.micro_size)
        if self.no_lone_tail and self.rows % self.micro_size == 1 and micro_per_epoch > 1:
            micro_per_epoch -= 1  # the lone last row joins the previous micro-batch
        return math.ceil(micro_per_epoch / self.grad_accum)

    def total_steps(self, epochs: int, max_steps: int = 0) -> int:
        return max_steps or epochs * self.steps_per_epoch

    def epoch_micro_batches(self, epoch: int) -> list[list[int]]:
        """Row indices of every micro-batch of epoch `epoch` (all processes' rows), in order."""
        order = epoch_order(self.rows, self.groups, self.seed + epoch, self.shuffle)
        micro = [order[i:i + self.micro_size] for i in range(0, self.rows, self.micro_size)]
        if self.no_lone_tail and len(micro) > 1 and len(micro[-1]) == 1:
            tail = micro.pop()
            micro[-1] = micro[-1] + tail
        return micro

    def micro_batches(self, step: int) -> list[list[int]]:
        """Row indices of each micro-batch of optimizer step `step` (0-based; all processes' rows)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.epoch_micro_batches(epoch)[k * self.grad_accum:(k + 1) * self.grad_accum]

    def step_rows(self, step: int) -> list[int]:
        """Row indices of optimizer step `step`, micro-batches one after the other (a loop that cuts its own)."""
        return [i for m in self.micro_batches(step) for i in m]
