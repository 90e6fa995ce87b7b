"""`dpokit sft`: demonstration formats and their errors, assistant turns found by rendering prefixes (against HF's
{% generation %} mask), the first-step loss against TRL 1.16's SFTTrainer (prompt-completion and messages, and
over gradient accumulation), packing on/off, LoRA, resume to the uninterrupted weights, torchrun (2 processes =
1 process), and the README's SFT → DPO commands."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CHATML, write_jsonl
from dpokit.batches.demos import assistant_spans, collate_demos, tokenize_demos
from dpokit.cli import main
from dpokit.config import ConfigError, TrainConfig
from dpokit.data import DataError, builtin_path, load_pairs
from dpokit.data.demos import load_demos
from dpokit.loop.checkpoint import complete_checkpoints
from dpokit.loop.sft import train_sft

QUIET = dict(log=lambda *_: None)
SRC = str(Path(__file__).resolve().parents[1] / "src")
# CHATML with the assistant's text (and its closing tag) inside {% generation %}: what HF's
# return_assistant_tokens_mask and TRL's assistant_only_loss need; renders the same text as CHATML
CHATML_GEN = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
              "{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}{% else %}"
              "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _pairs(n: int, start: int = 0) -> list[dict]:
    return [json.loads(line) for line in open(builtin_path("helpful_train"), encoding="utf-8")][start:start + n]


def _prompt_completion(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in _pairs(n, start)]


def _conversations(n: int) -> list[dict]:
    """Two-turn conversations (a system message in every other one): two assistant turns each."""
    rows = _pairs(2 * n)
    out = []
    for i in range(n):
        a, b = rows[2 * i], rows[2 * i + 1]
        messages = [{"role": "system", "content": "Be brief."}] if i % 2 else []
        for r in (a, b):
            messages += [{"role": "user", "content": r["prompt"].strip()},
                         {"role": "assistant", "content": r["chosen"].strip()}]
        out.append({"messages": messages})
    return out


def _cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(stage="sft", model=model, data=data, output_dir=str(out), batch_size=2, max_steps=2, lr=1e-3,
                warmup_steps=0, progress=False, memory_check=False, device="cpu")
    return TrainConfig.from_dict({**base, **kw})


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl", encoding="utf-8")]


# ---- formats and errors -----------------------------------------------------------------------------------

def test_formats_are_detected_and_pairs_give_their_chosen_side(tmp_path):
    demos, report = load_demos(write_jsonl(tmp_path / "pc.jsonl", _prompt_completion(3)))
    assert report.format == "prompt-completion" and len(demos) == 3 and demos[0].completion == _pairs(1)[0]["chosen"]
    conv = [{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}]
    demos, report = load_demos(write_jsonl(tmp_path / "conv.jsonl", conv))
    assert report.format == "prompt-completion" and demos[0].conversational
    demos, report = load_demos(write_jsonl(tmp_path / "m.jsonl", _conversations(2)))
    assert report.format == "messages" and demos[1].messages[0]["role"] == "system"
    demos, report = load_demos(builtin_path("helpful_train"))
    assert report.format == "explicit pairs, chosen as demonstrations" and len(demos) == 140
    assert report.summary().startswith(f"{builtin_path('helpful_train')}: 140 demonstrations")


@pytest.mark.parametrize("row, line, field, words", [
    ({"prompt": "Q", "completion": 3}, 2, "completion", "expected a string"),
    ({"prompt": "Q"}, 2, "completion", "missing"),  # the file is prompt-completion: the row lacks its field
    ({"prompt": "  ", "completion": "A"}, 2, "prompt", "empty prompt"),
    ({"prompt": "Q", "completion": " "}, 2, "completion", "empty completion"),
    ({"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "user", "content": "A"}]}, 2,
     "completion", "assistant"),
    ({"prompt": "Q", "completion": "A", "label": True}, 2, "label", "not demonstrations"),
])
def test_a_bad_row_names_file_line_and_field(tmp_path, row, line, field, words):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "completion": "A"}, row])
    if "label" in row:  # the first row decides the format: a KTO file
        path = write_jsonl(tmp_path / "d.jsonl", [row])
        line = 1
    with pytest.raises(DataError) as e:
        load_demos(path)
    assert (e.value.path, e.value.line, e.value.field) == (path, line, field)
    assert words in str(e.value) and f"d.jsonl:{line}" in str(e.value)


@pytest.mark.parametrize("messages, field, words", [
    ([{"role": "user", "content": "Q"}], "messages", "no assistant message"),
    ([{"role": "assistant", "content": "A"}], "messages[0].role", "starts with the assistant"),
    ([{"role": "user", "content": "Q"}, {"role": "robot", "content": "A"}], "messages[1].role", "unknown role"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant"}], "messages[1]", "{role, content}"),
])
def test_bad_messages_name_the_message(tmp_path, messages, field, words):
    path = write_jsonl(tmp_path / "m.jsonl", _conversations(1) + [{"messages": messages}])
    with pytest.raises(DataError) as e:
        load_demos(path)
    assert (e.value.line, e.value.field) == (2, field) and words in str(e.value)
    demos, report = load_demos(path, on_bad_row="skip")
    assert len(demos) == 1 and sum(report.skipped.values()) == 1


def test_dpo_and_kto_refuse_demonstrations_pointing_at_sft(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _prompt_completion(2))
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'completion' prompt-completion rows are demonstrations .*"
                                        r"dpokit sft"):
        load_pairs(path)


def test_a_template_that_is_not_prefix_preserving_is_refused(tmp_path, tokenizer):
    tok = copy.deepcopy(tokenizer)  # renders only the last message: earlier turns are no prefix of the whole
    tok.chat_template = ("{{ '<|im_start|>' + messages[-1]['role'] + '\\n' + messages[-1]['content'] + '<|im_end|>' }}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    demos, _ = load_demos(write_jsonl(tmp_path / "m.jsonl", _conversations(1)))
    with pytest.raises(DataError, match=r"m.jsonl:1: field 'messages\[1\]' the chat template does not render"):
        tokenize_demos(demos, tok, 512)
    tok.chat_template = None
    with pytest.raises(DataError, match="no_chat_template|has none"):
        tokenize_demos(demos, tok, 512)


# ---- tokens trained on ------------------------------------------------------------------------------------

def test_assistant_spans_equal_hf_generation_mask(tokenizer):
    """Every assistant turn (content and closing tag) and nothing else, as HF computes from {% generation %}."""
    marked = copy.deepcopy(tokenizer)
    marked.chat_template = CHATML_GEN
    for row in _conversations(4):
        ids, spans = assistant_spans(row["messages"], tokenizer, "x:1")
        out = marked.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        assert ids == out["input_ids"]
        assert [t for s, e in spans for t in range(s, e)] == [t for t, m in enumerate(out["assistant_masks"]) if m]
        turns = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert [tokenizer.decode(ids[s:e]) for s, e in spans] == [c + "<|im_end|>\n" for c in turns]


def test_truncation_keeps_the_start_and_drops_rows_left_without_trained_tokens(tmp_path, tokenizer):
    demos, _ = load_demos(write_jsonl(tmp_path / "pc.jsonl", _prompt_completion(4)))
    full, _ = tokenize_demos(demos, tokenizer, 10_000)
    cut, report = tokenize_demos(demos, tokenizer, 30)
    prompt_lengths = [d.spans[0][0] for d in full]
    kept = [f for f, p in zip(full, prompt_lengths) if p < 30]
    assert [c.ids for c in cut] == [f.ids[:30] for f in kept]
    assert report.dropped.get("prompt_fills_max_length", 0) == len(full) - len(kept)
    assert all(c.spans == [(f.spans[0][0], min(f.spans[0][1], 30))] for c, f in zip(cut, kept))


# ---- the loss against TRL --------------------------------------------------------------------------------

def _trl_loss(tmp_path, model_dir, tok, rows, batches: list[list[int]], **config) -> float:
    """TRL 1.16 SFTTrainer's loss of one optimizer step over `batches` (micro-batches of row indices), as its
    training_step computes it: each micro-batch's compute_loss with num_items_in_batch = the step's label tokens."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModelForCausalLM
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(batches[0]), report_to=[],
                         bf16=False, use_cpu=True, save_strategy="no", max_length=512, **config)
    trainer = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    micro = [trainer.data_collator([trainer.train_dataset[i] for i in idx]) for idx in batches]
    items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    with torch.no_grad():
        return sum(trainer.compute_loss(trainer.model, b, num_items_in_batch=torch.tensor(items)).item() for b in micro)


