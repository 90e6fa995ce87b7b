"""`dpokit data check`: what a preference file holds, beyond whether it loads.

Invalid rows (all of them, each with file:line:field), exact duplicates, token lengths, truncation, and
the chosen/rejected length bias: DPO is known to learn "longer is better" when chosen answers are
systematically longer, so a file where they are deserves a look before training. Unpaired (KTO) files
— prompt, completion, label — are checked as KTO training reads them: label balance, completions
repeated with the other label, and the desirable/undesirable length difference in place of pair bias.
Ranked files (k scored completions per prompt, data/ranked.py) are checked as the pairs they imply, plus
completions per row, the pairs each --ranked-pairs option implies, ties, and the tokens an epoch computes with
each completion once against the pairs written out. Demonstration files (`dpokit sft`: prompt/completion or
messages rows) report their row and trained tokens, assistant turns, and rows cut at --max-length.

`check_stats` is a pure function of what loading and tokenizing produced; `format_check` turns its dict
into text; `check_file` runs both stages on one file.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter

from dpokit.batches.demos import tokenize_demos
from dpokit.batches.packing import share  # training's own layout: each prompt and completion once
from dpokit.batches.tokenize import TokenizedCompletion, TokenizedPair, TokenizeReport, tokenize_completions, \
    tokenize_pairs
from dpokit.data.formats import Completion, LoadReport, Pair, detect_format, load_completions, load_pairs
from dpokit.data.demos import DEMO_FORMATS, load_demos
from dpokit.data.readers import read_rows

SHOWN = 5  # duplicate lines and dropped rows named in the text; invalid rows are all listed


def check_stats(pairs: list[Pair], load_report: LoadReport, tokenized: list[TokenizedPair],
                tok_report: TokenizeReport, untruncated: list[TokenizedPair]) -> dict:
    """Statistics of one file. `tokenized` are the pairs as training sees them (truncated, some maybe
    dropped, counted in `tok_report`); `untruncated` the same pairs tokenized without length limits,
    which is what lengths and length bias describe and what truncation is measured against."""
    first_seen, duplicates = {}, []
    for p in pairs:
        key = json.dumps([p.prompt, p.chosen, p.rejected])
        if key in first_seen:
            duplicates.append((_line(p.source), first_seen[key]))
        else:
            first_seen[key] = _line(p.source)

    cuts = []
    for t, f in zip(tokenized, _untruncated_of(tokenized, untruncated)):
        cut = sum(len(a) - len(b) for a, b in ((f.prompt_ids, t.prompt_ids), (f.chosen_ids, t.chosen_ids),
                                                (f.rejected_ids, t.rejected_ids)))
        if cut:
            cuts.append(cut)

    differences = [len(t.chosen_ids) - len(t.rejected_ids) for t in untruncated]
    n = len(differences)
    carrying = [t for t in tokenized if t.sampler_ref is not None]
    return {
        **_common(load_report, "pairs", len(pairs), duplicates, cuts, tok_report),
        "ranked": None if load_report.ranked is None else _ranked(load_report.ranked, tokenized),
        # make-pairs rows carry the sampler's reference log-probs; training uses those whose ids it reproduces
        "sampler_ref": {"pairs": sum(p.sampler_ref is not None for p in pairs),
                        "digests": sorted({p.sampler_ref.digest for p in pairs if p.sampler_ref is not None}),
                        "matching": sum((t.prompt_ids, t.chosen_ids, t.rejected_ids) == (
                            t.sampler_ref.prompt_ids, t.sampler_ref.chosen_ids, t.sampler_ref.rejected_ids)
                            for t in carrying)},
        "chosen_equals_rejected": load_report.skipped.get("chosen_equals_rejected", 0),
        "tokens": {part: _spread([len(getattr(t, f"{part}_ids")) for t in untruncated])
                   for part in ("prompt", "chosen", "rejected")},
        "length_bias": {"pairs": n,
                        "chosen_longer": sum(d > 0 for d in differences) / n if n else None,
                        "rejected_longer": sum(d < 0 for d in differences) / n if n else None,
                        "equal": sum(d == 0 for d in differences) / n if n else None,
                        "mean_difference": sum(differences) / n if n else None},
    }


def _untruncated_of(tokenized: list[TokenizedPair], untruncated: list[TokenizedPair]) -> list[TokenizedPair]:
    """Each training pair's untruncated tokenization. The pairs of a ranked row share their source, so pairs are
    matched in order: `tokenized` is `untruncated` less the dropped pairs, never reordered, and a truncated
    pair's ids are cut from the full ones (the prompt from its start, completions from their end)."""
    def cut_from(t: TokenizedPair, f: TokenizedPair) -> bool:
        return (t.source == f.source and f.prompt_ids[len(f.prompt_ids) - len(t.prompt_ids):] == t.prompt_ids
                and f.chosen_ids[:len(t.chosen_ids)] == t.chosen_ids
                and f.rejected_ids[:len(t.rejected_ids)] == t.rejected_ids)
    out, i = [], 0
    for t in tokenized:
        while not cut_from(t, untruncated[i]):
            i += 1
        out.append(untruncated[i])
        i += 1
    return out


