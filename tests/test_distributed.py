"""torchrun with 2 gloo processes on CPU: DDP and FSDP2 give the loss, metrics and weights of one process
with the same global batch (to 1e-5); the reference cache they compute in parallel is the one-process
cache bit for bit; a distributed run stopped by SIGTERM resumes to the same weights; combinations that
cannot work are refused at start-up.

Each torchrun here starts two Python processes (a few seconds each); the runs are shared per module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import wait_for_checkpoint, write_jsonl
from dpokit.cli import main
from dpokit.config import ConfigError
from dpokit.data import builtin_path
from dpokit.distributed import DistributedError
from dpokit.loop.checkpoint import CheckpointError, complete_checkpoints

SRC = str(Path(__file__).resolve().parents[1] / "src")
TOL = 1e-5


def _rows(start: int, count: int) -> list[dict]:
    return [json.loads(line) for line in open(builtin_path("helpful_train"), encoding="utf-8")][start:start + count]


def _args(model: str, base: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    # 13 pairs: a global micro-batch of 4 leaves one pair in the epoch's last, so one rank sits it out
    # (the weight-0 repeat); 7 held-out pairs in batches of 2 split unevenly over the ranks. KTO reads
    # 13 labelled completions instead (its held-out set stays pairs).
    data = base / ("kto.jsonl" if "kto" in extra else "train.jsonl")
    return ["train", "--model", model, "--data", str(data), "--eval-data", str(base / "eval.jsonl"),
            "--output-dir", str(out), "--batch-size", str(batch_size), "--grad-accum", "2", "--epochs", "3",
            "--lr", "1e-3", "--eval-batch-size", "2", "--eval-every", "3", "--no-progress", *extra]


def _torchrun(args: list[str], cache: Path, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": SRC, "DPOKIT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dpokit", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


def _one_process(args: list[str], cache: Path, monkeypatch) -> None:
    with monkeypatch.context() as m:
        m.setenv("DPOKIT_CACHE", str(cache))
        assert main(args) == 0


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]


def _close(a: float, b: float, scale: float = 1.0) -> bool:
    return abs(a - b) <= TOL * max(1.0, scale, abs(a), abs(b))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist")
    write_jsonl(path / "train.jsonl", _rows(0, 13))
    write_jsonl(path / "eval.jsonl", _rows(20, 7))
    write_jsonl(path / "kto.jsonl", [{"prompt": r["prompt"], "completion": r["chosen" if i % 3 else "rejected"],
                                      "label": bool(i % 3)} for i, r in enumerate(_rows(30, 13))])
    return path


@pytest.fixture(scope="module")
def one_process(base, tiny_model_dir):
    mp = pytest.MonkeyPatch()
    runs = {}
    for name, extra in (("full", ()), ("lora", ("--lora-r", "4")), ("kto", ("--loss", "kto"))):
        _one_process(_args(tiny_model_dir, base, base / f"one-{name}", 4, *extra), base / f"cache-one-{name}", mp)
        runs[name] = base / f"one-{name}"
    return runs


@pytest.mark.parametrize("mode,extra", [("ddp", ()), ("fsdp", ("--fsdp",)), ("ddp-lora", ("--lora-r", "4")),
                                        ("fsdp-checkpointing", ("--fsdp", "--gradient-checkpointing")),
                                        ("ddp-kto", ("--loss", "kto")), ("fsdp-kto", ("--fsdp", "--loss", "kto"))])
def test_two_processes_match_one_process(base, tiny_model_dir, one_process, mode, extra):
    out = base / f"two-{mode}"
    code, log = _torchrun(_args(tiny_model_dir, base, out, 2, *extra), base / f"cache-{mode}")
    assert code == 0, log[-3000:]
    assert ("FSDP2" if mode.startswith("fsdp") else "DDP") in log
    assert log.count("held-out implicit-reward accuracy:") == 1  # the summary comes from rank 0 alone
    expected_dir = one_process["lora" if "lora" in mode else "kto" if "kto" in mode else "full"]

    # metrics: written once per step by rank 0, each equal to the one-process value (sums reduced over ranks)
    got, expected = _metrics(out), _metrics(expected_dir)
    assert [m["step"] for m in got] == [m["step"] for m in expected] == [1, 2, 3, 4, 5, 6, 6]
    for g, e in zip(got, expected):
        assert set(g) == set(e)
        for key in e:
            if not key.endswith("_per_s"):
                # a log-prob shift is the difference of two sums of ~100 nats, each equal to TOL of its size: it is
                # compared at that size (seen: 1.7e-5 apart on an AVX-512 Xeon, DDP + LoRA, step 3)
                scale = abs(e.get(key.removesuffix("_shift"), 1.0)) if key.endswith("_shift") else 1.0
                assert _close(g[key], e[key], scale), (g["step"], key, g[key], e[key])
    assert any("eval/rewards/margins" in m for m in got[:-1])  # a held-out evaluation mid-run, split over ranks

    # weights (the adapter alone for LoRA): same names, same values
    name = "adapter_model.safetensors" if "lora" in mode else "model.safetensors"
    g, e = load_file(out / "final" / name), load_file(expected_dir / "final" / name)
    assert g.keys() == e.keys()
    assert max((g[k] - e[k]).abs().max().item() for k in e) <= TOL
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    if "lora" not in mode:  # and they did move: the comparison is not between two untouched models
        assert max((g[k] - start[k]).abs().max().item() for k in start) > 1e-3


def test_reference_cache_computed_in_parallel_is_the_one_process_cache(base, one_process, tiny_model_dir,
                                                                       monkeypatch):
    two = sorted((base / "cache-ddp" / "refcache").glob("*.safetensors"))
    assert two, "run with test_two_processes_match_one_process[ddp], which writes this cache"
    # the training pairs' sums are cached in --batch-size batches (the micro-batch): the DDP run's 2 per process
    _one_process(["cache-ref", *_args(tiny_model_dir, base, base / "one-cache-ref", 2)[1:]], base / "cache-one-2",
                 monkeypatch)
    one = sorted((base / "cache-one-2" / "refcache").glob("*.safetensors"))
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 2  # training and held-out pairs
    four = {p.name for p in (base / "cache-one-full" / "refcache").glob("*.safetensors")}  # --batch-size 4
    assert len(four & {p.name for p in one}) == 1  # the held-out cache alone: --eval-batch-size 2 in both
    for a, b in zip(one, two):
        ta, tb = load_file(a), load_file(b)
        assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("mode,extra", [("ddp", ()), ("fsdp", ("--fsdp",))])
def test_distributed_run_stops_on_sigterm_and_resumes(base, tiny_model_dir, monkeypatch, mode, extra):
    steps = ["--max-steps", "40", "--save-every", "4", "--eval-every", "0"]
    expected = base / "resume-one"
    if not (expected / "final").exists():  # shared by both modes
        _one_process(_args(tiny_model_dir, base, expected, 4, *steps), base / "cache-resume", monkeypatch)
    out = base / f"resume-{mode}"
    proc = _torchrun(_args(tiny_model_dir, base, out, 2, *steps, *extra), base / "cache-resume", wait=False)
    wait_for_checkpoint(proc, out, 8, seconds=240)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0 and "continue with --resume auto" in err, err[-3000:]
    assert not (out / "final").exists()
    code, log = _torchrun(_args(tiny_model_dir, base, out, 2, *steps, *extra, "--resume", "auto"),
                          base / "cache-resume")
    assert code == 0, log[-3000:]
    assert "resumed from" in log
    assert [m["step"] for m in _metrics(out)] == list(range(1, 41)) + [40]  # every step once, then the final eval
    g, e = load_file(out / "final" / "model.safetensors"), load_file(expected / "final" / "model.safetensors")
    assert max((g[k] - e[k]).abs().max().item() for k in e) <= TOL

    # that checkpoint belongs to a 2-process run: one process would see other batches, so it is refused
    # (an FSDP checkpoint is refused for its --fsdp option already)
    with pytest.raises(CheckpointError, match="2 process" if mode == "ddp" else "fsdp: True → False"):
        from dpokit import train
        train(model=tiny_model_dir, data=str(base / "train.jsonl"), output_dir=str(base / f"resume-1-{mode}"),
              batch_size=2, grad_accum=2, epochs=3, lr=1e-3, eval_batch_size=2, max_steps=40, save_every=4,
              progress=False, resume=str(complete_checkpoints(str(out))[0]), log=lambda *a: None)


def test_combinations_that_cannot_work_are_refused_at_start_up(base, tiny_model_dir, monkeypatch, capsys):
    from dpokit import train
    from dpokit.config import TrainConfig
    with pytest.raises(DistributedError, match="launch at least 2 with torchrun"):
        train(model=tiny_model_dir, data=str(base / "train.jsonl"), fsdp=True, output_dir=str(base / "x"),
              log=lambda *a: None)
    for bad in ({"lora_r": 4}, {"sync_ref_every": 2}):
        with pytest.raises(ConfigError, match="fsdp"):
            TrainConfig.from_dict({"fsdp": True, **bad})
    with pytest.raises(ConfigError, match="DDP, without --fsdp"):  # online runs: DDP only
        TrainConfig.from_dict({"fsdp": True, "loss": "grpo"})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="RANK is not set"):
        train(model=tiny_model_dir, data=str(base / "train.jsonl"), output_dir=str(base / "x"), log=lambda *a: None)
    monkeypatch.delenv("WORLD_SIZE")


def test_lora_dropout_run_resumes_exactly_under_ddp(base, tiny_model_dir):
    """Each rank draws its own dropout masks (its rows have other shapes), so each rank's RNG state is
    checkpointed and restored: resumed at step 3, the run ends with the uninterrupted run's adapter, bit for bit."""
    out = base / "ddp-lora-dropout"
    args = _args(tiny_model_dir, base, out, 2, "--lora-r", "4", "--lora-dropout", "0.1", "--max-steps", "6",
                 "--save-every", "3", "--eval-every", "0")
    code, log = _torchrun(args, base / "cache-lora-dropout")
    assert code == 0, log[-3000:]
    expected = load_file(out / "final" / "adapter_model.safetensors")
    ckpt = complete_checkpoints(str(out))[0]
    assert ckpt.name == "step-0000003"
    code, log = _torchrun([*args, "--resume", str(ckpt)], base / "cache-lora-dropout")
    assert code == 0 and "resumed from" in log, log[-3000:]
    got = load_file(out / "final" / "adapter_model.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_batch_sorting_objectives_are_refused_under_torchrun(base, tiny_model_dir, monkeypatch):
    """AOT sorts the log-ratios of the whole micro-batch; split over processes each would sort only its rows."""
    from dpokit import train
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before the process group is joined: no torchrun needed
    for loss in ("aot", "aot_unpaired", "sigmoid,aot"):
        with pytest.raises(DistributedError, match=r"aot.*launch it without torchrun"):
            train(model=tiny_model_dir, data=str(base / "train.jsonl"), loss=loss, output_dir=str(base / "x"),
                  log=lambda *a: None)
