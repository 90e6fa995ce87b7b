"""Ranked rows: k >= 2 scored completions of one prompt, read as the preference pairs they imply.

Two shapes, detected per file like the pair formats (formats.detect_format):
- ranked: `{prompt, completions: [k], scores: [k numbers]}`. Prompt and completions are strings (text, as
  the explicit format) or message lists (conversational: each completion a list of messages starting with
  an assistant message, rendered with the chat template). Optional: `truncated: [k bools]` (a sample cut at
  make-pairs' --max-new-tokens: no EOS after it, as `chosen_truncated`), and what the sampling model computed
  of each completion (make-pairs --ranked; all four or none): `ref_digest`, `ref_prompt_ids`,
  `completions_ref_ids` (k id lists), `completions_ref_logp` (k sums), from which each pair gets the
  SamplerRef a pair row would carry (logprobs/sampler_ref.py uses it unchanged).
- ultrafeedback: openbmb/UltraFeedback's raw rows, `{instruction (or prompt), completions: [{response,
  fine-grained_score, overall_score, …}]}`. The instruction becomes a user message and each response an
  assistant reply, rendered with the chat template (as HuggingFaceH4/ultrafeedback_binarized writes them).
  The score is `fine-grained_score`, the mean of the four aspect ratings (honesty, instruction following,
  truthfulness, helpfulness; what argilla/ultrafeedback-binarized-preferences ranks by), or with
  --ultrafeedback-score overall_score the critique model's 1–10 score (what ultrafeedback_binarized ranks by,
  after UltraFeedback's 2023-12 fix of its wrong 10s).

Pairing (`--ranked-pairs`), over completions c_0 … c_{k-1} with scores s_i; ties never form a pair:
- all (default): every (i, j) with s_i > s_j — k(k-1)/2 pairs when no two scores tie;
- best-worst: (b, w), b the best completion, w the worst;
- best-rest: (b, j) for every j with s_j < s_b.
With several completions tied for best (or worst), b (w) is the first of them in row order. A row's pairs
come out next to each other, best chosen first: ordered by the chosen's rank, then the rejected's, ranks
from a stable sort by descending score (equal scores keep row order). Every pair of a row has the row's
"file:line" as `source` and `group`: training keeps them together and computes each completion once.

A row whose scores are all equal implies no pair: it is a bad row (reason all_scores_equal), so
--on-bad-row skip counts it. Identical completions scored differently contradict each other (reason
duplicate_completion); identical ones scored the same are kept (they never pair with each other).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from dpokit.data.errors import DataError
from dpokit.data.rows import (Pair, SamplerRef, Text, _check_unicode, _has_text, _messages, check_logp,
                              check_token_ids, has_sampler_fields)

RANKED_FORMATS = ("ranked", "ultrafeedback")
PAIRINGS = ("all", "best-worst", "best-rest")
ULTRAFEEDBACK_SCORES = ("fine-grained_score", "overall_score")
SAMPLER_FIELDS = ("ref_digest", "ref_prompt_ids", "completions_ref_ids", "completions_ref_logp")


@dataclass
class RankedRow:
    prompt: Text
    completions: list[Text]
    scores: list[float]
    conversational: bool
    ends: list[bool]                       # False: completion i was cut (truncated[i]), no EOS after it
    sampler: tuple | None = None           # (digest, prompt_ids, [k id lists], [k sums]) when the row has them
    repeats: int = 0                       # completions left out: the same text and score as an earlier one

    def without_repeats(self) -> "RankedRow":
        """The row with each repeated completion (same text, same score: it adds no pair, only a copy of
        another's) left out and counted, so no pair is trained twice."""
        keep, seen = [], set()
        for i, text in enumerate(self.completions):
            key = repr(text)
            if key not in seen:
                seen.add(key)
                keep.append(i)
        if len(keep) == len(self.completions):
            return self
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        sampler = None if self.sampler is None else (*self.sampler[:2], pick(self.sampler[2]), pick(self.sampler[3]))
        return RankedRow(self.prompt, pick(self.completions), pick(self.scores), self.conversational, pick(self.ends),
                         sampler, len(self.completions) - len(keep))


def rank_pairs(scores: list[float], pairing: str = "all") -> list[tuple[int, int]]:
    """(chosen, rejected) completion indices a row with these scores implies (module docstring), in order."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # best first; stable: ties keep row order
    best, worst = order[0], min(order, key=lambda i: scores[i])   # min: the first of the lowest in row order
    if pairing == "best-worst":
        candidates = [(best, worst)]
    elif pairing == "best-rest":
        candidates = [(best, j) for j in order[1:]]
    else:
        candidates = [(i, j) for a, i in enumerate(order) for j in order[a + 1:]]
    return [(i, j) for i, j in candidates if scores[i] > scores[j]]


def ties(scores: list[float]) -> int:
    """Couples of completions with equal scores: the candidate pairs 'all' leaves out."""
    return sum(n * (n - 1) // 2 for n in Counter(scores).values())


def parse_ranked(row: dict, fmt: str, path: str, line: int, score_field: str = "fine-grained_score") -> RankedRow:
    """Check one ranked or ultrafeedback row; DataError(path, line, field, …) naming e.g. `completions[2]`."""
    def fail(fieldname, message, reason):
        raise DataError(path, line, fieldname, message, reason=reason)

    if row.get("chosen") is not None or row.get("rejected") is not None:
        fail("chosen", f"this file is {fmt} format (k scored completions) but this row is a pair: mixed formats",
             "mixed_formats")
    if fmt == "ultrafeedback":
        prompt, completions, scores, prompt_key = _ultrafeedback(row, score_field, fail)
    else:
        for key in ("prompt", "completions", "scores"):
            if row.get(key) is None:
                fail(key, "missing (a ranked file needs prompt, completions and scores in every row)",
                     "missing_field")
        prompt, completions, scores, prompt_key = row["prompt"], row["completions"], row["scores"], "prompt"
        for key, value in (("completions", completions), ("scores", scores)):
            if not isinstance(value, list):
                fail(key, f"expected a list, got {type(value).__name__}", "wrong_type")
    k = len(completions)
    if k < 2:
        fail("completions", f"{k} completion{'s' * (k != 1)}: a ranked row needs at least 2", "too_few_completions")
    if fmt == "ranked" and len(scores) != k:
        fail("scores", f"{len(scores)} scores for {k} completions", "length_mismatch")
    for i, s in enumerate(scores):
        name = f"completions[{i}].{score_field}" if fmt == "ultrafeedback" else f"scores[{i}]"
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            fail(name, f"expected a number, got {s!r:.40}", "wrong_type")
        if not math.isfinite(s):
            fail(name, f"expected a finite number, got {s}", "non_finite_score")

    conversational = isinstance(prompt, list)
    if conversational:
        prompt = _messages(prompt, prompt_key, fail)
        if not _has_text(prompt):
            fail(prompt_key, "no prompt messages" if not prompt else "empty prompt", "empty_prompt")
    else:
        if not isinstance(prompt, str):
            fail(prompt_key, f"expected a string or a list of messages, got {type(prompt).__name__}", "wrong_type")
        _check_unicode(prompt, prompt_key, fail)
        if not prompt.strip():
            fail(prompt_key, "empty prompt", "empty_prompt")
    texts = [_completion(c, f"completions[{i}]" + (".response" if fmt == "ultrafeedback" else ""),
                         conversational, fail) for i, c in enumerate(completions)]
    for j in range(k):
        for i in range(j):
            if texts[i] == texts[j] and scores[i] != scores[j]:
                fail(f"completions[{j}]", f"identical to completions[{i}] but scored {scores[j]} against "
                     f"{scores[i]}: contradictory scores", "duplicate_completion")
    if len(set(scores)) == 1:
        fail("scores", f"all {k} completions scored {scores[0]}: no preference among them", "all_scores_equal")
    return RankedRow(prompt, texts, [float(s) for s in scores], conversational,
                     [not cut for cut in _truncated(row, k, fail)], _sampler(row, k, fail)).without_repeats()


def expand(ranked: RankedRow, source: str, pairing: str = "all") -> list[Pair]:
    """The Pairs a checked row implies under `pairing`, each carrying `group=source` and, when the row has
    the sampler's data, the SamplerRef a pair row of those two completions would carry."""
    pairs = []
    for i, j in rank_pairs(ranked.scores, pairing):
        ref = None
        if ranked.sampler is not None:
            digest, prompt_ids, ids, logps = ranked.sampler
            ref = SamplerRef(digest, prompt_ids, ids[i], ids[j], logps[i], logps[j])
        pairs.append(Pair(ranked.prompt, ranked.completions[i], ranked.completions[j], source, ranked.conversational,
                          ranked.ends[i], ranked.ends[j], ref, group=source))
    return pairs


@dataclass
class RankedStats:
    """What a ranked file's valid rows hold: how many completions per row, and the pairs each pairing implies."""
    format: str = "ranked"
    pairing: str = "all"
    rows: int = 0
    completions: Counter = field(default_factory=Counter)   # k → rows with k completions
    implied: Counter = field(default_factory=Counter)       # pairing → pairs
    ties: int = 0                                           # equal-score couples, left out by every pairing
    repeats: int = 0                                        # repeated completions left out (RankedRow.repeats)

    def add(self, ranked: RankedRow) -> None:
        self.rows += 1
        self.repeats += ranked.repeats
        self.completions[len(ranked.scores)] += 1
        for pairing in PAIRINGS:
            self.implied[pairing] += len(rank_pairs(ranked.scores, pairing))
        self.ties += ties(ranked.scores)

    def k_text(self) -> str:
        ks = sorted(self.completions.elements())
        if not ks:
            return "no valid row"
        if ks[0] == ks[-1]:
            return f"k={ks[0]} completions per prompt"
        return f"k={ks[0]}–{ks[-1]} completions per prompt, {sum(ks) / len(ks):.1f} on average"

    def describe(self) -> str:
        """The format as LoadReport shows it, e.g. 'ranked (4 rows, k=4 completions per prompt; 6.0 pairs per
        row on average; pairing all)'."""
        per_row = self.implied[self.pairing] / self.rows if self.rows else 0.0
        repeats = f"; {self.repeats} repeated completions left out" if self.repeats else ""
        return (f"{self.format} ({self.rows} rows, {self.k_text()}; {per_row:.1f} pairs per row on average; "
                f"pairing {self.pairing}{repeats})")


def ranked_pairs(row: dict, fmt: str, path: str, line: int, pairing: str, score_field: str,
                 stats: RankedStats) -> list[Pair]:
    """One row's pairs (load_pairs' parse step for ranked files), counted in `stats` when the row is valid."""
    ranked = parse_ranked(row, fmt, path, line, score_field)
    stats.format, stats.pairing = fmt, pairing
    stats.add(ranked)
    return expand(ranked, f"{path}:{line}", pairing)


def _ultrafeedback(row: dict, score_field: str, fail) -> tuple:
    if score_field not in ULTRAFEEDBACK_SCORES:
        raise ValueError(f"score_field must be one of {', '.join(ULTRAFEEDBACK_SCORES)}, got {score_field!r}")
    prompt_key = "instruction" if row.get("instruction") is not None else "prompt"
    if row.get(prompt_key) is None:
        fail("instruction", "missing (an UltraFeedback row needs 'instruction' or 'prompt')", "missing_field")
    if row.get("completions") is None:
        fail("completions", "missing (an UltraFeedback row needs a list of completions)", "missing_field")
    if not isinstance(row["completions"], list):
        fail("completions", f"expected a list, got {type(row['completions']).__name__}", "wrong_type")
    responses, scores = [], []
    for i, c in enumerate(row["completions"]):
        if not isinstance(c, dict):
            fail(f"completions[{i}]", f"expected an object with 'response' and scores, got {type(c).__name__}",
                 "wrong_type")
        for key in ("response", score_field):
            if c.get(key) is None:
                fail(f"completions[{i}].{key}", "missing", "missing_field")
        responses.append(c["response"])
        scores.append(c[score_field])
    prompt = row[prompt_key]
    if isinstance(prompt, str):  # UltraFeedback's instructions are chat requests: a user turn, replies as assistant
        prompt = [{"role": "user", "content": prompt}]
        responses = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in responses]
    return prompt, responses, scores, prompt_key


