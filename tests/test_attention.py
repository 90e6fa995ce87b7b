"""Segment-wise attention (logprobs/attention.py) equals the dense-mask path, builds no [T, T] tensor, and is
refused where it would not be exact."""

from __future__ import annotations

import pytest
import torch

import dpokit.logprobs.attention as attn
from conftest import make_tiny_model
from dpokit.batches import collate, collate_kto, collate_packed, pad_rows, tokenize_pair
from dpokit.batches.tokenize import TokenizedCompletion, TokenizedPair
from dpokit.config import ConfigError, TrainConfig
from dpokit.data.formats import Pair
from dpokit.logprobs.sequence import batch_token_logps


@pytest.fixture(autouse=True)
def restore_choice():
    yield
    attn.use_attention("auto")


def _pairs(tokenizer, rows):
    return [tokenize_pair(Pair(r["prompt"], r["chosen"], r["rejected"], f"x:{i}"), tokenizer, 512, None)
            for i, r in enumerate(rows)]


def _layouts(tokenizer, rows):
    pairs, pad = _pairs(tokenizer, rows), tokenizer.pad_token_id
    kto = [TokenizedCompletion(p.prompt_ids, c, i % 2 == 0, p.source)
           for i, p in enumerate(pairs) for c in (p.chosen_ids, p.rejected_ids)][:6]
    prompt = pairs[0].prompt_ids  # a GRPO group: one prompt, completions of different lengths
    group = [(prompt, p.chosen_ids[:n]) for p, n in zip(pairs, (3, 9, 17, 30))]
    return {"padded": collate(pairs, pad), "prefix-shared": collate_packed(pairs, pad, 0),
            "packed": collate_packed(pairs, pad, 400), "kto": collate_kto(kto, pad, 512),
            "grpo-group": pad_rows(group, pad)}


def _run(model, batch, kind, params):
    """Log-prob values and the gradients of a fixed scalar of them, under --attention `kind`."""
    attn.use_attention(kind, log=lambda m: None)
    model.zero_grad(set_to_none=True)
    tok = batch_token_logps(model, batch)
    (tok.values * torch.linspace(-1, 1, tok.values.numel())).sum().backward()
    return tok.values.detach(), [p.grad.clone() for p in params]


def _assert_same(model, batch, params):
    dense_v, dense_g = _run(model, batch, "dense", params)
    seg_v, seg_g = _run(model, batch, "segments", params)
    assert attn.install(model) == ""
    torch.testing.assert_close(seg_v, dense_v, rtol=1e-5, atol=1e-5 * dense_v.abs().max().item())
    for s, d in zip(seg_g, dense_g):
        torch.testing.assert_close(s, d, rtol=1e-4, atol=1e-5 * d.abs().max().item())


@pytest.mark.parametrize("layout", ["padded", "prefix-shared", "packed", "kto", "grpo-group"])
def test_segments_equal_dense_fp32(tokenizer, explicit_rows, layout):
    batch = _layouts(tokenizer, explicit_rows)[layout]
    model = make_tiny_model(len(tokenizer))
    _assert_same(model, batch, [p for p in model.parameters()])


def test_segments_equal_dense_under_lora(tokenizer, explicit_rows):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(make_tiny_model(len(tokenizer)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                        init_lora_weights=False))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    _assert_same(model, _layouts(tokenizer, explicit_rows)["packed"], lora)


def test_segments_equal_dense_under_gradient_checkpointing(tokenizer, explicit_rows):
    """The recompute in backward reads the config's attention again: it must run the segments again."""
    model = make_tiny_model(len(tokenizer))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # (the tiny model's dropout is 0)
    assert attn.install(model) == ""  # (its probe calls the segments too)
    calls = []
    real = attn.segment_attention
    attn.segment_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        _assert_same(model, _layouts(tokenizer, explicit_rows)["packed"], list(model.parameters()))
    finally:
        attn.segment_attention = real
    assert len(calls) == 2 * 2  # 2 layers, forward and recompute


def test_no_mask_reaches_attention_and_no_TxT_tensor_is_built(tokenizer):
    """One 4,096-token pair: the attention layers get no mask, and no op allocates T² bytes (the dense path's
    float mask takes 4·T², which shows the check sees it)."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    ids = lambda n: torch.randint(3, len(tokenizer), (n,)).tolist()  # noqa: E731
    batch = collate_packed([TokenizedPair(ids(3584), ids(256), ids(256), "long")], 0, 0)
    T = batch["input_ids"].shape[1]
    model = make_tiny_model(len(tokenizer))
    masks = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(lambda m, a, k: masks.append(k.get("attention_mask")),
                                                  with_kwargs=True)
    largest = {}
    for kind in ("segments", "dense"):
        attn.use_attention(kind, log=lambda m: None)
        batch_token_logps(model, collate_packed([TokenizedPair([5] * 2, [6] * 3, [7] * 3, "w")], 0, 0))  # probe
        masks.clear()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            batch_token_logps(model, batch).values.sum().backward()
        largest[kind] = max(e.cpu_memory_usage for e in prof.events())
        if kind == "segments":
            assert masks and all(m is None for m in masks)
    assert largest["dense"] >= 4 * T * T  # the dense path's additive fp32 mask
    # segments: the largest is the rejected segment's bottom-right bias, 8 bytes × |R|·(|P|+|R|) = 7.9 MB here
    assert largest["segments"] <= 8 * 256 * (3584 + 256) < T * T


def test_auto_falls_back_and_segments_are_refused_where_not_exact(tokenizer, explicit_rows):
    """A sliding window shorter than the rows changes who sees whom; the probe finds it (Mistral passes
    sliding_window to the attention function). Also models whose layers bypass the AttentionInterface."""
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    batch = _layouts(tokenizer, explicit_rows)["packed"]
    for model, why in ((MistralForCausalLM(cfg).eval(), "sliding_window"),
                       (make_tiny_model(len(tokenizer)), "AttentionInterface")):
        if why == "AttentionInterface":
            model._supports_attention_backend = False
        logged = []
        attn.use_attention("auto", log=logged.append)
        auto = batch_token_logps(model, batch).values
        assert why in attn.install(model) and len(logged) == 1 and why in logged[0]
        assert model.config._attn_implementation == "sdpa"  # left as it was
        attn.use_attention("dense")
        torch.testing.assert_close(auto, batch_token_logps(model, batch).values, rtol=0, atol=0)
        attn.use_attention("segments")
        with pytest.raises(ConfigError, match="--attention segments: not exact on this model"):
            batch_token_logps(model, batch)


def test_attention_option_is_checked():
    assert TrainConfig().attention == "auto"
    with pytest.raises(ConfigError, match="attention"):
        TrainConfig.from_dict({"attention": "flash"})
    with pytest.raises(ConfigError, match="--attention"):
        attn.use_attention("flash")


def test_dense_mask_of_packed_segments_is_the_prefix_sharing_mask():
    pairs = [TokenizedPair([1, 2], [3, 4, 5], [6], "a"), TokenizedPair([7], [8], [9, 10], "b")]
    b = collate_packed(pairs, 0, 64)
    got = attn.dense_mask(b["segments"], *b["input_ids"].shape)[0, 0].int()
    o = 0
    expected = torch.eye(b["input_ids"].shape[1], dtype=torch.int)
    for p in pairs:  # the mask collate_packed built before segments
        P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        L = P + C + R
        block = torch.ones(L, L, dtype=torch.int).tril()
        block[P + C:, P:P + C] = 0
        expected[o:o + L, o:o + L] = block
        o += L
    assert torch.equal(got, expected)
