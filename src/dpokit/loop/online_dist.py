"""Online training under torchrun (DDP) — GRPO, RLOO, PPO, online DPO (TR-DPO included), iterative DPO — on
dpokit.distributed's machinery (the process group, DDP `wrap`, `gradient_sync`, `sum_across`, the gathers), the
offline loop's. With one process `Shard()` does nothing and the loop is the one-process loop.

A step's prompts are batch_size × grad_accum × processes, in the offline loop's order (BatchSchedule with
micro-batches of batch_size × processes prompts); each rank takes every world-th prompt of each micro-batch, so
`torchrun -n 2 … --batch-size 1` steps through the prompts of one process with --batch-size 2. Then:

  * sampling: each rank samples its prompts' completions from its own seeded stream (`sampling_seed`: rank 0's
    seed is the one-process seed) and scores them; a prompt's group of completions stays on the rank that drew it;
  * what is a statistic of the whole batch — GRPO's and RLOO's advantages (GRPO's batch-scaled std), GRPO's token
    divisor, online DPO's pair count, the logged metrics — is computed from every rank's values (gathered or
    summed), so it is the one-process value over the same completions;
  * gradients: the gradient passes run through DDP (`Shard.trained`), which averages the ranks' gradients in the
    last micro-batch's backward (`Shard.sync`); each rank divides its loss by the batch's divisor / processes, so
    the average is the one-process gradient and every rank makes the same update;
  * PPO (loop/ppo.py) shuffles the whole rollout into mini-batches and whitens its advantages over all its tokens:
    the rollout's token ids and rewards are gathered into the one-process row order (`step_placement`: which
    rank holds which prompt of the schedule `order`), every global micro-batch is shared out row by row (`share`)
    for the no-grad and the gradient passes, and the no-grad results are summed back (`all_sum`, each row from
    one rank); policy (TokenLogpsModule) and value model (ppo.ValuesModule) are two DDP wrappers, reduced in the
    same backward;
  * iterative DPO (loop/iterative.py): each rank samples and scores prompts[rank::world] of a round, the samples
    are put back in the prompts' order (`deal_back`) and rank 0 writes the pairs file; the round's offline run is
    loop/train.py's DDP run;
  * a rank left without rows in a micro-batch runs a weight-0 one (DDP's reduction waits for every rank);
  * rank 0 alone logs, writes metrics.jsonl, checkpoints (holding every rank's RNG state) and final/, and runs the
    held-out evaluation — the one-process evaluation: same prompts, seeds and samples.

A non-finite loss is not raised by one rank alone (the others would wait in the reduction forever): its NaN reaches
every rank's gradients, and loop/update.py's norm check raises on all of them at the same update.
"""

from __future__ import annotations

import gc
import statistics
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from dpokit.distributed import (Distributed, DistributedError, all_sum, gather_cat, gather_objects, gradient_sync,
                                sum_across, wrap)
from dpokit.evaluation.rewards import Scores
from dpokit.generation import sample
from dpokit.logprobs.sequence import TokenLogpsModule

RANK_STRIDE = 1_000_000_007  # a prime beyond any step count: no two (step, rank) of a run share a sampling seed


def sampling_seed(seed: int, step: int, rank: int = 0) -> int:
    """The sampler's seed at step (or round) `step` on rank `rank`: seed × 1_000_003 + step + rank × 1_000_000_007.
    Rank 0's is the one-process seed; the step's other prompts are drawn by other ranks from their own streams."""
    return seed * 1_000_003 + step + rank * RANK_STRIDE


def draw(policy, tokenizer, prompts: list, cfg, step: int, rank: int):
    """train_online's default `sampler`: num_generations completions of each of this rank's prompts of the step,
    from the current policy with the rank's seeded stream. (A test injects fixed completions through this seam.)"""
    return sample(policy, tokenizer, prompts, cfg.num_generations, cfg.max_new_tokens, cfg.temperature,
                  seed=sampling_seed(cfg.seed, step, rank))


