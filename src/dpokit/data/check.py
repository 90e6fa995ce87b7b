"""`dpokit data check`: what a preference file holds, beyond whether it loads.

Invalid rows (all of them, each with file:line:field), exact duplicates, token lengths, truncation, and
the chosen/rejected length bias: DPO is known to learn "longer is better" when chosen answers are
systematically longer, so a file where they are deserves a look before training.

`check_stats` is a pure function of what loading and tokenizing produced; `format_check` turns its dict
into text; `check_file` runs both stages on one file.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter

from dpokit.batches.tokenize import TokenizedPair, TokenizeReport, tokenize_pairs
from dpokit.data.formats import LoadReport, Pair, load_pairs

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

    full = {t.source: t for t in untruncated}
    cuts = []
    for t in tokenized:
        f = full[t.source]
        cut = sum(len(a) - len(b) for a, b in ((f.prompt_ids, t.prompt_ids), (f.chosen_ids, t.chosen_ids),
                                                (f.rejected_ids, t.rejected_ids)))
        if cut:
            cuts.append(cut)

    differences = [len(t.chosen_ids) - len(t.rejected_ids) for t in untruncated]
    n = len(differences)
    return {
        "path": load_report.path,
        "format": load_report.format,
        "pairs": len(pairs),
        "invalid": {"count": sum(load_report.skipped.values()), "by_reason": dict(load_report.skipped),
                    "rows": [str(e) for e in load_report.errors]},
        "chosen_equals_rejected": load_report.skipped.get("chosen_equals_rejected", 0),
        "duplicates": {"count": len(duplicates), "lines": duplicates[:SHOWN]},
        "tokens": {part: _spread([len(getattr(t, f"{part}_ids")) for t in untruncated])
                   for part in ("prompt", "chosen", "rejected")},
        "truncation": {"pairs": len(cuts), "prompts": tok_report.prompts_truncated,
                       "completions": tok_report.completions_truncated, "tokens_cut": sum(cuts),
                       "mean_cut": sum(cuts) / len(cuts) if cuts else 0.0,
                       "dropped": dict(tok_report.dropped), "dropped_sources": list(tok_report.dropped_sources)},
        "length_bias": {"pairs": n,
                        "chosen_longer": sum(d > 0 for d in differences) / n if n else None,
                        "rejected_longer": sum(d < 0 for d in differences) / n if n else None,
                        "equal": sum(d == 0 for d in differences) / n if n else None,
                        "mean_difference": sum(differences) / n if n else None},
    }


def _line(source: str) -> int:
    return int(source.rsplit(":", 1)[1])


def _spread(values: list[int]) -> dict | None:
    if not values:
        return None
    return {"mean": sum(values) / len(values), "median": statistics.median(values), "max": max(values)}


def format_check(stats: dict) -> str:
    """The report of one file, as `dpokit data check` prints it."""
    lines = [f"{stats['path']}: {stats['pairs']} pairs, format {stats['format']}"]
    invalid = stats["invalid"]
    if invalid["count"]:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(invalid["by_reason"].items()))
        lines.append(f"  invalid rows: {invalid['count']} ({reasons})")
        lines += [f"    {row}" for row in invalid["rows"]]
    else:
        lines.append("  invalid rows: none")
    if stats["chosen_equals_rejected"]:
        lines.append(f"  chosen == rejected: {stats['chosen_equals_rejected']} (among the invalid rows)")
    dup = stats["duplicates"]
    if dup["count"]:
        shown = ", ".join(f"line {line} = line {first}" for line, first in dup["lines"])
        lines.append(f"  duplicates: {dup['count']} pairs repeat an earlier one (same prompt, chosen and "
                     f"rejected): {shown}" + (" …" if dup["count"] > len(dup["lines"]) else ""))
    else:
        lines.append("  duplicates: none")
    if not stats["length_bias"]["pairs"]:
        lines.append("  no pair left to measure")
        return "\n".join(lines)

    lines.append(f"  {'tokens (before truncation)':<28}{'mean':>8}{'median':>8}{'max':>8}")
    for part, s in stats["tokens"].items():
        lines.append(f"    {part:<26}{s['mean']:>8.1f}{s['median']:>8.1f}{s['max']:>8}")
    tr = stats["truncation"]
    text = (f"  truncation: {tr['pairs']} pairs truncated ({tr['prompts']} prompts, {tr['completions']} "
            f"completions), {tr['tokens_cut']} tokens cut")
    if tr["pairs"]:
        text += f", mean {tr['mean_cut']:.1f} per truncated pair"
    if tr["dropped"]:
        sources = tr["dropped_sources"]
        text += ("; dropped " + ", ".join(f"{n} ({why})" for why, n in sorted(tr["dropped"].items())) + ": "
                 + ", ".join(sources[:SHOWN]) + (" …" if len(sources) > SHOWN else ""))
    lines.append(text)
    bias = stats["length_bias"]
    lines.append(f"  length bias: chosen longer in {bias['chosen_longer']:.1%} of pairs, rejected longer in "
                 f"{bias['rejected_longer']:.1%}, equal {bias['equal']:.1%}; mean chosen - rejected "
                 f"{bias['mean_difference']:+.1f} tokens")
    return "\n".join(lines)


def format_totals(all_stats: list[dict]) -> str:
    """One line over several files: pairs by format, invalid rows."""
    by_format = Counter()
    for s in all_stats:
        by_format[s["format"]] += s["pairs"]
    formats = ", ".join(f"{fmt} {n}" for fmt, n in sorted(by_format.items()))
    invalid = sum(s["invalid"]["count"] for s in all_stats)
    return (f"{len(all_stats)} files read: {sum(by_format.values())} pairs by format: {formats}; "
            f"{invalid} invalid rows")


def check_file(path: str, tokenizer, max_length: int, max_prompt_length: int | None) -> dict:
    """Load `path` keeping every bad row's error, tokenize as training would and without limits, and
    measure. Raises DataError only for problems with the whole file."""
    pairs, report = load_pairs(path, on_bad_row="skip", allow_empty=True)
    tokenized, tok_report = tokenize_pairs(pairs, tokenizer, max_length, max_prompt_length)
    untruncated, _ = tokenize_pairs(pairs, tokenizer, sys.maxsize, None)
    return check_stats(pairs, report, tokenized, tok_report, untruncated)
