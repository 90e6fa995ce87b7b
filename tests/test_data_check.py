"""`dpokit data check`: every invalid row, duplicates, token lengths, truncation, length bias."""

from __future__ import annotations

from collections import Counter

import pytest

from conftest import write_jsonl
from dpokit.batches import TokenizedPair, TokenizeReport, tokenize_pairs
from dpokit.batches.tokenize import tokenize_completions
from dpokit.cli import main
from dpokit.data import DataError, LoadReport, Pair, load_completions, load_pairs
from dpokit.data.check import check_file, check_stats, format_check

GOOD = [{"prompt": "How do I boil an egg?", "chosen": " Simmer it for nine minutes, then cool it in cold water.",
         "rejected": " No idea."},
        {"prompt": "Name a fruit.", "chosen": " An apple.", "rejected": " A carrot, which is a vegetable."},
        {"prompt": "Is the sky blue?", "chosen": " Yes, on a clear day.", "rejected": " No."}]
BAD = [{"prompt": "Q", "chosen": " same", "rejected": " same"},  # line 4
       {"prompt": "Q", "chosen": " a"},                          # line 5
       "{not json",                                              # line 6
       {"prompt": "Q", "chosen": 3, "rejected": " b"}]           # line 7


def test_check_stats_is_exact_arithmetic():
    """The pure function on hand-made inputs: every number can be worked out by hand."""
    pairs = [Pair("P", " c", " r", "f:1"), Pair("P2", " c2", " r2", "f:2"), Pair("P", " c", " r", "f:4"),
             Pair("P", " c", " r", "f:5")]
    report = LoadReport("f", format="explicit", rows=4)
    for e in (DataError("f", 3, "rejected", "identical to chosen", "chosen_equals_rejected"),
              DataError("f", 6, None, "invalid JSON", "invalid_json")):
        report.skip(e)
    untruncated = [TokenizedPair([1] * 4, [2] * 10, [3] * 6, "f:1"), TokenizedPair([1] * 2, [2] * 3, [3] * 5, "f:2"),
                   TokenizedPair([1] * 4, [2] * 10, [3] * 6, "f:4"), TokenizedPair([1] * 4, [2] * 10, [3] * 6, "f:5")]
    # as training sees them: f:1 cut to 4 + 6 + 6 (4 chosen tokens cut), f:4 and f:5 prompts cut by 2
    # and chosen by 4, f:2 whole
    tokenized = [TokenizedPair([1] * 4, [2] * 6, [3] * 6, "f:1"), untruncated[1],
                 TokenizedPair([1] * 2, [2] * 6, [3] * 6, "f:4"), TokenizedPair([1] * 2, [2] * 6, [3] * 6, "f:5")]
    tok_report = TokenizeReport(pairs=4, prompts_truncated=2, completions_truncated=3)

    s = check_stats(pairs, report, tokenized, tok_report, untruncated)
    assert (s["path"], s["format"], s["pairs"]) == ("f", "explicit", 4)
    assert s["invalid"] == {"count": 2, "by_reason": {"chosen_equals_rejected": 1, "invalid_json": 1},
                            "rows": ["f:3: field 'rejected' identical to chosen", "f:6: invalid JSON"]}
    assert s["chosen_equals_rejected"] == 1
    assert s["duplicates"] == {"count": 2, "lines": [(4, 1), (5, 1)]}
    assert s["tokens"]["prompt"] == {"mean": 3.5, "median": 4.0, "max": 4}
    assert s["tokens"]["chosen"] == {"mean": 8.25, "median": 10.0, "max": 10}
    assert s["truncation"] == {"truncated": 3, "prompts": 2, "completions": 3, "tokens_cut": 4 + 6 + 6,
                               "mean_cut": 16 / 3, "dropped": {}, "dropped_sources": []}
    # chosen - rejected: +4, -2, +4, +4
    assert s["length_bias"] == {"pairs": 4, "chosen_longer": 0.75, "rejected_longer": 0.25, "equal": 0.0,
                                "mean_difference": 2.5}

    text = format_check(s)
    assert "f: 4 pairs, format explicit" in text
    assert "invalid rows: 2 (1 chosen_equals_rejected, 1 invalid_json)" in text
    assert "    f:3: field 'rejected' identical to chosen\n    f:6: invalid JSON" in text
    assert "duplicates: 2 pairs repeat an earlier one" in text and "line 4 = line 1, line 5 = line 1" in text
    assert "3 pairs truncated (2 prompts, 3 completions), 16 tokens cut, mean 5.3 per truncated pair" in text
    assert "chosen longer in 75.0% of pairs, rejected longer in 25.0%, equal 0.0%" in text
    assert "+2.5 tokens" in text