def _ranked(stats, tokenized: list[TokenizedPair]) -> dict:
    """Ranked rows (data/ranked.RankedStats) and the tokens an epoch of `tokenized` computes: the pairs written
    out (two sequences per pair: prompt twice), one prompt per pair (prefix sharing per pair), and each
    distinct prompt and completion of a row once (the pairs of a row share `group`)."""
    rows: dict[str, list[TokenizedPair]] = {}
    for t in tokenized:
        rows.setdefault(t.group, []).append(t)
    units = [u for pairs in rows.values() for u in share(pairs)[0]]
    completion_tokens = sum(len(t.chosen_ids) + len(t.rejected_ids) for t in tokenized)
    prompt_tokens = sum(len(t.prompt_ids) for t in tokenized)
    once_completions = sum(len(c) for u in units for c in u.completions)
    once_prompts = sum(len(u.prompt) for u in units)
    return {"format": stats.format, "pairing": stats.pairing, "rows": stats.rows, "k": stats.k_text(),
            "completions_per_row": dict(sorted(stats.completions.items())), "implied": dict(stats.implied),
            "ties": stats.ties,
            "tokens": {"written_out": 2 * prompt_tokens + completion_tokens,
                       "prompt_per_pair": prompt_tokens + completion_tokens,
                       "once": once_prompts + once_completions,
                       "completions_written_out": completion_tokens, "completions_once": once_completions}}


def check_unpaired_stats(examples: list[Completion], load_report: LoadReport, tokenized: list[TokenizedCompletion],
                         tok_report: TokenizeReport, untruncated: list[TokenizedCompletion]) -> dict:
    """Statistics of one unpaired (KTO) file, as `check_stats` for pairs. A completion repeated with the
    same label is a duplicate; with the other label, a contradiction (KTO would push it both ways)."""
    first_seen, duplicates, contradictions = {}, [], []  # key → {label: first line with that label}
    for ex in examples:
        key, line = json.dumps([ex.prompt, ex.completion]), _line(ex.source)
        seen = first_seen.setdefault(key, {})
        if ex.label in seen:
            duplicates.append((line, seen[ex.label]))
        else:
            if seen:  # a label not seen yet for this completion: it contradicts the first occurrence
                contradictions.append((line, min(seen.values())))
            seen[ex.label] = line
    full = {(t.source, t.label): t for t in untruncated}  # a split pair's two completions share a source
    cuts = [c for t in tokenized if (c := sum(len(a) - len(b) for a, b in (
        (full[t.source, t.label].prompt_ids, t.prompt_ids),
        (full[t.source, t.label].completion_ids, t.completion_ids))))]

    def mean_length(label: bool) -> float | None:
        lengths = [len(t.completion_ids) for t in untruncated if t.label == label]
        return sum(lengths) / len(lengths) if lengths else None
    return {
        **_common(load_report, "completions", len(examples), duplicates, cuts, tok_report),
        "labels": {"desirable": sum(ex.label for ex in examples),
                   "undesirable": sum(not ex.label for ex in examples)},
        "contradictions": {"count": len(contradictions), "lines": contradictions[:SHOWN]},
        "tokens": {part: _spread([len(getattr(t, f"{part}_ids")) for t in untruncated])
                   for part in ("prompt", "completion")},
        "label_lengths": {"desirable": mean_length(True), "undesirable": mean_length(False)},
        "measured": len(untruncated),
    }


