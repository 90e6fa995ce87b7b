"""Pairs from scored samples: which two of a prompt's n samples make a pair (best vs worst, or all with a
reward gap), as rows of a pairs file. Used by make-pairs and the demo (tasks/pairs.py, which also documents the
rows' fields) and by online / iterative DPO (loop/online.py): it sits here, below both."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from dpokit.generation.sample import Samples


@dataclass
class PairStats:
    prompts: int = 0
    samples: int = 0
    pairs: int = 0
    ties: int = 0                 # candidate pairs left out because their rewards were within min_gap
    identical: int = 0            # candidate pairs left out because the two texts were the same
    empty: int = 0                # candidate pairs left out because a text was empty (EOS first): loading refuses it
    truncated: int = 0            # samples stopped by max_new_tokens (kept; their rows mark them *_truncated)
    reusable: int | None = None   # pairs whose stored reference log-probs match training's tokenization
    seconds: float = 0.0
    reward_gaps: list[float] = field(default_factory=list)
    rows: int | None = None       # ranked rows written (make-pairs --ranked); None: pair rows
    rows_left_out: int = 0        # ranked: prompts with under 2 distinct non-empty samples, or all rewards equal

    def summary(self) -> str:
        gap = sum(self.reward_gaps) / len(self.reward_gaps) if self.reward_gaps else float("nan")
        if self.rows is not None:
            return (f"{self.rows} ranked rows from {self.prompts} prompts × {self.samples // max(self.prompts, 1)} "
                    f"samples ({self.seconds:.0f} s sampling), implying {self.pairs} pairs with --ranked-pairs all "
                    f"(mean reward gap {gap:.3f}); left out: {self.identical} samples repeating an earlier text, "
                    f"{self.empty} empty samples, {self.rows_left_out} prompts with fewer than 2 samples left or "
                    f"all rewards equal; {self.ties} tied couples never pair; {self.truncated} of {self.samples} "
                    "samples cut at max_new_tokens (marked truncated: trained without EOS)" +
                    ("" if self.reusable is None else f"; reference log-probs stored, {self.reusable} of "
                     f"{self.pairs} pairs tokenize to the sampled ids (reusable by training)"))
        return (f"{self.pairs} pairs from {self.prompts} prompts × {self.samples // max(self.prompts, 1)} samples "
                f"({self.seconds:.0f} s sampling); mean reward gap {gap:.3f}; left out: {self.ties} ties, "
                f"{self.identical} identical texts, {self.empty} with an empty text; {self.truncated} of "
                f"{self.samples} samples cut at max_new_tokens (marked *_truncated: trained without EOS)" +
                ("" if self.reusable is None else f"; reference log-probs stored, {self.reusable} of "
                 f"{self.pairs} pairs tokenize to the sampled ids (reusable by training)"))


def _as_reply(prompt, text: str):
    """A chat prompt's completion as an assistant message, so the pairs file reads back as conversational."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def select_pairs(samples: Samples, rewards: list[float], pairing: str = "best-worst", min_gap: float = 0.0,
                 skip_empty: bool = False) -> tuple[list[tuple[int, int, int]], PairStats]:
    """(prompt index, chosen row, rejected row) from n scored samples per prompt.
    pairing: "best-worst" (one pair per prompt: highest vs lowest reward) or "all" (every two samples
    whose rewards differ by more than min_gap, the higher one chosen). Equal texts are left out too, and with
    skip_empty a sample with no text (EOS first, or only whitespace): loading refuses an empty completion
    (pairs kept as token ids, as online DPO keeps them, need no text)."""
    if pairing not in ("best-worst", "all"):
        raise ValueError(f"pairing must be 'best-worst' or 'all', got {pairing!r}")
    n, stats, selected = samples.n, PairStats(len(samples.prompts), len(samples.texts)), []
    for p in range(len(samples.prompts)):
        group = sorted(range(p * n, (p + 1) * n), key=lambda i: -rewards[i])  # best first, stable
        candidates = [(group[0], group[-1])] if pairing == "best-worst" else itertools.combinations(group, 2)
        for hi, lo in candidates:
            if samples.texts[hi] == samples.texts[lo]:
                stats.identical += 1
            elif skip_empty and not (samples.texts[hi].strip() and samples.texts[lo].strip()):
                stats.empty += 1
            elif rewards[hi] - rewards[lo] <= min_gap:
                stats.ties += 1
            else:
                selected.append((p, hi, lo))
                stats.reward_gaps.append(rewards[hi] - rewards[lo])
    stats.pairs = len(selected)
    return selected, stats


def pair_up(samples: Samples, rewards: list[float], pairing: str = "best-worst",
            min_gap: float = 0.0, digest: str | None = None) -> tuple[list[dict], PairStats]:
    """Rows {prompt, chosen, rejected, chosen_reward, rejected_reward, chosen_truncated, rejected_truncated} of
    the pairs `select_pairs` picks (tasks/pairs.py's docstring for *_truncated); with `digest` (the sampling model's
    weights digest) also its reference log-probs fields (tasks/pairs.py's docstring)."""
    selected, stats = select_pairs(samples, rewards, pairing, min_gap, skip_empty=True)  # rows are texts
    cut = samples.truncated or [False] * len(samples.texts)
    stats.truncated = sum(cut)
    rows = [{"prompt": samples.prompts[p], "chosen": _as_reply(samples.prompts[p], samples.texts[hi]),
             "rejected": _as_reply(samples.prompts[p], samples.texts[lo]),
             "chosen_reward": rewards[hi], "rejected_reward": rewards[lo],
             "chosen_truncated": cut[hi], "rejected_truncated": cut[lo],
             **({} if digest is None else
                {"ref_digest": digest, "ref_prompt_ids": samples.prompt_ids[hi],
                 "chosen_ref_ids": samples.completion_ids[hi], "rejected_ref_ids": samples.completion_ids[lo],
                 "chosen_ref_logp": samples.logps[hi], "rejected_ref_logp": samples.logps[lo]})}
            for p, hi, lo in selected]
    return rows, stats


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