def test_check_stats_with_nothing_usable():
    report = LoadReport("f")
    report.skip(DataError("f", 1, "chosen", "missing", "missing_field"))
    s = check_stats([], report, [], TokenizeReport(), [])
    assert s["pairs"] == 0 and s["invalid"]["rows"] == ["f:1: field 'chosen' missing"]
    assert s["tokens"]["prompt"] is None and s["length_bias"]["chosen_longer"] is None
    assert "no pair left to measure" in format_check(s)


def test_check_file_with_a_real_tokenizer(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD + BAD + [GOOD[0], GOOD[2]])  # lines 8, 9 repeat lines 1, 3
    s = check_file(path, tokenizer, max_length=16, max_prompt_length=8)

    assert s["pairs"] == 5 and s["format"] == "explicit"
    assert s["invalid"]["count"] == 4 and len(s["invalid"]["rows"]) == 4  # all of them, not just the first
    for row, line, field in zip(s["invalid"]["rows"], (4, 5, 6, 7), ("rejected", "rejected", None, "chosen")):
        assert row.startswith(f"{path}:{line}:") and (field is None or f"field '{field}'" in row)
    assert s["chosen_equals_rejected"] == 1
    assert s["duplicates"] == {"count": 2, "lines": [(8, 1), (9, 3)]}

    pairs, _ = load_pairs(path, on_bad_row="skip")
    full, _ = tokenize_pairs(pairs, tokenizer, 10_000, None)
    cut, report = tokenize_pairs(pairs, tokenizer, 16, 8)
    assert s["tokens"]["chosen"]["max"] == max(len(t.chosen_ids) for t in full)
    assert s["tokens"]["prompt"]["median"] == sorted(len(t.prompt_ids) for t in full)[2]
    lost = [sum(map(len, (f.prompt_ids, f.chosen_ids, f.rejected_ids))) -
            sum(map(len, (c.prompt_ids, c.chosen_ids, c.rejected_ids))) for f, c in zip(full, cut)]
    assert s["truncation"]["tokens_cut"] == sum(lost) > 0
    assert s["truncation"]["truncated"] == sum(n > 0 for n in lost)
    assert (s["truncation"]["prompts"], s["truncation"]["completions"]) == (report.prompts_truncated,
                                                                            report.completions_truncated)
    differences = [len(t.chosen_ids) - len(t.rejected_ids) for t in full]
    assert s["length_bias"]["mean_difference"] == pytest.approx(sum(differences) / 5)
    assert s["length_bias"]["chosen_longer"] == pytest.approx(sum(d > 0 for d in differences) / 5)


