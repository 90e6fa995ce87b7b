"""One micro-batch of work: log-probs, loss, backward, and the metric sums the loop averages.

`paired_step` serves every paired objective; `kto_step` serves KTO's labelled completions. Both
call backward on loss_sum / step_examples, so grad accumulation yields the mean over the whole step,
and return (metric sums over examples, tokens of the examples: prompt counted once, whatever the
layout, so tokens/s compares across layouts and tools).
"""

from __future__ import annotations

import torch

from dpokit.batches import collate_kto, pair_batch
from dpokit.distributed import gather_cat
from dpokit.logprobs import compute_precision, pair_logps, sequence_logps
from dpokit.loop.reference import reference_forward
from dpokit.objectives import OBJECTIVES, UnpairedInputs, combined_loss, rewards
from dpokit.objectives.kto import kto_reference_point


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient; the step was not applied."""


def _backward(losses: torch.Tensor, step_examples: float, rows, step: int, weight: float,
              check_finite: bool, scaler) -> None:
    loss = losses.sum() / step_examples
    if weight != 1.0:
        loss = loss * weight
    # Under torchrun one rank must not stop alone (the others would wait for it forever): the loop checks
    # the loss summed over ranks instead, and a NaN gradient reaches every rank through the reduction.
    if check_finite and not torch.isfinite(loss):
        raise NonFiniteError(f"step {step}: non-finite loss on rows {[r.source for r in rows]}")
    (scaler.scale(loss) if scaler is not None else loss).backward()  # fp16: scaled so gradients stay in range


def paired_step(policy, reference, rows, cfg, pad_id: int, device, step_examples: float, step: int,
                ref_cached=None, weight: float = 1.0, check_finite: bool = True, scaler=None):
    """`ref_cached`: the rows' reference log-probs from the cache; else `reference` is run (or None:
    reference-free objective). `weight` 0 runs forward and backward for nothing (a rank with no rows
    left in a micro-batch must still take part in the gradient reduction). `scaler`: fp16's GradScaler."""
    batch = {k: v.to(device) for k, v in pair_batch(rows, pad_id, cfg.prefix_sharing, cfg.pack_tokens).items()}
    ref = ref_cached
    with compute_precision(device, cfg.dtype):
        if ref is None and reference is not None:
            model, context = reference_forward(reference)
            with torch.no_grad(), context:
                ref = pair_logps(model, batch, cfg.ld_alpha)
        pol = pair_logps(policy, batch, cfg.ld_alpha, cfg.use_weighting)
    losses, extra = combined_loss(cfg.loss_names, cfg.loss_weight_values, pol, ref, cfg)
    _backward(losses, step_examples, rows, step, weight, check_finite, scaler)
    r_chosen, r_rejected = rewards(pol, ref, cfg)
    sums = {
        "loss": losses.detach().sum().item(),
        "rewards/chosen": r_chosen.sum().item(),
        "rewards/rejected": r_rejected.sum().item(),
        "rewards/margins": (r_chosen - r_rejected).sum().item(),
        "rewards/accuracies": (r_chosen > r_rejected).float().sum().item(),
        "logps/chosen": pol.chosen.detach().sum().item(),
        "logps/rejected": pol.rejected.detach().sum().item(),
    }
    for key, value in extra.items():  # batch means → weighted by the micro-batch's size
        sums[key] = value.item() * len(rows)
    return sums, sum(len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in rows)


def kto_step(policy, reference, rows, cfg, pad_id: int, device, step_examples: float, step: int, ref_cached=None,
             weight: float = 1.0, check_finite: bool = True, scaler=None, micro_batch=None, ctx=None):
    """`rows`: this process's examples; under torchrun (`ctx` enabled) `micro_batch` holds every process's
    examples of the micro-batch, in order: the KL rows borrow their completions across processes (`kl_partners`)
    and z_ref is the mean over the whole micro-batch, as in one process."""
    across = ctx is not None and ctx.enabled
    partners = kl_partners(micro_batch, ctx.rank, ctx.world) if across else None
    batch = {k: v.to(device) for k, v in collate_kto(rows, pad_id, cfg.max_length, partners).items()}
    labels = batch.pop("labels")
    n = len(rows)
    # The mismatched (KL) rows need no gradient: z_ref is detached. Running them without grad saves
    # the memory of their activations.
    main = {k: v[:n] for k, v in batch.items()}
    with compute_precision(device, cfg.dtype):
        model, context = reference_forward(reference)
        with torch.no_grad():
            with context:
                ref_all = sequence_logps(model, **batch)
            pol_kl = sequence_logps(policy, **{k: v[n:] for k, v in batch.items()})
        pol = sequence_logps(policy, **main)
    pol_kl, ref_kl = pol_kl, ref_all[n:]
    if across:  # a rank sitting out (weight 0) lends nothing to the estimate
        pol_kl, ref_kl = (gather_cat(t if weight else t[:0], ctx) for t in (pol_kl, ref_kl))
    z_ref = kto_reference_point(pol_kl, ref_kl)
    losses = OBJECTIVES["kto"].compute(UnpairedInputs(pol, ref_all[:n], labels, z_ref), cfg)
    _backward(losses, step_examples, rows, step, weight, check_finite, scaler)
    reward = cfg.beta * (pol.detach() - ref_all[:n])
    sums = {"loss": losses.detach().sum().item(), "kto/kl": z_ref.item() * n,
            "kto/desirable_fraction": labels.float().sum().item()}
    # Per-label means need per-label counts: logged as sums here, divided by the loop via *_count.
    for name, mask in (("chosen", labels), ("rejected", ~labels)):
        sums[f"rewards/{name}_sum"] = reward[mask].sum().item()
        sums[f"logps/{name}_sum"] = pol.detach()[mask].sum().item()
        sums[f"count/{name}"] = mask.sum().item()
    return sums, sum(len(r.prompt_ids) + len(r.completion_ids) for r in rows)


def kl_partners(micro_batch: list, rank: int, world: int) -> list:
    """The examples whose completions this process's KL rows take: each example's KL row borrows the completion of
    the example before it in the whole micro-batch (the first borrows the last), as in one process. The process
    holds every world-th example (`rank_share`); one left without any (it repeats the first, with weight 0)
    borrows the last."""
    n = len(micro_batch)
    return [micro_batch[(p - 1) % n] for p in range(rank, n, world)] or micro_batch[-1:]


def finish_kto_metrics(record: dict) -> dict:
    """Turn kto_step's per-label sums into means (rewards/chosen = mean β·Δ over desirable examples)."""
    for name in ("chosen", "rejected"):
        count = record.pop(f"count/{name}", 0)
        for kind in ("rewards", "logps"):
            total = record.pop(f"{kind}/{name}_sum", 0.0)
            if count:
                record[f"{kind}/{name}"] = total / count
    return record
