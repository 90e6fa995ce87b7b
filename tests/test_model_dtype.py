"""--model-dtype / --pure-half: weights stored in bf16 (frozen ones stay so, trained ones get an fp32 master copy
unless --pure-half), log-probs stay fp32, the reference cache tells dtypes apart, and bad combinations are refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import write_jsonl
from dpokit import ConfigError, TrainConfig, train
from dpokit.batches import pair_batch, tokenize_pairs
from dpokit.data import load_pairs
from dpokit.logprobs.sequence import batch_token_logps, pair_logps
from dpokit.models import load_model
from dpokit.models.load import fast_head

QUIET = dict(progress=False, memory_check=False)


def _metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def _dtypes(tensors: dict) -> dict[str, set]:
    """{'lora': dtypes of adapter tensors, 'base': of the others}."""
    out = {"lora": set(), "base": set()}
    for name, t in tensors.items():
        out["lora" if "lora_" in name else "base"].add(t.dtype)
    return out


def _moments(ckpt) -> set:
    state = torch.load(ckpt / "state.pt", weights_only=True)["optimizer"]["state"]
    return {t.dtype for s in state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")}


# ---- options ---------------------------------------------------------------------------------------------

def test_cli_flags_parse_and_show_in_help():
    from dpokit.cli import build_parser, config_from_args
    cfg = config_from_args(build_parser().parse_args(["train", "--model-dtype", "bf16", "--pure-half"]))
    assert (cfg.model_dtype, cfg.pure_half) == ("bf16", True)
    assert TrainConfig().model_dtype == "fp32" and not TrainConfig().pure_half
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    formatter = train_parser._get_formatter()
    for action in train_parser._actions:
        if action.dest in ("model_dtype", "pure_half"):
            formatter.add_argument(action)
    text = formatter.format_help()
    assert "--model-dtype {fp32,bf16,fp16}" in text and "--pure-half" in text and "master copy" in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--model-dtype", "int8"])


@pytest.mark.parametrize("options, message", [
    (dict(pure_half=True), "needs --model-dtype bf16"),
    (dict(pure_half=True, model_dtype="fp16"), "GradScaler refuses"),
    (dict(pure_half=True, model_dtype="bf16", lora_r=4), "pure_half with LoRA"),
    (dict(pure_half=True, model_dtype="bf16", fsdp=True), "fsdp with pure_half"),
    (dict(model_dtype="bf16", dtype="fp16"), "two half precisions"),
    (dict(model_dtype="fp16", lora_r=4), "needs --dtype fp16"),
])
def test_combinations_that_would_train_wrongly_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(options)


def test_fp16_weights_with_auto_dtype_are_refused_where_auto_means_bf16(monkeypatch):
    """--dtype auto is bf16 autocast on a GPU: over fp16 weights that is two half precisions (was accepted)."""
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="pass --dtype fp16"):
            TrainConfig.from_dict(dict(model_dtype="fp16", device=device))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="auto is bf16 there"):
        TrainConfig.from_dict(dict(model_dtype="fp16"))  # --device auto → cuda here
    for options in (dict(device="cpu"), dict(device="cuda", dtype="fp16"), dict(device="cuda", dtype="fp32")):
        TrainConfig.from_dict(dict(model_dtype="fp16", **options))  # auto is fp32 on a CPU; explicit choices
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    TrainConfig.from_dict(dict(model_dtype="fp16"))


def test_allowed_combinations():
    for options in (dict(model_dtype="bf16"), dict(model_dtype="bf16", pure_half=True), dict(model_dtype="bf16",
                    lora_r=4, dtype="bf16"), dict(model_dtype="fp16", device="cpu"),
                    dict(model_dtype="fp16", lora_r=4, dtype="fp16"),
                    dict(model_dtype="bf16", loss="grpo")):
        TrainConfig.from_dict(options)


# ---- loading and log-probs -------------------------------------------------------------------------------

def _batch(tokenizer, rows, tmp_path):
    pairs, _ = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows), "error")
    tokenized, _ = tokenize_pairs(pairs, tokenizer, 128, 64)
    return pair_batch(tokenized, tokenizer.pad_token_id, True, 1024)


def test_bf16_load_keeps_probes_and_gives_fp32_logprobs_close_to_fp32(tmp_path, tiny_model_dir, tokenizer,
                                                                      explicit_rows):
    from dpokit.logprobs.attention import install
    full, half = load_model(tiny_model_dir), load_model(tiny_model_dir, dtype="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert fast_head(half) and install(half) == ""  # both probes still pass on bf16 weights
    batch = _batch(tokenizer, explicit_rows, tmp_path)
    with torch.no_grad():
        a, b = pair_logps(full, batch), pair_logps(half, batch)
    assert a.chosen.dtype == b.chosen.dtype == torch.float32
    # bf16 keeps 8 significant bits: each weight and each activation is rounded by ≤ 2^-9 relative, so a token's
    # log-prob moves by ~2^-9 of the logit spread (here ~1) per layer; summed over n tokens with random signs,
    # ~√n of that. 0.02 nats per token bounds it with margin, and an fp16-vs-fp32 mix-up of whole-model
    # magnitude errors (or a bf16-rounded logit path on large logits) would exceed it.
    tokens = torch.cat([a.chosen_tokens, a.rejected_tokens])
    diff = (torch.cat([a.chosen, a.rejected]) - torch.cat([b.chosen, b.rejected])).abs()
    assert 0 < diff.max() and (diff / tokens).max() < 0.02


def test_lm_head_runs_in_fp32_on_bf16_weights(tmp_path, tiny_model_dir, tokenizer, explicit_rows):
    """Large logits (|z| ≈ 10–30, where bf16's spacing is 1/16–1/8) come from an fp32 head on the bf16 states."""
    model = load_model(tiny_model_dir, dtype="bf16")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(64)  # tied with the input embeddings: the norm rescales those
    batch = _batch(tokenizer, explicit_rows[:2], tmp_path)
    captured = []
    hook = model.get_decoder().register_forward_hook(lambda m, i, out: captured.append(out.last_hidden_state))
    with torch.no_grad():
        tok = batch_token_logps(model, batch)
    hook.remove()
    ids = batch["input_ids"]
    states = captured[0][batch["score_row"], batch["score_src"]]           # bf16 hidden states actually used
    targets = ids[batch["score_row"], batch["score_tgt"]]
    weight = model.get_output_embeddings().weight
    logits32, logits16 = F.linear(states.float(), weight.float()), F.linear(states, weight).float()
    want = logits32.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    rounded = logits16.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    assert states.dtype == torch.bfloat16 and tok.values.dtype == torch.float32
    assert logits32.abs().max() > 8  # large enough for bf16 logits to be coarse
    torch.testing.assert_close(tok.values, want, rtol=1e-5, atol=1e-5)
    assert (rounded - want).abs().max() > 1e-2  # what a bf16 head would have cost


class _HeadWeightCopies(TorchDispatchMode):
    """Counts fp32 tensors of the LM head weight's shape made by a dtype conversion (an upcast copy of it)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and out.dtype == torch.float32 and tuple(out.shape) == self.shape:
            self.count += 1
        return out


def test_head_weight_upcast_once_per_call_and_never_under_autocast(tmp_path, tiny_model_dir, tokenizer,
                                                                   explicit_rows, monkeypatch):
    """Without autocast the [vocab, hidden] head weight is upcast once per call, not once per chunk; under bf16
    autocast not at all (autocast would cast it straight back). Before: once per chunk in both cases."""
    import dpokit.logprobs.sequence as seq
    monkeypatch.setattr(seq, "choose", lambda *_: False)  # dense masks: segment SDPA's bias subclass and the mode clash
    model = load_model(tiny_model_dir, dtype="bf16")
    weight = model.get_output_embeddings().weight
    batch = _batch(tokenizer, explicit_rows[:4], tmp_path)
    monkeypatch.setattr(seq, "CHUNK_ELEMENTS", weight.shape[0] * 8)  # 8 tokens per chunk: many chunks
    with torch.no_grad(), _HeadWeightCopies(weight.shape) as plain:
        values = batch_token_logps(model, batch).values
    assert values.numel() > 3 * 8 and plain.count == 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), _HeadWeightCopies(weight.shape) as mixed:
        auto = batch_token_logps(model, batch).values
    assert mixed.count == 0 and auto.dtype == torch.float32
    assert (auto - values).abs().max() < 0.05 * values.abs().max()


def test_head_probe_catches_a_mild_logit_scale_on_bf16_weights(tokenizer):
    """The probe compares fp32 logits on bf16 weights: bf16's own tolerance (8 eps ≈ 0.06 × |log p|) let a
    logits ÷ 1.05 head pass as a plain one, and the fast path would then skip the scale."""
    from transformers import GraniteConfig, GraniteForCausalLM
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    scaled = GraniteForCausalLM(GraniteConfig(vocab_size=len(tokenizer), logits_scaling=1.05, **small)).eval()
    plain = GraniteForCausalLM(GraniteConfig(vocab_size=len(tokenizer), logits_scaling=1.0, **small)).eval()
    with pytest.warns(UserWarning, match="fast log-prob path off"):
        assert fast_head(scaled.to(torch.bfloat16)) is False
    assert fast_head(plain.to(torch.bfloat16)) is True


# ---- training ------------------------------------------------------------------------------------------------

def test_lora_with_bf16_base(tmp_path, tiny_model_dir, explicit_rows):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    logs: list[str] = []
    result = train(model=tiny_model_dir, data=data, output_dir=str(tmp_path / "run"), model_dtype="bf16", lora_r=4,
                   max_steps=4, batch_size=4, lr=2e-2, warmup_steps=0, save_every=2, log=logs.append, **QUIET)
    losses = [m["loss"] for m in _metrics(result.output_dir) if "loss" in m]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # B = 0 and the same bf16 base: π = π_ref exactly
    assert losses[-1] < losses[0]
    ckpt = result.output_dir / "checkpoints" / "step-0000002"
    assert _dtypes(load_file(ckpt / "model.safetensors")) == {"lora": {torch.float32}, "base": {torch.bfloat16}}
    assert _moments(ckpt) == {torch.float32}
    assert {t.dtype for t in load_file(result.final_dir / "adapter_model.safetensors").values()} == {torch.float32}
    assert any("matmul" in m and "fp32" in m for m in logs)  # the measured CPU speed of bf16 is reported


def test_full_finetuning_keeps_an_fp32_master_copy_and_a_bf16_reference(tmp_path, tiny_model_dir, explicit_rows,
                                                                        monkeypatch):
    import importlib
    loop = importlib.import_module("dpokit.loop.train")  # the module (the package exports train())
    seen = {}
    original = loop.prepare_reference

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["reference"] = {p.dtype for p in out[0].parameters()}
        return out
    monkeypatch.setattr(loop, "prepare_reference", spy)
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    common = dict(model=tiny_model_dir, data=data, model_dtype="bf16", ref_cache=False, max_steps=4, batch_size=4,
                  lr=1e-2, warmup_steps=0, save_every=2, log=lambda *_: None, **QUIET)
    result = train(output_dir=str(tmp_path / "run"), **common)
    assert seen["reference"] == {torch.bfloat16}
    ckpt = result.output_dir / "checkpoints" / "step-0000002"
    assert _dtypes(load_file(ckpt / "model.safetensors"))["base"] == {torch.float32}
    assert _moments(ckpt) == {torch.float32}
    final = load_file(result.final_dir / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.bfloat16}  # final/ in --model-dtype
    # and config.json says so (save_pretrained wrote the fp32 master's dtype): dtype="auto" loads bf16
    from transformers import AutoModelForCausalLM
    assert json.load(open(result.final_dir / "config.json"))["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(result.final_dir, dtype="auto").dtype == torch.bfloat16
    start = load_model(tiny_model_dir, dtype="bf16").state_dict()
    assert any(not torch.equal(final[k], start[k]) for k in final)
    # resuming from the fp32 master copy and fp32 moments continues the run exactly
    resumed = tmp_path / "resumed"
    train(output_dir=str(resumed), resume=str(ckpt), **common)
    again = load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert _metrics(resumed)[-1]["loss"] == _metrics(result.output_dir)[-1]["loss"]


def test_full_finetuning_with_bf16_weights_starts_at_exactly_zero_margins(tmp_path, tiny_model_dir, explicit_rows,
                                                                           monkeypatch):
    """The cached and held-out reference sums come from the fp32 master copy the policy evaluates and trains in
    (same bf16-rounded values), not from the bf16 weights before the upcast: step 0's held-out margins are exactly
    0 and its loss ln 2 (before: bf16 rounding noise, a random-looking held-out accuracy)."""
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    result = train(model=tiny_model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"),
                   model_dtype="bf16", max_steps=1, lr=0.0, batch_size=8, shuffle=False, log=lambda *_: None, **QUIET)
    assert result.eval_before["eval/rewards/margins"] == 0.0
    assert result.eval_before["eval/rewards/accuracies"] == 0.0
    first = _metrics(result.output_dir)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0.0


def test_pure_half_trains_bf16_weights_in_place(tmp_path, tiny_model_dir, explicit_rows):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    logs: list[str] = []
    result = train(model=tiny_model_dir, data=data, output_dir=str(tmp_path / "run"), model_dtype="bf16",
                   pure_half=True, max_steps=2, batch_size=4, lr=1e-2, warmup_steps=0, save_every=1, log=logs.append,
                   **QUIET)
    ckpt = result.output_dir / "checkpoints" / "step-0000001"
    assert _dtypes(load_file(ckpt / "model.safetensors"))["base"] == {torch.bfloat16}
    assert _moments(ckpt) == {torch.bfloat16}
    final = load_file(result.final_dir / "model.safetensors")
    start = load_model(tiny_model_dir, dtype="bf16").state_dict()
    assert any(not torch.equal(final[k], start[k]) for k in final)
    assert any(m.startswith("--pure-half: a step of ~lr = 0.01") for m in logs)


def test_pure_half_reports_how_much_a_small_lr_cannot_move(tiny_model_dir):
    from dpokit.models.load import stalled_weights_note
    model = load_model(tiny_model_dir, dtype="bf16")
    small = stalled_weights_note(model, TrainConfig(model_dtype="bf16", pure_half=True, lr=1e-7))
    large = stalled_weights_note(model, TrainConfig(model_dtype="bf16", pure_half=True, lr=1.0))
    assert "do not move" in small and int(small.split(" ulp for ")[1].split("%")[0]) > 90
    assert "survive" in large


def test_reference_cache_key_names_the_model_dtype(tmp_path, tiny_model_dir, explicit_rows, monkeypatch):
    from dpokit.loop.reference import cache_reference
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)

    def paths(**options) -> list[str]:
        logs: list[str] = []
        cache_reference(model=tiny_model_dir, data=data, log=logs.append, **options)
        return [m for m in logs if "reference log-probs" in m]

    fp32, bf16 = paths(), paths(model_dtype="bf16")
    assert all("computed" in m for m in fp32 + bf16)  # the bf16 reference did not reuse the fp32 cache
    assert all("read from cache" in m for m in paths(model_dtype="bf16"))
    assert {m.split("cached at ")[1] for m in fp32}.isdisjoint({m.split("cached at ")[1] for m in bf16})
