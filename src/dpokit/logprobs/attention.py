"""Attention that follows the pair structure: no [T, T] mask, no hidden block computed.

A row is described by its segments, [S, 5] (row, p0, p1, q0, q1): queries q0 … q1−1 attend to every key in
p0 … p1−1 (the shared prompt) and causally to keys q0 … q (themselves). A prefix-shared pair at offset o is
two segments, (o, o, o, o+P+C) for prompt+chosen and (o, o, o+P, o+P+C, o+L) for the rejected tokens; a
right-padded row of n tokens is (r, 0, 0, 0, n). Positions in no segment are padding: their output is 0.

Each segment is one fused SDPA call: `is_causal=True` when it has no prefix, else the bottom-right causal
bias over cat(prefix keys, own keys) — `causal_lower_right` (on CPU torch materialises that |Q|×(|P|+|Q|)
bool mask, linear in the row length; on CUDA the flash / efficient kernels take it natively). So the work
is Σ |Q|·(|P|+|Q|/2) instead of T² per row, and memory stays linear in T.

The model's attention layers reach this through transformers' AttentionInterface: `install` renames the
config's attention implementation to `dpokit_segments:<original>`, which runs the segments when the call
carries `dpokit_segments` and the original implementation otherwise, so dense calls, generation and the
recompute of gradient checkpointing (which reads the config again in backward) all stay right. The name
is not saved with the model (transformers drops `_attn_implementation_internal` from config.json).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from dpokit.config import ConfigError

NAME = "dpokit_segments"
KINDS = ("auto", "dense", "segments")
SUPPORT = "_dpokit_segments"   # on the model: '' when segments are exact on it, else the reason they are not
# arguments some attention layers pass that segment-wise SDPA would ignore: refuse rather than differ
UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "position_bias", "attention_chunk_size")

_requested = "auto"
_log = print
_logged: set[str] = set()
_active: ContextVar[bool] = ContextVar("dpokit_segments_active", default=False)


class SegmentsUnsupported(RuntimeError):
    """Segment-wise attention would not be exact for this model."""


def use_attention(kind: str, log=print) -> None:
    """Set the process's attention choice (--attention) and where the choice is logged (once per reason)."""
    global _requested, _log
    if kind not in KINDS:
        raise ConfigError(f"--attention {kind!r}: must be one of {', '.join(KINDS)}")
    _requested, _log = kind, log
    _logged.clear()


@contextmanager
def attention_kind(kind: str, log=print):
    """`use_attention(kind, log)` for the duration of a block (a run, a test), then the previous choice back."""
    before = _requested, _log
    use_attention(kind, log)
    try:
        yield
    finally:
        use_attention(*before)


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        _log(f"attention: {message}")


# ---- segment descriptions ----------------------------------------------------------------------------

def padded_segments(mask: torch.Tensor) -> torch.Tensor | None:
    """[S, 5] segments of a 2D padding mask [R, T] (1 = real token): one per non-empty row, causal over its
    real tokens. None when some row's real tokens are not contiguous (not a padded layout)."""
    m = mask.bool().cpu()
    n = m.sum(1)
    first = m.long().argmax(1)
    rows = (n > 0).nonzero().flatten()
    segs = torch.stack([rows, first[rows], first[rows], first[rows], first[rows] + n[rows]], 1)
    ends = torch.arange(m.shape[1])
    inside = (ends >= first[:, None]) & (ends < (first + n)[:, None])
    return segs if bool((inside == m).all()) else None


def batch_segments(batch: dict) -> torch.Tensor | None:
    """The segments of a batch from `collate_packed` (its "segments") or from a padded 2D mask."""
    if "segments" in batch:
        return batch["segments"]
    mask = batch.get("attention_mask")
    return padded_segments(mask) if mask is not None and mask.dim() == 2 else None


def dense_mask(segments: torch.Tensor, rows: int, width: int, device=None) -> torch.Tensor:
    """The [rows, 1, T, T] bool may-attend mask equal to `segments` (padding attends to itself: no NaN)."""
    allowed = torch.eye(width, dtype=torch.bool).repeat(rows, 1, 1)
    for r, p0, p1, q0, q1 in segments.tolist():
        allowed[r, q0:q1, p0:p1] = True
        allowed[r, q0:q1, q0:q1] = torch.ones(q1 - q0, q1 - q0, dtype=torch.bool).tril()
    return allowed[:, None].to(device)


