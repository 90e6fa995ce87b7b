"""Turn raw rows into preference pairs, detecting the format of each file.

Four formats, decided per file from its first valid row and then required of every row:
- explicit: `prompt`, `chosen`, `rejected` strings;
- implicit: `chosen`, `rejected` full texts; the prompt is their longest common prefix cut back to the
  end of the last assistant turn marker inside it (Anthropic HH's "\\n\\nHuman: … \\n\\nAssistant:");
- conversational: `chosen`/`rejected` (and optionally `prompt`) are lists of {role, content} messages;
- unpaired (KTO): `prompt`, `completion` (strings or message lists) and a boolean `label`;
- ranked / ultrafeedback: k >= 2 scored completions of a prompt, read as the pairs they imply (data/ranked.py).
Demonstrations (`prompt`/`completion` without a label, or `messages`) are detected here too, and refused with a
pointer to `dpokit sft`, which reads them (data/demos.py).

Rows written by `make-pairs` (and the demo) may also carry the reference log-probs the sampler computed
(`SamplerRef`: `ref_digest`, `ref_prompt_ids`, `chosen_ref_ids`, `rejected_ref_ids`, `chosen_ref_logp`,
`rejected_ref_logp`), in any of the paired formats: all six or none. A pair row may carry a numeric `margin`
(read by `dpokit train-rm` only, as TRL's RewardTrainer reads it).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from dpokit.data.errors import DataError
from dpokit.data.readers import read_rows
# the row types, below this module and data/ranked.py (which it reads ranked rows with); re-exported
from dpokit.data.rows import ROLES, Messages, Pair, SamplerRef, Text, _check_unicode, _has_text, _messages  # noqa: F401
from dpokit.data.rows import check_logp, check_token_ids, has_sampler_fields

# Where an assistant turn begins in raw dialogue text; the implicit prompt ends right after one of these.
TURN_MARKERS = ("\n\nAssistant:", "\nAssistant:", "<|im_start|>assistant\n", "[/INST]",
                "<|start_header_id|>assistant<|end_header_id|>\n\n", "<start_of_turn>model\n")


SAMPLER_FIELDS = ("ref_digest", "ref_prompt_ids", "chosen_ref_ids", "rejected_ref_ids", "chosen_ref_logp",
                  "rejected_ref_logp")


@dataclass
class LoadReport:
    path: str
    format: str = "unknown"
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_lines: list[str] = field(default_factory=list)  # "line N (reason)", in file order
    errors: list[DataError] = field(default_factory=list)  # every skipped row's error, in file order
    unit: str = "pairs"
    ranked: object = None  # ranked files: data/ranked.RankedStats (rows, completions per row, pairs implied)

    def skip(self, error: DataError) -> None:
        self.skipped[error.reason] += 1
        self.skipped_lines.append(f"line {error.line} ({error.reason})")
        self.errors.append(error)

    def summary(self) -> str:
        text = f"{self.path}: {self.rows} {self.unit}, format {self.format}"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
            shown = self.skipped_lines[:10]
            text += " at " + ", ".join(shown) + (" …" if len(self.skipped_lines) > len(shown) else "")
        return text


@dataclass
class Completion:
    """One labelled completion (KTO): label True = desirable."""
    prompt: Text
    completion: Text
    label: bool
    source: str
    conversational: bool = False
    ends: bool = True  # as Pair.chosen_ends


def detect_format(row: dict) -> str:
    if "completion" in row and "label" in row and "chosen" not in row:
        return "unpaired"
    if "chosen" not in row and ("messages" in row or "completion" in row):  # `dpokit sft` (data/demos.py)
        return "messages" if "messages" in row else "prompt-completion"
    if "completions" in row and "chosen" not in row:  # k scored completions (data/ranked.py)
        first = row["completions"][0] if isinstance(row["completions"], list) and row["completions"] else None
        return "ultrafeedback" if "instruction" in row or (isinstance(first, dict) and "response" in first) else "ranked"
    chosen = row.get("chosen")
    if isinstance(chosen, list):
        return "conversational"
    if "prompt" in row:
        return "explicit"
    return "implicit"


def _check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")


def _load_rows(path: str, on_bad_row: str, parse, describe) -> tuple[list, LoadReport]:
    """The loop both loaders share: `parse(row, fmt, line)` returns the row's items or raises DataError,
    which stops the load or (on_bad_row="skip") is counted. Only a valid row decides the file's format:
    with "skip", a broken first row must not impose its own."""
    _check_on_bad_row(on_bad_row)
    report, out, fmt = LoadReport(path), [], None
    for line, row in read_rows(path):
        try:
            if isinstance(row, DataError):
                raise row
            row_fmt = fmt or detect_format(row)
            out += parse(row, row_fmt, line)
            if fmt is None:
                fmt = row_fmt
                report.format = describe(fmt)
        except DataError as e:
            if on_bad_row == "error":
                raise
            report.skip(e)
    report.rows = len(out)
    return out, report


def load_pairs(path: str, on_bad_row: str = "error", allow_empty: bool = False, ranked_pairs: str = "all",
               ultrafeedback_score: str = "fine-grained_score") -> tuple[list[Pair], LoadReport]:
    """Read every row of `path` as a Pair. Bad rows raise DataError, or with on_bad_row="skip" are
    counted by reason in the report (never dropped silently). A file with no usable pair raises unless
    `allow_empty` (for `data check`, which lists every bad row). Ranked rows (k scored completions) give the
    pairs `ranked_pairs` picks ("all", "best-worst", "best-rest"), each row's consecutively (data/ranked.py)."""
    from dpokit.data.ranked import RANKED_FORMATS, RankedStats, ranked_pairs as expand_ranked
    ranked = RankedStats(pairing=ranked_pairs)

    def parse(row, fmt, line):
        if fmt == "unpaired":
            raise DataError(path, line, "completion", "unpaired rows (prompt, completion, label) need an "
                            "unpaired objective: --loss kto", reason="unpaired_data")
        if fmt in ("prompt-completion", "messages"):
            _demonstrations(path, line, fmt, "DPO")
        if fmt in RANKED_FORMATS:
            return expand_ranked(row, fmt, path, line, ranked_pairs, ultrafeedback_score, ranked)
        return [parse_row(row, fmt, path, line)]

    pairs, report = _load_rows(path, on_bad_row, parse, describe=lambda fmt: fmt)
    if report.format in RANKED_FORMATS:
        report.ranked, report.format = ranked, ranked.describe()
    if not pairs and not allow_empty:
        raise DataError(path, None, None, "no usable preference pairs" +
                        (f" ({report.summary()})" if report.skipped else ""), reason="empty")
    return pairs, report


