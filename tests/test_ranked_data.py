"""Ranked rows (issue 15 part 1, data side): k scored completions per prompt — our ranked shape and
UltraFeedback's — read as the pairs they imply (all, best-worst, best-rest), each row's pairs together under
its "file:line" group; bad rows named by file, line and field; make-pairs --ranked rows carrying the sampler's
reference data per completion, which every expanded pair gets as its SamplerRef; `data check` on them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import write_jsonl
from test_sampler_ref import model_dir  # noqa: F401 (fixture: a sampler whose samples both end and get cut)
from dpokit import train
from dpokit.batches import TokenizedPair, TokenizeReport, pad_rows, tokenize_pairs
from dpokit.cli import main
from dpokit.config import ConfigError, TrainConfig
from dpokit.data import DataError, LoadReport, Pair, load_completions, load_pairs
from dpokit.data.check import check_file, check_stats, format_check
from dpokit.data.ranked import RankedStats, rank_pairs, ties
from dpokit.logprobs import sequence_logps
from dpokit.logprobs.refcache import weights_digest
from dpokit.logprobs.sampler_ref import sort_pairs
from dpokit.models import load_model
from dpokit.tasks.pairs import make_pairs

TEXT_PROMPTS = ["The movie was", "I watched this film and", "Honestly, the acting", "This review is about",
                "The plot of the story", "What a"]
CHAT_PROMPTS = [[{"role": "user", "content": p}] for p in TEXT_PROMPTS]
ROW = {"prompt": "Name a fruit.", "completions": [" A carrot.", " An apple.", " A pear, ripe.", " Stone."],
       "scores": [1.0, 3.0, 2.0, 0.0]}


def chat(text: str, role: str = "assistant") -> list[dict]:
    return [{"role": role, "content": text}]


def _load(tmp_path, rows, name="r.jsonl", **options):
    return load_pairs(write_jsonl(tmp_path / name, rows), **options)


def test_rank_pairs_orders_by_score_and_never_pairs_ties():
    scores = [3, 1, 3, 0, 0]  # two tied for best (0, 2), two for worst (3, 4): the first in row order stands for them
    assert rank_pairs(scores, "all") == [(0, 1), (0, 3), (0, 4), (2, 1), (2, 3), (2, 4), (1, 3), (1, 4)]
    assert rank_pairs(scores, "best-worst") == [(0, 3)]
    assert rank_pairs(scores, "best-rest") == [(0, 1), (0, 3), (0, 4)]
    assert ties(scores) == 2 and len(rank_pairs(scores, "all")) + ties(scores) == 5 * 4 // 2
    assert rank_pairs([0.5, 0.25], "all") == rank_pairs([0.5, 0.25], "best-rest") == [(0, 1)]
    with pytest.raises(ValueError, match="pairing"):
        rank_pairs(scores, "best")


def test_text_rows_give_every_scored_pair_in_one_group(tmp_path):
    second = {"prompt": "Q?", "completions": [" yes", " no"], "scores": [0, 1], "truncated": [False, True]}
    pairs, report = _load(tmp_path, [ROW, second])
    source = f"{tmp_path / 'r.jsonl'}:1"
    c = ROW["completions"]  # ranks: apple 3, pear 2, carrot 1, stone 0
    assert [(p.chosen, p.rejected) for p in pairs[:6]] == [(c[1], c[2]), (c[1], c[0]), (c[1], c[3]), (c[2], c[0]),
                                                           (c[2], c[3]), (c[0], c[3])]
    assert all(p.group == p.source == source and p.prompt == ROW["prompt"] for p in pairs[:6])
    assert not any(p.conversational or p.sampler_ref for p in pairs)
    last = pairs[6]  # truncated flags: the cut completion gets no EOS, wherever it stands in the pair
    assert (last.chosen, last.rejected, last.chosen_ends, last.rejected_ends) == (" no", " yes", False, True)
    assert last.group == f"{tmp_path / 'r.jsonl'}:2"
    assert report.format == "ranked (2 rows, k=2–4 completions per prompt, 3.0 on average; 3.5 pairs per row on " \
                            "average; pairing all)"
    assert report.summary().startswith(f"{tmp_path / 'r.jsonl'}: 7 pairs, format ranked (2 rows")
    assert (report.rows, report.ranked.rows, dict(report.ranked.implied)) == (
        7, 2, {"all": 7, "best-worst": 2, "best-rest": 4})


@pytest.mark.parametrize("pairing, expected", [("best-worst", [(1, 3)]), ("best-rest", [(1, 2), (1, 0), (1, 3)])])
def test_best_worst_and_best_rest(tmp_path, pairing, expected):
    pairs, report = _load(tmp_path, [ROW], ranked_pairs=pairing)
    c = ROW["completions"]
    assert [(p.chosen, p.rejected) for p in pairs] == [(c[i], c[j]) for i, j in expected]
    assert report.format.endswith(f"pairing {pairing})")


def test_ties_never_pair_and_a_completion_repeated_with_its_score_counts_once(tmp_path):
    row = {"prompt": "P", "completions": [" a", " b", " c", " a"], "scores": [2, 2, 1, 2]}
    pairs, report = _load(tmp_path, [row])
    assert [(p.chosen, p.rejected) for p in pairs] == [(" a", " c"), (" b", " c")]  # (" a", " c") not twice
    assert report.ranked.ties == 1 and report.ranked.repeats == 1
    worst_tied = {"prompt": "P", "completions": [" a", " b", " c"], "scores": [5, 1, 1]}
    assert [(p.chosen, p.rejected) for p in _load(tmp_path, [worst_tied], "w.jsonl",
                                                    ranked_pairs="best-worst")[0]] == [(" a", " b")]


def test_conversational_rows(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    row = {"prompt": prompt, "completions": [chat("Hello."), chat("Go away."), chat("Hi! How can I help?")],
           "scores": [2, 0, 1]}
    pairs, report = _load(tmp_path, [row])
    assert report.format.startswith("ranked (1 rows, k=3")
    assert all(p.conversational and p.prompt == prompt for p in pairs)
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [
        ("Hello.", "Hi! How can I help?"), ("Hello.", "Go away."), ("Hi! How can I help?", "Go away.")]


def _ultrafeedback(prompt_key="instruction"):
    return {"source": "evol_instruct", prompt_key: "Write a haiku about rain.",
            "completions": [{"model": "a", "response": "Rain falls soft.", "fine-grained_score": 4.25,
                             "overall_score": 6.0},
                            {"model": "b", "response": "I like trains.", "fine-grained_score": 1.5,
                             "overall_score": 8.0},
                            {"model": "c", "response": "Grey sky weeps on stone", "fine-grained_score": 4.75,
                             "overall_score": 7.0}]}


def test_ultrafeedback_rows_rank_by_fine_grained_score_or_overall_score(tmp_path):
    pairs, report = _load(tmp_path, [_ultrafeedback(), _ultrafeedback("prompt")])
    assert report.format.startswith("ultrafeedback (2 rows, k=3 completions per prompt; 3.0 pairs per row")
    assert pairs[0].prompt == chat("Write a haiku about rain.", "user") and pairs[0].conversational
    order = [(p.chosen[0]["content"][:4], p.rejected[0]["content"][:4]) for p in pairs[:3]]
    assert order == [("Grey", "Rain"), ("Grey", "I li"), ("Rain", "I li")]  # fine-grained: 4.75 > 4.25 > 1.5
    by_overall, _ = _load(tmp_path, [_ultrafeedback()], "o.jsonl", ultrafeedback_score="overall_score")
    assert [(p.chosen[0]["content"][:4], p.rejected[0]["content"][:4]) for p in by_overall] == [
        ("I li", "Grey"), ("I li", "Rain"), ("Grey", "Rain")]  # overall: 8 > 7 > 6


def _with(**changes):
    row = dict(ROW, **changes)
    return {k: v for k, v in row.items() if v is not None}


SAMPLER = {"ref_digest": "d" * 64, "ref_prompt_ids": [1, 2], "completions_ref_ids": [[3], [4], [5], [6]],
           "completions_ref_logp": [-1.0, -2.0, -0.5, -3.0]}


@pytest.mark.parametrize("row, field, reason", [
    (_with(completions=[" only"], scores=[1]), "completions", "too_few_completions"),
    (_with(scores=[1, 2, 3]), "scores", "length_mismatch"),
    (_with(scores=[1, "2", 3, 4]), "scores[1]", "wrong_type"),
    (_with(scores=[1, 2, True, 4]), "scores[2]", "wrong_type"),
    (_with(scores=[1, float("nan"), 3, 4]), "scores[1]", "non_finite_score"),
    (_with(completions=[" a", " b", "  ", " d"]), "completions[2]", "empty_completion"),
    (_with(completions=[" a", " b", " a", " d"]), "completions[2]", "duplicate_completion"),
    (_with(scores=[2, 2, 2, 2]), "scores", "all_scores_equal"),
    (_with(completions=[" a", chat("b"), " c", " d"]), "completions[1]", "wrong_type"),
    (_with(prompt=chat("Q", "user"), completions=[chat("a"), chat("b", "user"), chat("c"), chat("d")]),
     "completions[1]", "bad_role"),
    (_with(prompt=None), "prompt", "missing_field"),
    (_with(truncated=[True, False]), "truncated", "wrong_type"),
    (_with(truncated=[True, False, 0, False]), "truncated[2]", "wrong_type"),
    (_with(chosen=" a", rejected=" b"), "chosen", "mixed_formats"),
    (_with(**{k: v for k, v in SAMPLER.items() if k != "completions_ref_logp"}), "completions_ref_logp",
     "missing_field"),
    (_with(**dict(SAMPLER, completions_ref_ids=[[3], [4], [5]])), "completions_ref_ids", "wrong_type"),
    (_with(**dict(SAMPLER, completions_ref_logp=[-1.0, 0.5, -1.0, -1.0])), "completions_ref_logp[1]", "wrong_type"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, field, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROW, row])
    with pytest.raises(DataError) as info:
        load_pairs(path)
    e = info.value
    assert (e.path, e.line, e.field, e.reason) == (path, 2, field, reason)
    assert str(e).startswith(f"{path}:2: field '{field}'")


def test_bad_ultrafeedback_rows(tmp_path):
    missing = _ultrafeedback()
    del missing["completions"][1]["fine-grained_score"]
    few = dict(_ultrafeedback(), completions=_ultrafeedback()["completions"][:1])
    path = write_jsonl(tmp_path / "uf.jsonl", [_ultrafeedback(), missing, few])
    with pytest.raises(DataError, match="completions\\[1\\].fine-grained_score") as info:
        load_pairs(path)
    assert (info.value.line, info.value.reason) == (2, "missing_field")
    pairs, report = load_pairs(path, on_bad_row="skip", ultrafeedback_score="overall_score")
    assert len(pairs) == 3 + 3 and dict(report.skipped) == {"too_few_completions": 1}  # overall_score is there


def test_skip_counts_bad_rows_and_the_report_says_rows_and_pairs(tmp_path):
    rows = [ROW, _with(scores=[1, 1, 1, 1]), "{not json", _with(completions=[" x"], scores=[3]), ROW]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    pairs, report = load_pairs(path, on_bad_row="skip")
    assert len(pairs) == 12 and report.rows == 12 and report.ranked.rows == 2
    assert dict(report.skipped) == {"all_scores_equal": 1, "invalid_json": 1, "too_few_completions": 1}
    assert report.summary() == (f"{path}: 12 pairs, format ranked (2 rows, k=4 completions per prompt; 6.0 pairs "
                                "per row on average; pairing all); skipped 1 all_scores_equal, 1 invalid_json, "
                                "1 too_few_completions at line 2 (all_scores_equal), line 3 (invalid_json), "
                                "line 4 (too_few_completions)")
    with pytest.raises(DataError, match="no usable preference pairs"):
        load_pairs(write_jsonl(tmp_path / "e.jsonl", [_with(scores=[0, 0, 0, 0])]), on_bad_row="skip")


def test_unpaired_objectives_refuse_ranked_rows(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [ROW])
    with pytest.raises(DataError, match="need a paired objective") as info:
        load_completions(path)
    assert (info.value.line, info.value.field, info.value.reason) == (1, "completions", "ranked_data")


def test_options_are_config_fields_and_flags(capsys):
    assert TrainConfig().ranked_pairs == "all" and TrainConfig().ultrafeedback_score == "fine-grained_score"
    with pytest.raises(ConfigError, match="ranked_pairs"):
        TrainConfig.from_dict({"ranked_pairs": "best"})
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--ranked-pairs {all,best-worst,best-rest}" in text and "--ultrafeedback-score" in text
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--ranked-pairs" in capsys.readouterr().out
    # make-pairs --ranked keeps every sample: pairs are chosen when training reads the rows
    assert main(["make-pairs", "--prompts", "p.jsonl", "--output", "o.jsonl", "--ranked", "--pairing", "all"]) == 2
    assert "--ranked-pairs" in capsys.readouterr().err


# ---- data check ------------------------------------------------------------------------------------------

def test_check_stats_counts_the_tokens_each_completion_once_saves():
    """By hand: one row, prompt 4 tokens, completions A (3), B (5), C (2) scored A > B > C: three pairs."""
    prompt, a, b, c = [1] * 4, [2] * 3, [3] * 5, [4] * 2
    tokenized = [TokenizedPair(prompt, x, y, "f:1", group="f:1") for x, y in ((a, b), (a, c), (b, c))]
    stats = RankedStats(rows=1)
    stats.completions[3] += 1
    stats.implied.update({"all": 3, "best-worst": 1, "best-rest": 2})
    report = LoadReport("f", format="ranked (…)", rows=3, ranked=stats)
    pairs = [Pair("P", f" {x}", f" {y}", "f:1", group="f:1") for x, y in ("ab", "ac", "bc")]
    s = check_stats(pairs, report, tokenized, TokenizeReport(pairs=3), tokenized)
    assert s["ranked"]["tokens"] == {"written_out": 3 * 2 * 4 + 8 + 5 + 7, "prompt_per_pair": 3 * 4 + 20,
                                     "once": 4 + 3 + 5 + 2, "completions_written_out": 20, "completions_once": 10}
    text = format_check(s)
    assert "ranked rows: 1, k=3 completions per prompt (1 with k=3)" in text
    assert "pairs implied: all 3, best-worst 1, best-rest 2 (loaded: all); ties skipped: 0" in text
    assert "44 written out as pairs, 32 with one prompt per pair, 14 with each prompt and completion once " \
           "(3.14× / 2.29× fewer); completion tokens 20 → 10" in text


def test_data_check_reports_a_ranked_file(tmp_path, tokenizer):
    rows = [ROW, _with(scores=[1, 1, 1, 1]), _with(prompt="Another?", scores=[1, 0, 1, 2])]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    s = check_file(path, tokenizer, max_length=64, max_prompt_length=None, ranked_pairs="best-rest")
    assert (s["pairs"], s["ranked"]["rows"], s["ranked"]["implied"]) == (
        3 + 3, 2, {"all": 6 + 5, "best-worst": 2, "best-rest": 3 + 3})
    assert s["ranked"]["ties"] == 1 and s["invalid"]["by_reason"] == {"all_scores_equal": 1}
    tok = s["ranked"]["tokens"]
    assert tok["once"] < tok["prompt_per_pair"] < tok["written_out"]
    text = format_check(s)
    assert "pairs implied: all 11, best-worst 2, best-rest 6 (loaded: best-rest); ties skipped: 1" in text
    assert "ranked rows: 2, k=4 completions per prompt (2 with k=4)" in text


# ---- make-pairs --ranked: the sampler's reference data per completion ------------------------------------

def _ranked_rows(model_dir, tokenizer, prompts, n=4):
    return make_pairs(load_model(model_dir), tokenizer, prompts, lambda _p, texts: [float(len(t)) for t in texts],
                      n=n, max_new_tokens=8, seed=1, ranked=True)


@pytest.mark.parametrize("chat_prompts", [False, True], ids=["text", "chat"])
def test_make_pairs_ranked_rows_round_trip_to_pairs_with_sampler_refs(tmp_path, tokenizer, model_dir, chat_prompts):
    prompts = CHAT_PROMPTS if chat_prompts else TEXT_PROMPTS
    rows, stats = _ranked_rows(model_dir, tokenizer, prompts)
    model = load_model(model_dir)
    digest = weights_digest(model)
    assert stats.rows == len(rows) >= 3 and stats.rows + stats.rows_left_out == len(prompts)
    for r in rows:
        k = len(r["completions"])
        assert 2 <= k <= 4 and len(r["scores"]) == len(r["truncated"]) == len(r["completions_ref_ids"]) == k
        assert r["ref_digest"] == digest and len(set(map(json.dumps, r["completions"]))) == k
        for ids, cut in zip(r["completions_ref_ids"], r["truncated"]):
            assert (ids[-1] == tokenizer.eos_token_id) != cut  # EOS kept exactly when the sample ended

    path = write_jsonl(tmp_path / "ranked.jsonl", rows)
    pairs, report = load_pairs(path)
    assert report.ranked.rows == len(rows) and len(pairs) == stats.pairs
    assert f"{stats.rows} ranked rows from {len(prompts)} prompts × 4 samples" in stats.summary()
    for p in pairs:  # each pair's SamplerRef is the row's data of its two completions
        r = rows[int(p.group.rsplit(":", 1)[1]) - 1]
        i, j = r["completions"].index(p.chosen), r["completions"].index(p.rejected)
        assert r["scores"][i] > r["scores"][j] and (p.chosen_ends, p.rejected_ends) == (
            not r["truncated"][i], not r["truncated"][j])
        s = p.sampler_ref
        assert (s.digest, s.prompt_ids, s.chosen_ids, s.rejected_ids, s.chosen_logp, s.rejected_logp) == (
            digest, r["ref_prompt_ids"], r["completions_ref_ids"][i], r["completions_ref_ids"][j],
            r["completions_ref_logp"][i], r["completions_ref_logp"][j])

    # the sampler_ref machinery, unchanged, takes the expanded pairs: the usable ones' stored sums are the
    # reference pass's sums of their ids
    tokenized, _ = tokenize_pairs(pairs, tokenizer, 4096, None)
    usable, _ = sort_pairs(tokenized, digest)
    assert len(usable) == stats.reusable and usable
    stored = [tokenized[i].sampler_ref for i in usable]
    with torch.no_grad():
        again = sequence_logps(model, **pad_rows([(s.prompt_ids, ids) for s in stored
                                                  for ids in (s.chosen_ids, s.rejected_ids)], tokenizer.pad_token_id))
    torch.testing.assert_close(again.double(), torch.tensor([v for s in stored for v in (s.chosen_logp, s.rejected_logp)],
                                                            dtype=torch.float64), rtol=1e-5, atol=1e-5)
    text = format_check(check_file(path, tokenizer, 4096, None))
    assert f"sampler reference log-probs: {len(pairs)} of {len(pairs)} pairs" in text
    assert f"ranked rows: {len(rows)}" in text


def test_training_on_make_pairs_ranked_rows_uses_the_stored_sums(tmp_path, tokenizer, model_dir, monkeypatch):
    rows, stats = _ranked_rows(model_dir, tokenizer, TEXT_PROMPTS)
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    logs: list[str] = []
    result = train(model=model_dir, data=write_jsonl(tmp_path / "r.jsonl", rows), output_dir=str(tmp_path / "run"),
                   max_steps=1, lr=0.0, batch_size=8, shuffle=False, progress=False, log=logs.append)
    first = json.loads(open(result.output_dir / "metrics.jsonl").readline())
    assert any(f"{stats.reusable} of {stats.pairs} pairs from the sampler" in m for m in logs), logs
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference: stored sums are its own


def test_repeated_completions_are_left_out_and_counted(tmp_path):
    row = {"prompt": "Q?", "completions": [" yes", " no", " yes", " maybe"], "scores": [2, 0, 2, 1]}
    pairs, report = load_pairs(write_jsonl(tmp_path / "r.jsonl", [row]))
    assert sorted((p.chosen, p.rejected) for p in pairs) == [(" maybe", " no"), (" yes", " maybe"), (" yes", " no")]
    assert "1 repeated completions left out" in report.summary()


def test_an_ultrafeedback_row_without_completions_is_a_data_error(tmp_path):
    good = {"instruction": "Say hi", "completions": [{"response": "hi", "fine-grained_score": 4.0},
                                                     {"response": "no", "fine-grained_score": 1.0}]}
    path = write_jsonl(tmp_path / "uf.jsonl", [good, {"instruction": "x"}])
    with pytest.raises(DataError, match=r"uf\.jsonl:2: field 'completions' missing"):
        load_pairs(path)
    pairs, report = load_pairs(path, on_bad_row="skip")
    assert len(pairs) == 1 and report.skipped["missing_field"] == 1


@pytest.mark.parametrize("options", [{"loss": "grpo", "ranked_pairs": "best-worst"},
                                     {"loss": "kto", "ranked_pairs": "best-rest"},
                                     {"online_dpo": True, "ultrafeedback_score": "overall_score"}])
def test_ranked_options_where_nothing_reads_them_are_refused(options):
    key = next(k for k in options if k in ("ranked_pairs", "ultrafeedback_score"))
    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_dict(options)
