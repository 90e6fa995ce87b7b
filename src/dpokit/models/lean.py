"""Fewer activations kept for backward, without recomputing a single matmul.

What autograd keeps per token and decoder layer of SmolLM2-135M (measured by walking the backward graph of a
256-token forward, 2026-12-02; floats per token per layer, 11,190 in all):

    inputs of the seven Linears   576 × 3 (q/k/v share one) + 1,536 (down_proj)
    SwiGLU  act(gate) * up        gate 1,536 (SiLU's input), act(gate) 1,536 and up 1,536 (the product's inputs)
    two RMSNorms                  each its input and the normalised input, 576 + 576
    attention (SDPA)              q 576, k 192, v 192, logsumexp 9

The elementwise parts need not be kept: recomputing act(gate) from gate, and x / rms(x) from x, costs a few
elementwise passes in backward and no matmul. So each RMSNorm, and the `act(gate) * up` of each gated MLP, runs
under its own small `torch.utils.checkpoint` (non-reentrant): the norm keeps only its input, the MLP only gate and
up. 2,688 fewer floats per token and layer (−24 % of the activations); the forward computes exactly the same ops,
and backward recomputes them bit for bit, so values and gradients are unchanged (tests/test_lean.py).

Three tensors a layer's Linears keep are rebuilt rather than kept, for the same reason: each RMSNorm's output (the
input of q/k/v, and of gate/up) from the norm's input, and act(gate) * up (down_proj's input) from gate and up, all
of which backward holds anyway. While a patched attention or MLP runs its Linears, a saved-tensor hook stores such
a tensor as its recipe (`_Rebuilds`); backward rebuilds it once, with the same ops on the same inputs, and hands
every Linear that kept it the same values. 2,688 more floats per token and layer (576 + 576 + 1,536); skipped when
other saved-tensor hooks are active (gradient checkpointing, its recompute, activation offloading), which then
decide what is kept. Under autocast a Linear keeps autocast's half copy of a norm's output rather than the output
itself, so there only act(gate) * up is rebuilt (estimate/parts.py counts it so).

Installed by `models.load_model` on modules whose forward it reproduces — probed once per class: the patched
forward must equal the original bit for bit on a random input, else the class is left alone. Active only while
autograd records (no-grad passes — the reference, sampling — run the original forward).
"""

from __future__ import annotations

import types
import weakref
from contextlib import nullcontext

import torch
from torch.utils.checkpoint import checkpoint

_ORIGINAL = "_dpokit_original_forward"
_PROBED: dict[type, bool] = {}


