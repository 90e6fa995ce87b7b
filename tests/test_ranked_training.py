"""Training on ranked rows (k scored completions per prompt) is training on the pairs they imply, each
completion computed once: the same per-step metrics and weights as those pairs written out as pair rows, in
every layout, with LoRA, across a resume and under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import write_jsonl
from dpokit import train
from dpokit.data import builtin_path, load_pairs

TOL = 1e-5


def _ranked_rows(n: int) -> list[dict]:
    rows = [json.loads(line) for line in open(builtin_path("helpful_train"), encoding="utf-8")][:n]
    return [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"], r["chosen"] + " Anything else?", " No."],
             "scores": [3, 1, 2, 0]} for r in rows]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("ranked-train")
    ranked = write_jsonl(base / "ranked.jsonl", _ranked_rows(5))
    pairs, _ = load_pairs(ranked)  # 6 pairs a row, in the order training reads them
    explicit = write_jsonl(base / "pairs.jsonl", [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                                                  for p in pairs])
    return base, ranked, explicit


def _train(model, data, out, log=None, **kw):
    options = dict(model=model, data=data, output_dir=str(out), batch_size=4, max_steps=6, lr=1e-3,
                   warmup_steps=0, progress=False, log=log or (lambda *_: None)) | kw
    result = train(**options)
    metrics = [json.loads(line) for line in open(result.output_dir / "metrics.jsonl")]
    return metrics, result


def _same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in y:
            if not key.endswith("_per_s") and key != "tokens":
                assert abs(x[key] - y[key]) <= TOL * max(1.0, abs(y[key])), (x["step"], key, x[key], y[key])


@pytest.mark.parametrize("layout", [{}, {"prefix_sharing": False}, {"pack_tokens": 0}, {"lora_r": 4}])
def test_ranked_rows_train_as_their_pairs_written_out(tiny_model_dir, files, layout):
    base, ranked, explicit = files
    name = "-".join(f"{k}{v}" for k, v in layout.items()) or "default"
    messages = []
    got, result = _train(tiny_model_dir, ranked, base / f"ranked-{name}", messages.append, shuffle=False, **layout)
    expected, _ = _train(tiny_model_dir, explicit, base / f"pairs-{name}", shuffle=False, **layout)
    _same_metrics(got, expected)
    assert got[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    weights = "adapter_model.safetensors" if "lora_r" in layout else "model.safetensors"
    g, e = (load_file(base / f"{kind}-{name}" / "final" / weights) for kind in ("ranked", "pairs"))
    assert max((g[k] - e[k]).abs().max().item() for k in e) <= TOL
    assert any("format ranked (5 rows, k=4" in m for m in messages)
    if layout.get("prefix_sharing", True):
        assert any(m.startswith("ranked rows: an epoch computes") for m in messages)


def test_ranked_run_resumes_to_identical_weights(tiny_model_dir, files):
    """The epoch order (rows shuffled, each row's pairs together) is a function of (seed, step) alone."""
    base, ranked, _ = files
    full, _ = _train(tiny_model_dir, ranked, base / "resume-full", save_every=2, max_steps=8, keep_last=0)
    part = base / "resume-part"
    part.mkdir()
    shutil.copytree(base / "resume-full" / "checkpoints" / "step-0000004", part / "checkpoints" / "step-0000004")
    resumed, _ = _train(tiny_model_dir, ranked, part, save_every=2, max_steps=8, keep_last=0, resume="auto")
    assert resumed[-1]["step"] == 8
    _same_metrics([m for m in resumed if m["step"] > 4], [m for m in full if m["step"] > 4])
    g, e = (load_file(d / "final" / "model.safetensors") for d in (part, base / "resume-full"))
    assert all((g[k] == e[k]).all() for k in e)


def test_ranked_rows_under_torchrun_match_one_process(tiny_model_dir, files, tmp_path):
    base, ranked, _ = files
    args = ["train", "--model", tiny_model_dir, "--data", ranked, "--batch-size", "3", "--max-steps", "4",
            "--lr", "1e-3", "--warmup-steps", "0", "--no-progress"]
    one, _ = _train(tiny_model_dir, ranked, tmp_path / "one", batch_size=6, max_steps=4)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
           "DPOKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dpokit",
           *args, "--output-dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    _same_metrics(two, one)
