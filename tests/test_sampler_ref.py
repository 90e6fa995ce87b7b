"""Reference log-probs from the sampler (issue 15, part 2): make-pairs rows carry the ids the reference
scored and their sums; training uses them for the pairs it tokenizes to the same ids with that reference,
recomputes the rest, and starts from the same step 0 as with a live reference pass."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import write_jsonl
from dpokit import train
from dpokit.batches import tokenize_pairs
from dpokit.batches.tokenize import TokenizedPair
from dpokit.data import load_pairs
from dpokit.data.errors import DataError
from dpokit.logprobs import pairs_logps
from dpokit.logprobs.refcache import weights_digest
from dpokit.models import load_model
from dpokit.tasks.pairs import make_pairs

TEXT_PROMPTS = ["The movie was", "I watched this film and", "Honestly, the acting", "This review is about",
                "The plot of the story", "What a"]
CHAT_PROMPTS = [[{"role": "user", "content": p}] for p in TEXT_PROMPTS]


def eos_model(tokenizer, boost: float = 0.4):
    """A tiny random Llama that writes whole words (" the", " movie": text that re-tokenizes to the same ids, as
    a trained model's mostly does) and EOS often enough that samples of a few tokens both end and get cut.
    Residual dimension 0 is 1 everywhere (embeddings set, no layer writes it); only the LM head reads it:
    0 for words, `boost` for EOS, -30 for every other token."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    words = [i for i in range(len(tokenizer)) if re.fullmatch(r" [a-z]{2,}", text := tokenizer.decode([i]))
             and tokenizer(text, add_special_tokens=False)["input_ids"] == [i]]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        model.lm_head.weight[:, 0] = -30.0
        model.lm_head.weight[words, 0] = 0.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = boost
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> str:
    path = tmp_path_factory.mktemp("eos-llama")
    eos_model(tokenizer).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def _length_reward(prompts, texts):
    return [float(len(t)) for t in texts]


def _rows(model_dir, tokenizer, prompts, n=4):
    rows, stats = make_pairs(load_model(model_dir), tokenizer, prompts, _length_reward, n=n, pairing="all",
                             max_new_tokens=8, seed=1)
    return rows, stats


def _quiet(*_args):
    pass


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_stored_sums_equal_the_reference_pass(tmp_path, tokenizer, model_dir, chat):
    rows, stats = _rows(model_dir, tokenizer, CHAT_PROMPTS if chat else TEXT_PROMPTS)
    model = load_model(model_dir)
    assert all(r["ref_digest"] == weights_digest(model) for r in rows)
    assert stats.empty >= 1  # samples that were EOS alone: left out (loading, below, refuses empty completions)
    cut = [r["chosen_truncated"] for r in rows] + [r["rejected_truncated"] for r in rows]
    assert any(cut) and not all(cut), "the model should give both ended and cut samples"
    for r in rows:
        for side in ("chosen", "rejected"):
            ids = r[f"{side}_ref_ids"]
            assert (ids[-1] == tokenizer.eos_token_id) != r[f"{side}_truncated"]  # EOS kept exactly when it ended
    # the sampler's sums are the reference pass's sums of the very ids it stored: ended and cut, text and chat
    stored = [TokenizedPair(r["ref_prompt_ids"], r["chosen_ref_ids"], r["rejected_ref_ids"], "?") for r in rows]
    again = pairs_logps(model, stored, 4, tokenizer.pad_token_id, torch.device("cpu"), pack_tokens=1024)
    torch.testing.assert_close(again.chosen.double(), torch.tensor([r["chosen_ref_logp"] for r in rows],
                                                                   dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.rejected.double(), torch.tensor([r["rejected_ref_logp"] for r in rows],
                                                                     dtype=torch.float64), rtol=1e-5, atol=1e-5)
    # and training's own tokenization of the rows gives those ids — except an ended chat reply, whose
    # template writes "\n" after <|im_end|>: training scores one token more, so such a pair is recomputed
    pairs, _ = tokenize_pairs(load_pairs(write_jsonl(tmp_path / "p.jsonl", rows))[0], tokenizer, 4096, None)
    same = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) == (r["ref_prompt_ids"], r["chosen_ref_ids"],
                                                              r["rejected_ref_ids"]) for p, r in zip(pairs, rows)]
    both_cut = [r["chosen_truncated"] and r["rejected_truncated"] for r in rows]
    if chat:
        assert same == both_cut
    else:
        assert sum(same) >= len(rows) - 2  # BPE may merge across the prompt boundary now and then
        assert any(s and not c for s, c in zip(same, both_cut))  # ended samples match too


