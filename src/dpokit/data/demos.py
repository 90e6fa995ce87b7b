"""Demonstrations for `dpokit sft`: what the model should say, read from any file type data/readers.py reads.

Formats, decided per file from its first valid row (data/formats.detect_format) and then required of every row:
- prompt-completion: `prompt` and `completion` strings, or message lists (conversational: the prompt's messages,
  then the assistant's completion messages); the completion is trained on, the prompt is context (TRL's
  prompt-completion rows with completion_only_loss);
- messages: `messages`, one conversation as a list of {role, content}; every assistant turn is trained on, every
  other message is context (TRL's assistant_only_loss);
- a preference file (explicit, implicit or conversational pairs): each pair's chosen completion is a
  demonstration of its prompt — the DPO paper's way to get a reference model when none was fine-tuned
  (Rafailov et al. 2023, §4: "maximizing likelihood of preferred completions"), so `dpokit sft` then
  `dpokit train` runs on the same built-in pairs.
Labelled completions (KTO) and ranked rows are refused: an undesirable completion is no demonstration, and a
ranking says which completion is better, not that the best one is good.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpokit.data.errors import DataError
from dpokit.data.formats import LoadReport, _load_rows, parse_row
from dpokit.data.rows import Messages, Text, _check_unicode, _has_text, _messages

DEMO_FORMATS = ("prompt-completion", "messages")
PAIR_FORMATS = ("explicit", "implicit", "conversational")


@dataclass
class Demo:
    """One demonstration: `prompt` → `completion` (prompt-completion rows and pairs' chosen side), or a whole
    conversation in `messages` whose assistant turns are trained on."""
    source: str  # "file:line"
    prompt: Text | None = None
    completion: Text | None = None
    messages: Messages | None = None
    conversational: bool = False
    ends: bool = True  # False: a pair's chosen was cut (`chosen_truncated`), so no EOS is added after it


def load_demos(path: str, on_bad_row: str = "error", allow_empty: bool = False) -> tuple[list[Demo], LoadReport]:
    """Every row of `path` as a Demo. Bad rows raise DataError naming file, line and field, or with
    on_bad_row="skip" are counted by reason in the report; a file with no usable row raises unless `allow_empty`
    (for `data check`)."""
    def parse(row, fmt, line):
        return [parse_demo(row, fmt, path, line)]

    demos, report = _load_rows(path, on_bad_row, parse, describe=lambda fmt: fmt if fmt in DEMO_FORMATS
                               else f"{fmt} pairs, chosen as demonstrations")
    report.unit = "demonstrations"
    if not demos and not allow_empty:
        raise DataError(path, None, None, "no usable demonstrations" +
                        (f" ({report.summary()})" if report.skipped else ""), reason="empty")
    return demos, report


def parse_demo(row: dict, fmt: str, path: str, line: int) -> Demo:
    def fail(fieldname, message, reason):
        raise DataError(path, line, fieldname, message, reason=reason)

    source = f"{path}:{line}"
    if fmt == "messages":
        messages = _messages(row["messages"], "messages", fail)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            fail("messages", "no assistant message with text: nothing to train on", "no_assistant_turn")
        if messages[0]["role"] == "assistant":
            fail("messages[0].role", "the conversation starts with the assistant: nothing comes before its first "
                 "turn to condition it on", "bad_role")
        return Demo(source, messages=messages, conversational=True)
    if fmt == "prompt-completion":
        return _prompt_completion(row, source, fail)
    if fmt in PAIR_FORMATS:
        pair = parse_row(row, fmt, path, line)
        return Demo(source, pair.prompt, pair.chosen, conversational=pair.conversational, ends=pair.chosen_ends)
    if fmt == "unpaired":
        fail("label", "labelled completions (KTO rows) are not demonstrations: an undesirable one must not be "
             "imitated; give prompt/completion rows without a label, or train them with `dpokit train --loss kto`",
             "unpaired_data")
    fail("completions", f"{fmt} rows (k scored completions) rank completions; `dpokit sft` needs demonstrations: "
         "prompt/completion or messages rows, or preference pairs (their chosen side)", "ranked_data")


def _prompt_completion(row: dict, source: str, fail) -> Demo:
    for key in ("prompt", "completion"):
        if row.get(key) is None:
            fail(key, "missing (a prompt-completion file needs prompt and completion in every row)", "missing_field")
    if isinstance(row["completion"], list):  # conversational
        prompt = _messages(row["prompt"], "prompt", fail)
        completion = _messages(row["completion"], "completion", fail)
        if not _has_text(prompt):
            fail("prompt", "no prompt messages" if not prompt else "empty prompt", "empty_prompt")
        if not _has_text(completion):
            fail("completion", "empty completion", "empty_completion")
        if completion[0]["role"] != "assistant":
            fail("completion", f"completion must start with an assistant message, got role "
                 f"'{completion[0]['role']}'", "bad_role")
        return Demo(source, prompt, completion, conversational=True)
    for key in ("prompt", "completion"):
        if not isinstance(row[key], str):
            fail(key, f"expected a string (or, conversational, a list of messages), got {type(row[key]).__name__}",
                 "wrong_type")
        _check_unicode(row[key], key, fail)
    if not row["prompt"].strip():
        fail("prompt", "empty prompt", "empty_prompt")
    if not row["completion"].strip():
        fail("completion", "empty completion", "empty_completion")
    return Demo(source, row["prompt"], row["completion"])