# ---- the attention function --------------------------------------------------------------------------

def segment_attention(module, query, key, value, segments, dropout: float = 0.0, scaling: float | None = None):
    """query [B, H, T, D], key/value [B, Hkv, T, D·] → [B, T, H, D·]; one SDPA call per segment."""
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as SDPA under autocast; CausalBias's checks run before autocast would
        low = torch.get_autocast_dtype(device)
        query, key, value = query.to(low), key.to(low), value.to(low)
    groups = query.shape[1] // key.shape[1]
    # CPU's fused kernel takes grouped heads (measured: less memory than repeating); elsewhere repeat them,
    # since the lower-right path of CausalBias calls the flash kernel without enable_gqa.
    gqa = groups > 1 and device == "cpu"
    if groups > 1 and not gqa:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    B, H, T, _ = query.shape
    by_row: dict[int, list] = {}
    for seg in segments:
        if seg[4] > seg[3]:
            by_row.setdefault(seg[0], []).append(seg)
    rows = []
    for r in range(B):
        segs = sorted(by_row.get(r, []), key=lambda s: s[3])
        # cut the row at every boundary once: each segment's queries, prefix keys and own keys are then
        # whole pieces, and backward concatenates the pieces' gradients instead of adding full-size zero tensors
        cuts = sorted({0, T, *(x for s in segs for x in s[1:])})
        sizes = [b - a for a, b in zip(cuts, cuts[1:])]
        at = {a: i for i, a in enumerate(cuts[:-1])}
        qs, ks, vs = (t[r:r + 1].split(sizes, 2) for t in (query, key, value))

        def span(parts, a, b):
            i, j = at[a], (at[b] if b in at else len(parts))
            return parts[i] if j == i + 1 else torch.cat(parts[i:j], 2)
        pieces, pos = [], 0
        for _, p0, p1, q0, q1 in segs:
            if q0 > pos:
                pieces.append(query.new_zeros(1, q0 - pos, H, value.shape[-1]))
            q, k, v = span(qs, q0, q1), span(ks, q0, q1), span(vs, q0, q1)
            if p1 > p0:  # bottom-right causal over cat(prefix, own): query i sees the prefix and own keys ≤ i
                k, v = torch.cat([span(ks, p0, p1), k], 2), torch.cat([span(vs, p0, p1), v], 2)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q1 - q0, k.shape[2]),
                                                   dropout_p=dropout, scale=scaling, enable_gqa=gqa)
            else:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling,
                                                   enable_gqa=gqa)
            pieces.append(o.transpose(1, 2))  # [1, q, H, D]: concatenated, the row is already [T, H, D]
            pos = q1
        if pos < T:
            pieces.append(query.new_zeros(1, T - pos, H, value.shape[-1]))
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1))
    out = rows[0] if B == 1 else torch.cat(rows, 0)
    return out if out.is_contiguous() else out.contiguous()


