"""Pairs → token ids: the prompt once, each completion as the tokens that follow it.

The completion is defined inside the tokenization of prompt+completion, not by tokenizing the
completion alone: BPE may merge characters across the boundary (": " + "Sure" → ":", " Sure", or a
single token spanning both), and the model must be scored on the tokens it would actually see. The
prompt is the longest common prefix of tokenize(prompt), tokenize(prompt+chosen) and
tokenize(prompt+rejected); whatever follows belongs to the completion, so the two sequences of a pair
always share an identical prompt.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

from jinja2 import TemplateError

from dpokit.data.errors import DataError
from dpokit.data.formats import Completion, Pair, SamplerRef


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str
    sampler_ref: SamplerRef | None = None  # the row's stored reference log-probs (used when these ids match)
    group: str | None = None  # Pair.group: the ranked row this pair came from, if any

    @property
    def n_tokens(self) -> int:
        """Tokens of prompt+chosen plus prompt+rejected, as a padded two-sequence batch computes them."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class TokenizeReport:
    pairs: int = 0
    prompts_truncated: int = 0
    completions_truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    dropped_sources: list[str] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=lambda: {"prompt": [], "chosen": [], "rejected": []})

    def summary(self) -> str:
        text = (f"{self.pairs} pairs tokenized; {self.prompts_truncated} prompts and "
                f"{self.completions_truncated} completions truncated")
        if self.pairs:
            text += "; tokens mean/max " + ", ".join(
                f"{k} {sum(v) / len(v):.0f}/{max(v)}" for k, v in self.lengths.items() if v)
        if self.dropped:
            shown = ", ".join(self.dropped_sources[:5]) + (" …" if len(self.dropped_sources) > 5 else "")
            text += "; dropped " + ", ".join(f"{n} ({why})" for why, n in self.dropped.items()) + f": {shown}"
        return text


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def render(prompt, completions: list, conversational: bool, tokenizer, ends: list[bool] | None = None,
           source: str = "?", names: list[str] | None = None) -> list[list[int]]:
    """Token ids of the prompt, then of prompt+completion for each completion, before boundary resolution.
    ends[i] False: completion i was cut (a sample stopped at max_new_tokens), so nothing closes it. A cut
    chat reply is rendered as the sampler saw it: chat(prompt, add_generation_prompt=True) + its text —
    never by locating its text in a closed turn (templates trim content; the text may occur in the tags).
    Failures are DataErrors at `source` ("file:line"), field names[i]."""
    ends = ends or [True] * len(completions)
    names = names or ["completion"] * len(completions)
    if conversational:
        def chat(messages, gen, name):
            try:
                return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            except TemplateError as e:  # e.g. raise_exception('roles must alternate'): the row is at fault
                _fail(source, name, f"the chat template refuses this conversation: {e}", "template_error")

        def open_turn(messages, name):  # the sampled prompt (generation.sample.prompt_token_ids) + the text
            if messages[-1]["role"] != "assistant":
                _fail(source, name, f"marked truncated (a sample cut at max_new_tokens) but its last "
                      f"message is role '{messages[-1]['role']}', not the assistant's", "bad_role")
            return chat(messages[:-1], True, name) + messages[-1]["content"]
        texts = [chat(prompt, True, "prompt")] + [open_turn(prompt + c, name) if not end else
                                                  chat(prompt + c, False, name)
                                                  for c, end, name in zip(completions, ends, names)]
        add_special = False  # the template already wrote BOS and the turn tokens
    else:
        eos = tokenizer.eos_token
        # EOS ends each completion, so the model learns where a good answer stops — not a cut one: it did not.
        texts = [prompt] + [prompt + (c if c.endswith(eos) or not end else c + eos)
                            for c, end in zip(completions, ends)]
        add_special = True
    return tokenizer(texts, add_special_tokens=add_special)["input_ids"]


def _fail(source: str, name: str, message: str, reason: str):
    path, _, line = source.rpartition(":")
    raise DataError(path, int(line), name, message, reason=reason) if line.isdigit() else \
        DataError(source, None, name, message, reason=reason)


