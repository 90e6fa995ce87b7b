"""Property-based fuzzing of the loaders (hypothesis).

Every generated file either loads exactly the rows that are valid in it — same values, same order,
nothing silently dropped — or raises a DataError naming the file, the line of the first bad row and
the field at fault; never another exception. With on_bad_row="skip", loaded + skipped = rows.

Rows are generated together with what the loader must make of them: a valid row of some format (and
the pair it must become), or a broken one (and the field to blame). Which rows are valid in a file
follows the documented rule: the first valid row decides the file's format, and every row must have it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpokit.data import DataError, load_completions, load_pairs
from dpokit.data.formats import ROLES, TURN_MARKERS, detect_format



def fuzz(examples: int) -> settings:
    """About 1,100 files in all (~30 s); DPOKIT_FUZZ_SCALE=10 fuzzes ten times longer.

    The same examples every run by default, so a landing is never red by the luck of the draw;
    DPOKIT_FUZZ_RANDOM=1 explores new ones (do it when the loaders change)."""
    examples *= int(os.environ.get("DPOKIT_FUZZ_SCALE", "1"))
    explore = os.environ.get("DPOKIT_FUZZ_RANDOM") == "1"
    return settings(max_examples=examples, deadline=None, derandomize=not explore, suppress_health_check=[
        HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much, HealthCheck.large_base_example])


ANY = "*"  # the row is at fault, but which field is blamed depends on the format it is parsed as
REQUIRED = {"prompt", "chosen", "rejected", "completion", "label"}
READ = REQUIRED | {"margin", "scores", "completions", "instruction", "truncated", "ref_digest"}  # extras avoid them
MARK = "\ue000"  # stands for invalid UTF-8 bytes in CSV values, replaced after encoding


@dataclass
class Row:
    value: object = None        # what is serialized: a dict, or any JSON value
    fmt: str | None = None      # the format of a valid row; None: invalid in any file
    expect: tuple = ()          # what a valid row loads as: (prompt, chosen, rejected) or (prompt, completion, label)
    field: str | None = ANY     # the field blamed when parsed in its own format (None: the whole row)
    own: str | None = None      # the format a broken row was made from ("always": blamed on `field` in any file)
    raw: bytes | None = None    # a JSONL line written as is (invalid JSON, invalid UTF-8 …)


# ---------------------------------------------------------------------------------------------- text

CHARS = st.characters(exclude_categories=("Cs",), exclude_characters=MARK)
BLANK = st.sampled_from(["", " ", "\t", " \n ", "\r\n", "\u3000", "\u00a0 "])  # str.strip() == ""
HUGE = st.sampled_from(["x", "é ", "😀", "a\n", "\x00"]).map(lambda c: c * (200_000 // len(c)))
SURROGATES = st.sampled_from(["\ud800", "\udfff", "\udc80"])


@st.composite
def text(draw, alphabet=CHARS, markers_ok=True):
    """Non-blank text; now and then 200k characters."""
    if draw(st.integers(0, 59)) == 7:
        return draw(HUGE)
    s = draw(st.text(alphabet, min_size=1, max_size=12).filter(lambda s: s.strip()))
    if not markers_ok and any(m in s for m in TURN_MARKERS):
        s = "plain"
    return s


WRONG_TYPE = st.one_of(st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(CHARS, max_size=5),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(CHARS, max_size=4),
                                                                                        inner, max_size=3),
                          max_leaves=6)
EXTRAS = st.dictionaries(st.text(CHARS, max_size=6).filter(lambda k: k not in READ), JSON_VALUE, max_size=2)


def insert(draw, s: str, piece: str) -> str:
    i = draw(st.integers(0, len(s)))
    return s[:i] + piece + s[i:]


def norm(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ---------------------------------------------------------------------------------------------- valid rows

@st.composite
def explicit_row(draw, strings_only=False):
    prompt, chosen, rejected = draw(text()), draw(text(markers_ok=False)), draw(text(markers_ok=False))
    if chosen == rejected:
        rejected += " no"
    extras = {} if strings_only else draw(EXTRAS)
    return Row({**extras, "prompt": prompt, "chosen": chosen, "rejected": rejected}, "explicit",
               (prompt, chosen, rejected))


IMPLICIT_CHARS = st.characters(exclude_categories=("Cs",), exclude_characters=MARK + "\n[<")  # no turn marker


@st.composite
def implicit_row(draw, strings_only=False):
    marker = draw(st.sampled_from(["\n\nAssistant:", "[/INST]"]))
    prompt = "\n\nHuman: " + draw(text()) + marker
    chosen, rejected = draw(text(IMPLICIT_CHARS)), draw(text(IMPLICIT_CHARS))
    if chosen == rejected:
        rejected += " no"
    extras = {} if strings_only else draw(EXTRAS)
    return Row({**extras, "chosen": prompt + chosen, "rejected": prompt + rejected}, "implicit",
               (prompt, chosen, rejected))


def message(role) -> st.SearchStrategy[dict]:
    role = st.sampled_from(ROLES) if role is None else st.just(role)
    return st.builds(lambda r, c, extra: {"role": r, "content": c, **extra}, role, text(),
                     st.sampled_from([{}, {"name": "x"}]))


@st.composite
def messages(draw, first_role=None):
    first = draw(message(first_role))
    rest = draw(st.lists(st.one_of(message(None), message(None).map(lambda m: {**m, "content": " "})), max_size=2))
    return [first] + rest


@st.composite
def conversational_row(draw):
    prompt, chosen, rejected = draw(messages()), draw(messages("assistant")), draw(messages("assistant"))
    if draw(st.booleans()):  # explicit prompt
        if norm(chosen) == norm(rejected):
            rejected[0] = {**rejected[0], "content": rejected[0]["content"] + " no"}
        # a lone user turn may also be written as a string (UltraFeedback-style rows)
        as_text = len(prompt) == 1 and prompt[0]["role"] == "user" and draw(st.booleans())
        value = {**draw(EXTRAS), "prompt": prompt[0]["content"] if as_text else prompt, "chosen": chosen,
                 "rejected": rejected}
    else:  # implicit: the shared leading messages are the prompt
        if norm(chosen[:1]) == norm(rejected[:1]):
            rejected[0] = {**rejected[0], "content": rejected[0]["content"] + " no"}
        value = {**draw(EXTRAS), "chosen": prompt + chosen, "rejected": prompt + rejected}
    return Row(value, "conversational", (norm(prompt), norm(chosen), norm(rejected)))


LABELS = [(True, True), (False, False), (1, True), (0, False), ("true", True), ("false", False),
          ("TRUE", True), (" False ", False), ("1", True), ("0", False), (" 0", False)]
ODD_LABELS = [2, -1, 1.5, 1.0, 0.0, "yes", "", "truee", "null", "on", [], {}, [True], {"v": 1}]


@st.composite
def unpaired_row(draw, strings_only=False):
    label, truth = draw(st.sampled_from(LABELS[4:] if strings_only else LABELS))
    if not strings_only and draw(st.booleans()):
        prompt, completion = draw(messages()), draw(messages("assistant"))
        expect = (norm(prompt), norm(completion), truth)
    else:
        prompt, completion = draw(text()), draw(text())
        expect = (prompt, completion, truth)
    extras = {} if strings_only else draw(EXTRAS)
    return Row({**extras, "prompt": prompt, "completion": completion, "label": label}, "unpaired", expect)


def valid_row(fmt: str):
    return {"explicit": explicit_row, "implicit": implicit_row, "conversational": conversational_row,
            "unpaired": unpaired_row}[fmt]()


# ---------------------------------------------------------------------------------------------- broken rows

def broken(value: dict, own: str, field: str | None) -> Row:
    return Row(value, None, (), field, own)


@st.composite
def broken_string_row(draw, strings_only=False):
    """An explicit or implicit row with one fault; strings_only keeps it representable in CSV/Parquet."""
    own = draw(st.sampled_from(["explicit", "implicit"]))
    base = draw(explicit_row(strings_only) if own == "explicit" else implicit_row(strings_only))
    row, key = dict(base.value), draw(st.sampled_from(["chosen", "rejected"] + (["prompt"] if own == "explicit"
                                                                                 else [])))
    kinds = ["blank", "same"] + ([] if strings_only else ["delete", "null", "wrong", "surrogate"])
    kind = draw(st.sampled_from(kinds + (["no_marker"] if own == "implicit" else [])))
    field = key
    if kind == "delete":
        del row[key]
        field = ANY if key == "prompt" else key  # without its prompt an explicit row reads as implicit
    elif kind == "null":
        row[key] = None
    elif kind == "wrong":
        row[key] = draw(WRONG_TYPE)
        if key == "chosen" and isinstance(row[key], list):
            field = ANY  # a list `chosen` makes the row conversational
    elif kind == "blank":
        row[key] = draw(BLANK) if own == "explicit" else base.expect[0] + draw(BLANK)
    elif kind == "same":
        row["rejected"], field = row["chosen"], "rejected"
    elif kind == "surrogate":
        row[key] = insert(draw, row[key], draw(SURROGATES))
    elif kind == "no_marker":
        row["chosen"], row["rejected"], field = base.expect[1], base.expect[2], "chosen"
    return broken(row, own, field)


@st.composite
def broken_conversational_row(draw):
    base = draw(conversational_row().filter(lambda r: isinstance(r.value.get("prompt"), list)))
    row = {k: (list(v) if isinstance(v, list) else v) for k, v in base.value.items()}
    key = draw(st.sampled_from(["prompt", "chosen", "rejected"]))
    i = draw(st.integers(0, len(row[key]) - 1))
    kind = draw(st.sampled_from(["not_list", "not_dict", "no_role", "no_content", "bad_role", "content_type",
                                 "empty", "blank", "same", "surrogate"] + (["first_role"] if key != "prompt" else [])))
    field = key
    if kind == "not_list":
        # A string prompt beside assistant-only lists is valid (it is the user turn), so only chosen/rejected
        # may turn into a string here.
        row[key] = draw(st.one_of(*([text()] if key != "prompt" else []), st.integers(),
                                  st.just({"role": "user", "content": "hi"})))
        if key == "chosen":
            field = ANY  # a non-list `chosen` makes the row explicit
    elif kind == "not_dict":
        row[key][i] = draw(st.one_of(text(), st.integers(), st.lists(st.integers(), max_size=2), st.none()))
    elif kind in ("no_role", "no_content"):
        row[key][i] = {k: v for k, v in row[key][i].items() if k != kind[3:]}
    elif kind == "bad_role":
        row[key][i] = {**row[key][i], "role": draw(st.sampled_from(["wizard", "", "User", "ASSISTANT", 1, None,
                                                                   ["user"]]))}
    elif kind == "content_type":
        row[key][i] = {**row[key][i], "content": draw(st.one_of(st.integers(), st.none(), st.just(["a"])))}
    elif kind == "empty":
        row[key] = []
    elif kind == "blank":
        row[key] = [{**m, "content": draw(BLANK)} for m in row[key]]
    elif kind == "same":
        row["rejected"], field = row["chosen"], "rejected"
    elif kind == "surrogate":
        row[key][i] = {**row[key][i], "content": insert(draw, row[key][i]["content"], draw(SURROGATES))}
    elif kind == "first_role":
        row[key][0] = {**row[key][0], "role": draw(st.sampled_from(["system", "user", "tool"]))}
    return broken(row, "conversational", field)


@st.composite
def broken_unpaired_row(draw, strings_only=False):
    base = draw(unpaired_row(strings_only))
    row = dict(base.value)
    conversational = isinstance(row["completion"], list)
    kind = draw(st.sampled_from(["odd_label", "blank"] + ([] if strings_only else
                                ["null_label", "no_label", "no_prompt", "no_completion", "wrong", "surrogate"]
                                + (["first_role"] if conversational else []))))
    key = draw(st.sampled_from(["prompt", "completion"]))
    field = key
    if kind == "odd_label":
        row["label"], field = draw(st.sampled_from([x for x in ODD_LABELS if isinstance(x, str) or
                                                    not strings_only])), "label"
    elif kind == "null_label":
        row["label"], field = None, "label"
    elif kind in ("no_label", "no_completion"):
        del row[kind[3:]]
        field = ANY  # then the row reads as a paired one
    elif kind == "no_prompt":
        del row["prompt"]
        field = "prompt"
    elif kind == "wrong":
        row[key] = draw(st.one_of(st.integers(), st.booleans(), st.dictionaries(st.text(max_size=2), st.integers(),
                                                                                 max_size=1)))
        field = "prompt" if conversational and key == "completion" else key  # checked as a pair of message lists
    elif kind == "blank":
        row[key] = [{**m, "content": draw(BLANK)} for m in row[key]] if conversational else draw(BLANK)
    elif kind == "surrogate":
        if conversational:
            first = {**row[key][0], "content": insert(draw, row[key][0]["content"], draw(SURROGATES))}
            row[key] = [first] + row[key][1:]
        else:
            row[key] = insert(draw, row[key], draw(SURROGATES))
    elif kind == "first_role":
        row["completion"] = [{**row["completion"][0], "role": "user"}] + row["completion"][1:]
        field = "completion"
    return broken(row, "unpaired", field)


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


GARBAGE = st.one_of(
    st.text(CHARS, min_size=1, max_size=30),
    st.text(st.sampled_from('{}[]":,0123456789.eE+-truefalsnul \t\\/'), min_size=1, max_size=30),
    st.sampled_from(["[" * 100_000, "{\"a\":" * 5_000, '{"prompt": ' + "1" * 5_000 + "}", "NaN", "null", '"x"',
                     "[1, 2]", "1e999", '{"prompt": "a\x00b", "chosen": " a", "rejected": " b"}', "\x00", "{}{}"]),
).filter(lambda s: s.strip() and "\n" not in s and not s.startswith("\ufeff") and not _is_json_object(s))
BAD_BYTES = st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80", b"\xf8\x88\x80\x80\x80"])


@st.composite
def raw_row(draw):
    """A JSONL line that is not a JSON object: garbage, or a valid row's bytes with invalid UTF-8 inserted."""
    if draw(st.booleans()):
        return Row(raw=draw(GARBAGE).encode("utf-8"), field=None)
    line = json.dumps(draw(explicit_row()).value, ensure_ascii=draw(st.booleans())).encode("utf-8")
    i = draw(st.integers(0, len(line)))
    line = line[:i] + draw(BAD_BYTES) + line[i:]
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return Row(raw=line, field=None)
    raise AssertionError("inserting a stray byte must break UTF-8")