def _dispatcher(original: str, module_name: str):
    """The attention function registered as `dpokit_segments:<original>`."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, dpokit_segments=None,
                  **kwargs):
        if dpokit_segments is None:
            dense = (getattr(sys.modules[module_name], "eager_attention_forward") if original == "eager"
                     else ALL_ATTENTION_FUNCTIONS[original])
            return dense(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        used = [k for k in UNSUPPORTED if kwargs.get(k) is not None]
        if used or attention_mask is not None or kwargs.get("is_causal") is False:
            raise SegmentsUnsupported(f"{type(module).__name__} passes {used or 'an attention mask or is_causal'}")
        return segment_attention(module, query, key, value, dpokit_segments, dropout, scaling), None
    return attention


def _mask_dispatcher(original: str):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    base = ALL_MASK_ATTENTION_FUNCTIONS[original]

    def mask(*args, **kwargs):  # under segments no mask at all (transformers would build one from positions)
        return None if _active.get() else base(*args, **kwargs)
    return mask


@contextmanager
def segments_active():
    token = _active.set(True)
    try:
        yield
    finally:
        _active.reset(token)


# ---- deciding, per model and per batch ---------------------------------------------------------------

def install(model) -> str:
    """Route the model's attention through `dpokit_segments:<original>` if segments are exact on it; '' if
    so, else why not (the model is left as it was). Probed once per model instance, then cached."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    found = getattr(model, SUPPORT, None)
    if found is not None:
        return found
    config = model.config
    original = config._attn_implementation
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    if original is None or not original.startswith(NAME):
        if original not in ("sdpa", "eager"):
            why = f"it runs {original!r} attention (segments wrap sdpa or eager)"
        elif not getattr(base, "_supports_attention_backend", False):
            why = f"{type(base).__name__}'s attention layers do not go through transformers' AttentionInterface"
        else:
            name = f"{NAME}:{original}"
            ALL_ATTENTION_FUNCTIONS.register(name, _dispatcher(original, type(base).__module__))
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, _mask_dispatcher(original))
            why = _probe(model, name)
            if why:
                config._attn_implementation = original
    else:
        why = ""
    setattr(model, SUPPORT, why)
    return why


def _probe(model, name: str) -> str:
    """Install `name`; '' when segments and the dense mask then give the model's own hidden states on two
    packed pairs (tolerance as `fast_head`'s probe), else why not."""
    embed = model.get_input_embeddings().weight
    ids = torch.linspace(0, embed.shape[0] - 1, 21, device=embed.device).long()[None]                 # [1, 21]
    # pair 1: P 4, C 3, R 2 (positions 0-6, 4-5); pair 2: P 5, C 4, R 3; then 0 pad
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7]], device=embed.device)
    segs = torch.tensor([[0, 0, 0, 0, 7], [0, 0, 4, 7, 9], [0, 9, 9, 9, 18], [0, 9, 14, 18, 21]])
    mask = dense_mask(segs, 1, 21, embed.device)
    additive = torch.zeros((), dtype=embed.dtype, device=embed.device).masked_fill(~mask, torch.finfo(embed.dtype).min)
    decoder, was_training = model.get_decoder(), model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(embed.device.type, enabled=False):
            before = decoder(input_ids=ids, attention_mask=additive, position_ids=pos, use_cache=False)[0]
            model.config._attn_implementation = name
            dense = decoder(input_ids=ids, attention_mask=additive, position_ids=pos, use_cache=False)[0]
            with segments_active():
                seg = decoder(input_ids=ids, attention_mask=None, position_ids=pos, use_cache=False,
                              dpokit_segments=tuple(map(tuple, segs.tolist())))[0]
    except Exception as e:  # noqa: BLE001 — any failure means: not exact here, use the dense mask
        return f"segment-wise attention fails on it: {type(e).__name__}: {e}"
    finally:
        model.train(was_training)
    tol = max(1e-4, 8 * torch.finfo(embed.dtype).eps) * max(1.0, before.abs().max().item())
    for label, got in (("the dense mask through dpokit", dense), ("segments", seg)):
        diff = (got - before).abs().max().item()
        if not diff <= tol:
            return f"{label} moved its hidden states by {diff:.3g} > {tol:.2g} (probe)"
    return ""


def choose(model, segments: torch.Tensor | None) -> bool:
    """Whether this batch runs segment-wise: --attention and the model's support decide. auto takes segments
    wherever they are exact: measured faster than the dense mask at every row length tried, short packed rows
    included (docs/PERFORMANCE.md)."""
    if _requested == "dense":
        return False
    if segments is None:
        if _requested == "segments":
            raise ConfigError("--attention segments: this batch's rows are not padded or packed pairs")
        return False
    why = install(model)
    if why:
        if _requested == "segments":
            raise ConfigError(f"--attention segments: not exact on this model: {why}; use --attention dense "
                              "or auto")
        _log_once(f"dense 4D masks ({why})")
        return False
    _log_once(f"segment-wise SDPA ({_requested}): no T×T mask, hidden blocks skipped")
    return True