@dataclass
class BatchView:
    """What the step's metrics read of the samples, over every rank's rows (rank order): Samples' lengths,
    truncated flags and sampling seconds (the slowest rank's: the step waits for it)."""
    lengths: list[int]
    truncated: list[bool] | None
    seconds: float


class Shard:
    """This process's part of an online run (module docstring); `Shard()` is a one-process run."""

    def __init__(self, ctx: Distributed | None = None):
        self.ctx = ctx or Distributed()
        self._ddp: dict[int, torch.nn.Module] = {}  # id(model) → its DDP wrapper
        self.order = None  # the run's BatchSchedule (train_online sets it): which rank holds which prompt

    @property
    def world(self) -> int:
        return self.ctx.world

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def check_finite(self) -> bool:
        """Whether a step may raise on its own non-finite loss (module docstring: not under DDP)."""
        return not self.ctx.enabled

    def trained(self, model, module_class=TokenLogpsModule):
        """What a gradient pass calls: `model` itself in one process, else `module_class(model)` wrapped in DDP,
        made on the first call (every rank makes it at the same step: DDP's constructor is a collective).
        Take it before `sync`, which acts on the wrappers made so far."""
        if not self.ctx.enabled:
            return model
        if id(model) not in self._ddp:
            self._ddp[id(model)] = wrap(module_class(model), self.ctx)
        return self._ddp[id(model)]

    @contextmanager
    def sync(self, last: bool):
        """Around a micro-batch's forward and backward: gradients reduced over ranks only when `last`."""
        with ExitStack() as stack:
            for wrapper in self._ddp.values():
                stack.enter_context(gradient_sync(wrapper, self.ctx, last))
            yield

    def close(self) -> None:
        """Free the DDP wrappers, then leave the process group. In this order: a wrapper freed after the group
        is destroyed takes gloo's process group down with it, whose destructor joins a worker thread that may
        be waiting for the GIL the destructor holds (seen: a rank hung at exit)."""
        self._ddp.clear()
        gc.collect()
        self.ctx.close()

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        return sum_across(values, self.ctx)

    def cat(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D `values`, concatenated in rank order."""
        return gather_cat(values, self.ctx)

    def mine(self, n: int) -> slice:
        """Where this rank's `n` rows sit in `cat`'s concatenation."""
        counts = gather_objects(n, self.ctx)
        start = sum(counts[:self.rank])
        return slice(start, start + n)

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order."""
        return [x for part in gather_objects(items, self.ctx) for x in part]

    def gather_all(self, value) -> list:
        """[rank 0's value, rank 1's, …] (small picklable values)."""
        return gather_objects(value, self.ctx)

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_sum(tensor, self.ctx)

    def share(self, rows: list) -> list:
        """This rank's part of a global micro-batch: every world-th row (as the offline loop's `rank_share`)."""
        return rows[self.rank::self.world]

    def step_placement(self, step: int) -> list[tuple[int, int]]:
        """`placement` of step `step`'s prompts in the one-process order (the schedule: `self.order`)."""
        return placement([len(m) for m in self.order.micro_batches(step)], self.world)

    def step_prompts(self, order, step: int) -> list[int]:
        """This rank's prompts of step `step`: its share of each of the step's micro-batches."""
        return [i for m in order.micro_batches(step) for i in self.share(m)]

    def check_shares(self, order, total_steps: int) -> None:
        """Refuse, before any work, a schedule whose epoch-final step leaves a rank without a prompt to sample."""
        if self.world == 1 or total_steps < order.steps_per_epoch:
            return
        last = order.epoch_micro_batches(0)[(order.steps_per_epoch - 1) * order.grad_accum:]
        fewest = sum(len(m[self.world - 1::self.world]) for m in last)
        if not fewest:
            n = sum(map(len, last))
            raise DistributedError(
                f"{order.rows} prompts in steps of {order.micro_size * order.grad_accum} (batch_size × grad_accum × "
                f"{self.world} processes) leave {n} prompt(s) for the epoch's last step, fewer than the processes: "
                "a rank would have nothing to sample. Change --batch-size or --grad-accum, or the number of prompts "
                "or processes, so that the last step gets at least one prompt per process")

    def view(self, samples, rewards: list[float], reward_s: float):
        """(BatchView, rewards, reward seconds) of every rank's rows, for the step's metrics; in one process the
        samples and rewards themselves."""
        if not self.ctx.enabled:
            return samples, rewards, reward_s
        parts = gather_objects((samples.lengths, samples.truncated, samples.seconds, list(rewards),
                                getattr(rewards, "columns", {}), reward_s), self.ctx)
        truncated = None if any(p[1] is None for p in parts) else [t for p in parts for t in p[1]]
        view = BatchView([n for p in parts for n in p[0]], truncated, max(p[2] for p in parts))
        values = [r for p in parts for r in p[3]]
        columns = {name: [v for p in parts for v in p[4][name]] for name in parts[0][4]}
        return view, Scores(values, columns) if columns else values, max(p[5] for p in parts)


def placement(sizes: list[int], world: int) -> list[tuple[int, int]]:
    """(rank, place among that rank's prompts) of each prompt of micro-batches of these sizes, in their order, when
    each rank takes every world-th prompt of each (Shard.share)."""
    taken, where = [0] * world, []
    for size in sizes:
        for j in range(size):
            where.append((j % world, taken[j % world]))
            taken[j % world] += 1
    return where


def deal_back(parts: list[tuple], n: int, where: list[tuple[int, int]]) -> tuple:
    """Every rank's (Samples, rewards) (`parts`, rank order; n completions per prompt) → one (Samples, rewards) in
    the prompts' one-process order, `where` (`placement`) saying where each prompt sits; one part is itself."""
    if len(parts) == 1:
        return parts[0]
    rows = [(r, k * n + j) for r, k in where for j in range(n)]
    first = parts[0][0]
    truncated = None if any(s.truncated is None for s, _ in parts) else [parts[r][0].truncated[i] for r, i in rows]
    samples = type(first)([parts[r][0].prompts[k] for r, k in where], n,
                          *([getattr(parts[r][0], f)[i] for r, i in rows]
                            for f in ("prompt_ids", "completion_ids", "texts", "logps")),
                          sum(s.new_tokens for s, _ in parts), max(s.seconds for s, _ in parts), truncated)
    return samples, [parts[r][1][i] for r, i in rows]


def step_record(cfg: TrainConfig, step: int, steps_per_epoch: int, record: dict, samples, rewards: list[float],
                 reward_s: float, seconds: float) -> dict:
    """One line of metrics.jsonl: the update's values, then the step's rewards, lengths and timings. Several
    rewards (evaluation/rewards.combine's `Scores`): each function's unweighted mean and std too, as TRL logs
    them (rewards/<name>/mean, /std); `truncated`: the share of completions cut at max_new_tokens."""
    groups = [rewards[i:i + cfg.num_generations] for i in range(0, len(rewards), cfg.num_generations)]
    per_function = {}
    for name, column in getattr(rewards, "columns", {}).items():
        per_function[f"rewards/{name}/mean"] = statistics.fmean(column)
        if len(column) > 1:
            per_function[f"rewards/{name}/std"] = statistics.stdev(column)
    return {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), **record,
            "reward": statistics.fmean(rewards), **({"reward_std": statistics.stdev(rewards)} if len(rewards) > 1
                                                    else {}),
            **({"frac_reward_zero_std": sum(max(g) == min(g) for g in groups) / len(groups)}
               if cfg.num_generations > 1 else {}),  # PPO may sample one completion per prompt: no groups
            **per_function, "completion_length": statistics.fmean(samples.lengths),
            **({"truncated": statistics.fmean(samples.truncated)} if samples.truncated is not None else {}),
            "generation_s": samples.seconds,
            "generation_share": samples.seconds / seconds, "reward_s": reward_s, "step_s": seconds}


ONE = Shard()  # a one-process run: the step functions' default