JUNK = st.one_of(st.builds(lambda v: Row(v, field=None), JSON_VALUE.filter(lambda v: not isinstance(v, dict))),
                 st.builds(lambda extras: Row(extras), EXTRAS))  # not an object; an object with no known field

ROW = st.one_of(*(valid_row(f) for f in ("explicit", "implicit", "conversational", "unpaired")),
                broken_string_row(), broken_conversational_row(), broken_unpaired_row(), JUNK)


@st.composite
def rows(draw, main=("explicit", "implicit", "conversational", "unpaired"), other=ROW, max_size=8):
    """Mostly valid rows of one main format, with a drawn share of broken, foreign and junk rows."""
    fmt, bad_share = draw(st.sampled_from(main)), draw(st.sampled_from([0, 0, 1, 3, 6, 10]))
    n = draw(st.integers(0, max_size))
    return [draw(other) if draw(st.integers(0, 9)) < bad_share else draw(valid_row(fmt) if isinstance(fmt, str)
                                                                         else fmt) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- oracle

@dataclass
class Expected:
    loaded: list[tuple]                     # what must load, in order: (..., source)
    bad: list[tuple[int, Row, str | None]]  # (line, row, the file's format when the row is read)
    rows: int


def expected(numbered: list[tuple[int, Row]], path: str, paired: bool) -> Expected:
    fmt, loaded, bad = None, [], []
    for line, r in numbered:
        usable = r.fmt is not None and not (paired and r.fmt == "unpaired")
        if usable and (fmt is None or r.fmt == fmt):
            fmt = fmt or r.fmt
            source = f"{path}:{line}"
            if paired:
                loaded.append((*r.expect, source))
            elif r.fmt == "unpaired":
                loaded.append((*r.expect, source))
            else:
                loaded += [(r.expect[0], r.expect[1], True, source), (r.expect[0], r.expect[2], False, source)]
        else:
            if r.fmt is not None:  # a valid row of another format: any field may be blamed
                r = Row(r.value, None, (), ANY, None, r.raw)
            bad.append((line, r, fmt))
    return Expected(loaded, bad, len(numbered))


def check_error(e: DataError, path: str, line: int, r: Row, fmt: str | None, paired: bool):
    message = str(e)
    assert message.startswith(f"{path}:{line}:"), (message[:300], line)
    assert e.line == line and e.path == path
    if e.field is not None:
        assert f"field '{e.field}'" in message
    if r.field is None:
        assert e.field is None, message[:300]
        return
    assert e.field is not None, message[:300]  # a row that is an object is always blamed on a field
    root = e.field.split("[")[0]
    read_as = fmt or detect_format(r.value)
    if r.field != ANY and (r.own == "always" or r.own == read_as and not (paired and r.own == "unpaired")):
        assert root == r.field, (message[:300], r.field)
    else:
        assert root in set(r.value) | REQUIRED, message[:300]


def check_loaded(items, exp: Expected, paired: bool):
    if paired:
        got = [(p.prompt, p.chosen, p.rejected, p.source) for p in items]
        for p in items:
            for part in (p.prompt, p.chosen, p.rejected):
                assert (isinstance(part, str) and part.strip()) or (
                    isinstance(part, list) and part and all(m["role"] in ROLES and isinstance(m["content"], str)
                                                            for m in part))
            assert p.chosen != p.rejected
    else:
        got = [(c.prompt, c.completion, c.label, c.source) for c in items]
    assert len(got) == len(exp.loaded)
    assert got == exp.loaded


def check_file(path: str, numbered: list[tuple[int, Row]], paired: bool = True):
    """The whole property, for one file: error mode, then skip mode."""
    load = load_pairs if paired else load_completions
    exp = expected(numbered, path, paired)
    # on_bad_row="error": the first bad row raises; else everything valid loads
    try:
        items, report = load(path)
    except DataError as e:
        if exp.bad:
            check_error(e, path, *exp.bad[0], paired)
        else:
            assert not exp.loaded and e.line is None and str(e).startswith(f"{path}:"), str(e)[:300]
    else:
        assert not exp.bad, f"{path}: line {exp.bad[0][0]} should have been refused: {exp.bad[0][1]}"[:500]
        check_loaded(items, exp, paired)
    # on_bad_row="skip": every bad row is counted, and named by its error
    try:
        items, report = load(path, on_bad_row="skip")
    except DataError as e:
        assert not exp.loaded and e.line is None and str(e).startswith(f"{path}:"), str(e)[:300]
        return
    check_loaded(items, exp, paired)
    assert sum(report.skipped.values()) == len(exp.bad) == len(report.errors)
    assert len(exp.bad) + len({s for *_, s in exp.loaded}) == exp.rows
    for e, (line, r, fmt) in zip(report.errors, exp.bad):
        check_error(e, path, line, r, fmt, paired)


# ---------------------------------------------------------------------------------------------- JSONL

@st.composite
def jsonl_file(draw, row_strategy):
    """(bytes, [(line, Row)]): CRLF or LF, a BOM or not, blank lines, ASCII-escaped JSON or raw UTF-8."""
    body = draw(row_strategy)
    if draw(st.booleans()):
        body += draw(st.lists(raw_row(), max_size=2))
    body = draw(st.permutations(body))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    ascii_only = draw(st.booleans())
    lines, numbered = [], []
    for r in body:
        for _ in range(draw(st.integers(0, 1))):
            lines.append(draw(st.sampled_from([b"", b" ", b"\t ", b"\r"])))
        if r.raw is not None:
            line = r.raw
        else:
            try:
                line = json.dumps(r.value, ensure_ascii=ascii_only).encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate only exists as a JSON escape
                line = json.dumps(r.value).encode("utf-8")
        lines.append(line)
        numbered.append((len(lines), r))
    data = eol.join(lines) + (eol if draw(st.booleans()) else b"")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    return data, numbered


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@fuzz(300)
@given(file=jsonl_file(rows()))
def test_jsonl_pairs(fuzz_dir, file):
    data, numbered = file
    path = fuzz_dir / "pairs.jsonl"
    path.write_bytes(data)
    check_file(str(path), numbered)


@fuzz(200)
@given(file=jsonl_file(rows()))
def test_jsonl_completions(fuzz_dir, file):
    data, numbered = file
    path = fuzz_dir / "completions.jsonl"
    path.write_bytes(data)
    check_file(str(path), numbered, paired=False)


# ---------------------------------------------------------------------------------------------- JSON

@fuzz(150)
@given(body=rows(), wrap=st.booleans(), bom=st.booleans(), indent=st.sampled_from([None, 2]), paired=st.booleans())
def test_json_array(fuzz_dir, body, wrap, bom, indent, paired):
    path = fuzz_dir / "rows.json"
    values = [r.value for r in body]
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") +
                     json.dumps({"train": values} if wrap else values, indent=indent).encode("utf-8"))
    check_file(str(path), list(enumerate(body, start=1)), paired)