def _completion(value, name: str, conversational: bool, fail) -> Text:
    if conversational:
        if not isinstance(value, list):
            fail(name, f"expected a list of messages like the prompt, got {type(value).__name__}", "wrong_type")
        msgs = _messages(value, name, fail)
        if not _has_text(msgs):
            fail(name, "empty completion", "empty_completion")
        if msgs[0]["role"] != "assistant":
            fail(name, f"completion must start with an assistant message, got role '{msgs[0]['role']}'", "bad_role")
        return msgs
    if not isinstance(value, str):
        fail(name, f"expected a string like the prompt, got {type(value).__name__}", "wrong_type")
    _check_unicode(value, name, fail)
    if not value.strip():
        fail(name, "empty completion", "empty_completion")
    return value


def _truncated(row: dict, k: int, fail) -> list[bool]:
    flags = row.get("truncated")
    if flags is None:
        return [False] * k
    if not isinstance(flags, list) or len(flags) != k:
        fail("truncated", f"expected a list of {k} true/false (one per completion), got {flags!r:.40}", "wrong_type")
    for i, flag in enumerate(flags):
        if not isinstance(flag, bool):
            fail(f"truncated[{i}]", f"expected true or false, got {flag!r:.40}", "wrong_type")
    return flags


def _sampler(row: dict, k: int, fail) -> tuple | None:
    """(digest, prompt_ids, k id lists, k sums), None when the row has none of SAMPLER_FIELDS; some is an error."""
    if not has_sampler_fields(row, SAMPLER_FIELDS, fail):
        return None
    ids, logps = row["completions_ref_ids"], row["completions_ref_logp"]
    for key, value in (("completions_ref_ids", ids), ("completions_ref_logp", logps)):
        if not isinstance(value, list) or len(value) != k:
            fail(key, f"expected a list of {k} (one per completion), got {value!r:.40}", "wrong_type")
    check_token_ids("ref_prompt_ids", row["ref_prompt_ids"], fail)
    for i, v in enumerate(ids):
        check_token_ids(f"completions_ref_ids[{i}]", v, fail)
    logps = [check_logp(f"completions_ref_logp[{i}]", v, fail) for i, v in enumerate(logps)]
    return row["ref_digest"], row["ref_prompt_ids"], ids, logps
