"""Stage 1: every file type and format loads; every bad row names file, line and field."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from dpokit.data import DataError, builtin_path, load_pairs

HH_ROW = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant:"
          " Sure, an apple.", "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: "
          "Name a fruit.\n\nAssistant: Sure, no."}


def test_builtin_sets_are_large_enough_and_disjoint():
    train, rt = load_pairs(builtin_path("helpful_train"))
    held, re_ = load_pairs(builtin_path("helpful_eval"))
    assert len(train) >= 100 and len(held) >= 30
    assert rt.format == re_.format == "explicit"
    assert not {p.prompt for p in train} & {p.prompt for p in held}


def test_explicit_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}])
    pairs, report = load_pairs(path)
    assert report.format == "explicit" and (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("Q?", " yes", " no")
    assert pairs[0].source == f"{path}:1"


def test_implicit_hh_prompt_is_cut_back_to_the_turn_boundary(tmp_path):
    # Both answers start with " Sure," — the common prefix runs into the completions and must be cut back.
    pairs, report = load_pairs(write_jsonl(tmp_path / "hh.jsonl", [HH_ROW]))
    p = pairs[0]
    assert report.format == "implicit"
    assert p.prompt.endswith("Name a fruit.\n\nAssistant:")
    assert (p.chosen, p.rejected) == (" Sure, an apple.", " Sure, no.")


def test_implicit_without_turn_marker_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"chosen": "abc def", "rejected": "abc xyz"}])
    with pytest.raises(DataError, match=r"x\.jsonl:1: field 'chosen'.*turn marker"):
        load_pairs(path)


def test_conversational_explicit_and_implicit(tmp_path):
    user = [{"role": "user", "content": "Name a fruit."}]
    rows = [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "Apple."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"chosen": user + [{"role": "assistant", "content": "Pear."}],
         "rejected": user + [{"role": "assistant", "content": "Go away."}]},
    ]
    pairs, report = load_pairs(write_jsonl(tmp_path / "c.jsonl", rows))
    assert report.format == "conversational"
    assert all(p.conversational and p.prompt == user for p in pairs)
    assert pairs[1].chosen == [{"role": "assistant", "content": "Pear."}]


def test_json_csv_parquet_and_datasets_folder(tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": " good", "rejected": " bad"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.csv").write_text("prompt,chosen,rejected\n" + "".join(f'Q{i}?," good"," bad"\n' for i in range(3)))
    import datasets
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for name in ("a.json", "a.csv", "a.parquet", "saved"):
        pairs, report = load_pairs(str(tmp_path / name))
        assert [p.prompt for p in pairs] == ["Q0?", "Q1?", "Q2?"], name
        assert pairs[0].chosen == " good", name


@pytest.mark.parametrize("row, line_field, reason", [
    ({"prompt": "Q", "chosen": " a"}, "field 'rejected'", "missing"),
    ({"prompt": "Q", "chosen": " a", "rejected": None}, "field 'rejected'", "missing"),
    ({"prompt": "Q", "chosen": 3, "rejected": " b"}, "field 'chosen'", "expected a string, got int"),
    ({"prompt": "Q", "chosen": "   ", "rejected": " b"}, "field 'chosen'", "empty completion"),
    ({"prompt": "Q", "chosen": " same", "rejected": " same"}, "field 'rejected'", "identical to chosen"),
    ({"prompt": "", "chosen": " a", "rejected": " b"}, "field 'prompt'", "empty prompt"),
    ('{"prompt": "Q", "chosen": " a", ', "", "invalid JSON"),
    ("[1, 2]", "", "expected a JSON object"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, line_field, reason):
    good = {"prompt": "Q", "chosen": " a", "rejected": " b"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(DataError) as info:
        load_pairs(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3:") and line_field in message and reason in message
    assert info.value.line == 3


def test_bad_conversational_roles(tmp_path):
    rows = [{"prompt": [{"role": "wizard", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}]
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'prompt\[0\]\.role' unknown role 'wizard'"):
        load_pairs(write_jsonl(tmp_path / "c.jsonl", rows))


def test_skip_counts_every_bad_row_by_reason(tmp_path):
    good = {"prompt": "Q", "chosen": " a", "rejected": " b"}
    rows = [good, {"prompt": "Q", "chosen": " a"}, {"prompt": "Q", "chosen": " x", "rejected": " x"},
            "not json", good, {"prompt": "Q", "chosen": 1, "rejected": " b"}]
    pairs, report = load_pairs(write_jsonl(tmp_path / "s.jsonl", rows), on_bad_row="skip")
    assert len(pairs) == 2
    assert dict(report.skipped) == {"missing_field": 1, "chosen_equals_rejected": 1, "invalid_json": 1,
                                    "wrong_type": 1}
    assert "skipped" in report.summary() and "line 2 (missing_field)" in report.summary()


def test_invalid_utf8_and_bom(tmp_path):
    good = json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"}).encode()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\r\n" + good + b"\r\n")
    pairs, _ = load_pairs(str(tmp_path / "bom.jsonl"))
    assert len(pairs) == 2
    (tmp_path / "utf.jsonl").write_bytes(good + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"utf\.jsonl:2: invalid UTF-8"):
        load_pairs(str(tmp_path / "utf.jsonl"))


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_pairs(str(tmp_path / "nope.jsonl"))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        load_pairs(str(tmp_path / "a.txt"))


# Regressions found by tests/test_fuzz_data.py: each input once, readable.

def test_a_broken_first_row_does_not_decide_the_format(tmp_path):
    good = {"prompt": "Q", "chosen": " a", "rejected": " b"}
    # the first row read as implicit, the second as unpaired, used to impose that format on the whole file
    rows = [{"chosen": " x"}, {"prompt": "Q", "completion": " c", "label": True}, good, good]
    pairs, report = load_pairs(write_jsonl(tmp_path / "s.jsonl", rows), on_bad_row="skip")
    assert len(pairs) == 2 and report.format == "explicit"
    assert dict(report.skipped) == {"missing_field": 1, "unpaired_data": 1}
    assert [e.line for e in report.errors] == [1, 2]


@pytest.mark.parametrize("rows, match", [
    # implicit file, then a row with a prompt: it used to be ignored silently
    ([HH_ROW, {**HH_ROW, "prompt": "ignored?"}], r":2: field 'prompt' .*mixed formats"),
    # JSON escapes half a surrogate pair: the tokenizer would fail on it later, with no row to point at
    ([{"prompt": "Q\ud83d", "chosen": " a", "rejected": " b"}], r":1: field 'prompt' invalid Unicode"),
    ([{"prompt": [{"role": "user", "content": " "}], "chosen": [{"role": "assistant", "content": "a"}],
       "rejected": [{"role": "assistant", "content": "b"}]}], r":1: field 'prompt' empty prompt"),
    ([{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
       "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
     r":1: field 'rejected' identical to chosen"),
    (['{"prompt": ' + "1" * 5000 + "}"], r":1: invalid JSON"),
    (["[" * 100_000], r":1: invalid JSON"),
])
def test_rows_that_used_to_load_or_crash(tmp_path, rows, match):
    with pytest.raises(DataError, match=match):
        load_pairs(write_jsonl(tmp_path / "r.jsonl", rows))


def test_unpaired_conversational_completion_must_have_text(tmp_path):
    from dpokit.data import load_completions
    row = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": ""}],
           "label": True}
    with pytest.raises(DataError, match=r":1: field 'completion' empty completion"):
        load_completions(write_jsonl(tmp_path / "u.jsonl", [row]))
    with pytest.raises(ValueError, match="on_bad_row"):
        load_completions(write_jsonl(tmp_path / "u.jsonl", [row]), on_bad_row="skp")


def test_csv_long_fields_and_bad_bytes_are_per_row(tmp_path):
    long = "x" * 200_000  # over csv's default 128 KiB field limit
    (tmp_path / "a.csv").write_bytes(b"prompt,chosen,rejected\n" + f"Q,{long}, b\n".encode() + b"Q,a\xff, b\nQ, a, c\n")
    with pytest.raises(DataError, match=r"a\.csv:3: field 'chosen' invalid UTF-8"):
        load_pairs(str(tmp_path / "a.csv"))
    pairs, report = load_pairs(str(tmp_path / "a.csv"), on_bad_row="skip")
    assert [p.chosen for p in pairs] == [long, " a"] and dict(report.skipped) == {"invalid_utf8": 1}


def test_corrupt_parquet_is_a_data_error(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"a\.parquet: invalid Parquet"):
        load_pairs(str(tmp_path / "a.parquet"))
