"""Reference log-probs from the sampler: pairs sampled from the reference already carry its log-probs.

`make-pairs` (and the demo) sample from the reference and record, per completion, Σ log π(token | prefix)
from the model's raw logits — the reference's own log-prob of what it emitted, whatever the sampling
temperature or top-p — with the ids it scored and the model's weights digest (tasks/pairs.py). Training
uses those sums as a pair's reference log-probs when
- the reference's weights digest is the rows' (`ref_digest`), and
- training's tokenization of the row gives exactly the stored ids (prompt, chosen, rejected): a BPE merge
  across the prompt boundary, a chat template writing tokens after the end of turn, a prompt or completion
  cut by --max-prompt-length / --max-length all change what the reference would score, so such a pair is
  recomputed;
and runs the usual reference pass on the other pairs only. The merged table goes into the on-disk reference
cache under the usual key (reference weights, numerics, every token id): the stored sums differ from a
recomputed pass by fp32 rounding only, as a cache computed in another batch layout does.

Not used (everything recomputed, and logged) with --ld-alpha (LD-DPO weights each token by its position
relative to the other completion's length: a plain sum cannot give that), when the reference pass runs
under bf16/fp16 autocast (the sampler's sums are in the model's own precision, so step 0 would not start
from the reference's own rounding), or with --no-ref-cache (the reference then runs live every step).
Unpaired objectives (KTO) and TR-DPO's moving reference have no fixed pair table to fill. Held-out pairs
are always recomputed: evaluation runs the policy in the reference's very batches so that step 0's margins
are exactly 0, which sums from another computation would turn into rounding noise.
"""

from __future__ import annotations

from collections import Counter

import torch

from dpokit.logprobs.sequence import PairLogps


def refusal(cfg, autocast) -> str | None:
    """Why stored sums cannot stand for this run's training reference log-probs; None when they can."""
    if cfg.ld_alpha is not None:
        return "--ld-alpha weights tokens by position (LD-DPO), which a stored sum cannot give"
    if autocast is not None:
        return "the reference pass runs under --dtype autocast; the stored sums are in the model's own precision"
    if not cfg.ref_cache:
        return "--no-ref-cache runs the reference live"
    return None


def sort_pairs(pairs, weights: str) -> tuple[list[int], Counter]:
    """(indices of the pairs whose stored sums apply, Counter of why the others do not)."""
    usable, why = [], Counter()
    for i, p in enumerate(pairs):
        s = p.sampler_ref
        if s is None:
            why["no stored log-probs"] += 1
        elif s.digest != weights:
            why["digest differs"] += 1
        elif (s.prompt_ids, s.chosen_ids, s.rejected_ids) != (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            why["tokenization differed"] += 1
        else:
            usable.append(i)
    return usable, why


def with_sampler_logps(pairs, weights: str, compute, dtype: torch.dtype, log=print) -> PairLogps:
    """Reference log-probs of `pairs`, in order: the stored sums where they apply (`sort_pairs`),
    `compute(list of the other pairs)` → PairLogps for the rest. `dtype`: the sums' dtype a reference pass
    gives (fp32, fp64 for fp64 models)."""
    usable, why = sort_pairs(pairs, weights)
    rest = sorted(set(range(len(pairs))) - set(usable))
    reasons = ", ".join(f"{n} {w}" for w, n in why.most_common())
    log(f"training reference log-probs: {len(usable)} of {len(pairs)} pairs from the sampler, {len(rest)} "
        f"recomputed" + (f" ({reasons})" if reasons else ""))
    n = len(pairs)
    out = PairLogps(torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype), torch.zeros(n), torch.zeros(n))
    if usable:
        idx = torch.tensor(usable)
        stored = [pairs[i].sampler_ref for i in usable]
        out.chosen[idx] = torch.tensor([s.chosen_logp for s in stored], dtype=torch.float64).to(dtype)
        out.rejected[idx] = torch.tensor([s.rejected_logp for s in stored], dtype=torch.float64).to(dtype)
        out.chosen_tokens[idx] = torch.tensor([float(len(s.chosen_ids)) for s in stored])
        out.rejected_tokens[idx] = torch.tensor([float(len(s.rejected_ids)) for s in stored])
    if rest:
        computed, idx = compute([pairs[i] for i in rest]), torch.tensor(rest)
        for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
            getattr(out, name)[idx] = getattr(computed, name).to(getattr(out, name).dtype)
    return out


def applies(pairs, cfg, autocast, log=print) -> bool:
    """True when some training pairs carry stored sums and this run can use them; logs why not otherwise."""
    carrying = sum(getattr(p, "sampler_ref", None) is not None for p in pairs)
    why = refusal(cfg, autocast) if carrying else None
    if why:
        log(f"training reference log-probs: the {carrying} pairs' stored sampler log-probs are not used "
            f"(all recomputed): {why}")
    return bool(carrying) and why is None


def note_unused(pairs, cfg, log=print) -> None:
    """Log it when the rows carry stored sums but the run has no fixed training reference table to fill
    (--no-ref-cache, TR-DPO's --sync-ref-every): nothing is silently ignored."""
    carrying = sum(getattr(p, "sampler_ref", None) is not None for p in pairs)
    if carrying:
        why = "--sync-ref-every moves the reference" if cfg.sync_ref_every else "--no-ref-cache runs the reference live"
        log(f"training reference log-probs: the {carrying} pairs' stored sampler log-probs are not used: {why}")


def sums_dtype(model) -> torch.dtype:
    """The dtype a reference pass gives its sums in: fp32, fp64 for fp64 models (logprobs.sequence)."""
    return torch.promote_types(next(model.parameters()).dtype, torch.float32)
