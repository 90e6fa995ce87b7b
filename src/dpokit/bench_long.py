"""`dpokit bench --prompt-tokens 256,1024,2048,4096`: long rows, measured.

At each prompt length, long multi-turn pairs are built (data/long_pairs.py) and every tool trains on them in
its own process, one pair per step by default: dpokit with dense attention (a [rows, 1, T, T] mask) and with
segment-wise attention (no T×T tensor), and TRL's DPOTrainer as far as it fits. Printed per length and tool:
s/pair of the steps, dpokit's reference pass (computed before training; TRL runs its reference inside every
step), s/pair with it, its share of the floor (useful FLOPs at the measured matmul peak, as bench.py
counts them), peak RSS and the first-step loss; then per tool a least-squares fit of peak RSS
against the unique tokens of a pair, a + b·T + c·T² — the T² coefficient is the attention mask's share.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

DEFAULT_TOOLS = "dpokit-dense,dpokit-segments,trl"


def fit_memory(points: list[tuple[float, float]]) -> tuple[float, float, float | None]:
    """(a, b, c) of peak GB ≈ a + b·T + c·T² (T in thousands of tokens) by least squares; c is None (and the
    fit linear) with fewer than 3 distinct lengths."""
    import numpy as np
    x = np.array([p[0] for p in points]) / 1000
    y = np.array([p[1] for p in points])
    degree = 2 if len(set(x.tolist())) >= 3 else 1
    coef = np.linalg.lstsq(np.vander(x, degree + 1, increasing=True), y, rcond=None)[0]
    return float(coef[0]), float(coef[1]), float(coef[2]) if degree == 2 else None


def available_gb() -> float:
    """The machine's free memory as the pre-load check sees it (estimate.available_bytes: MemAvailable, or a
    container's cgroup limit where lower), in GiB; inf where unknown."""
    from dpokit.estimate import available_bytes
    free = available_bytes("cpu")
    return free / 2**30 if free else float("inf")


def trl_skip(prompt: int, tokens: float, measured: list[tuple[float, float]], limit: int) -> str:
    """Why TRL is not run at this length ('' to run it): over --trl-max-tokens, or its peak RSS extrapolated
    from the shorter lengths (a + c·T² through two points: the mask and scores grow with T²) exceeds what is
    available — a kill by the OOM killer could take other processes with it."""
    if prompt > limit:
        return f"not run: prompt over --trl-max-tokens {limit}"
    if len(measured) >= 2:
        (x0, y0), (x1, y1) = measured[-2], measured[-1]
        c = (y1 - y0) / (x1**2 - x0**2) if x1 != x0 else 0.0
        predicted = y1 + c * (tokens**2 - x1**2)
        if predicted > 0.9 * available_gb():
            return f"not run: predicted {predicted:.1f} GB peak RSS > 90% of {available_gb():.1f} GB available"
    return ""


def build_pairs(source: str, tokenizer, prompt: int, n: int, path: Path) -> dict:
    """Write n long pairs to `path`; their prompt / unique token means and the max_length that cuts none."""
    from dpokit.batches import tokenize_pair
    from dpokit.data import Pair
    from dpokit.data.long_pairs import long_pairs
    rows = long_pairs(source, tokenizer, prompt, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tok = [tokenize_pair(Pair(r["prompt"], r["chosen"], r["rejected"], "long"), tokenizer, 10**9, None) for r in rows]
    return {"path": str(path), "prompt": statistics.mean(len(t.prompt_ids) for t in tok),
            "tokens": statistics.mean(len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in tok),
            "max_length": max(len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) for t in tok)}