@pytest.mark.parametrize("kind", ["prompt-completion", "messages"])
def test_first_step_loss_equals_trl_sft_trainer(tmp_path, tiny_model_dir, tokenizer, kind):
    rows = _prompt_completion(4) if kind == "prompt-completion" else _conversations(4)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    tok = copy.deepcopy(tokenizer)
    if kind == "messages":
        tok.chat_template = CHATML_GEN  # TRL finds assistant tokens by its markers; dpokit renders prefixes
    config = dict(completion_only_loss=True) if kind == "prompt-completion" else dict(assistant_only_loss=True)
    theirs = _trl_loss(tmp_path, tiny_model_dir, tok, rows, [[0, 1, 2, 3]], **config)
    for name, kw in (("one", dict(batch_size=4)), ("accum", dict(batch_size=1, grad_accum=4)),
                     ("unpacked", dict(batch_size=4, pack_tokens=0))):
        train_sft(_cfg(tiny_model_dir, data, tmp_path / name, max_steps=1, **kw), **QUIET)
        ours = _metrics(tmp_path / name)[0]["loss"]
        assert ours == pytest.approx(theirs, abs=1e-4), name
        assert abs(ours - theirs) < 1e-5, name  # the same tokens and math: fp32 rounding only
    # over gradient accumulation TRL too divides by the step's tokens (not a mean of micro-batch means)
    assert _trl_loss(tmp_path, tiny_model_dir, tok, rows, [[0], [1], [2], [3]], **config) == pytest.approx(theirs,
                                                                                                           abs=1e-5)


