"""Nothing lost: kill -9 or SIGTERM mid-run, resume, and the final weights are bit-identical; broken
checkpoints are detected and skipped; bad output dirs and non-finite steps are answered clearly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import wait_for_checkpoint, write_jsonl
from dpokit import train
from dpokit.cli import main
from dpokit.loop.checkpoint import CheckpointError, complete_checkpoints, find_checkpoint
from dpokit.loop.steps import NonFiniteError

STEPS = 60


def _args(model, data, out, *extra):
    return ["train", "--model", model, "--data", data, "--output-dir", str(out), "--max-steps", str(STEPS),
            "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "3", "--lr-scheduler", "cosine",
            "--save-every", "4", "--no-progress", *extra]


def _weights(out: Path) -> dict:
    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    from conftest import explicit_rows as _rows  # noqa: F401  (fixture function, not callable here)
    base = tmp_path_factory.mktemp("resume")
    rows = [json.loads(line) for line in open(__import__("dpokit").data.builtin_path("helpful_train"))][:12]
    data = write_jsonl(base / "d.jsonl", rows)
    assert main(_args(tiny_model_dir, data, base / "full")) == 0
    return data, _weights(base / "full"), base


def _start(model, data, out) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    code = f"import sys; from dpokit.cli import main; sys.exit(main({_args(model, data, out)!r}))"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_to_bit_identical_weights(tiny_model_dir, uninterrupted, how):
    data, expected, base = uninterrupted
    out = base / how
    proc = _start(tiny_model_dir, data, out)
    wait_for_checkpoint(proc, out, random.Random(how).randrange(4, STEPS // 2, 4))
    proc.send_signal(getattr(signal, how))
    code = proc.wait(timeout=120)
    assert code == (-signal.SIGKILL if how == "SIGKILL" else 128 + signal.SIGTERM), proc.stderr.read().decode()
    if how == "SIGTERM":  # it checkpointed the step it was in, said so, and stopped
        assert "continue with --resume auto" in proc.stderr.read().decode()
    assert not (out / "final").exists()
    assert main(_args(tiny_model_dir, data, out, "--resume", "auto")) == 0
    got = _weights(out)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1))  # no step logged twice, none missing


def test_corrupt_and_partial_checkpoints_are_skipped(tmp_path, tiny_model_dir, uninterrupted):
    data, _, _ = uninterrupted
    out = tmp_path / "run"
    train(model=tiny_model_dir, data=data, output_dir=str(out), max_steps=12, batch_size=2, save_every=4,
          progress=False, log=lambda *_: None)
    ckpts = complete_checkpoints(str(out))
    assert [p.name for p in ckpts] == ["step-0000004", "step-0000008"]
    weights = ckpts[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")  # bit rot in the newest
    (out / "checkpoints" / "step-0000010").mkdir()  # a folder with no manifest: an interrupted copy
    logs: list[str] = []
    assert find_checkpoint(str(out), "auto", logs.append) == ckpts[0]
    assert any("step-0000008 skipped: model.safetensors does not match its checksum" in m for m in logs)
    assert any("step-0000010 skipped: no readable manifest" in m for m in logs)
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        find_checkpoint(str(out), str(ckpts[-1]))


def test_keep_last_prunes_only_older_checkpoints(tmp_path, tiny_model_dir, uninterrupted):
    data, _, _ = uninterrupted
    out = tmp_path / "run"
    train(model=tiny_model_dir, data=data, output_dir=str(out), max_steps=20, batch_size=2, save_every=4,
          keep_last=2, progress=False, log=lambda *_: None)
    assert [p.name for p in complete_checkpoints(str(out))] == ["step-0000012", "step-0000016"]


def test_unwritable_output_dir_fails_at_start(tmp_path, tiny_model_dir, uninterrupted, capsys):
    data, _, _ = uninterrupted
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = main(["train", "--model", tiny_model_dir, "--data", data, "--output-dir", str(blocker / "out")])
    assert code == 2 and "dpokit: error:" in capsys.readouterr().err


def test_nonfinite_loss_stops_naming_rows_or_is_skipped(tmp_path, tiny_model_dir, uninterrupted, monkeypatch):
    data, _, _ = uninterrupted
    import dpokit.loop.steps as steps
    real = steps.combined_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        losses, extra = real(*args, **kwargs)
        calls["n"] += 1
        return (losses * float("nan") if calls["n"] == 3 else losses), extra

    monkeypatch.setattr(steps, "combined_loss", poisoned)
    common = dict(model=tiny_model_dir, data=data, max_steps=5, batch_size=2, progress=False, log=lambda *_: None)
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss on rows \['.*d\.jsonl:\d+'"):
        train(output_dir=str(tmp_path / "stop"), **common)
    calls["n"] = 0
    result = train(output_dir=str(tmp_path / "skip"), on_nonfinite="skip", **common)
    records = [json.loads(line) for line in open(result.output_dir / "metrics.jsonl")]
    assert {"step": 3, "skipped_nonfinite": 1} in records
    assert all("loss" in r for r in records if r["step"] != 3)


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_model_dir):
    from dpokit.models import load_model
    from dpokit.models.load import ModelError
    folder = tmp_path / "pickled"
    model = load_model(tiny_model_dir)
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()  # transformers 5 writes safetensors only: make the pickle by hand
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pytorch_model\.bin.*--allow-pickle"):
        load_model(str(folder))
    loaded = load_model(str(folder), allow_pickle=True)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_tr_dpo_run_checkpoints_and_resumes_exactly(tmp_path, tiny_model_dir, uninterrupted):
    data, _, _ = uninterrupted
    common = dict(model=tiny_model_dir, data=data, max_steps=8, batch_size=2, lr=1e-3, sync_ref_every=2,
                  progress=False, log=lambda *_: None)
    full = train(output_dir=str(tmp_path / "full"), **common)
    part = tmp_path / "part"
    train(output_dir=str(part), save_every=3, **common)
    import shutil
    shutil.rmtree(part / "checkpoints" / "step-0000006")
    resumed = train(output_dir=str(part), save_every=3, resume="auto", **common)
    assert resumed.resumed_at == 3
    a, b = _weights(full.output_dir), _weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_options_and_auto_starts_fresh(tmp_path, tiny_model_dir, uninterrupted):
    data, _, _ = uninterrupted
    logs: list[str] = []
    common = dict(model=tiny_model_dir, data=data, max_steps=4, batch_size=2, save_every=2, progress=False)
    first = train(output_dir=str(tmp_path / "r"), resume="auto", log=logs.append, **common)  # nothing yet: fresh
    assert first.resumed_at == 0 and any("starting fresh" in m for m in logs)
    with pytest.raises(CheckpointError, match=r"batch_size: 2 → 3"):
        train(output_dir=str(tmp_path / "r"), resume="auto", log=logs.append, **{**common, "batch_size": 3})
    # options that change the numbers without changing the data order: the held-out evaluation's batch layout
    # (eval_batch_size: its eval/* metrics) and the kernels (deterministic)
    with pytest.raises(CheckpointError, match=r"eval_batch_size: 8 → 4"):
        train(output_dir=str(tmp_path / "r"), resume="auto", log=logs.append, eval_batch_size=4, **common)
    with pytest.raises(CheckpointError, match=r"deterministic: False → True"):
        train(output_dir=str(tmp_path / "r"), resume="auto", log=logs.append, deterministic=True, **common)
    # a CPU checkpoint is refused by a GPU run (no GPU here: the check itself, before any state is loaded)
    from dpokit.loop.checkpoint import load_training_state
    with pytest.raises(CheckpointError, match=r"written on cpu, this run is on cuda \(--device\)"):
        load_training_state(complete_checkpoints(str(tmp_path / "r"))[0], None, None, device=torch.device("cuda"))


def test_deterministic_turns_on_deterministic_kernels_for_the_run(tmp_path, tiny_model_dir, uninterrupted, monkeypatch):
    data, _, _ = uninterrupted
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # (monkeypatch restores the variable's absence afterwards)
    import dpokit.loop.steps as steps
    seen = []
    real = steps.combined_loss

    def spy(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "combined_loss", spy)
    train(model=tiny_model_dir, data=data, output_dir=str(tmp_path / "d"), max_steps=2, batch_size=2,
          deterministic=True, progress=False, log=lambda *_: None)
    assert seen == [(True, ":4096:8")] * 2
    # the process's settings are given back: deterministic mode off, the variable unset as it was
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own setting is kept, during and after
    from dpokit.loop.checkpoint import deterministic_kernels
    with deterministic_kernels(True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def _eval_rows(start: int, count: int) -> list[dict]:
    path = __import__("dpokit").data.builtin_path("helpful_eval")
    return [json.loads(line) for line in open(path, encoding="utf-8")][start:start + count]


@pytest.mark.parametrize("size", ["same-size", "other-size"])
def test_resume_with_other_eval_data_evaluates_against_its_own_reference(tmp_path, tiny_model_dir, uninterrupted,
                                                                         monkeypatch, size):
    """--eval-data may change on resume: the held-out reference log-probs are those of the new pairs under
    the *starting* reference (TR-DPO here, so the checkpoint's reference has moved), as if the run had
    always used them."""
    data, _, _ = uninterrupted
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    old = write_jsonl(tmp_path / "old.jsonl", _eval_rows(0, 6))
    new = write_jsonl(tmp_path / "new.jsonl", _eval_rows(6, 6 if size == "same-size" else 4))
    common = dict(model=tiny_model_dir, data=data, max_steps=4, batch_size=2, lr=1e-3, sync_ref_every=2,
                  save_every=2, progress=False, log=lambda *_: None)
    expected = train(output_dir=str(tmp_path / "new-all-along"), eval_data=new, **common)
    train(output_dir=str(tmp_path / "run"), eval_data=old, **common)
    ckpt = complete_checkpoints(str(tmp_path / "run"))[0]
    resumed = train(output_dir=str(tmp_path / "run"), eval_data=new, resume=str(ckpt), **common)
    assert resumed.resumed_at == 2
    assert resumed.eval_after == expected.eval_after


def lora_dropout_run(tmp_path, tiny_model_dir, uninterrupted):
    """6 LoRA-dropout steps with a checkpoint at 3: (options, output dir, final adapter weights)."""
    data, _, _ = uninterrupted
    common = dict(model=tiny_model_dir, data=data, max_steps=6, batch_size=2, lr=1e-3, lora_r=4, lora_dropout=0.1,
                  save_every=3, progress=False, log=lambda *_: None)
    out = tmp_path / "run"
    train(output_dir=str(out), **common)
    return common, out, load_file(out / "final" / "adapter_model.safetensors")


def test_lora_dropout_run_resumes_exactly_on_cpu(tmp_path, tiny_model_dir, uninterrupted):
    """LoRA dropout draws from the CPU RNG every step: the checkpoint's CPU RNG state makes the resumed masks
    the same. (Checkpoints held the CPU state before the per-rank states too; the CUDA entry is checked by
    test_cuda_rng_state_round_trips_through_a_checkpoint.)"""
    common, out, expected = lora_dropout_run(tmp_path, tiny_model_dir, uninterrupted)
    resumed = train(output_dir=str(out), resume=str(complete_checkpoints(str(out))[0]), **common)
    assert resumed.resumed_at == 3
    got = load_file(out / "final" / "adapter_model.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_checkpoint_written_before_newer_options_resumes_with_its_old_rng_layout(tmp_path, tiny_model_dir,
                                                                                  uninterrupted):
    """A checkpoint from before `deterministic` and the per-rank RNG states: its config.yaml lacks the key (the
    run had the default, False) and its state.pt holds "torch_rng"/"python_rng" instead of "rng". It resumes,
    and LoRA dropout (which draws from the restored CPU RNG) makes the same weights as the uninterrupted run.
    Failed before the fix: "deterministic: None → False"."""
    import yaml
    from dpokit.loop.checkpoint import MANIFEST, STATE, _sha256
    common, out, expected = lora_dropout_run(tmp_path, tiny_model_dir, uninterrupted)
    ckpt = complete_checkpoints(str(out))[0]
    config = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))
    del config["deterministic"]
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    state = torch.load(ckpt / STATE, weights_only=True)
    rng = state.pop("rng")[0]
    del state["device_type"]
    torch.save({**state, "torch_rng": rng["torch"], "python_rng": rng["python"], "eval_ref": None}, ckpt / STATE)
    manifest = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
    manifest["files"] = {name: _sha256(ckpt / name) for name in manifest["files"]}
    (ckpt / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    resumed = train(output_dir=str(out), resume=str(ckpt), **common)
    assert resumed.resumed_at == 3
    got = load_file(out / "final" / "adapter_model.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_cuda_rng_state_round_trips_through_a_checkpoint(tmp_path, tokenizer, monkeypatch):
    """rng_state/set_rng_state's CUDA branch, with torch.cuda's RNG functions faked (no GPU here): a
    checkpoint written on "cuda" stores the device's generator state, and loading it on "cuda" gives that
    state back to the same device, next to the CPU one."""
    from conftest import make_tiny_model
    from dpokit.loop.checkpoint import STATE, load_training_state, save_checkpoint
    generator = {"state": torch.arange(16, dtype=torch.uint8)}  # the fake device's generator
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": generator["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    model = make_tiny_model(len(tokenizer))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    cpu_before = torch.get_rng_state()
    path = save_checkpoint(str(tmp_path), 3, model, tokenizer, optimizer.state_dict(), scheduler, "{}",
                           device_type="cuda")
    saved = torch.load(path / STATE, weights_only=True)["rng"]
    assert len(saved) == 1 and torch.equal(saved[0]["cuda"], torch.arange(16, dtype=torch.uint8))
    generator["state"] = torch.zeros(16, dtype=torch.uint8)  # the run went on drawing
    torch.rand(5)
    assert load_training_state(path, lambda s: None, scheduler, device=torch.device("cuda")) == 3
    assert len(restored) == 1 and restored[0][1] == torch.device("cuda")
    assert torch.equal(restored[0][0], torch.arange(16, dtype=torch.uint8))
    assert torch.equal(torch.get_rng_state(), cpu_before)
    # a CPU run's checkpoint holds no CUDA state and restores none
    save_checkpoint(str(tmp_path / "cpu"), 1, model, tokenizer, optimizer.state_dict(), scheduler, "{}")
    load_training_state(complete_checkpoints(str(tmp_path / "cpu"))[0], lambda s: None, scheduler)
    assert len(restored) == 1