def test_check_file_drops_and_conversational(tmp_path, tokenizer):
    user = [{"role": "user", "content": "Name a fruit."}]
    rows = [{"prompt": user, "chosen": [{"role": "assistant", "content": "Apple, a sweet and crunchy fruit."}],
             "rejected": [{"role": "assistant", "content": "No."}]},
            {"prompt": [{"role": "user", "content": "Tell me a very long story about a dragon " * 5}],
             "chosen": [{"role": "assistant", "content": "Once upon a time."}],
             "rejected": [{"role": "assistant", "content": "No."}]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    s = check_file(path, tokenizer, max_length=30, max_prompt_length=None)
    assert s["format"] == "conversational" and s["pairs"] == 2
    assert s["truncation"]["dropped"] == {"prompt_fills_max_length": 1}
    assert s["truncation"]["dropped_sources"] == [f"{path}:2"]
    assert s["length_bias"]["pairs"] == 2 and s["length_bias"]["chosen_longer"] == 1.0
    assert f"dropped 1 (prompt_fills_max_length): {path}:2" in format_check(s)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(path)
    return str(path)


def test_cli_lists_every_invalid_row_then_fails(tmp_path, tokenizer_dir, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD + BAD)
    rc = main(["data", "check", path, "--model", tokenizer_dir, "--max-length", "64"])
    out, err = capsys.readouterr()
    assert rc == 1
    for line in (4, 5, 6, 7):
        assert f"    {path}:{line}:" in out
    assert f"{path}: 3 pairs, format explicit" in out and "length bias: chosen longer in" in out
    assert "4 invalid row(s)" in err

    # skip: the same listing, and success, as training with --on-bad-row skip would go ahead
    rc = main(["data", "check", path, "--model", tokenizer_dir, "--on-bad-row", "skip"])
    out_skip, err = capsys.readouterr()
    assert rc == 0 and out_skip.count(f"    {path}:") == 4 and not err


def test_cli_clean_files_pass_and_totals_by_format(tmp_path, tokenizer_dir, capsys):
    explicit = write_jsonl(tmp_path / "e.jsonl", GOOD)
    conversational = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]}])
    rc = main(["data", "check", explicit, conversational, "--model", tokenizer_dir])
    out, err = capsys.readouterr()
    assert rc == 0 and not err
    assert "2 files read: 4 pairs by format: conversational 1, explicit 3; 0 invalid rows" in out
    assert "invalid rows: none" in out and "duplicates: none" in out


