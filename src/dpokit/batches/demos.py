"""Demonstrations → token ids with the spans trained on, and → packed batches (`dpokit sft`).

A prompt-completion demonstration is tokenized as pairs are (tokenize.render: the prompt, then prompt+completion
with EOS added to a plain-text completion, the completion starting where the two diverge), which is also what
TRL's SFTTrainer does. A conversation (`messages`) is trained on every assistant turn. Chat templates rarely mark
assistant text (`{% generation %}`, which HF's return_assistant_tokens_mask needs), so each assistant turn i is
found by rendering prefixes: it begins where chat(m[:i], add_generation_prompt=True) ends and ends where
chat(m[:i+1]) ends, both located inside the tokens of chat(m) as common prefixes (a token merged across a
boundary belongs to what follows it, as for prompt-completion rows). The turn's closing tag (e.g. <|im_end|>)
is part of it, so the model learns to stop.

Rows longer than --max-length keep their first max_length tokens (TRL's truncation_mode "keep_start"); a row left
with no trained token is dropped and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from dpokit.batches.packing import pack_lengths
from dpokit.batches.tokenize import _fail, common_prefix_length, render
from dpokit.data.demos import Demo


@dataclass
class TokenizedDemo:
    ids: list[int]
    spans: list[tuple[int, int]]  # [start, end) of the trained tokens, start >= 1 (token 0 has nothing before it)
    source: str

    @property
    def trained(self) -> int:
        """Tokens the loss is taken over."""
        return sum(e - s for s, e in self.spans)


@dataclass
class DemoReport:
    demos: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    dropped_sources: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.demos} demonstrations tokenized; {self.truncated} cut at --max-length"
        if self.demos:
            text += (f"; tokens mean/max {sum(self.lengths) / self.demos:.0f}/{max(self.lengths)}, trained on "
                     f"{sum(self.trained):,} of {sum(self.lengths):,}")
        if self.dropped:
            shown = ", ".join(self.dropped_sources[:5]) + (" …" if len(self.dropped_sources) > 5 else "")
            text += "; dropped " + ", ".join(f"{n} ({why})" for why, n in self.dropped.items()) + f": {shown}"
        return text


def assistant_spans(messages: list[dict], tokenizer, source: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids of the whole conversation, [start, end) of each assistant turn's tokens): see the module
    docstring. A template that renders a conversation's beginning other than as the beginning of the whole (one
    that drops earlier turns' reasoning, say) cannot be split this way: refused naming the turn."""
    def chat(msgs, gen: bool, name: str) -> str:
        from jinja2 import TemplateError
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except TemplateError as e:
            _fail(source, name, f"the chat template refuses this conversation: {e}", "template_error")

    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    whole = chat(messages, False, "messages")
    texts = []
    for i in turns:
        before, through = chat(messages[:i], True, f"messages[{i}]"), chat(messages[:i + 1], False, f"messages[{i}]")
        if not (whole.startswith(through) and through.startswith(before)):
            _fail(source, f"messages[{i}]", "the chat template does not render the conversation up to this assistant "
                  "turn as the beginning of the whole conversation, so the turn's tokens cannot be located; give "
                  "prompt/completion rows instead (the completion alone is trained on)", "template_not_prefix")
        texts += [before, through]
    ids = tokenizer([whole] + texts, add_special_tokens=False)["input_ids"]  # the template wrote the specials
    full = ids[0]
    bounds = [common_prefix_length(x, full) for x in ids[1:]]
    return full, [(bounds[k], bounds[k + 1]) for k in range(0, len(bounds), 2)]


def tokenize_demo(demo: Demo, tokenizer, max_length: int, report: DemoReport) -> TokenizedDemo | None:
    """One demonstration's ids and trained spans, cut at max_length; None (counted in `report`) when no trained
    token is left."""
    if demo.conversational and not tokenizer.chat_template:
        _fail(demo.source, "messages" if demo.messages is not None else "prompt", "conversational rows need a "
              "tokenizer with a chat template, and --model's has none", "no_chat_template")
    if demo.messages is not None:
        ids, spans = assistant_spans(demo.messages, tokenizer, demo.source)
    else:
        prompt_ids, ids = render(demo.prompt, [demo.completion], demo.conversational, tokenizer, [demo.ends],
                                 demo.source)
        spans = [(common_prefix_length(prompt_ids, ids), len(ids))]
    if len(ids) > max_length:
        report.truncated += 1
        ids = ids[:max_length]
    kept = [(max(s, 1), min(e, len(ids))) for s, e in spans]
    kept = [(s, e) for s, e in kept if e > s]
    if not kept:
        report.dropped["prompt_fills_max_length" if any(s >= max_length for s, _ in spans)
                       else "no_trained_tokens"] += 1
        report.dropped_sources.append(demo.source)
        return None
    out = TokenizedDemo(ids, kept, demo.source)
    report.demos += 1
    report.lengths.append(len(ids))
    report.trained.append(out.trained)
    return out


def tokenize_demos(demos: list[Demo], tokenizer, max_length: int) -> tuple[list[TokenizedDemo], DemoReport]:
    report = DemoReport()
    out = [tokenize_demo(d, tokenizer, max_length, report) for d in demos]
    return [t for t in out if t is not None], report


def collate_demos(demos: list[TokenizedDemo], pad_id: int, capacity: int = 0) -> dict[str, torch.Tensor]:
    """Demonstrations packed first-fit decreasing into rows of at most `capacity` tokens (packing.pack_lengths;
    0: one per row, padded to the longest), each its own causal segment with positions from 0, so no token sees
    another demonstration's (logprobs/attention.py). The score index lists every trained token t of demonstration
    i (its spans) as predicted from position t − 1 of the same demonstration, under sequence i: the layout
    `logprobs.sequence.batch_token_logps` reads, as batches/packing.py's for pairs.

    Returns input_ids, position_ids [R, T]; segments [S, 5]; score_row, score_src, score_tgt, score_seq,
    score_pos [K]; n_seqs = len(demos)."""
    lengths = [len(d.ids) for d in demos]
    layout = pack_lengths(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in layout)
    input_ids = torch.full((len(layout), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(layout), width), dtype=torch.long)
    segments, index = [], []
    for r, row in enumerate(layout):
        o = 0
        for i in row:
            d, n = demos[i], lengths[i]
            input_ids[r, o:o + n] = torch.tensor(d.ids)
            position_ids[r, o:o + n] = torch.arange(n)
            segments.append((r, o, o, o, o + n))  # no prefix keys; queries o … o+n−1 see each other causally
            trained = [t for s, e in d.spans for t in range(s, e)]
            index += [(r, o + t - 1, o + t, i, k) for k, t in enumerate(trained)]
            o += n
    score = torch.tensor(index, dtype=torch.long).reshape(-1, 5).T
    return {"input_ids": input_ids, "position_ids": position_ids,
            "segments": torch.tensor(segments, dtype=torch.long).reshape(-1, 5),
            "score_row": score[0], "score_src": score[1], "score_tgt": score[2], "score_seq": score[3],
            "score_pos": score[4], "n_seqs": torch.tensor(len(demos))}