def parse_row(row: dict, fmt: str, path: str, line: int) -> Pair:
    def fail(fieldname, message, reason):
        raise DataError(path, line, fieldname, message, reason=reason)

    for key in ("chosen", "rejected") + (("prompt",) if fmt == "explicit" else ()):
        if key not in row or row[key] is None:
            fail(key, f"missing (a {fmt}-format file needs it in every row)", "missing_field")
    if fmt == "implicit" and row.get("prompt") is not None:  # else the prompt would be silently ignored
        fail("prompt", "this file is implicit format (no prompt field) but this row has one: mixed formats",
             "mixed_formats")
    source = f"{path}:{line}"
    extra = {}
    for key in ("chosen_truncated", "rejected_truncated"):
        if not isinstance(row.get(key, False), bool):
            fail(key, f"expected true or false, got {row[key]!r:.40}", "wrong_type")
        extra[key.replace("truncated", "ends")] = not row.get(key, False)
    extra["sampler_ref"] = _sampler_ref(row, fail)
    extra["margin"] = _margin(row, fail)

    if fmt == "conversational":
        chosen = _messages(row["chosen"], "chosen", fail)
        rejected = _messages(row["rejected"], "rejected", fail)
        # A string prompt beside full conversations (HuggingFaceH4/ultrafeedback_binarized, argilla's cleaned
        # UltraFeedback, Tülu 3's mixtures) restates the user turn they already hold: the lists are read, as
        # TRL's maybe_extract_prompt and the alignment-handbook's `columns: [chosen, rejected]` do. Beside
        # assistant-only lists it is the user turn.
        raw_prompt = row.get("prompt")
        if raw_prompt is not None and not isinstance(raw_prompt, str):
            prompt = _messages(raw_prompt, "prompt", fail)
        elif isinstance(raw_prompt, str) and chosen and chosen[0]["role"] == "assistant":
            prompt = [{"role": "user", "content": raw_prompt}]
        else:  # implicit conversational: the shared leading messages are the prompt
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if chosen == rejected:  # checked first: identical lists split into a prompt and two empty completions
            fail("rejected", "identical to chosen: the pair carries no preference", "chosen_equals_rejected")
        if not _has_text(prompt):
            fail("prompt", "no prompt messages" if not prompt else "empty prompt", "empty_prompt")
        for key, msgs in (("chosen", chosen), ("rejected", rejected)):
            if not _has_text(msgs):
                fail(key, "empty completion", "empty_completion")
            if msgs[0]["role"] != "assistant":
                fail(key, f"completion must start with an assistant message, got role '{msgs[0]['role']}'",
                     "bad_role")
        return Pair(prompt, chosen, rejected, source, conversational=True, **extra)

    for key in ("chosen", "rejected") + (("prompt",) if fmt == "explicit" else ()):
        if not isinstance(row[key], str):
            fail(key, f"expected a string, got {type(row[key]).__name__} (this file is {fmt} format)", "wrong_type")
        _check_unicode(row[key], key, fail)
    if fmt == "explicit":
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt, chosen, rejected = split_implicit(row["chosen"], row["rejected"], fail)
    if not prompt.strip():
        fail("prompt", "empty prompt", "empty_prompt")
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            fail(key, "empty completion", "empty_completion")
    if chosen == rejected:
        fail("rejected", "identical to chosen: the pair carries no preference", "chosen_equals_rejected")
    return Pair(prompt, chosen, rejected, source, **extra)