def test_packed_and_unpacked_batches_give_the_same_log_probs(tmp_path, tiny_model_dir, tokenizer):
    from dpokit.logprobs.sequence import token_logps
    from dpokit.models import load_model
    model = load_model(tiny_model_dir)
    demos, _ = load_demos(write_jsonl(tmp_path / "m.jsonl", _conversations(4)))
    tokenized, _ = tokenize_demos(demos, tokenizer, 512)
    packed = collate_demos(tokenized, tokenizer.pad_token_id, 1024)
    one_per_row = collate_demos(tokenized, tokenizer.pad_token_id, 0)
    assert packed["input_ids"].shape[0] < one_per_row["input_ids"].shape[0] == 4
    with torch.no_grad():
        a, b = token_logps(model, packed), token_logps(model, one_per_row)
    assert torch.allclose(a.sums(), b.sums(), atol=1e-5)
    assert a.counts().tolist() == [d.trained for d in tokenized]


# ---- runs ---------------------------------------------------------------------------------------------------

def test_packing_on_and_off_train_the_same(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", _conversations(6))
    for name, pack in (("packed", 1024), ("unpacked", 0)):
        train_sft(_cfg(tiny_model_dir, data, tmp_path / name, batch_size=3, max_steps=3, pack_tokens=pack), **QUIET)
    for a, b in zip(_metrics(tmp_path / "packed"), _metrics(tmp_path / "unpacked")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert _metrics(tmp_path / "packed")[-1]["loss"] < _metrics(tmp_path / "packed")[0]["loss"]


def test_resume_gives_the_uninterrupted_weights(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", _prompt_completion(8))
    out = tmp_path / "run"
    train_sft(_cfg(tiny_model_dir, data, out, max_steps=4, save_every=2), **QUIET)
    uninterrupted = load_file(out / "final" / "model.safetensors")
    ckpt = complete_checkpoints(str(out))[0]
    assert ckpt.name == "step-0000002"
    train_sft(_cfg(tiny_model_dir, data, out, max_steps=4, save_every=2, resume=str(ckpt)), **QUIET)
    resumed = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]  # steps 3 and 4 redone once, not duplicated


def test_lora_trains_adapters_and_merges(tmp_path, tiny_model_dir):
    pytest.importorskip("peft")
    data = write_jsonl(tmp_path / "d.jsonl", _prompt_completion(4))
    train_sft(_cfg(tiny_model_dir, data, tmp_path / "merged", lora_r=4, merge_lora=True), **QUIET)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "final")
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "final" / "model.safetensors")
    changed = [k for k in base if k in merged and not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k for k in changed)  # the adapted Linears moved, nothing else


