"""The one exception bad input raises: it always says which file, which line and which field."""

from __future__ import annotations


class DataError(ValueError):
    """A row (or a whole file) that cannot be used, located as precisely as the file format allows.

    `line` is the 1-based line of JSONL/CSV files, the 1-based row index of JSON arrays, Parquet and
    `datasets` tables; `field` is the offending key, or None when the whole row or file is at fault.
    `reason` is a short machine-readable tag used to count skipped rows (e.g. "missing_field").
    """

    def __init__(self, path: str, line: int | None, field: str | None, message: str, reason: str = "invalid"):
        self.path, self.line, self.field, self.reason, self.detail = path, line, field, reason, message
        where = str(path) + (f":{line}" if line is not None else "")
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}")
