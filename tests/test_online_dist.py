"""Online runs under torchrun (loop/online_dist.py), 2 gloo processes on CPU: with sampling replaced by fixed
completions (drawn from (prompt, step), not from the rank's stream), GRPO, RLOO, PPO, online DPO and iterative DPO
make the updates of one process over the same prompts to 1e-5 (weights and metrics); a real-sampling run (GRPO,
PPO) checkpoints and resumes to its uninterrupted weights bit for bit and refuses a resume with another process
count; a real-sampling iterative DPO run resumes its unfinished round to the same weights.

This file is also the worker torchrun starts: `python tests/test_online_dist.py '<config json>' fixed|sampled`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
SRC = str(TESTS.parent / "src")
TOL = 1e-5
METRICS = ("loss", "reward", "reward_std", "advantage_std", "grad_norm", "kl", "completion_length", "pairs",
           "rewards/chosen", "rewards/margins", "entropy", "loss/value", "value", "rlhf_reward", "explained_variance",
           "clip_fraction")
METHODS = {
    "grpo": {"loss": "grpo", "grpo_iterations": 2, "kl_coef": 0.05, "scale_rewards": "batch"},
    "rloo": {"loss": "rloo", "kl_coef": 0.05},
    "online_dpo": {"loss": "sigmoid", "online_dpo": True, "sync_ref_every": 2},
    # the value model trained too; mini-batches shuffled over, and advantages whitened over, every rank's rows
    "ppo": {"loss": "ppo", "kl_coef": 0.05, "num_ppo_epochs": 2, "num_mini_batches": 2},
}


def fixed_sampler(policy, tokenizer, prompts, cfg, step, rank):
    """num_generations completions of each prompt, random token ids seeded by (prompt, step, j): the same
    completions whichever rank holds the prompt (lengths 2 … max_new_tokens, cut at the longest)."""
    from dpokit.generation.sample import Samples, prompt_token_ids
    eos, vocab = tokenizer.eos_token_id, len(tokenizer)
    prompt_ids, completion_ids, truncated = [], [], []
    for p in prompts:
        for j in range(cfg.num_generations):
            g = torch.Generator().manual_seed(zlib.crc32(json.dumps(p).encode()) * 1000 + step * 10 + j)
            n = int(torch.randint(2, cfg.max_new_tokens + 1, (1,), generator=g))
            ids = torch.randint(3, vocab, (n,), generator=g).tolist()
            cut = n == cfg.max_new_tokens
            prompt_ids.append(prompt_token_ids(p, tokenizer))
            completion_ids.append(ids if cut else ids[:-1] + [eos])
            truncated.append(cut)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]
    return Samples(list(prompts), cfg.num_generations, prompt_ids, completion_ids, texts, [0.0] * len(texts),
                   sum(map(len, completion_ids)), 0.0, truncated)


def _config(model: str, prompts: str, out: Path, batch_size: int, **extra) -> dict:
    # 6 prompts, batch_size × grad_accum 2 × processes = 4 per step: the epoch's second step holds 2
    return dict(model=model, prompts=prompts, reward="conftest:letter_reward", output_dir=str(out),
                max_new_tokens=6, batch_size=batch_size, grad_accum=2, num_generations=3, lr=1e-3, warmup_steps=0,
                max_steps=4, progress=False, **extra)


def _torchrun(config: dict, mode: str) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(TESTS)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           json.dumps(config), mode]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # take the workers down too: no rank left waiting on another
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun timed out; its output: {(out + err)[-3000:]}")
    return proc.returncode, out + err


def _method(config):
    """train_online's `method`, as loop/run.py chooses it."""
    from dpokit.loop.ppo import ppo_method
    return ppo_method if config.loss_names == ["ppo"] else None


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL * max(1.0, abs(a), abs(b))