def load_completions(path: str, on_bad_row: str = "error",
                     allow_empty: bool = False) -> tuple[list[Completion], LoadReport]:
    """Labelled completions for KTO: unpaired rows as they are, or each preference pair split into a
    desirable (chosen) and an undesirable (rejected) completion of the same prompt. `allow_empty` as
    for `load_pairs`."""
    def parse(row, fmt, line):
        if fmt == "unpaired":
            return [parse_unpaired(row, path, line)]
        if fmt in ("prompt-completion", "messages"):
            _demonstrations(path, line, fmt, "KTO")
        if fmt in ("ranked", "ultrafeedback"):  # which completions are desirable is not defined by a ranking
            raise DataError(path, line, "completions", f"{fmt} rows (k scored completions) need a paired "
                            "objective, e.g. --loss sigmoid: an unpaired one (kto) reads prompt/completion/label "
                            "rows or pairs", reason="ranked_data")
        p = parse_row(row, fmt, path, line)
        return [Completion(p.prompt, p.chosen, True, p.source, p.conversational, p.chosen_ends),
                Completion(p.prompt, p.rejected, False, p.source, p.conversational, p.rejected_ends)]

    out, report = _load_rows(path, on_bad_row, parse, describe=lambda fmt: fmt if fmt == "unpaired"
                             else f"{fmt} pairs split into desirable/undesirable")
    report.unit = "completions"
    if not out and not allow_empty:
        raise DataError(path, None, None, "no usable completions", reason="empty")
    return out, report


def _demonstrations(path: str, line: int, fmt: str, method: str):
    raise DataError(path, line, "messages" if fmt == "messages" else "completion", f"{fmt} rows are demonstrations "
                    f"(supervised fine-tuning: `dpokit sft`); {method} needs preference pairs", reason="demonstrations")


_LABELS = {True: True, False: False, 1: True, 0: False, "true": True, "false": False, "1": True, "0": False}


def parse_unpaired(row: dict, path: str, line: int) -> Completion:
    def fail(fieldname, message, reason):
        raise DataError(path, line, fieldname, message, reason=reason)

    for key in ("prompt", "completion", "label"):
        if key not in row or row[key] is None:
            fail(key, "missing (an unpaired file needs prompt, completion and label in every row)", "missing_field")
    label = row["label"].strip().lower() if isinstance(row["label"], str) else row["label"]
    if not isinstance(label, (bool, int, str)) or label not in _LABELS:
        fail("label", f"expected true/false, got {row['label']!r:.80}", "wrong_type")
    if isinstance(row["completion"], list):
        prompt = _messages(row["prompt"], "prompt", fail)
        completion = _messages(row["completion"], "completion", fail)
        if not _has_text(prompt):
            fail("prompt", "no prompt messages" if not prompt else "empty prompt", "empty_prompt")
        if not _has_text(completion):
            fail("completion", "empty completion", "empty_completion")
        if completion[0]["role"] != "assistant":
            fail("completion", "completion must start with an assistant message", "bad_role")
        return Completion(prompt, completion, _LABELS[label], f"{path}:{line}", conversational=True)
    for key in ("prompt", "completion"):
        if not isinstance(row[key], str):
            fail(key, f"expected a string, got {type(row[key]).__name__}", "wrong_type")
        _check_unicode(row[key], key, fail)
    if not row["prompt"].strip():
        fail("prompt", "empty prompt", "empty_prompt")
    if not row["completion"].strip():
        fail("completion", "empty completion", "empty_completion")
    return Completion(row["prompt"], row["completion"], _LABELS[label], f"{path}:{line}")


def split_implicit(chosen: str, rejected: str, fail) -> tuple[str, str, str]:
    """Prompt = longest common prefix of the two texts, cut back to the end of the last turn marker in it.

    Cutting back matters: two answers that both begin " Sure" share that word, but it is part of the
    completions, not of the prompt."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) and n == len(rejected):
        fail("rejected", "identical to chosen: the pair carries no preference", "chosen_equals_rejected")
    common = chosen[:n]
    cut = max((common.rfind(m) + len(m) for m in TURN_MARKERS if m in common), default=-1)
    if cut <= 0:
        fail("chosen", "implicit format: no assistant turn marker (e.g. '\\n\\nAssistant:') in the text shared "
             "by chosen and rejected; give an explicit 'prompt' field", "no_prompt_boundary")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _margin(row: dict, fail) -> float | None:
    """The row's optional `margin` (a reward model's target score gap, TRL's column): a finite number or absent."""
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail("margin", f"expected a finite number, got {value!r:.40}", "wrong_type")
    return float(value)


def _sampler_ref(row: dict, fail) -> SamplerRef | None:
    """The row's SamplerRef, None when it has none of its fields; half of them is an error, not ignored."""
    if not has_sampler_fields(row, SAMPLER_FIELDS, fail):
        return None
    ids = [check_token_ids(key, row[key], fail) for key in ("ref_prompt_ids", "chosen_ref_ids", "rejected_ref_ids")]
    logps = [check_logp(key, row[key], fail) for key in ("chosen_ref_logp", "rejected_ref_logp")]
    return SamplerRef(row["ref_digest"], *ids, *logps)