def test_cli_unusable_files_fail_but_the_others_are_reported(tmp_path, tokenizer_dir, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    all_bad = write_jsonl(tmp_path / "bad.jsonl", BAD)
    rc = main(["data", "check", str(tmp_path / "missing.jsonl"), all_bad, good, "--model", tokenizer_dir,
               "--on-bad-row", "skip"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "missing.jsonl: no such file" in err and "2 unusable file(s)" in err
    assert f"{all_bad}: 0 pairs" in out and out.count(f"    {all_bad}:") == 4
    assert f"{good}: 3 pairs" in out


def test_load_report_keeps_every_error(tmp_path):
    pairs, report = load_pairs(write_jsonl(tmp_path / "d.jsonl", GOOD + BAD), on_bad_row="skip")
    assert [e.line for e in report.errors] == [4, 5, 6, 7]
    assert sum(report.skipped.values()) == len(report.errors) and report.skipped == Counter(
        e.reason for e in report.errors)
    with pytest.raises(DataError, match="no usable preference pairs"):
        load_pairs(write_jsonl(tmp_path / "b.jsonl", BAD), on_bad_row="skip")
    pairs, report = load_pairs(str(tmp_path / "b.jsonl"), on_bad_row="skip", allow_empty=True)
    assert pairs == [] and len(report.errors) == 4
    assert report.rows == 0


UNPAIRED = [{"prompt": "How do I boil an egg?", "completion": " Simmer it for nine minutes.", "label": True},
            {"prompt": "How do I boil an egg?", "completion": " No idea.", "label": False},
            {"prompt": "Name a fruit.", "completion": " An apple, which is sweet.", "label": "true"},
            {"prompt": "Name a fruit.", "completion": " No idea.", "label": 0}]


def test_check_file_reads_unpaired_kto_files(tmp_path, tokenizer):
    """A KTO file (prompt, completion, label) is checked as KTO training reads it, not as broken pairs."""
    bad = [{"prompt": "Q", "completion": " a"},                                # line 5: no label
           {"prompt": "Q", "completion": " a", "label": "maybe"},              # line 6
           UNPAIRED[0],                                                        # line 7: repeats line 1
           {**UNPAIRED[1], "label": True}]                                     # line 8: contradicts line 2
    path = write_jsonl(tmp_path / "k.jsonl", UNPAIRED + bad)
    s = check_file(path, tokenizer, max_length=12, max_prompt_length=4)
    assert (s["format"], s["unit"], s["completions"]) == ("unpaired", "completions", 6)
    assert s["invalid"]["count"] == 2 and [r.split(":")[1] for r in s["invalid"]["rows"]] == ["5", "6"]
    assert s["labels"] == {"desirable": 4, "undesirable": 2}
    assert s["duplicates"] == {"count": 1, "lines": [(7, 1)]}
    assert s["contradictions"] == {"count": 1, "lines": [(8, 2)]}
    examples, _ = load_completions(path, on_bad_row="skip")
    full, _ = tokenize_completions(examples, tokenizer, 10_000, None)
    cut, report = tokenize_completions(examples, tokenizer, 12, 4)
    assert s["tokens"]["completion"]["max"] == max(len(t.completion_ids) for t in full)
    lost = [len(f.prompt_ids) + len(f.completion_ids) - len(c.prompt_ids) - len(c.completion_ids)
            for f, c in zip(full, cut)]
    assert s["truncation"]["tokens_cut"] == sum(lost) > 0 and s["truncation"]["truncated"] == sum(n > 0 for n in lost)
    desirable = [len(t.completion_ids) for t in full if t.label]
    assert s["label_lengths"]["desirable"] == pytest.approx(sum(desirable) / len(desirable))
    text = format_check(s)
    assert f"{path}: 6 completions, format unpaired" in text and "4 desirable, 2 undesirable" in text
    assert "invalid rows: 2" in text and "contradictory labels: 1" in text and "line 8 = line 2" in text


def test_cli_checks_unpaired_files(tmp_path, tokenizer_dir, capsys):
    kto = write_jsonl(tmp_path / "k.jsonl", UNPAIRED)
    pairs = write_jsonl(tmp_path / "e.jsonl", GOOD)
    rc = main(["data", "check", kto, pairs, "--model", tokenizer_dir])
    out, err = capsys.readouterr()
    assert rc == 0 and not err, err
    assert f"{kto}: 4 completions, format unpaired" in out and "invalid rows: none" in out
    assert "2 files read: 3 pairs by format: explicit 3; 4 completions by format: unpaired 4; 0 invalid rows" in out
    all_bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Q", "completion": " a", "label": "maybe"}])
    assert main(["data", "check", all_bad, "--model", tokenizer_dir, "--on-bad-row", "skip"]) == 1
    out, err = capsys.readouterr()
    assert f"{all_bad}: 0 completions, format unpaired" in out and "1 unusable file(s)" in err


def test_check_file_decides_the_format_from_the_first_valid_row_as_the_loader_does(tmp_path, tokenizer):
    """A KTO file whose first row is broken ("lable") is still a KTO file: `train --loss kto --on-bad-row skip`
    trains on its good rows, so the check must not report it as 0 pairs needing --loss kto."""
    path = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "Q", "completion": " a", "lable": True}] + UNPAIRED[:3])
    examples, _ = load_completions(path, on_bad_row="skip")
    s = check_file(path, tokenizer, max_length=64, max_prompt_length=None)
    assert (s["format"], s["unit"], s["completions"]) == ("unpaired", "completions", len(examples)) == \
        ("unpaired", "completions", 3)
    assert s["invalid"]["count"] == 1 and s["invalid"]["rows"][0].startswith(f"{path}:1:")
    # and the converse: a pair file whose first row looks unpaired (a stray completion/label) stays a pair file
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "completion": " a", "label": "maybe"}] + GOOD)
    s = check_file(pairs, tokenizer, max_length=64, max_prompt_length=None)
    assert (s["format"], s["unit"], s["pairs"], s["invalid"]["count"]) == ("explicit", "pairs", 3, 1)


def test_unpaired_repeat_of_a_later_first_occurrence_is_a_duplicate(tmp_path, tokenizer):
    """Line 3 repeats line 2 (same prompt, completion, label False) after line 1 gave it label True: a
    duplicate of line 2, not a contradiction (the contradiction is line 2 itself)."""
    row = {"prompt": "Q?", "completion": " An answer.", "label": True}
    path = write_jsonl(tmp_path / "k.jsonl", [row, {**row, "label": False}, {**row, "label": False},
                                             {**row, "label": True}])
    s = check_file(path, tokenizer, max_length=64, max_prompt_length=None)
    assert s["contradictions"] == {"count": 1, "lines": [(2, 1)]}
    assert s["duplicates"] == {"count": 2, "lines": [(3, 2), (4, 1)]}