@pytest.mark.parametrize("name", list(METHODS))
def test_two_processes_make_the_one_process_updates_on_fixed_completions(tmp_path, tiny_model_dir, prompts_file,
                                                                          name):
    from dpokit.config import TrainConfig
    from dpokit.loop.online import train_online
    one = tmp_path / "one"
    config = TrainConfig.from_dict(_config(tiny_model_dir, prompts_file, one, 2, **METHODS[name]))
    train_online(config, lambda *a: None, _method(config), sampler=fixed_sampler)
    two = tmp_path / "two"
    code, log = _torchrun(_config(tiny_model_dir, prompts_file, two, 1, **METHODS[name]), "fixed")
    assert code == 0, log[-3000:]
    assert "2 processes (DDP, 1 prompts each per micro-batch)" in log
    expected, got = _metrics(one), _metrics(two)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    compared = 0
    for e, g in zip(expected, got):
        for key in METRICS:
            if key in e:
                assert key in g and _close(e[key], g[key]), (name, e["step"], key, e[key], g.get(key))
                compared += 1
    assert compared >= 4 * 4
    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= TOL
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(base[k], b[k]) for k in b)  # the updates did something


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_two_process_run_resumes_to_its_uninterrupted_weights(tmp_path, tiny_model_dir, prompts_file, name):
    """Real sampling: each rank's stream; the checkpoint holds both ranks' RNG states and the step (PPO: and the
    value model)."""
    from dpokit import train
    from dpokit.loop.checkpoint import CheckpointError, complete_checkpoints
    out = tmp_path / "run"
    config = _config(tiny_model_dir, prompts_file, out, 1, save_every=2, eval_every=2, eval_prompts=prompts_file,
                     **{"grpo": {"loss": "grpo", "kl_coef": 0.05}, "ppo": METHODS["ppo"]}[name])
    code, log = _torchrun(config, "sampled")
    assert code == 0, log[-3000:]
    expected = load_file(out / "final" / "model.safetensors")
    steps = [m["step"] for m in _metrics(out)]
    assert steps == [1, 2, 3, 4, 4] and "eval/reward" in _metrics(out)[1]  # rank 0 evaluated at step 2
    ckpt = complete_checkpoints(str(out))[0]
    assert ckpt.name == "step-0000002"
    code, log = _torchrun({**config, "resume": str(ckpt)}, "sampled")
    assert code == 0 and "resumed from" in log, log[-3000:]
    assert [m["step"] for m in _metrics(out)] == steps  # steps 3 and 4 redone, each logged once
    got = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with pytest.raises(CheckpointError, match="2 process"):  # its steps' prompts were split over 2 ranks
        train(**{**config, "resume": str(ckpt), "output_dir": str(tmp_path / "one")}, log=lambda *a: None)


def test_two_process_iterative_dpo_makes_the_one_process_rounds(tmp_path, tiny_model_dir, prompts_file):
    """Each rank samples its share of a round's prompts; rank 0 writes the pairs file in the prompts' order, so on
    fixed completions the pairs and the two rounds' DDP offline runs are one process's."""
    from dpokit.config import TrainConfig
    from dpokit.loop.iterative import iterative_dpo
    extra = {"loss": "sigmoid", "online_dpo": True, "rounds": 2}
    one = tmp_path / "one"
    iterative_dpo(TrainConfig.from_dict(_config(tiny_model_dir, prompts_file, one, 2, **extra)), lambda *a: None,
                  sampler=fixed_sampler)
    two = tmp_path / "two"
    code, log = _torchrun(_config(tiny_model_dir, prompts_file, two, 1, **extra), "fixed")
    assert code == 0, log[-3000:]
    assert "2 processes (DDP" in log
    expected, got = _metrics(one), _metrics(two)
    assert [m["round"] for m in got] == [1, 2]
    for e, g in zip(expected, got):
        assert {k: g[k] for k in ("step", "pairs", "ties", "identical")} == \
            {k: e[k] for k in ("step", "pairs", "ties", "identical")}
        assert _close(e["reward"], g["reward"]) and _close(e["completion_length"], g["completion_length"])
    for r in (1, 2):
        assert (one / f"round-{r}" / "pairs.jsonl").read_text() == (two / f"round-{r}" / "pairs.jsonl").read_text()
    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= TOL
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(base[k], b[k]) for k in b)


def test_two_process_iterative_dpo_samples_and_resumes_its_unfinished_round(tmp_path, tiny_model_dir, prompts_file):
    """Real sampling, each rank from its own stream; --resume auto keeps round 1 and redoes round 2 to the same
    weights (its pairs sampled again with the same seeds)."""
    import shutil
    out = tmp_path / "run"
    config = _config(tiny_model_dir, prompts_file, out, 1, loss="sigmoid", online_dpo=True, rounds=2)
    code, log = _torchrun(config, "sampled")
    assert code == 0, log[-3000:]
    assert [m["round"] for m in _metrics(out)] == [1, 2] and log.count("round 1/2") == 1  # rank 0 logs
    expected = load_file(out / "final" / "model.safetensors")
    pairs = (out / "round-2" / "pairs.jsonl").read_text()
    shutil.rmtree(out / "round-2" / "final")
    shutil.rmtree(out / "final")
    code, log = _torchrun({**config, "resume": "auto"}, "sampled")
    assert code == 0 and "rounds 1 complete" in log, log[-3000:]
    assert [m["round"] for m in _metrics(out)] == [1, 2]
    assert (out / "round-2" / "pairs.jsonl").read_text() == pairs
    got = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


if __name__ == "__main__":  # the torchrun worker
    from dpokit.config import TrainConfig
    from dpokit.loop.iterative import iterative_dpo
    from dpokit.loop.online import train_online
    from dpokit.loop.online_dist import draw
    config = TrainConfig.from_dict(json.loads(sys.argv[1]))
    sampler = fixed_sampler if sys.argv[2] == "fixed" else draw
    if config.rounds:
        iterative_dpo(config, print, sampler=sampler)
    else:
        train_online(config, print, _method(config), sampler=sampler)
