"""The rows every data format reads into: a preference `Pair` (with the `SamplerRef` make-pairs may store),
and the checks of a message list and of a text that formats.py and ranked.py share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

Messages = list[dict]
Text = Union[str, Messages]

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class SamplerRef:
    """What the model that sampled a pair computed of it: the token ids it scored and their summed log-probs.
    When that model is training's reference (`digest`: refcache.weights_digest) and training tokenizes the
    row to exactly these ids, the sums are the pair's reference log-probs (logprobs/sampler_ref.py)."""
    digest: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_logp: float
    rejected_logp: float


@dataclass
class Pair:
    prompt: Text
    chosen: Text
    rejected: Text
    source: str  # "file:line", carried along so later stages (tokenization, training) can name the row
    conversational: bool = False
    # False when the row says `chosen_truncated` / `rejected_truncated`: true (a sample cut at make-pairs'
    # --max-new-tokens): that completion did not end, so tokenization adds no EOS / end of turn after it
    chosen_ends: bool = True
    rejected_ends: bool = True
    sampler_ref: SamplerRef | None = None  # the sampler's reference log-probs, when the row carries them
    # Pairs read from one ranked row (k scored completions of a prompt) share its "file:line" here: training
    # keeps them next to each other, so each completion is computed once (batches/packing.py).
    group: str | None = None
    # The row's optional numeric `margin` (as TRL's RewardTrainer reads it): how much more the chosen completion
    # should score; read by `dpokit train-rm` only (objectives/reward_model.py), None when absent.
    margin: float | None = None


def _messages(value, key: str, fail) -> Messages:
    if not isinstance(value, list):
        fail(key, f"expected a list of {{role, content}} messages, got {type(value).__name__}", "wrong_type")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            fail(f"{key}[{i}]", "expected a {role, content} message", "bad_message")
        if m["role"] not in ROLES:
            fail(f"{key}[{i}].role", f"unknown role {m['role']!r:.80}; expected one of {', '.join(ROLES)}",
                 "bad_role")
        if not isinstance(m["content"], str):
            fail(f"{key}[{i}].content", f"expected a string, got {type(m['content']).__name__}", "wrong_type")
        _check_unicode(m["content"], f"{key}[{i}].content", fail)
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _has_text(messages: Messages) -> bool:
    return any(m["content"].strip() for m in messages)


def _check_unicode(text: str, key: str, fail) -> None:
    # JSON can escape half of a surrogate pair ("\ud83d"); such a string cannot be encoded, so the
    # tokenizer would fail on it later, far from the row.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        fail(key, f"invalid Unicode: unpaired surrogate at character {e.start}", "invalid_unicode")


# ---- the sampler's reference data a row may carry (pair rows: formats.py; ranked rows: ranked.py) ----------

def has_sampler_fields(row: dict, fields: tuple[str, ...], fail) -> bool:
    """Whether the row carries the sampler's reference data: all of `fields` (the first is the digest, a
    string) or none; some of them is an error, not ignored."""
    present = [key for key in fields if row.get(key) is not None]
    if not present:
        return False
    if len(present) < len(fields):
        missing = next(key for key in fields if key not in present)
        fail(missing, f"missing while the row has {present[0]} (sampler reference log-probs need all of "
             f"{', '.join(fields)})", "missing_field")
    if not isinstance(row[fields[0]], str):
        fail(fields[0], f"expected a string, got {row[fields[0]]!r:.40}", "wrong_type")
    return True


def check_token_ids(name: str, value, fail) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        fail(name, f"expected a list of token ids, got {value!r:.40}", "wrong_type")
    return value


def check_logp(name: str, value, fail) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value <= 0:
        fail(name, f"expected a log-probability (a number <= 0), got {value!r:.40}", "wrong_type")
    return float(value)