def test_rows_load_and_data_check_reports_them(tmp_path, tokenizer, model_dir):
    from dpokit.data.check import check_file, format_check
    rows, _ = _rows(model_dir, tokenizer, TEXT_PROMPTS[:3])
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    pairs, report = load_pairs(path)  # samples that are EOS alone (empty texts) are left out of the pairs
    assert report.format == "explicit" and all(p.sampler_ref is not None for p in pairs)
    assert pairs[0].sampler_ref.chosen_logp == rows[0]["chosen_ref_logp"]
    text = format_check(check_file(path, tokenizer, 4096, None))
    assert f"sampler reference log-probs: {len(rows)} of {len(rows)} pairs" in text
    broken = dict(rows[0])
    del broken["chosen_ref_logp"]  # half of the fields is an error naming the missing one, not ignored
    with pytest.raises(DataError, match="chosen_ref_logp"):
        load_pairs(write_jsonl(tmp_path / "b.jsonl", [broken]))


def _first_step(tmp_path, monkeypatch, name, model, data, **options):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / f"cache-{name}"))  # each run its own: no cache reuse
    logs: list[str] = []
    result = train(model=model, data=data, output_dir=str(tmp_path / name), max_steps=1, lr=0.0, batch_size=8,
                   shuffle=False, progress=False, log=logs.append, **options)
    first = json.loads(open(result.output_dir / "metrics.jsonl").readline())
    return first, [m for m in logs if "reference log-probs" in m]


def test_training_uses_stored_sums_and_starts_like_a_live_reference(tmp_path, tokenizer, model_dir, monkeypatch):
    rows, _ = _rows(model_dir, tokenizer, TEXT_PROMPTS)
    plain = [{k: v for k, v in r.items() if "ref_" not in k} for r in rows]
    live, live_logs = _first_step(tmp_path, monkeypatch, "live", model_dir, write_jsonl(tmp_path / "l.jsonl", plain))
    assert not any("sampler" in m for m in live_logs)
    stored, logs = _first_step(tmp_path, monkeypatch, "stored", model_dir, write_jsonl(tmp_path / "s.jsonl", rows))
    pairs, _ = tokenize_pairs(load_pairs(str(tmp_path / "s.jsonl"))[0], tokenizer, 1024, None)
    matching = sum((p.prompt_ids, p.chosen_ids, p.rejected_ids) == (r["ref_prompt_ids"], r["chosen_ref_ids"],
                                                                     r["rejected_ref_ids"])
                   for p, r in zip(pairs, rows))
    assert any(f"{matching} of {len(rows)} pairs from the sampler, {len(rows) - matching} recomputed" in m
               for m in logs), logs
    assert any(m.startswith(f"training reference log-probs: computed for {len(rows) - matching} pairs") for m in logs)
    assert stored["loss"] == pytest.approx(live["loss"], abs=1e-6)
    assert stored["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert stored[key] == pytest.approx(live[key], abs=1e-5), key

    # the sums are really used: a wrong stored value moves step 0 away from ln 2 ...
    i = next(k for k, (p, r) in enumerate(zip(pairs, rows)) if (p.chosen_ids == r["chosen_ref_ids"]
                                                                and p.prompt_ids == r["ref_prompt_ids"]))
    bad = [dict(r) for r in rows]
    bad[i]["chosen_ref_logp"] -= 8.0
    moved, _ = _first_step(tmp_path, monkeypatch, "moved", model_dir, write_jsonl(tmp_path / "m.jsonl", bad))
    assert abs(moved["rewards/margins"]) > 0.05
    # ... and a row whose stored ids are not training's is recomputed, whatever its stored sum says
    bad[i]["chosen_ref_ids"] = bad[i]["chosen_ref_ids"] + [5]
    fixed, logs = _first_step(tmp_path, monkeypatch, "fixed", model_dir, write_jsonl(tmp_path / "f.jsonl", bad))
    assert fixed["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert any(f"{matching - 1} of {len(rows)} pairs from the sampler, {len(rows) - matching + 1} recomputed" in m
               and "tokenization differed" in m for m in logs), logs


def test_another_reference_or_ld_alpha_recomputes_everything(tmp_path, tokenizer, model_dir, monkeypatch):
    rows, _ = _rows(model_dir, tokenizer, TEXT_PROMPTS[:3])
    data = write_jsonl(tmp_path / "s.jsonl", rows)
    other = tmp_path / "other"
    eos_model(tokenizer, boost=0.3).save_pretrained(other, safe_serialization=True)
    tokenizer.save_pretrained(other)
    _, logs = _first_step(tmp_path, monkeypatch, "other", model_dir, data, ref_model=str(other))
    assert any(f"0 of {len(rows)} pairs from the sampler, {len(rows)} recomputed ({len(rows)} digest differs)" in m
               for m in logs), logs
    _, logs = _first_step(tmp_path, monkeypatch, "ld", model_dir, data, ld_alpha=0.5)
    assert any("not used (all recomputed): --ld-alpha" in m for m in logs), logs