# ---------------------------------------------------------------------------------------------- CSV

STRING_ROW = st.one_of(explicit_row(strings_only=True), implicit_row(strings_only=True),
                       unpaired_row(strings_only=True), broken_string_row(strings_only=True),
                       broken_unpaired_row(strings_only=True))


@st.composite
def csv_file(draw):
    """(text, [(line, Row)]) with every value a string. Columns are the union of the rows' keys, a missing
    value is written empty, so each row is what the reader will see; a row may carry an extra value or a
    value with invalid UTF-8 bytes (MARK)."""
    fmt = draw(st.sampled_from([explicit_row, implicit_row, unpaired_row]))(strings_only=True)
    body = draw(rows(main=(fmt,), other=STRING_ROW))
    columns = sorted({k for r in body for k in r.value}) or ["prompt", "chosen", "rejected"]
    out, numbered = io.StringIO(), []
    eol = draw(st.sampled_from(["\r\n", "\n"]))  # with "\n", csv.writer would leave a "\r" in a value unquoted
    writer = csv.writer(out, lineterminator=eol, quoting=csv.QUOTE_MINIMAL if eol == "\r\n" else csv.QUOTE_ALL)
    writer.writerow(columns)
    for r in body:
        seen = {c: r.value.get(c, "") for c in columns}
        values = [seen[c] for c in columns]
        extra = draw(st.integers(0, 19))
        if extra == 0:
            values.append("extra")
            r = Row(field=None)
        elif extra == 1:
            column = draw(st.sampled_from(columns))
            values[columns.index(column)] = insert(draw, seen[column], MARK)
            r = Row(seen, None, (), column, "always")  # invalid UTF-8 is blamed on its column in any file
        else:
            r = _as_read(r, seen)
        writer.writerow(values)
        numbered.append((len(io.StringIO(out.getvalue(), newline="").readlines()), r))
    return out.getvalue(), numbered


