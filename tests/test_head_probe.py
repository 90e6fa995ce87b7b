"""The fast log-prob path (decoder hidden states → output embeddings) is used only where it equals the model's
own logits: models that scale or soft-cap lm_head(h) (Granite, Falcon-H1, Gemma 2, …) fall back to the full
logits, decided once per model by a probe at load (or at first use), and say so."""

from __future__ import annotations

import warnings

import pytest
import torch

import dpokit.logprobs.sequence as seq
from conftest import make_tiny_model
from dpokit.batches import collate, tokenize_pair
from dpokit.data.formats import Pair
from dpokit.logprobs import pair_logps, sequence_logps, sequence_logps_full
from dpokit.models import load_model

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, pad_token_id=0)


def tiny_granite(vocab: int, seed: int = 0):
    from transformers import GraniteConfig, GraniteForCausalLM
    torch.manual_seed(seed)  # logits = lm_head(h) / logits_scaling
    return GraniteForCausalLM(GraniteConfig(vocab_size=vocab, logits_scaling=4.0, **SMALL)).eval()


def tiny_falcon_h1(vocab: int, seed: int = 0):
    from transformers import FalconH1Config, FalconH1ForCausalLM
    torch.manual_seed(seed)  # logits = lm_head(h) · lm_head_multiplier (a Mamba2/attention hybrid)
    return FalconH1ForCausalLM(FalconH1Config(
        vocab_size=vocab, lm_head_multiplier=3.0, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
        mamba_n_groups=1, mamba_chunk_size=16, tie_word_embeddings=False, **SMALL)).eval()


def tiny_gemma2(vocab: int, seed: int = 0):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(seed)  # logits = 30 · tanh(lm_head(h) / 30)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, head_dim=8, final_logit_softcapping=30.0,
                                          tie_word_embeddings=False, **SMALL)).eval()


@pytest.fixture
def batch(tokenizer, explicit_rows):
    pairs = [tokenize_pair(Pair(r["prompt"], r["chosen"], r["rejected"], f"x:{i}"), tokenizer, 512, None)
             for i, r in enumerate(explicit_rows[:4])]
    return collate(pairs, tokenizer.pad_token_id)


@pytest.mark.parametrize("make", [tiny_granite, tiny_falcon_h1], ids=["granite", "falcon_h1"])
def test_scaled_head_log_probs_equal_the_full_logits(tokenizer, batch, make):
    """Failed before the probe: the fast path skipped the scale (up to 0.9 nats off per sequence for Granite,
    5.8 for Falcon-H1 here)."""
    model = make(len(tokenizer))
    with torch.no_grad(), pytest.warns(UserWarning, match=r"fast log-prob path off .*max \|Δ log-softmax\|"):
        fast = sequence_logps(model, **batch)
    with torch.no_grad():
        full = sequence_logps_full(model, **batch)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    assert seq.fast_head(model) is False


def test_plain_llama_keeps_the_fast_path_and_is_probed_once(tokenizer, batch, monkeypatch):
    model = make_tiny_model(len(tokenizer))
    calls = []
    probe = seq._probe_head
    monkeypatch.setattr(seq, "_probe_head", lambda m: calls.append(m) or probe(m))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32 rounding must pass the probe: no fallback warning
        assert seq.fast_head(model) is True
        with torch.no_grad():
            sequence_logps(model, **batch)
            pair_logps(model, batch)
    assert len(calls) == 1
    assert model.training is False


def test_probe_restores_train_mode_and_ignores_autocast(tokenizer):
    model = make_tiny_model(len(tokenizer)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 probe would differ by ~1e-2: must not fall back
        assert seq.fast_head(model) is True
    assert model.training


def test_soft_capping_is_caught_by_its_config_key_where_the_probe_cannot_see_it(tokenizer, batch):
    """30·tanh(z/30) is the identity to ~1e-7 at random init (|z| ≈ 0.1), so the probe alone would pass it;
    once logits grow the cap matters. The config key keeps such models on the full logits from the start."""
    model = tiny_gemma2(len(tokenizer))
    with pytest.warns(UserWarning, match="final_logit_softcapping"):
        assert seq.fast_head(model) is False
    with torch.no_grad():
        model.lm_head.weight.mul_(300)  # logits of tens of nats: the cap now bends them
        fast, full = sequence_logps(model, **batch), sequence_logps_full(model, **batch)
        uncapped = model.lm_head(model.get_decoder()(**{k: batch[k] for k in ("input_ids", "attention_mask")})
                                 .last_hidden_state)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-4)
    assert uncapped.abs().max() > 30  # so the plain fast path would have been wrong


def test_load_model_decides_at_load(tmp_path, tokenizer, batch, tiny_model_dir):
    """Decided before any wrapping (FSDP2 shards right after load): the decision is on the loaded model."""
    tiny_granite(len(tokenizer)).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.warns(UserWarning, match="GraniteForCausalLM"):
        granite = load_model(str(tmp_path))
    assert getattr(granite, seq.DECISION) is False
    plain = load_model(tiny_model_dir)
    assert getattr(plain, seq.DECISION) is True
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(granite, **batch), sequence_logps_full(granite, **batch),
                                   rtol=1e-5, atol=1e-5)


def test_the_decision_survives_lora(tmp_path, tokenizer, batch):
    from peft import LoraConfig, get_peft_model
    model = tiny_granite(len(tokenizer))
    with pytest.warns(UserWarning):
        assert seq.fast_head(model) is False
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second probe
        assert seq.fast_head(peft) is False
        with torch.no_grad():
            torch.testing.assert_close(sequence_logps(peft, **batch), sequence_logps_full(peft, **batch),
                                       rtol=1e-5, atol=1e-5)
    # a PEFT model never probed before is probed through PEFT's forwarding
    fresh = get_peft_model(tiny_falcon_h1(len(tokenizer)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.warns(UserWarning, match="FalconH1"):
        assert seq.fast_head(fresh) is False
    plain = get_peft_model(make_tiny_model(len(tokenizer)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert seq.fast_head(plain) is True
