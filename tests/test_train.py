"""Stage 5: the loop on tiny random models — ln 2 at step 0, overfitting, resume, config, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from dpokit import ConfigError, TrainConfig, train
from dpokit.cli import main


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def _quiet(*_args):
    pass


def test_first_step_loss_is_exactly_ln2_and_metrics_use_trl_names(tmp_path, tiny_model_dir, explicit_rows):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    # Without the reference cache the reference runs on the very same batch as the policy: exactly ln 2.
    result = train(model=tiny_model_dir, data=data, output_dir=str(tmp_path / "run"), max_steps=2,
                   batch_size=4, progress=False, log=_quiet, ref_cache=False)
    first = _metrics(result.output_dir)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "lr", "grad_norm", "pairs_per_s", "tokens_per_s"):
        assert key in first
    assert first["rewards/margins"] == 0.0


def test_overfits_eight_pairs_to_full_accuracy(tmp_path, tiny_model_dir, explicit_rows):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    result = train(model=tiny_model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"),
                   max_steps=30, batch_size=8, lr=3e-3, warmup_steps=0, beta=0.5, progress=False, log=_quiet)
    assert result.eval_before["eval/rewards/accuracies"] == 0.0  # policy == reference: every margin is 0
    assert result.eval_after["eval/rewards/accuracies"] == 1.0
    assert result.eval_after["eval/rewards/margins"] > 1.0
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert isinstance(reloaded, torch.nn.Module)
    assert (result.output_dir / "config.yaml").is_file()


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir, explicit_rows):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    common = dict(model=tiny_model_dir, data=data, max_steps=6, batch_size=2, grad_accum=2, lr=1e-3,
                  warmup_steps=2, lr_scheduler="cosine", progress=False, log=_quiet)
    full = train(output_dir=str(tmp_path / "full"), **common)
    # same run, stopped after step 2's checkpoint, then resumed to the end
    part = tmp_path / "part"
    train(output_dir=str(part), save_every=2, **{**common, "max_steps": 6})
    import shutil
    for later in ("step-0000004",):
        shutil.rmtree(part / "checkpoints" / later)  # pretend the run died after step 2
    resumed = train(output_dir=str(part), save_every=2, resume="auto", **common)
    a = load_file(full.final_dir / "model.safetensors")
    b = load_file(resumed.final_dir / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses_full = [m["loss"] for m in _metrics(full.output_dir) if "loss" in m]
    losses_resumed = [m["loss"] for m in _metrics(part) if "loss" in m]
    assert losses_resumed[-4:] == losses_full[-4:]


def test_label_smoothing_and_rmsprop_run(tmp_path, tiny_model_dir, explicit_rows):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    result = train(model=tiny_model_dir, data=data, output_dir=str(tmp_path / "run"), max_steps=2,
                   label_smoothing=0.1, optimizer="rmsprop", progress=False, log=_quiet)
    assert math.isfinite(_metrics(result.output_dir)[-1]["loss"])


def test_bad_config_is_refused_with_key_and_range(tmp_path):
    with pytest.raises(ConfigError, match=r"beta = -1.0 is out of range: must be > 0"):
        TrainConfig.from_dict({"beta": -1})
    with pytest.raises(ConfigError, match=r"batch_size = 0 is out of range"):
        TrainConfig.from_dict({"batch_size": 0})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) betaa"):
        TrainConfig.from_dict({"betaa": 0.1})
    (tmp_path / "c.yaml").write_text("lr: fast\n")
    with pytest.raises(ConfigError, match=r"c.yaml: lr expects float, got str"):
        TrainConfig.from_yaml(str(tmp_path / "c.yaml"))


def test_cli_yaml_with_flag_override(tmp_path, tiny_model_dir, explicit_rows, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    out = tmp_path / "run"
    (tmp_path / "c.yaml").write_text(f"model: {tiny_model_dir}\ndata: {data}\nbeta: 0.3\nmax-steps: 5\n"
                                     f"output_dir: {out}\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--max-steps", "1", "--no-progress"]) == 0
    resolved = (out / "config.yaml").read_text()
    assert "beta: 0.3" in resolved and "max_steps: 1" in resolved
    assert len([m for m in _metrics(out) if "loss" in m]) == 1


def test_cli_reports_bad_data_without_a_traceback(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "chosen": " a", "rejected": " a"}])
    code = main(["train", "--model", tiny_model_dir, "--data", data, "--output-dir", str(tmp_path / "r")])
    assert code == 2
    assert f"{data}:1: field 'rejected' identical to chosen" in capsys.readouterr().err


def test_train_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--ref-model", "--data", "--eval-data", "--output-dir", "--config", "--beta",
                 "--label-smoothing", "--lr", "--optimizer", "--batch-size", "--grad-accum", "--max-steps",
                 "--epochs", "--warmup-steps", "--max-length", "--max-prompt-length", "--seed", "--save-every",
                 "--resume"):
        assert flag in text, flag
    assert "default: 0.1" in text


def test_fast_path_trains_like_the_plain_path(tmp_path, tiny_model_dir, explicit_rows):
    """Prefix sharing + packing + cached reference vs padded rows with a live reference: the same
    log-probs at step 1 and loss curves within 1e-3 over 20 steps."""
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    common = dict(model=tiny_model_dir, data=data, max_steps=20, batch_size=4, lr=2e-3, warmup_steps=0,
                  progress=False, log=_quiet)
    fast = _metrics(train(output_dir=str(tmp_path / "fast"), **common).output_dir)
    plain = _metrics(train(output_dir=str(tmp_path / "plain"), prefix_sharing=False, pack_tokens=0,
                           ref_cache=False, **common).output_dir)
    assert fast[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for key in ("logps/chosen", "logps/rejected"):
        assert fast[0][key] == pytest.approx(plain[0][key], rel=1e-5)
    losses = [(f["loss"], p["loss"]) for f, p in zip(fast, plain) if "loss" in f]
    assert len(losses) == 20 and losses[-1][1] < 0.6  # it really trained
    assert max(abs(a - b) for a, b in losses) < 1e-3


def test_reference_cache_is_reused_and_keyed_on_the_data(tmp_path, tiny_model_dir, explicit_rows, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    logs: list[str] = []
    common = dict(model=tiny_model_dir, data=data, max_steps=1, batch_size=4, progress=False, log=logs.append)
    train(output_dir=str(tmp_path / "a"), **common)
    assert any("training reference log-probs: computed" in m for m in logs)
    logs.clear()
    train(output_dir=str(tmp_path / "b"), beta=0.5, **common)  # a β sweep reuses it
    assert any("training reference log-probs: read from cache" in m for m in logs)
    logs.clear()
    train(output_dir=str(tmp_path / "c"), max_length=40, max_prompt_length=20,
          **{**common, "data": data})  # other truncation → other token ids → recomputed
    assert any("training reference log-probs: computed" in m for m in logs)
    changed = write_jsonl(tmp_path / "e.jsonl", explicit_rows[:-1] + [{**explicit_rows[-1], "chosen": " changed"}])
    logs.clear()
    train(output_dir=str(tmp_path / "d"), **{**common, "data": changed})
    assert any("training reference log-probs: computed" in m for m in logs)


def test_gradient_checkpointing_and_file_order_train_identically(tmp_path, tiny_model_dir, explicit_rows):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    common = dict(model=tiny_model_dir, data=data, max_steps=4, batch_size=4, lr=2e-3, warmup_steps=0,
                  shuffle=False, progress=False, log=_quiet)
    plain = _metrics(train(output_dir=str(tmp_path / "a"), **common).output_dir)
    ckpt = _metrics(train(output_dir=str(tmp_path / "b"), gradient_checkpointing=True, **common).output_dir)
    for a, b in zip(plain, ckpt):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    # --no-shuffle: the first step is the file's first rows, in every epoch
    first = _metrics(train(output_dir=str(tmp_path / "c"), **{**common, "max_steps": 1, "batch_size": 2}).output_dir)
    from dpokit.batches import tokenize_pairs
    from dpokit.data import load_pairs
    from dpokit.models import load_tokenizer
    tok = load_tokenizer(tiny_model_dir)
    pairs, _ = tokenize_pairs(load_pairs(data)[0][:2], tok, 512, 256)
    from dpokit.logprobs import pair_logps
    from dpokit.models import load_model
    from dpokit.batches import collate
    with torch.no_grad():
        logps = pair_logps(load_model(tiny_model_dir), collate(pairs, tok.pad_token_id))
    assert first[0]["logps/chosen"] == pytest.approx(logps.chosen.mean().item(), rel=1e-5)


def test_bf16_autocast_keeps_logps_and_loss_in_fp32(tmp_path, tiny_model_dir, explicit_rows):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    common = dict(model=tiny_model_dir, data=data, max_steps=2, batch_size=4, progress=False, log=_quiet,
                  shuffle=False, device="cpu")
    fp32 = _metrics(train(output_dir=str(tmp_path / "a"), dtype="fp32", **common).output_dir)
    bf16 = _metrics(train(output_dir=str(tmp_path / "b"), dtype="bf16", **common).output_dir)
    assert bf16[0]["logps/chosen"] == pytest.approx(fp32[0]["logps/chosen"], rel=2e-2)  # bf16 matmuls
    assert bf16[0]["logps/chosen"] != fp32[0]["logps/chosen"]  # autocast really ran
    assert math.isfinite(bf16[-1]["loss"])


def test_fp16_scales_the_loss_skips_overflowing_steps_and_resumes_exactly(tmp_path, tiny_model_dir, explicit_rows,
                                                                          monkeypatch):
    import functools
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    common = dict(model=tiny_model_dir, data=data, max_steps=8, batch_size=2, lr=1e-3, progress=False,
                  shuffle=False, device="cpu", dtype="fp16")
    fp32 = _metrics(train(output_dir=str(tmp_path / "fp32"), log=_quiet, **{**common, "dtype": "fp32"}).output_dir)
    plain = _metrics(train(output_dir=str(tmp_path / "fp16"), log=_quiet, **common).output_dir)
    assert plain[0]["logps/chosen"] == pytest.approx(fp32[0]["logps/chosen"], rel=1e-2)  # fp16 matmuls
    assert plain[0]["logps/chosen"] != fp32[0]["logps/chosen"]  # autocast really ran
    assert plain[0]["loss_scale"] == 2.0 ** 16

    # A start scale far too high: the first steps overflow in fp16 and must be skipped while the scale falls.
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 19))
    logs: list[str] = []
    fp16 = _metrics(train(output_dir=str(tmp_path / "a"), log=logs.append, **common).output_dir)
    skipped = [m for m in fp16 if "fp16_overflow_skipped" in m]
    trained = [m for m in fp16 if "loss" in m]
    assert skipped and trained and skipped[0]["step"] == 1  # some steps overflowed, later ones trained
    assert [m["fp16_overflow_skipped"] for m in skipped] == list(range(1, len(skipped) + 1))  # counted
    assert skipped[0]["loss_scale"] == 2.0 ** 18  # halved
    assert all(m["loss_scale"] == trained[0]["loss_scale"] for m in trained)
    assert sum("fp16 gradients overflowed" in line for line in logs) == len(skipped)  # and said so
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in trained)

    # the loss scale is part of the checkpoint (lowered before step 4 here, so a resume at 4 needs it): a run
    # stopped after step 4 and resumed ends bit-identical
    assert skipped[-1]["step"] < 4
    first = train(output_dir=str(tmp_path / "c"), log=_quiet, save_every=4, **{**common, "max_steps": 8})
    import shutil
    shutil.rmtree(first.final_dir)
    for ckpt in sorted((tmp_path / "c" / "checkpoints").iterdir())[1:]:
        shutil.rmtree(ckpt)
    train(output_dir=str(tmp_path / "c"), log=_quiet, save_every=4, resume="auto", **common)
    a, c = load_file(tmp_path / "a" / "final" / "model.safetensors"), load_file(first.final_dir / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ConfigError, match="fp16"):
        TrainConfig.from_dict({"fsdp": True, "dtype": "fp16"})


def test_cache_is_keyed_on_precision_and_untouched_without_ref_cache(tmp_path, tiny_model_dir, explicit_rows,
                                                                     monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    logs: list[str] = []
    common = dict(model=tiny_model_dir, data=data, eval_data=data, max_steps=1, batch_size=4, device="cpu",
                  progress=False, log=logs.append)
    train(output_dir=str(tmp_path / "a"), ref_cache=False, **common)
    assert not (tmp_path / "cache" / "refcache").exists()
    train(output_dir=str(tmp_path / "b"), dtype="fp32", **common)
    logs.clear()
    train(output_dir=str(tmp_path / "c"), dtype="bf16", **common)  # other numerics → not reused
    assert any(m.startswith("held-out reference log-probs: computed") for m in logs)
    logs.clear()
    train(output_dir=str(tmp_path / "d"), dtype="bf16", **common)  # same numerics → reused
    assert any(m.startswith("held-out reference log-probs: read from cache") for m in logs)


def test_no_prefix_sharing_alone_is_accepted(tmp_path, tiny_model_dir, explicit_rows):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    train(model=tiny_model_dir, data=data, output_dir=str(tmp_path / "a"), prefix_sharing=False, max_steps=1,
          progress=False, log=_quiet)
    with pytest.raises(ConfigError, match="pack_tokens needs prefix_sharing"):
        TrainConfig.from_dict({"prefix_sharing": False, "pack_tokens": 512})


def test_kto_never_builds_a_micro_batch_of_one(tmp_path, tiny_model_dir, explicit_rows, monkeypatch):
    import dpokit.loop.steps as steps
    sizes = []
    real = steps.collate_kto
    monkeypatch.setattr(steps, "collate_kto", lambda rows, *a: (sizes.append(len(rows)), real(rows, *a))[1])
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows[:5])  # 10 completions, batch 3 → 3, 3, 4
    train(model=tiny_model_dir, data=data, output_dir=str(tmp_path / "k"), loss="kto", batch_size=3, epochs=1,
          progress=False, log=_quiet)
    assert sizes == [3, 3, 4]


def _llama(tokenizer, **sizes):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
               pad_token_id=0)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **sizes})).eval()


@pytest.mark.parametrize("sizes", [dict(hidden_size=64), dict(num_hidden_layers=1), dict(intermediate_size=32),
                                   dict(tie_word_embeddings=False)])
def test_tr_dpo_refuses_a_reference_of_another_architecture(tmp_path, tokenizer, tiny_model_dir, explicit_rows,
                                                            sizes):
    """TR-DPO mixes the policy into the reference parameter by parameter. Before the check, zip paired them by
    position: a RuntimeError mid-run, or silently a partial update (an untied reference's lm_head never
    moved). Now sync_reference refuses, naming the parameter, and train refuses --ref-model at start-up."""
    from dpokit.loop.reference import sync_reference
    from dpokit.models.load import ModelError
    policy, other = _llama(tokenizer), _llama(tokenizer, **sizes)
    with pytest.raises(ModelError, match=r"parameter (model|lm_head)\.\S+ is .*TR-DPO"):
        sync_reference(other, policy, 0.5)
    same = _llama(tokenizer)
    with torch.no_grad():
        same.model.norm.weight.fill_(3.0)
    sync_reference(same, policy, 0.5)  # the same architecture: mixed by name
    assert torch.equal(same.model.norm.weight, torch.full_like(same.model.norm.weight, 2.0))
    ref_dir = tmp_path / "ref"
    other.save_pretrained(ref_dir, safe_serialization=True)
    tokenizer.save_pretrained(ref_dir)
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    common = dict(model=tiny_model_dir, data=data, ref_model=str(ref_dir), max_steps=2, batch_size=2,
                  progress=False, log=lambda *_: None)
    with pytest.raises(ModelError, match=r"--ref-model .*--sync-ref-every"):
        train(output_dir=str(tmp_path / "tr"), sync_ref_every=1, **common)
    assert not (tmp_path / "tr" / "final").exists()
    train(output_dir=str(tmp_path / "fixed"), **common)  # a frozen reference of another size is fine
