"""Preference pairs from a reward function: sample n completions per prompt from a model, score them,
pair them. This is how the DPO paper built its IMDb pairs (samples from the SFT model, labelled by a
sentiment classifier), and how online / iterative DPO regenerates its data from the current policy.

A sample stopped by max_new_tokens did not end: its row says so (`chosen_truncated` / `rejected_truncated`:
true), and training then adds no EOS (or chat end of turn) after it; one that ended by itself gets it.

Each row also stores what the sampling model computed of it (`make_pairs`: the sampler is the reference):
the token ids it scored (`ref_prompt_ids`, `chosen_ref_ids`, `rejected_ref_ids`: each completion's sampled
ids, ending with EOS when it ended), their summed log-probs under it (`chosen_ref_logp`,
`rejected_ref_logp`: from the raw logits, so whatever the temperature or top-p) and its weights digest
(`ref_digest`). Training reuses the sums for pairs it tokenizes to the same ids with that reference
(logprobs/sampler_ref.py) instead of running the reference on them.

With `ranked` (make-pairs --ranked) each prompt gets one ranked row instead (data/ranked.py): its distinct
non-empty samples, their rewards as `scores`, `truncated` flags and, per completion, the same reference data
(`ref_prompt_ids`, `completions_ref_ids`, `completions_ref_logp`, `ref_digest`); training pairs them
(--ranked-pairs) and computes each completion once."""

from __future__ import annotations

from dpokit.config import ConfigError
from dpokit.generation import Samples, sample
# pair selection sits under generation (online DPO uses it too); re-exported here for make-pairs
from dpokit.generation.pairs import PairStats, _as_reply, pair_up, select_pairs, write_jsonl  # noqa: F401


def rank_up(samples: Samples, rewards: list[float], digest: str | None = None) -> tuple[list[dict], PairStats]:
    """One ranked row per prompt {prompt, completions, scores, truncated} (data/ranked.py), with `digest` also
    the sampler's reference data per completion (module docstring). A sample with no text (EOS first) is left
    out, as is one repeating an earlier sample's text (keeping the first: a row's completions are distinct);
    a prompt left with under 2 samples, or with all rewards equal, gets no row. All counted in the stats,
    whose `pairs` are the pairs training's default --ranked-pairs all takes."""
    from dpokit.data.ranked import rank_pairs, ties
    n, stats, rows = samples.n, PairStats(len(samples.prompts), len(samples.texts)), []
    cut = samples.truncated or [False] * len(samples.texts)
    stats.truncated = sum(cut)
    for p, prompt in enumerate(samples.prompts):
        kept, seen = [], set()
        for i in range(p * n, (p + 1) * n):
            text = samples.texts[i]
            if not text.strip():
                stats.empty += 1
            elif text in seen:
                stats.identical += 1
            else:
                seen.add(text)
                kept.append(i)
        scores = [rewards[i] for i in kept]
        if len(kept) < 2 or len(set(scores)) == 1:
            stats.rows_left_out += 1
            continue
        rows.append({"prompt": prompt, "completions": [_as_reply(prompt, samples.texts[i]) for i in kept],
                     "scores": scores, "truncated": [cut[i] for i in kept],
                     **({} if digest is None else
                        {"ref_digest": digest, "ref_prompt_ids": samples.prompt_ids[kept[0]],
                         "completions_ref_ids": [samples.completion_ids[i] for i in kept],
                         "completions_ref_logp": [samples.logps[i] for i in kept]})})
        pairs = rank_pairs(scores, "all")
        stats.pairs += len(pairs)
        stats.ties += ties(scores)
        stats.reward_gaps += [scores[i] - scores[j] for i, j in pairs]
    stats.rows = len(rows)
    return rows, stats


def count_reusable(rows: list[dict], tokenizer) -> int:
    """Pairs (of pair rows, or those ranked rows imply with --ranked-pairs all) whose stored ids are what
    training's tokenization gives them (before any length limits): the pairs whose stored sums training can
    use. A chat template that writes tokens after the end of turn (ChatML's "\\n") makes every ended chat reply
    differ; BPE merges across the prompt boundary a few more."""
    from dpokit.batches.tokenize import tokenize_each
    n, pairs = 0, list(_stored_pairs(rows))
    for pair, t in zip(pairs, tokenize_each(pairs, tokenizer, 1 << 30, None)):
        s = pair.sampler_ref
        n += t is not None and (t.prompt_ids, t.chosen_ids, t.rejected_ids) == (s.prompt_ids, s.chosen_ids,
                                                                                 s.rejected_ids)
    return n


def _stored_pairs(rows: list[dict]):
    """The Pairs, with their SamplerRef, that training reads from make-pairs' rows."""
    from dpokit.data.formats import Pair, SamplerRef
    from dpokit.data.ranked import expand, parse_ranked
    for line, r in enumerate(rows, 1):  # each row its own source, hence its own group (one prompt boundary)
        if "completions" in r:
            yield from expand(parse_ranked(r, "ranked", "make-pairs", line), f"make-pairs:{line}")
        else:
            yield Pair(r["prompt"], r["chosen"], r["rejected"], "make-pairs", isinstance(r["prompt"], list),
                       not r["chosen_truncated"], not r["rejected_truncated"],
                       SamplerRef(r["ref_digest"], r["ref_prompt_ids"], r["chosen_ref_ids"], r["rejected_ref_ids"],
                                  r["chosen_ref_logp"], r["rejected_ref_logp"]))


def make_pairs(model, tokenizer, prompts: list, reward_fn, n: int = 4, pairing: str = "best-worst",
               min_gap: float = 0.0, max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0,
               seed: int = 0, batch_size: int = 128, digest: str | None = None,
               ranked: bool = False) -> tuple[list[dict], PairStats]:
    """Sample n completions per prompt from `model`, score with `reward_fn`, pair (see `pair_up`), or with
    `ranked` write one ranked row per prompt (`rank_up`; pairing and min_gap then unused); the rows carry the
    sampler's reference log-probs (module docstring). `digest`: the model's `weights_digest`, when the caller
    already has it (hashing the weights costs ~1 s per 135M parameters)."""
    from dpokit.logprobs.refcache import weights_digest
    if n < 2:
        raise ConfigError(f"making pairs needs at least 2 samples per prompt, got {n}")
    s = sample(model, tokenizer, prompts, n, max_new_tokens, temperature, top_p, batch_size, seed)
    rewards = reward_fn([s.prompt_of(i) for i in range(len(s.texts))], s.texts)
    return pairs_from_samples(s, rewards, tokenizer, pairing, min_gap, digest or weights_digest(model), ranked)


def pairs_from_samples(s: Samples, rewards: list[float], tokenizer, pairing: str = "best-worst", min_gap: float = 0.0,
                       digest: str | None = None, ranked: bool = False) -> tuple[list[dict], PairStats]:
    """`make_pairs` on samples already drawn and scored (the demo keeps its held-out ones, tasks/demo.py)."""
    rows, stats = rank_up(s, rewards, digest) if ranked else pair_up(s, rewards, pairing, min_gap, digest=digest)
    stats.seconds, stats.reusable = s.seconds, count_reusable(rows, tokenizer)
    return rows, stats