def _common(load_report: LoadReport, unit: str, n: int, duplicates: list, cuts: list[int],
            tok_report: TokenizeReport) -> dict:
    return {
        "path": load_report.path, "format": load_report.format, "unit": unit, unit: n,
        "invalid": {"count": sum(load_report.skipped.values()), "by_reason": dict(load_report.skipped),
                    "rows": [str(e) for e in load_report.errors]},
        "duplicates": {"count": len(duplicates), "lines": duplicates[:SHOWN]},
        "truncation": {"truncated": len(cuts), "prompts": tok_report.prompts_truncated,
                       "completions": tok_report.completions_truncated, "tokens_cut": sum(cuts),
                       "mean_cut": sum(cuts) / len(cuts) if cuts else 0.0,
                       "dropped": dict(tok_report.dropped), "dropped_sources": list(tok_report.dropped_sources)},
    }


def _line(source: str) -> int:
    return int(source.rsplit(":", 1)[1])


def _spread(values: list[int]) -> dict | None:
    if not values:
        return None
    return {"mean": sum(values) / len(values), "median": statistics.median(values), "max": max(values)}


def format_check(stats: dict) -> str:
    """The report of one file, as `dpokit data check` prints it."""
    if stats["unit"] == "demonstrations":
        return format_demo_check(stats)
    unit, paired = stats["unit"], stats["unit"] == "pairs"
    one = unit[:-1]
    lines = [f"{stats['path']}: {stats[unit]} {unit}, format {stats['format']}"]
    invalid = stats["invalid"]
    if invalid["count"]:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(invalid["by_reason"].items()))
        lines.append(f"  invalid rows: {invalid['count']} ({reasons})")
        lines += [f"    {row}" for row in invalid["rows"]]
    else:
        lines.append("  invalid rows: none")
    if paired and stats.get("ranked"):
        lines += _ranked_lines(stats["ranked"])
    if paired and stats["chosen_equals_rejected"]:
        lines.append(f"  chosen == rejected: {stats['chosen_equals_rejected']} (among the invalid rows)")
    if not paired:
        labels = stats["labels"]
        share = f" ({labels['desirable'] / stats[unit]:.1%} desirable)" if stats[unit] else ""
        lines.append(f"  labels: {labels['desirable']} desirable, {labels['undesirable']} undesirable{share}")
    same = "same prompt, chosen and rejected" if paired else "same prompt, completion and label"
    lines.append(_repeats("duplicates", stats["duplicates"], f"{unit} repeat an earlier one ({same})"))
    if not paired:
        lines.append(_repeats("contradictory labels", stats["contradictions"], f"{unit} repeat an earlier one "
                              "with the other label (KTO pushes them both ways)"))
    if not (stats["length_bias"]["pairs"] if paired else stats["measured"]):
        lines.append(f"  no {one} left to measure")
        return "\n".join(lines)

    lines.append(f"  {'tokens (before truncation)':<28}{'mean':>8}{'median':>8}{'max':>8}")
    for part, s in stats["tokens"].items():
        lines.append(f"    {part:<26}{s['mean']:>8.1f}{s['median']:>8.1f}{s['max']:>8}")
    tr = stats["truncation"]
    text = (f"  truncation: {tr['truncated']} {unit} truncated ({tr['prompts']} prompts, {tr['completions']} "
            f"completions), {tr['tokens_cut']} tokens cut")
    if tr["truncated"]:
        text += f", mean {tr['mean_cut']:.1f} per truncated {one}"
    if tr["dropped"]:
        sources = tr["dropped_sources"]
        text += ("; dropped " + ", ".join(f"{n} ({why})" for why, n in sorted(tr["dropped"].items())) + ": "
                 + ", ".join(sources[:SHOWN]) + (" …" if len(sources) > SHOWN else ""))
    lines.append(text)
    if paired and stats["sampler_ref"]["pairs"]:
        ref = stats["sampler_ref"]
        digests = ", ".join(d[:12] for d in ref["digests"])
        lines.append(f"  sampler reference log-probs: {ref['pairs']} of {stats[unit]} pairs (model digest {digests}); "
                     f"{ref['matching']} tokenize to the stored ids at these limits, so training with that "
                     "reference uses their stored sums")
    if paired:
        bias = stats["length_bias"]
        lines.append(f"  length bias: chosen longer in {bias['chosen_longer']:.1%} of pairs, rejected longer in "
                     f"{bias['rejected_longer']:.1%}, equal {bias['equal']:.1%}; mean chosen - rejected "
                     f"{bias['mean_difference']:+.1f} tokens")
    else:
        mean = {k: "-" if v is None else f"{v:.1f}" for k, v in stats["label_lengths"].items()}
        lines.append(f"  length bias: desirable completions {mean['desirable']} tokens on average, undesirable "
                     f"{mean['undesirable']}")
    return "\n".join(lines)