def run_long(args) -> None:
    from dpokit.bench_tools import _count_params, check_tools, measure_peak, spawn
    from dpokit.data.long_pairs import default_source
    from dpokit.models import load_tokenizer
    if args.max_length is not None:
        raise SystemExit("bench: --max-length does not apply with --prompt-tokens (each length's is set so that "
                         "no pair is cut)")
    try:
        lengths = [int(x) for x in args.prompt_tokens.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"bench: --prompt-tokens {args.prompt_tokens!r}: a comma list of integers") from None
    if not lengths or min(lengths) < 16:
        raise SystemExit(f"bench: --prompt-tokens {args.prompt_tokens!r}: lengths must be ≥ 16")
    batch = args.batch_size or 1
    n = args.steps * batch
    tools = check_tools([t for t in (args.tools or DEFAULT_TOOLS).split(",") if t])
    source = args.data or default_source()
    tokenizer = load_tokenizer(args.model)
    peak, machine = measure_peak(args)
    flops_per_token = 8 * _count_params(args.model)  # useful FLOPs as bench.py counts them (6N policy + 2N reference)
    out = Path(tempfile.mkdtemp(prefix="dpokit-bench-long-"))
    print(f"long rows from {source}: {n} pairs per length, {batch} per step, {args.steps} steps; {machine}",
          flush=True)
    rows: list[dict] = []
    for prompt in lengths:
        data = build_pairs(source, tokenizer, prompt, n, out / str(prompt) / "pairs.jsonl")
        print(f"prompt {prompt}: {data['prompt']:.0f} prompt tokens, {data['tokens']:.0f} unique tokens/pair",
              flush=True)
        for tool in tools:
            row = {"prompt": prompt, "tokens": data["tokens"], "tool": tool, "result": None, "note": ""}
            rows.append(row)
            if tool == "trl":
                trl_points = [(r["tokens"], r["result"]["peak_rss_gb"]) for r in rows if r["tool"] == "trl"
                              and r["result"]]
                row["note"] = trl_skip(prompt, data["tokens"], trl_points, args.trl_max_tokens)
                if row["note"]:
                    print(f"  trl: {row['note']}", flush=True)
                    continue
            row["result"], row["note"] = spawn(tool, data["path"], args, batch, data["max_length"],
                                               out / str(prompt) / tool)
            summarize(row, batch, n)
            if row["result"]:  # the useful FLOPs of a pair at the measured matmul peak, over the time taken
                row["of_floor"] = flops_per_token * data["tokens"] / (peak * 1e9) / row["s_pair_ref"]
            print(f"  {tool}: " + (f"{row['s_pair']:.3g} s/pair ({ref_text(row)}), "
                                   f"{row['result']['peak_rss_gb']:.2f} GB peak RSS" if row["result"]
                                   else row["note"]), flush=True)
    report(rows, tools)
    print("\nreproduce: dpokit bench --prompt-tokens " + ",".join(map(str, lengths)) + f" --steps {args.steps} "
          f"--tools {','.join(tools)} --model {args.model} --dtype {args.dtype}"
          + (f" --batch-size {args.batch_size}" if args.batch_size else "")
          + (f" --data {args.data}" if args.data else "") + f" --trl-max-tokens {args.trl_max_tokens}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "machine": machine}, indent=1))


def summarize(row: dict, batch: int, n: int) -> None:
    """s/pair of the steps (median; the first, warm-up, left out when there are 3 or more), the reference pass
    per pair (dpokit; TRL's is inside its steps)."""
    r = row["result"]
    if not r:
        return
    times = r["step_times"][1:] if len(r["step_times"]) > 2 else r["step_times"]  # as bench.py: warm-up out
    row["s_pair"] = statistics.median(times) / batch
    row["ref_pair"] = None if r["ref_s"] is None else r["ref_s"] / n  # None: TRL's, inside its steps
    row["s_pair_ref"] = row["s_pair"] + (row["ref_pair"] or 0.0)


def ref_text(row: dict) -> str:
    return "reference inside the steps" if row["ref_pair"] is None else f"+ reference {row['ref_pair']:.3g} s/pair"


def report(rows: list[dict], tools: list[str]) -> None:
    print(f"\n{'prompt':>7}{'tok/pair':>9}  {'tool':<17}{'s/pair':>8}{'ref s/pair':>11}{'s/pair+ref':>11}"
          f"{'RSS GB':>8}{'setup s':>9}{'of floor':>9}{'loss@1':>10}{'vs TRL pairs/s':>16}{'RSS':>7}")
    for row in rows:
        r = row["result"]
        head = f"{row['prompt']:>7}{row['tokens']:>9.0f}  {row['tool']:<17}"
        if not r:
            print(head + row["note"])
            continue
        trl = next((t for t in rows if t["tool"] == "trl" and t["prompt"] == row["prompt"] and t["result"]), None)
        vs = ""
        if trl and row["tool"] != "trl":
            vs = (f"{trl['s_pair_ref'] / row['s_pair_ref']:>15.2f}×"
                  f"{r['peak_rss_gb'] / trl['result']['peak_rss_gb']:>6.2f}×")
        ref = "in steps" if row["ref_pair"] is None else f"{row['ref_pair']:.3g}"
        print(head + f"{row['s_pair']:>8.3g}{ref:>11}{row['s_pair_ref']:>11.3g}"
              f"{r['peak_rss_gb']:>8.2f}{r['setup_s']:>9.1f}{row.get('of_floor', float('nan')):>9.0%}"
              f"{r['first']['loss']:>10.6f}{vs}")
    print("\npeak RSS fitted against unique tokens per pair, T in thousands (GB ≈ a + b·T + c·T²):")
    for tool in tools:
        points = [(r["tokens"], r["result"]["peak_rss_gb"]) for r in rows if r["tool"] == tool and r["result"]]
        if len(points) < 2:
            print(f"  {tool:<17}fewer than 2 lengths measured: no fit")
            continue
        a, b, c = fit_memory(points)
        top = max(p[0] for p in points) / 1000
        if c is None:
            print(f"  {tool:<17}a {a:.2f}  b {b:+.3f}  (linear only: 3 lengths are needed for the T² term)")
        else:
            print(f"  {tool:<17}a {a:.2f}  b {b:+.3f}  c {c:+.4f}  (T² term at {top:.1f}k tokens: {c * top**2:+.2f} "
                  f"GB of {a + b * top + c * top**2:.2f})")
