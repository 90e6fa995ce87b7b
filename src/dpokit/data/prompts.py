"""Prompt files (for sampling): rows with a `prompt` field — a string, or a list of {role, content}
messages rendered with the chat template. Other fields (e.g. chosen/rejected of a pairs file) are ignored,
so a pairs file also serves as a prompts file."""

from __future__ import annotations

from dpokit.data.errors import DataError
from dpokit.data.formats import LoadReport, _check_on_bad_row
from dpokit.data.readers import read_rows


def _prompt(row: dict, path: str, line: int):
    value = row.get("prompt")
    if isinstance(value, str):
        if not value.strip():
            raise DataError(path, line, "prompt", "is empty", reason="empty_prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        return value
    if value is None:
        raise DataError(path, line, "prompt", "missing: a prompts file needs a 'prompt' field", reason="missing_field")
    raise DataError(path, line, "prompt", f"must be a string or a list of {{role, content}} messages, got "
                    f"{type(value).__name__}", reason="wrong_type")


def load_prompts(path: str, on_bad_row: str = "error") -> tuple[list, LoadReport]:
    """Every row's prompt; bad rows raise DataError naming file:line:field, or are skipped and counted."""
    _check_on_bad_row(on_bad_row)
    report, prompts = LoadReport(path, unit="prompts"), []
    for line, row in read_rows(path):
        try:
            if isinstance(row, DataError):
                raise row
            prompts.append(_prompt(row, path, line))
        except DataError as e:
            if on_bad_row == "error":
                raise
            report.skip(e)
    report.rows, report.format = len(prompts), "prompts"
    if not prompts:
        raise DataError(path, None, None, "no usable prompts", reason="empty")
    return prompts, report