def _as_read(r: Row, seen: dict) -> Row:
    """The Row as the loader sees it: with every column present, a row may read as another format."""
    if r.fmt is not None and detect_format(seen) != r.fmt:
        return Row(seen, None, (), ANY)
    return Row(seen, r.fmt, r.expect, r.field, r.own)


@fuzz(200)
@given(file=csv_file(), bom=st.booleans(), paired=st.booleans())
def test_csv(fuzz_dir, file, bom, paired):
    text_, numbered = file
    data = text_.encode("utf-8").replace(MARK.encode("utf-8"), b"\xff\xfe")
    path = fuzz_dir / "rows.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    check_file(str(path), numbered, paired)


# ---------------------------------------------------------------------------------------------- Parquet

@fuzz(40)
@given(body=rows(main=(explicit_row(strings_only=True), implicit_row(strings_only=True)),
                 other=broken_string_row(strings_only=True), max_size=6), paired=st.booleans(),
       null=st.integers(0, 5))
def test_parquet(fuzz_dir, body, paired, null):
    import pyarrow as pa
    import pyarrow.parquet as pq
    columns = sorted({k for r in body for k in r.value}) or ["prompt", "chosen", "rejected"]
    seen = [{c: r.value.get(c) for c in columns} for r in body]  # Parquet has nulls: a missing value is None
    if body and null == 0:
        seen[0][columns[0]] = None
    pq.write_table(pa.table({c: pa.array([s[c] for s in seen], type=pa.string()) for c in columns}),
                   fuzz_dir / "rows.parquet")
    numbered = []
    for i, (r, s) in enumerate(zip(body, seen), start=1):
        numbered.append((i, _as_read(r, s) if s == {c: r.value.get(c) for c in columns} else Row(s)))
    check_file(str(fuzz_dir / "rows.parquet"), numbered, paired)


