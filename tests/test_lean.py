"""models/lean.py: norms and SwiGLU recompute their elementwise ops in backward — same values and gradients bit for
bit, fewer bytes kept, in every setting a policy trains in (plain, gradient checkpointing, LoRA, a deepcopy'd
reference)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from conftest import make_tiny_model
from dpokit.models import lean


def _kept_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward of one forward (each storage once, parameters left out)."""
    seen, total = set(), [0]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_decoder()(input_ids=ids).last_hidden_state  # the decoder's: the head's logits are no layer's
    return total[0]


def _run(model, ids):
    """Logits and every parameter's gradient of a simple loss."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.float().log_softmax(-1)[..., 7].sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _same(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name


@pytest.fixture
def pair():
    plain, patched = make_tiny_model(600), make_tiny_model(600)
    assert lean.install(patched) == 9  # 2 layers × (2 norms + MLP + attention) + the final norm
    assert lean.install(patched) == 0  # idempotent
    return plain, patched


IDS = (torch.arange(40)[None] * 13) % 600


def test_values_and_gradients_bit_for_bit_with_fewer_bytes_kept(pair):
    plain, patched = pair
    _same(_run(plain, IDS), _run(patched, IDS))
    # tiny model: per token and layer the norms drop 2 × hidden (32) and the MLP act(gate) (64) of what is kept
    assert _kept_bytes(patched, IDS) < 0.85 * _kept_bytes(plain, IDS)
    with torch.no_grad():  # no-grad passes (reference, sampling) run the original forward
        assert torch.equal(plain(input_ids=IDS).logits, patched(input_ids=IDS).logits)


def test_norm_outputs_and_gated_product_are_rebuilt_not_kept(pair):
    """The Linears' inputs that backward can rebuild (each norm's output, act(gate) * up) are freed after the
    forward: only the recipe is kept. The stock model keeps them alive in the graph."""
    for model, kept in zip(pair, (True, False)):
        seen = []
        layer = model.model.layers[0]
        hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(weakref.ref(args[0])))
                 for m in (layer.self_attn.q_proj, layer.mlp.gate_proj, layer.mlp.down_proj)]
        logits = model(input_ids=IDS).logits  # graph alive: nothing has been released by backward
        gc.collect()
        assert [r() is not None for r in seen] == [kept] * 3
        for h in hooks:
            h.remove()
        logits.sum().backward()  # and backward still runs off the rebuilt values


def test_under_autocast(pair):
    """bf16 autocast (`--dtype bf16`): the rebuild runs under the forward's autocast state, values bit for bit."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        runs = [_run(m, IDS) for m in pair]
    _same(*runs)


def test_under_gradient_checkpointing(pair):
    plain, patched = pair
    for m in pair:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    _same(_run(plain, IDS), _run(patched, IDS))


def test_with_lora(pair):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)
    plain = get_peft_model(pair[0], cfg)
    torch.manual_seed(1)
    patched = get_peft_model(pair[1], cfg)
    _same(_run(plain, IDS), _run(patched, IDS))


def test_deepcopy_computes_with_its_own_weights(pair):
    _, patched = pair
    ref = copy.deepcopy(patched)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.5)
    norm = ref.model.layers[0].input_layernorm
    assert norm.forward.__self__ is norm and norm._dpokit_original_forward.__self__ is norm
    mlp = ref.model.layers[0].mlp
    assert mlp.forward.__self__ is mlp
    fresh = make_tiny_model(600)
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(0.5)
    _same(_run(fresh, IDS), _run(ref, IDS))


def test_a_forward_it_does_not_reproduce_is_left_alone():
    class OddRMSNorm(torch.nn.Module):  # named like a norm, computes something else under the patch's call
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

        def forward(self, x, scale=None):
            if scale is None:
                raise TypeError("needs scale")
            return x * self.weight * scale
    model = torch.nn.Sequential(OddRMSNorm())
    assert lean.install(model) == 0