def _ranked_lines(ranked: dict) -> list[str]:
    from dpokit.data.ranked import PAIRINGS
    implied = ", ".join(f"{p} {ranked['implied'].get(p, 0)}" for p in PAIRINGS)
    lines = [f"  ranked rows: {ranked['rows']}, {ranked['k']} ("
             + ", ".join(f"{n} with k={k}" for k, n in ranked["completions_per_row"].items()) + ")",
             f"  pairs implied: {implied} (loaded: {ranked['pairing']}); ties skipped: {ranked['ties']} (two "
             "completions with equal scores never pair)"]
    tok = ranked["tokens"]
    if tok["once"]:
        lines.append(f"  tokens per epoch of these pairs: {tok['written_out']:,} written out as pairs, "
                     f"{tok['prompt_per_pair']:,} with one prompt per pair, {tok['once']:,} with each prompt and "
                     f"completion once ({tok['written_out'] / tok['once']:.2f}× / "
                     f"{tok['prompt_per_pair'] / tok['once']:.2f}× fewer); completion tokens "
                     f"{tok['completions_written_out']:,} → {tok['completions_once']:,}")
    return lines


def _repeats(name: str, found: dict, what: str) -> str:
    if not found["count"]:
        return f"  {name}: none"
    shown = ", ".join(f"line {line} = line {first}" for line, first in found["lines"])
    return f"  {name}: {found['count']} {what}: {shown}" + (" …" if found["count"] > len(found["lines"]) else "")


def format_totals(all_stats: list[dict]) -> str:
    """One line over several files: pairs (and unpaired completions) by format, invalid rows."""
    parts = []
    for unit in ("pairs", "completions", "demonstrations"):
        by_format = Counter()
        for s in all_stats:
            if s["unit"] == unit:
                by_format[s["format"].split(" (")[0]] += s[unit]  # "ranked (4 rows, …)": ranked
        if by_format:
            formats = ", ".join(f"{fmt} {n}" for fmt, n in sorted(by_format.items()))
            parts.append(f"{sum(by_format.values())} {unit} by format: {formats}")
    invalid = sum(s["invalid"]["count"] for s in all_stats)
    return f"{len(all_stats)} files read: " + "; ".join(parts) + f"; {invalid} invalid rows"


def check_file(path: str, tokenizer, max_length: int, max_prompt_length: int | None, ranked_pairs: str = "all",
               ultrafeedback_score: str = "fine-grained_score") -> dict:
    """Load `path` keeping every bad row's error, tokenize as training would and without limits, and
    measure. Unpaired files (their first valid row has prompt, completion, label) are loaded as KTO
    training loads them; ranked files as the pairs `ranked_pairs` picks. Raises DataError only for problems
    with the whole file."""
    # The format is the first valid row's, as the loaders decide it (a broken first row imposes nothing);
    # load_completions accepts every format but demonstrations, so its verdict is that row's.
    examples, report = load_completions(path, on_bad_row="skip", allow_empty=True)
    unpaired = report.format == "unpaired"
    if report.format == "unknown":  # no valid row: the first readable one says which rows' errors to list
        first = next((row for _, row in read_rows(path) if isinstance(row, dict)), None)
        if first is not None and detect_format(first) in DEMO_FORMATS:  # `dpokit sft`'s rows
            return check_demos(path, tokenizer, max_length)
        unpaired = first is not None and detect_format(first) == "unpaired"
    if unpaired:
        report.format = "unpaired"
        tokenized, tok_report = tokenize_completions(examples, tokenizer, max_length, max_prompt_length)
        untruncated, _ = tokenize_completions(examples, tokenizer, sys.maxsize, None)
        return check_unpaired_stats(examples, report, tokenized, tok_report, untruncated)
    pairs, report = load_pairs(path, on_bad_row="skip", allow_empty=True, ranked_pairs=ranked_pairs,
                               ultrafeedback_score=ultrafeedback_score)
    tokenized, tok_report = tokenize_pairs(pairs, tokenizer, max_length, max_prompt_length)
    untruncated, _ = tokenize_pairs(pairs, tokenizer, sys.maxsize, None)
    return check_stats(pairs, report, tokenized, tok_report, untruncated)