def _recording(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _Rebuilds:
    """Saved-tensor hooks that keep registered tensors as recipes: `register(t, rebuild)` while t is alive; a Linear
    that saves t (or a view of it) then holds (recipe, view geometry), and backward's first unpack calls rebuild()
    once for every holder. Matched by storage while the registered tensor is alive, so a later tensor at a freed
    address is never taken for it. A recipe lives as long as its tensor or a holder does (the set is weak), so
    nothing outlives the graph; it rebuilds under the autocast state its forward ran in."""

    def __init__(self):
        self.recipes: weakref.WeakSet[_Recipe] = weakref.WeakSet()

    def register(self, tensor: torch.Tensor, rebuild) -> None:
        device = tensor.device.type
        recipe = _Recipe(weakref.ref(tensor), rebuild, device, torch.is_autocast_enabled(device),
                         torch.get_autocast_dtype(device))
        tensor._dpokit_recipe = recipe  # alive with the tensor; afterwards only through the graph's holders
        self.recipes.add(recipe)

    def pack(self, t: torch.Tensor):
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            for r in list(self.recipes):
                alive = r.tensor()
                if alive is not None and alive.untyped_storage().data_ptr() == storage.data_ptr() \
                        and alive.dtype == t.dtype and alive.untyped_storage().nbytes() == storage.nbytes():
                    r.holders += 1
                    return (r, t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(self, packed):
        if not isinstance(packed, tuple):
            return packed
        recipe, size, stride, offset = packed
        if recipe.value is None:
            with torch.no_grad(), torch.autocast(recipe.device, dtype=recipe.autocast_dtype,
                                                 enabled=recipe.autocast):
                recipe.value = recipe.rebuild()
        value = recipe.value.as_strided(size, stride, offset)
        recipe.holders -= 1
        if recipe.holders <= 0:  # the last holder has it: free the rebuilt tensor with its use
            recipe.value = None
        return value

    def hooks(self):
        """Active only where no other saved-tensor hooks are (gradient checkpointing's would be overridden)."""
        if not _own_hooks():
            return nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Recipe:
    __slots__ = ("tensor", "rebuild", "device", "autocast", "autocast_dtype", "holders", "value", "__weakref__")

    def __init__(self, tensor, rebuild, device: str, autocast: bool, autocast_dtype):
        self.tensor, self.rebuild, self.holders, self.value = tensor, rebuild, 0, None
        self.device, self.autocast, self.autocast_dtype = device, autocast, autocast_dtype


_REBUILDS = _Rebuilds()


def _own_hooks() -> bool:
    """No other saved-tensor hooks are active (torch has no public query for this; a private one since 1.13)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def _norm_forward(self, hidden_states):
    original = getattr(self, _ORIGINAL)
    if not _recording(hidden_states, self.weight):
        return original(hidden_states)
    out = checkpoint(original, hidden_states, use_reentrant=False, preserve_rng_state=False)
    if _own_hooks():  # the Linears reading `out` keep it as a recipe (the checkpoint keeps hidden_states)
        _REBUILDS.register(out, lambda: original(hidden_states))
    return out


def _gated(act, gate, up):
    return act(gate) * up


def _mlp_forward(self, x):
    with _REBUILDS.hooks():
        gate, up = self.gate_proj(x), self.up_proj(x)
    if _recording(gate, up):
        hidden = checkpoint(_gated, self.act_fn, gate, up, use_reentrant=False, preserve_rng_state=False)
        if _own_hooks():
            _REBUILDS.register(hidden, lambda: _gated(self.act_fn, gate, up))
    else:
        hidden = self.act_fn(gate) * up
    with _REBUILDS.hooks():
        return self.down_proj(hidden)


def _attention_forward(self, *args, **kwargs):
    """The original attention, its q/k/v projections keeping the input norm's output as a recipe."""
    with _REBUILDS.hooks():
        return getattr(self, _ORIGINAL)(*args, **kwargs)


def _kind(module) -> str | None:
    if type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor):
        return "norm"
    if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return "mlp"
    if all(isinstance(getattr(module, a, None), torch.nn.Module) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "attention"
    return None


def _exact(module, kind: str) -> bool:
    """The patched forward gives the original's output bit for bit on a random input (with grad recording on, so
    the checkpointed path is the one compared)."""
    if kind == "attention":  # its own forward under hooks that only change what backward keeps
        return True
    cls = type(module)
    if cls not in _PROBED:
        width = module.weight.shape[0] if kind == "norm" else module.gate_proj.in_features
        param = next(module.parameters())
        x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
        x.requires_grad_(True)
        try:
            with torch.autocast(param.device.type, enabled=False):
                want = module.forward(x)
                got = (_norm_forward if kind == "norm" else _mlp_forward)(_with_original(module), x)
            _PROBED[cls] = bool(torch.equal(want, got))
        except Exception:  # noqa: BLE001 — a forward we do not reproduce: leave the class alone
            _PROBED[cls] = False
    return _PROBED[cls]


def _with_original(module):
    if not hasattr(module, _ORIGINAL):
        setattr(module, _ORIGINAL, module.forward)
    return module


def install(model) -> int:
    """Route every exact RMSNorm and gated MLP of `model` through the lean forward; returns how many modules.
    Idempotent. Bound with types.MethodType so that copy.deepcopy (the reference copy) rebinds to the copy."""
    count = 0
    for module in model.modules():
        kind = _kind(module)
        if kind is None or "_dpokit_lean" in module.__dict__ or not _exact(module, kind):
            continue
        _with_original(module)
        forward = {"norm": _norm_forward, "mlp": _mlp_forward, "attention": _attention_forward}[kind]
        module.forward = types.MethodType(forward, module)
        module._dpokit_lean = True
        count += 1
    return count
