"""Read rows out of preference files: JSONL, JSON, Parquet, CSV, saved `datasets` folders, hub names.

Every reader yields `(line, row)` where `line` is what a user would look up in the file (1-based line
for JSONL/CSV, 1-based row index otherwise), so every later error can point at it. A row that cannot
be parsed is yielded as a `DataError` in place of the dict, so the caller decides whether to stop or
to skip and count it; problems with the whole file raise.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from dpokit.data.errors import DataError


def read_rows(path: str) -> Iterator[tuple[int, dict | DataError]]:
    """Yield `(line, row_dict)` from a file, a saved `datasets` folder, or a `datasets` hub name."""
    p = Path(path)
    if p.is_dir():
        yield from _read_datasets(path, from_disk=True)
        return
    if not p.exists():
        if path.count("/") == 1 and not path.startswith((".", "/")) and not p.suffix:
            yield from _read_datasets(path, from_disk=False)  # looks like "org/name" on the hub
            return
        raise DataError(path, None, None, "no such file", reason="missing_file")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(p)
    elif suffix == ".json":
        yield from _read_json(p)
    elif suffix == ".csv":
        yield from _read_csv(p)
    elif suffix == ".parquet":
        yield from _read_parquet(p)
    else:
        raise DataError(path, None, None, f"unknown file type '{suffix}': use .jsonl, .json, .csv or .parquet",
                        reason="unknown_format")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, DataError(str(path), line_no, None, f"invalid UTF-8 at byte {e.start}",
                                         reason="invalid_utf8")
                continue
            if line_no == 1:
                text = text.removeprefix("\ufeff")  # a BOM is an encoding artefact, not data
            if not text.strip():
                continue  # blank lines (often a trailing newline) carry no row
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, DataError(str(path), line_no, None, f"invalid JSON: {e.msg} (column {e.colno})",
                                         reason="invalid_json")
                continue
            except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting deeper than the stack
                yield line_no, DataError(str(path), line_no, None, f"invalid JSON: {e}", reason="invalid_json")
                continue
            if not isinstance(row, dict):
                row = DataError(str(path), line_no, None, f"expected a JSON object, got {type(row).__name__}",
                                reason="not_an_object")
            yield line_no, row


def _read_json(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    try:
        text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise DataError(str(path), None, None, f"invalid UTF-8 at byte {e.start}", reason="invalid_utf8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(str(path), e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})",
                        reason="invalid_json") from None
    except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting deeper than the stack
        raise DataError(str(path), None, None, f"invalid JSON: {e}", reason="invalid_json") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} style wrappers
    if not isinstance(data, list):
        raise DataError(str(path), None, None, "expected a JSON array of objects", reason="not_an_object")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            row = DataError(str(path), i, None, f"expected a JSON object, got {type(row).__name__}",
                            reason="not_an_object")
        yield i, row


def _read_csv(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    # csv refuses fields over 128 KiB by default; long dialogues are legitimate data. (A process-wide setting.)
    csv.field_size_limit(2**31 - 1)
    # Undecodable bytes are kept as lone surrogates ("surrogateescape"), so that, as in JSONL, the row and
    # field holding them are reported (or skipped) instead of the whole file failing.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        try:
            if any(_undecodable(name) for name in reader.fieldnames or []):
                raise DataError(str(path), 1, None, "invalid UTF-8 in the header", reason="invalid_utf8")
            for row in reader:
                undecodable = [k for k, v in row.items() if _undecodable(v)]
                if None in row:
                    row = DataError(str(path), reader.line_num, None, "more values than header columns",
                                    reason="invalid_csv")
                elif undecodable:
                    row = DataError(str(path), reader.line_num, undecodable[0], "invalid UTF-8",
                                    reason="invalid_utf8")
                yield reader.line_num, row
        except csv.Error as e:
            raise DataError(str(path), reader.line_num, None, f"invalid CSV: {e}", reason="invalid_csv") from None


def _undecodable(value) -> bool:
    """True for a CSV value holding bytes that were not UTF-8 (decoded as lone surrogates)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(str(path), None, None, "reading Parquet needs pyarrow: pip install 'dpokit[data]'",
                        reason="missing_dependency") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError, UnicodeDecodeError) as e:  # not Parquet, corrupt, non-UTF-8 strings
        raise DataError(str(path), None, None, f"invalid Parquet: {e}", reason="invalid_parquet") from None
    for i, row in enumerate(rows, start=1):
        yield i, row


def _read_datasets(name: str, from_disk: bool) -> Iterator[tuple[int, dict]]:
    try:
        import datasets
    except ImportError:
        raise DataError(name, None, None, "reading a `datasets` folder or hub name needs `datasets`: "
                        "pip install 'dpokit[data]'", reason="missing_dependency") from None
    if from_disk:
        ds = datasets.load_from_disk(name)
    else:  # "org/name" or "org/name:split"
        repo, _, split = name.partition(":")
        ds = datasets.load_dataset(repo, split=split or "train")
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(name, None, None, f"has splits {list(ds)}, none named 'train'", reason="no_split")
        ds = ds["train"]
    for i, row in enumerate(ds, start=1):
        yield i, row