def check_demos(path: str, tokenizer, max_length: int) -> dict:
    """A demonstrations file (`dpokit sft`): invalid rows, duplicates, tokens (whole rows and trained ones, before
    truncation), rows cut at max_length (keeping their start) and dropped with no trained token left."""
    demos, report = load_demos(path, on_bad_row="skip", allow_empty=True)
    tokenized, tok_report = tokenize_demos(demos, tokenizer, max_length)
    untruncated, _ = tokenize_demos(demos, tokenizer, sys.maxsize)
    first_seen, duplicates = {}, []
    for d in demos:
        key = json.dumps([d.prompt, d.completion, d.messages])
        first_seen.setdefault(key, _line(d.source))
        if first_seen[key] != _line(d.source):
            duplicates.append((_line(d.source), first_seen[key]))
    return {"path": path, "format": report.format, "unit": "demonstrations", "demonstrations": len(demos),
            "invalid": {"count": sum(report.skipped.values()), "by_reason": dict(report.skipped),
                        "rows": [str(e) for e in report.errors]},
            "duplicates": {"count": len(duplicates), "lines": duplicates[:SHOWN]},
            "tokens": {"row": _spread([len(t.ids) for t in untruncated]),
                       "trained": _spread([t.trained for t in untruncated])},
            "turns": _spread([len(t.spans) for t in untruncated]),
            "truncation": {"truncated": tok_report.truncated, "kept": len(tokenized),
                           "trained_tokens": sum(t.trained for t in tokenized),
                           "dropped": dict(tok_report.dropped), "dropped_sources": tok_report.dropped_sources}}


def format_demo_check(stats: dict) -> str:
    lines = [f"{stats['path']}: {stats['demonstrations']} demonstrations, format {stats['format']}"]
    invalid = stats["invalid"]
    lines.append(f"  invalid rows: {invalid['count'] or 'none'}" + (" (" + ", ".join(
        f"{n} {why}" for why, n in sorted(invalid["by_reason"].items())) + ")" if invalid["count"] else ""))
    lines += [f"    {row}" for row in invalid["rows"]]
    lines.append(_repeats("duplicates", stats["duplicates"], "demonstrations repeat an earlier one"))
    if stats["tokens"]["row"] is None:
        lines.append("  no demonstration left to measure")
        return "\n".join(lines)
    lines.append(f"  {'tokens (before truncation)':<28}{'mean':>8}{'median':>8}{'max':>8}")
    for part, s in list(stats["tokens"].items()) + [("trained turns", stats["turns"])]:
        lines.append(f"    {part:<26}{s['mean']:>8.1f}{s['median']:>8.1f}{s['max']:>8}")
    tr = stats["truncation"]
    text = (f"  truncation: {tr['truncated']} demonstrations cut at --max-length (their start kept); "
            f"{tr['kept']} kept, {tr['trained_tokens']:,} trained tokens")
    if tr["dropped"]:
        text += ("; dropped " + ", ".join(f"{n} ({why})" for why, n in sorted(tr["dropped"].items())) + ": "
                 + ", ".join(tr["dropped_sources"][:SHOWN]) + (" …" if len(tr["dropped_sources"]) > SHOWN else ""))
    return "\n".join(lines + [text])