def test_options_sft_does_not_read_are_refused():
    for key, value in (("beta", 0.2), ("loss", "ipo"), ("max_prompt_length", 64), ("fsdp", True),
                       ("ranked_pairs", "best-worst"), ("prefix_sharing", False)):
        with pytest.raises(ConfigError, match="not read by `dpokit sft`"):
            TrainConfig.from_dict({"stage": "sft", key: value})
    TrainConfig.from_dict({"stage": "sft", "pack_tokens": 0, "lora_r": 4, "merge_lora": True, "attention": "dense",
                           "eval_every": 2, "save_every": 2, "resume": "auto"})


def test_torchrun_two_processes_equal_one(tmp_path, tiny_model_dir, monkeypatch):
    """7 demonstrations, global micro-batches of 4 (2 per process) and grad_accum 2: the epoch's last micro-batch
    leaves one process without a row (the weight-0 repeat); N counts both processes' tokens."""
    data = write_jsonl(tmp_path / "d.jsonl", _prompt_completion(7))
    held = write_jsonl(tmp_path / "e.jsonl", _prompt_completion(3, start=20))

    def args(out, batch_size):
        return ["sft", "--model", tiny_model_dir, "--data", data, "--eval-data", held, "--output-dir", str(out),
                "--batch-size", str(batch_size), "--grad-accum", "2", "--epochs", "2", "--lr", "1e-3",
                "--warmup-steps", "0", "--eval-batch-size", "2", "--no-progress", "--device", "cpu",
                "--no-memory-check"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "dpokit", *args(tmp_path / "two", 2)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(args(tmp_path / "one", 4)) == 0
    two, one = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert len(two) == len(one) == 3  # 2 steps (one per epoch) and the held-out loss after
    for a, b in zip(two, one):
        for key in ("loss", "num_tokens", "grad_norm", "eval/loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), key
    a, b = (load_file(tmp_path / x / "final" / "model.safetensors") for x in ("two", "one"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# ---- the command line and the README's example ------------------------------------------------------------

def test_help_and_the_readme_sft_then_dpo_example(tmp_path, tiny_model_dir, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Fine-tune --model on demonstrations" in text and "L = −(1/N) Σ log π(y_t | y_<t)" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "sft" in capsys.readouterr().out
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- sft-example -->")[1].split("```")[1]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("dpokit ")]
    assert [c.split()[1] for c in commands] == ["sft", "train"]
    monkeypatch.chdir(tmp_path)
    tiny = ["--max-steps", "1", "--batch-size", "2", "--device", "cpu", "--no-memory-check", "--no-progress"]
    for command in commands:  # the README's commands, on the tiny model instead of the embedded one
        args = command.split()[1:] + tiny
        if args[0] == "sft":
            args += ["--model", tiny_model_dir]
        assert main(args) == 0, command
    assert (tmp_path / "runs" / "sft" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "dpo-after-sft" / "final" / "model.safetensors").is_file()


def test_data_check_reports_a_demonstrations_file(tmp_path, tiny_model_dir, capsys):
    rows = _conversations(3) + [_conversations(1)[0], {"messages": [{"role": "user", "content": "Q"}]}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    assert main(["data", "check", path, "--model", tiny_model_dir, "--max-length", "60"]) == 1  # an invalid row
    out = capsys.readouterr().out
    assert f"{path}: 4 demonstrations, format messages" in out
    assert "invalid rows: 1 (1 no_assistant_turn)" in out and "m.jsonl:5: field 'messages'" in out
    assert "duplicates: 1 demonstrations repeat an earlier one: line 4 = line 1" in out
    assert "trained turns" in out and "demonstrations cut at --max-length" in out
