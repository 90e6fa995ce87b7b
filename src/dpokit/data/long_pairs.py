"""Long multi-turn text pairs at a target prompt length (`dpokit bench --prompt-tokens`).

The people who run DPO train on prompts of 1–8k tokens (multi-turn chats, retrieved documents); the shipped
data has prompts of a few hundred. Each long pair here is a real pair whose prompt is preceded by turns of
other dialogues (HH-RLHF's "\\n\\nHuman: … \\n\\nAssistant: …" turns, from ../shared/data when present, else
dpokit's built-in pairs), added until the prompt has about the requested number of tokens of the model's
tokenizer (the last turn added is cut to fit); its final assistant turn is the real chosen / rejected reply.
Rows are written as text pairs (prompt, chosen, rejected strings), not conversational ones, so dpokit and
TRL split prompt and completions identically.
"""

from __future__ import annotations

import re
from pathlib import Path

HH_FILE = "hh_helpful_base_test_1k.jsonl"
_TURN = re.compile(r"(?=\n\nHuman:|\n\nAssistant:)")


def default_source() -> str:
    """HH-RLHF helpful pairs from ../shared/data (next to the working directory or to this source tree), else
    the built-in helpful pairs (short, so their turns are repeated more)."""
    from dpokit.data import builtin_path
    for root in (Path.cwd().parent, Path(__file__).resolve().parents[3].parent):
        path = root / "shared" / "data" / HH_FILE
        if path.is_file():
            return str(path)
    return builtin_path("helpful_train")


def long_pairs(source: str, tokenizer, prompt_tokens: int, n: int) -> list[dict]:
    """n text pairs whose prompts have ~prompt_tokens tokens (never more, up to a token of BPE merging at a
    turn boundary): pair k is the source's k-th pair, preceded by turns of the source's later dialogues."""
    from dpokit.data import load_pairs
    pairs = [p for p in load_pairs(source, on_bad_row="skip")[0] if not p.conversational]
    if len(pairs) < n + 1:
        raise ValueError(f"{source}: {len(pairs)} text pairs, need at least {n + 1} (n pairs and context)")

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    turns = [t for p in pairs[n:] for t in _TURN.split(p.prompt + p.chosen) if t.strip()]
    rows, next_turn = [], 0
    for target in pairs[:n]:
        room = prompt_tokens - count(target.prompt)
        context = []
        for _ in range(len(turns)):  # at most one pass over the pool per pair, so a tiny source cannot loop
            if room <= 0:
                break
            turn = turns[next_turn % len(turns)]
            next_turn += 1
            ids = tokenizer.encode(turn, add_special_tokens=False)
            if len(ids) > room:
                turn = tokenizer.decode(ids[:room])
            context.append(turn)
            room -= min(len(ids), room)
        rows.append({"prompt": "".join(context) + target.prompt, "chosen": target.chosen,
                     "rejected": target.rejected})
    return rows