# ---------------------------------------------------------------------------------------------- any bytes

def check_only_data_errors(path: str):
    """Whatever the bytes: load, or a DataError naming the file (and the line, if it names one)."""
    for load in (load_pairs, load_completions):
        for mode in ("error", "skip"):
            try:
                items, report = load(path, on_bad_row=mode)
            except DataError as e:
                where = f"{path}:{e.line}:" if e.line is not None else f"{path}:"
                assert str(e).startswith(where), str(e)[:300]
                assert e.field is None or f"field '{e.field}'" in str(e)
            else:
                assert items and report.rows == len(items)


@st.composite
def mangled(draw):
    """Bytes of a file that was valid, then truncated, spliced with random bytes, or replaced by them."""
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
    good = [{"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no"} for i in range(3)]
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(good), sink)
        data = sink.getvalue()
    elif suffix == ".csv":
        data = b"prompt,chosen,rejected\r\n" + b"".join(f'Q{i}?," yes"," no"\r\n'.encode() for i in range(3))
    elif suffix == ".json":
        data = json.dumps(good).encode()
    else:
        data = b"".join(json.dumps(r).encode() + b"\n" for r in good)
    how = draw(st.sampled_from(["truncate", "splice", "random", "text"]))
    if how == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "splice":
        i = draw(st.integers(0, len(data)))
        data = data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i + draw(st.integers(0, 8)):]
    elif how == "random":
        data = draw(st.binary(max_size=200))
    else:
        data = draw(st.text(st.sampled_from('{}[]":,\n\r\t abc\x00\ufeff"prompt""chosen""rejected"'),
                            max_size=200)).encode()
    return suffix, data


@fuzz(250)
@given(file=mangled())
def test_any_bytes_load_or_raise_data_error(fuzz_dir, file):
    suffix, data = file
    path = fuzz_dir / f"mangled{suffix}"
    path.write_bytes(data)
    check_only_data_errors(str(path))


# ---------------------------------------------------------------------------------------------- examples

@pytest.mark.parametrize("line", ["[" * 100_000, '{"prompt": ' + "1" * 5_000 + "}"])
def test_json_python_refuses_is_a_row_error(tmp_path, line):
    """Nesting deeper than the stack and integers over 4300 digits are invalid JSON rows, not crashes."""
    good = json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"})
    path = tmp_path / "x.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl:2: invalid JSON"):
        load_pairs(str(path))
    (tmp_path / "x.json").write_text(f"[{good}, {line}]")
    with pytest.raises(DataError, match=r"x\.json: invalid JSON"):
        load_pairs(str(tmp_path / "x.json"))