def tokenize_pair(pair: Pair, tokenizer, max_length: int, max_prompt_length: int | None,
                  report: TokenizeReport | None = None, prompt_end: int | None = None,
                  rendered: list[list[int]] | None = None) -> TokenizedPair | None:
    """Tokenize and truncate one pair; None (and a count in `report`) if a completion would vanish.
    `prompt_end`: where the prompt's ids end, when the caller decided it for a whole ranked row; `rendered`:
    the pair's `render` ids, when the caller has them."""
    report = report if report is not None else TokenizeReport()
    prompt_ids, full_chosen, full_rejected = rendered or _render_pair(pair, tokenizer)
    n = _prompt_end(prompt_ids, full_chosen, full_rejected) if prompt_end is None else prompt_end
    prompt, chosen, rejected = prompt_ids[:n], full_chosen[n:], full_rejected[n:]

    # Keep the latest turns of a long prompt: the end of a dialogue is what the answer responds to.
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length:]
        report.prompts_truncated += 1
    budget = max_length - len(prompt)
    for name in ("chosen", "rejected"):
        ids = chosen if name == "chosen" else rejected
        if len(ids) > budget:
            report.completions_truncated += 1
            ids = ids[:max(budget, 0)]
        if not ids:
            reason = "prompt_fills_max_length" if budget <= 0 else f"empty_{name}_tokens"
            report.dropped[reason] += 1
            report.dropped_sources.append(pair.source)
            return None
        if name == "chosen":
            chosen = ids
        else:
            rejected = ids
    report.pairs += 1
    for key, ids in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        report.lengths[key].append(len(ids))
    return TokenizedPair(prompt, chosen, rejected, pair.source, pair.sampler_ref, pair.group)


def _render_pair(pair: Pair, tokenizer) -> list[list[int]]:
    return render(pair.prompt, [pair.chosen, pair.rejected], pair.conversational, tokenizer,
                  [pair.chosen_ends, pair.rejected_ends], pair.source, ["chosen", "rejected"])


def _prompt_end(prompt_ids: list[int], *fulls: list[int]) -> int:
    return min(common_prefix_length(prompt_ids, full) for full in fulls)


def tokenize_pairs(pairs: list[Pair], tokenizer, max_length: int,
                   max_prompt_length: int | None) -> tuple[list[TokenizedPair], TokenizeReport]:
    """Every pair that survives tokenization (`tokenize_each`), and the report."""
    report = TokenizeReport()
    return [t for t in tokenize_each(pairs, tokenizer, max_length, max_prompt_length, report) if t], report


def tokenize_each(pairs: list[Pair], tokenizer, max_length: int, max_prompt_length: int | None,
                  report: TokenizeReport | None = None) -> list[TokenizedPair | None]:
    """`tokenize_pair` of each pair, in order. The pairs of one ranked row (`Pair.group`) share one prompt/
    completion boundary — the shortest any of them gives — so each completion has the same ids in every pair
    it is in: one sequence, computed once (batches/packing.py), and one log-prob per completion. (Tokenized pair
    by pair, a BPE merge across the boundary in one completion would move only its pairs' boundary.)"""
    out: list[TokenizedPair | None] = []
    # a ranked row's pairs are consecutive (data/ranked.py): render one row at a time, not the whole file at once
    for _, run in itertools.groupby(enumerate(pairs), key=lambda ip: ip[1].group or ("pair", ip[0])):
        run = [p for _, p in run]
        rendered = [_render_pair(p, tokenizer) for p in run]
        end = min(_prompt_end(*ids) for ids in rendered) if run[0].group is not None else None
        out += [tokenize_pair(p, tokenizer, max_length, max_prompt_length, report, end, ids)
                for p, ids in zip(run, rendered)]
    return out


@dataclass
class TokenizedCompletion:
    """One labelled completion (KTO), tokenized like a pair's completions."""
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    source: str


def tokenize_completions(examples: list[Completion], tokenizer, max_length: int,
                         max_prompt_length: int | None) -> tuple[list[TokenizedCompletion], TokenizeReport]:
    """Tokenize KTO examples with the same boundary and truncation rules as pairs."""
    report, out = TokenizeReport(), []
    for ex in examples:
        prompt_ids, full = render(ex.prompt, [ex.completion], ex.conversational, tokenizer, [ex.ends], ex.source)
        n = common_prefix_length(prompt_ids, full)
        prompt, completion = prompt_ids[:n], full[n:]
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            prompt = prompt[len(prompt) - max_prompt_length:]
            report.prompts_truncated += 1
        budget = max_length - len(prompt)
        if len(completion) > budget:
            report.completions_truncated += 1
            completion = completion[:max(budget, 0)]
        if not completion:
            report.dropped["prompt_fills_max_length" if budget <= 0 else "empty_completion_tokens"] += 1
            report.dropped_sources.append(ex.source)
            continue
        report.pairs += 1
        report.lengths["prompt"].append(len(prompt))
        report.lengths["chosen" if ex.label else "rejected"].append(len(completion))
        out.append(TokenizedCompletion(prompt, completion, ex.label, ex.source))
    return out, report
