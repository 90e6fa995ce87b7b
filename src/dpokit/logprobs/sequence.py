"""Completion log-probs log π(y|x): per token, summed per sequence, and per pair.

The fast path runs the transformer body once, keeps the hidden states only at positions that predict
a completion token, and applies the LM head to those alone, in chunks: the [rows, T, vocab] fp32
logits tensor (49k vocab here, 128k+ for Llama 3) never exists. `sequence_logps_full` is the plain
textbook computation from the full logits; tests hold the two equal. Models whose logits are not
lm_head(hidden) — scaled, soft-capped — are found by a probe (`fast_head`) and take the full logits.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dpokit.logprobs.attention import batch_segments, choose, dense_mask, segments_active

# Above this many logit elements per chunk the head is recomputed in backward instead of storing
# logits: 2**25 fp32 values is 128 MB, small next to activations yet large enough to keep matmuls fast.
CHUNK_ELEMENTS = 2**25


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The dtype forward passes autocast to: bf16 when asked (or 'auto' on a GPU), fp16 when asked, else none."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float16 if dtype == "fp16" else None


def autocasts_bf16(device: torch.device, dtype: str) -> bool:
    return autocast_dtype(device, dtype) == torch.bfloat16


def compute_precision(device: torch.device, dtype: str):
    """The autocast context for forward passes (weights stay fp32; see `autocast_dtype`)."""
    low = autocast_dtype(device, dtype)
    return torch.autocast(device.type, dtype=low or torch.bfloat16, enabled=low is not None)


@dataclass
class TokenLogps:
    """Log-probs of the K completion tokens of a batch, flattened. All tensors are [K]."""
    values: torch.Tensor      # log π(y_t | x, y_<t), with grad when the model has it
    rows: torch.Tensor        # batch row of each token
    positions: torch.Tensor   # 0-based index of the token inside its completion
    log_sum_sq: torch.Tensor | None  # log Σ_v π(v | ·)², detached (for WPO), when asked for
    n_rows: int
    entropy: torch.Tensor | None = None  # H(π(· | prefix)) at each scored position, detached, when asked for

    def sums(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        values = self.values if weights is None else self.values * weights
        return torch.zeros(self.n_rows, dtype=values.dtype, device=values.device).index_add(0, self.rows, values)

    def counts(self) -> torch.Tensor:
        ones = torch.ones_like(self.values, dtype=torch.float32).detach()
        return torch.zeros(self.n_rows, device=ones.device).index_add(0, self.rows, ones)

    def shared(self, seq_map: torch.Tensor) -> "TokenLogps":
        """The tokens as if every row r had been computed itself: row r gets a copy of row seq_map[r]'s tokens
        (a completion several pairs share was computed once, under its first row). A gather, so the gradient
        of each copy flows back into the one computed token: the same gradient as the rows written out."""
        seq_map = seq_map.to(self.rows.device)
        order = torch.sort(self.rows, stable=True).indices            # tokens grouped by row, in their order
        counts = torch.bincount(self.rows, minlength=self.n_rows)
        starts = counts.cumsum(0) - counts                            # where each row's tokens begin in `order`
        new_counts = counts[seq_map]
        rows = torch.repeat_interleave(torch.arange(self.n_rows, device=seq_map.device), new_counts)
        offsets = torch.arange(rows.numel(), device=rows.device) - (new_counts.cumsum(0) - new_counts)[rows]
        idx = order[starts[seq_map][rows] + offsets]
        return TokenLogps(self.values[idx], rows, self.positions[idx],
                          None if self.log_sum_sq is None else self.log_sum_sq[idx], self.n_rows,
                          None if self.entropy is None else self.entropy[idx])


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _head_logits(head, device_type: str):
    """The function giving a chunk's logits (fp32 or wider) from its hidden states, decided once per call.

    With half-precision weights (--model-dtype bf16/fp16) and no autocast, a plain linear head runs in fp32 on the
    upcast hidden states and weight: bf16 logits of magnitude 16–32 are rounded to 1/8, an error no later fp32
    log-softmax can undo. The weight ([vocab, hidden]) is upcast once here, not per chunk. Under autocast
    (--dtype bf16/fp16, or auto on a GPU) the matmul runs in the compute precision asked for and autocast would
    cast an fp32 weight straight back, so no copy is made; only the log-softmax is fp32 there."""
    weight = getattr(head, "weight", None)
    if type(head) is not torch.nn.Linear or weight.dtype.itemsize >= 4 or torch.is_autocast_enabled(device_type):
        return lambda states: _at_least_fp32(head(states))  # (the module's own call: FSDP2's hooks unshard it)
    weight32 = _at_least_fp32(weight)
    bias32 = None if head.bias is None else _at_least_fp32(head.bias)
    return lambda states: F.linear(_at_least_fp32(states), weight32, bias32)


def _token_stats(states: torch.Tensor, head, targets: torch.Tensor, with_sq: bool, temperature: float = 1.0,
                 with_entropy: bool = False):
    logits = head(states)  # `_head_logits`: fp32 or wider
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    sq = entropy = None
    with torch.no_grad():  # from the chunk's logits already there: no second pass over the head
        if with_sq:
            sq = torch.logsumexp(2 * logits.detach(), dim=-1) - 2 * lse.detach()
        if with_entropy:  # H = −Σ_v p_v log p_v = lse − Σ_v p_v z_v, z the (tempered) logits
            z = logits.detach()
            entropy = lse.detach() - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logps, sq, entropy


# The fast path's decision, cached on the model instance (PEFT forwards attribute look-ups to the model it
# wraps, DDP/FSDP2 wrap a `TokenLogpsModule` holding it, deepcopy copies it).
DECISION = "_dpokit_fast_head"
PROBE_TOKENS = 16
# Config keys of post-processings the probe may not see: a soft-cap c·tanh(z/c) is the identity while |z| ≪ c
# (random or early weights), yet bends a trained model's logits. Scales (Granite's logits_scaling, Falcon-H1's
# lm_head_multiplier, …) show at any weights, so the probe finds them without a list.
CAPPING_KEYS = ("final_logit_softcapping", "logit_scale")


def fast_head(model) -> bool:
    """Whether logits are output_embeddings(decoder(x).last_hidden_state), so the fast path is exact.

    Decided once per model instance (`load_model` decides at load, before any DDP/FSDP2 wrapping; other
    models at their first use) and warned about once when the answer is no."""
    decided = getattr(model, DECISION, None)
    if decided is None:
        why = _probe_head(model)
        if why:
            name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__  # PEFT
            warnings.warn(f"dpokit: {name}: fast log-prob path off ({why}); log-probs come from the "
                          "model's full [rows, T, vocab] logits, which takes more memory", stacklevel=2)
        decided = not why
        setattr(model, DECISION, decided)
    return decided


def _probe_head(model) -> str:
    """Why the fast path would differ from model(x).logits, or '' when it agrees.

    Compares log_softmax of both on PROBE_TOKENS ids spread over the vocabulary, in eval mode, under
    no_grad, without autocast. Tolerance: max |Δ| ≤ max(1e-4, 8 eps) · max(1, max |log p|) — fp32 rounding
    of the same matmuls passes (Δ ≈ 0), a scaled head fails (Δ ≈ (1 − m)·spread of the logits). A linear head
    with half-precision weights runs in fp32 on both sides during the probe (a forward hook), so the logits,
    and the tolerance, are fp32's: bf16's 8·eps (~0.06 × |log p|) would let a mild scale (m ≈ 1.05) through."""
    for key in CAPPING_KEYS:
        if getattr(model.config, key, None) is not None:
            return f"config.{key} = {getattr(model.config, key)}"
    head = model.get_output_embeddings()
    if head is None:
        return "the model has no output embeddings"
    embed = model.get_input_embeddings().weight
    ids = torch.linspace(0, embed.shape[0] - 1, PROBE_TOKENS, device=embed.device).long()[None]   # [1, P]
    was_training = model.training
    model.eval()
    hook = None
    if type(head) is torch.nn.Linear and head.weight.dtype.itemsize < 4:  # output replaced by the fp32 head's
        hook = head.register_forward_hook(lambda m, inputs, _: F.linear(
            _at_least_fp32(inputs[0]), _at_least_fp32(m.weight), None if m.bias is None else _at_least_fp32(m.bias)))
    try:
        with torch.no_grad(), torch.autocast(embed.device.type, enabled=False):
            full = model(input_ids=ids, use_cache=False).logits
            try:
                fast = head(model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state)
            except Exception as e:  # noqa: BLE001 — any failure of the split call means: use the whole model
                return f"calling the decoder and the head separately fails: {type(e).__name__}: {e}"
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()
    if fast.shape != full.shape:
        return f"decoder → head gives {tuple(fast.shape)}, the model {tuple(full.shape)}"
    full_lp, fast_lp = F.log_softmax(_at_least_fp32(full), -1), F.log_softmax(_at_least_fp32(fast), -1)
    diff = (fast_lp - full_lp).abs().max().item()
    tol = max(1e-4, 8 * torch.finfo(full.dtype).eps) * max(1.0, full_lp.abs().max().item())
    if not diff <= tol:  # (NaN fails too)
        return f"max |Δ log-softmax| = {diff:.3g} > {tol:.2g} against the model's logits ({PROBE_TOKENS}-token probe)"
    return ""


def padded_score_index(completion_mask: torch.Tensor, row_seqs: torch.Tensor | None = None,
                       n_seqs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Score index of a right-padded batch: token t of row n is predicted from position t − 1
    (so the first token of a row is never scored); each row is its own sequence, or sequence row_seqs[n]
    of n_seqs when `collate` left out repeated rows."""
    scored = completion_mask[:, 1:].bool()
    rows, src = scored.nonzero(as_tuple=True)
    return {"score_row": rows, "score_src": src, "score_tgt": src + 1,
            "score_seq": rows if row_seqs is None else row_seqs.to(rows.device)[rows],
            "score_pos": (scored.long().cumsum(1) - 1)[scored],
            "n_seqs": torch.tensor(completion_mask.shape[0]) if n_seqs is None else n_seqs}


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D boolean may-attend mask → the additive float mask every attention implementation accepts."""
    return torch.zeros((), dtype=dtype, device=attention_mask.device).masked_fill(
        ~attention_mask, torch.finfo(dtype).min)


def batch_token_logps(model, batch: dict[str, torch.Tensor], with_sq: bool = False,
                      temperature: float = 1.0, with_entropy: bool = False) -> TokenLogps:
    """Log-probs of every scored completion token of a batch from `collate` (padded) or
    `collate_packed` (prefix-shared, packed); under softmax(logits / temperature) when it is not 1 (GRPO).
    with_entropy: also the entropy of that distribution at each scored position (GRPO's `entropy` metric),
    computed under no_grad from each head chunk's logits in the same pass."""
    index = batch if "score_seq" in batch else padded_score_index(batch["completion_mask"], batch.get("row_seqs"),
                                                                  batch.get("n_seqs"))
    ids, segments = batch["input_ids"], batch_segments(batch)
    kwargs = dict(input_ids=ids, position_ids=batch.get("position_ids"), use_cache=False)
    structured = choose(model, segments)
    if structured:  # no mask: each segment is one SDPA call (logprobs/attention.py)
        kwargs.update(attention_mask=None, dpokit_segments=tuple(map(tuple, segments.tolist())))
    else:
        mask = batch.get("attention_mask")
        if mask is None:
            mask = dense_mask(segments, *ids.shape, ids.device)
        kwargs["attention_mask"] = additive_mask(mask, model.dtype) if mask.dim() == 4 else mask
    row, src = index["score_row"], index["score_src"]
    targets = ids[row, index["score_tgt"]]                                      # [K]
    with segments_active() if structured else nullcontext():
        if fast_head(model):
            states = model.get_decoder()(**kwargs).last_hidden_state[row, src]  # [K, H] only what is scored
            head = model.get_output_embeddings()
        else:  # logits post-processed by the model: take them whole, then select
            states, head = model(**kwargs).logits[row, src], torch.nn.Identity()
    width = head.out_features if hasattr(head, "out_features") else states.shape[-1]
    chunk = max(1, CHUNK_ELEMENTS // width)
    head = _head_logits(head, states.device.type)
    if states.shape[0] <= chunk:
        values, sq, entropy = _token_stats(states, head, targets, with_sq, temperature, with_entropy)
    else:
        recompute = torch.is_grad_enabled()
        parts = [checkpoint(_token_stats, s, head, t, with_sq, temperature, with_entropy, use_reentrant=False)
                 if recompute else _token_stats(s, head, t, with_sq, temperature, with_entropy)
                 for s, t in zip(states.split(chunk), targets.split(chunk))]
        values = torch.cat([p[0] for p in parts])
        sq = torch.cat([p[1] for p in parts]) if with_sq else None
        entropy = torch.cat([p[2] for p in parts]) if with_entropy else None
    return TokenLogps(values, index["score_seq"], index["score_pos"], sq, int(index["n_seqs"]), entropy)


class TokenLogpsModule(torch.nn.Module):
    """A causal LM whose forward is `batch_token_logps`: the unit DDP and FSDP2 wrap.

    They act through hooks on a module's forward, and the fast path above calls the decoder and the LM
    head separately, never the HF model's own forward."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict, with_sq: bool = False, temperature: float = 1.0, with_entropy: bool = False):
        tok = batch_token_logps(self.lm, batch, with_sq, temperature, with_entropy)
        # a tuple of tensors, not a dataclass: the wrappers find the outputs to hook by walking the pytree
        return tok.values, tok.rows, tok.positions, tok.log_sum_sq, torch.tensor(tok.n_rows), tok.entropy


def token_logps(model, batch: dict[str, torch.Tensor], with_sq: bool = False, temperature: float = 1.0,
                with_entropy: bool = False) -> TokenLogps:
    """`batch_token_logps` for an HF model, or through the forward of a DDP/FSDP-wrapped `TokenLogpsModule`."""
    if isinstance(model, TokenLogpsModule) or isinstance(getattr(model, "module", None), TokenLogpsModule):
        values, rows, positions, log_sum_sq, n_rows, entropy = model(batch, with_sq, temperature, with_entropy)
        return TokenLogps(values, rows, positions, log_sum_sq, int(n_rows), entropy)
    return batch_token_logps(model, batch, with_sq, temperature, with_entropy)


def completion_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           completion_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                           with_sq: bool = False) -> TokenLogps:
    """Log-probs of every completion token (completion_mask == 1) of a right-padded [N, T] batch."""
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    if position_ids is not None:
        batch["position_ids"] = position_ids
    return token_logps(model, batch, with_sq)


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of log π(token | prefix) over completion tokens, per row: [N] in fp32 (fp64 for fp64 models)."""
    return completion_token_logps(model, input_ids, attention_mask, completion_mask, position_ids).sums()


def sequence_logps_full(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Same result as `sequence_logps`, from the model's full [N, T, vocab] logits (simple, memory-hungry)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits[:, :-1]
    logits = _at_least_fp32(logits)
    token_logps = F.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


@dataclass
class PairLogps:
    """Per-pair log-prob summaries of a batch from `batches.collate` (rows: B chosen, then B rejected)."""
    chosen: torch.Tensor            # [B] summed completion log-probs (LD-weighted when ld_alpha is set)
    rejected: torch.Tensor          # [B]
    chosen_tokens: torch.Tensor     # [B] completion lengths
    rejected_tokens: torch.Tensor   # [B]
    chosen_wpo: torch.Tensor | None = None    # [B] mean_t (log π(y_t) − log Σ_v π(v)²), for WPO
    rejected_wpo: torch.Tensor | None = None
    chosen_plain: torch.Tensor | None = None  # [B] unweighted sum when `chosen` is LD-weighted, else None

    def select(self, index: list[int], device=None) -> "PairLogps":
        """The rows `index` (e.g. one micro-batch out of a whole-dataset table), moved to `device`."""
        idx = torch.tensor(index)
        return PairLogps(*(None if (t := getattr(self, n)) is None else t[idx].to(device)
                           for n in ("chosen", "rejected", "chosen_tokens", "rejected_tokens", "chosen_wpo",
                                     "rejected_wpo", "chosen_plain")))

    @property
    def chosen_nll_logps(self) -> torch.Tensor:
        """[B] Σ_t log π(y_w,t), every token weighted 1: what NLL terms use (LD-DPO weights only log-ratios)."""
        return self.chosen if self.chosen_plain is None else self.chosen_plain

    @property
    def chosen_avg(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_avg(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)


def pair_logps(model, batch: dict[str, torch.Tensor], ld_alpha: float | None = None,
               with_wpo: bool = False) -> PairLogps:
    """Log-prob summaries of each pair.

    ld_alpha (LD-DPO, Liu 2024): tokens beyond the shorter completion's length count with weight α, so
    the longer answer's extra tokens stop dominating the log-ratio. α = 1 is plain DPO. The unweighted
    chosen sum is kept too (`chosen_plain`): NLL terms stay plain NLL, as in TRL.
    """
    tok = token_logps(model, batch, with_sq=with_wpo)
    if "seq_map" in batch:  # completions shared by several pairs were computed once (batches/packing.py)
        tok = tok.shared(batch["seq_map"])
    counts = tok.counts()
    b = tok.n_rows // 2
    weights = None
    if ld_alpha is not None:
        shared = torch.minimum(counts[:b], counts[b:]).repeat(2)   # per row: the pair's shorter length
        one = torch.ones((), dtype=tok.values.dtype, device=counts.device)
        weights = torch.where(tok.positions < shared[tok.rows], one, one * ld_alpha)
    sums = tok.sums(weights)
    out = PairLogps(sums[:b], sums[b:], counts[:b], counts[b:])
    if weights is not None:
        out.chosen_plain = tok.sums()[:b]
    if with_wpo:
        aligned = torch.zeros(tok.n_rows, device=counts.device, dtype=tok.values.dtype).index_add(
            0, tok.rows, tok.values.detach() - tok.log_sum_sq) / counts.clamp(min=1)
        out.chosen_wpo, out.rejected_wpo = aligned[:b], aligned[b:]
    return out
