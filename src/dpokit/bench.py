"""`dpokit bench`: train the same K steps on the same pairs with dpokit and with TRL's DPOTrainer,
each in its own process, and print a table of speed, memory and first-step values with ratios.

Useful FLOPs per pair are counted as the issue of record defines them: 6N (policy forward+backward)
plus 2N (reference forward) per token of prompt + chosen + rejected, prompt counted once — whatever
a tool actually computes. "floor" is the time those FLOPs take at the matmul peak measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import tempfile
import time
from pathlib import Path

from dpokit.bench_tools import VARIANTS, _count_params, check_tools, measure_peak, spawn, uses_bf16

def select_pairs(data: str, n: int, max_length: int, model: str, out: Path) -> tuple[str, int]:
    """The first n pairs of `data` that fit max_length untruncated, written in explicit form so both
    tools split prompt and completions identically; returns (path, unique tokens of those pairs)."""
    from dpokit.batches import tokenize_pair
    from dpokit.data import load_pairs
    from dpokit.models import load_tokenizer
    tokenizer = load_tokenizer(model)
    pairs, _ = load_pairs(data, on_bad_row="skip")
    chosen, tokens = [], 0
    for p in pairs:
        if p.conversational:
            raise SystemExit("bench: use a file of text pairs (explicit or implicit format)")
        t = tokenize_pair(p, tokenizer, 10**9, None)
        if len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) <= max_length:
            chosen.append(p)
            tokens += len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids)
        if len(chosen) == n:
            break
    path = out / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for p in chosen:
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return str(path), tokens


def worker(args) -> dict:
    """Runs in a child process: train K steps with one tool, report timings and peak RSS."""
    import torch
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    step_times, first = [], {}
    if args.tool == "trl":
        import datasets
        import trl
        from transformers import TrainerCallback
        from dpokit.models import load_model, load_tokenizer
        rows = [json.loads(line) for line in open(args.pairs, encoding="utf-8")]
        tokenizer, model = load_tokenizer(args.model), load_model(args.model, "cuda" if cuda else "cpu")

        class Timer(TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.t = time.perf_counter()

            def on_step_end(self, *a, **k):
                step_times.append(time.perf_counter() - self.t)

        cfg = trl.DPOConfig(output_dir=args.tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                            learning_rate=5e-6, logging_steps=1, report_to=[], bf16=uses_bf16(args.dtype, cuda),
                            use_cpu=not cuda,
                            gradient_checkpointing=False, max_length=args.max_length, save_strategy="no",
                            beta=0.1, seed=0, dataloader_drop_last=True, train_sampling_strategy="sequential")
        trainer = trl.DPOTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tokenizer, callbacks=[Timer()])
        trainer.train()
        log = trainer.state.log_history[0]
        first = {k: log[k] for k in ("loss", "logps/chosen", "logps/rejected")}
        setup, ref_s = 0.0, None  # TRL runs its reference inside every step
    else:
        from dpokit.loop import train
        overrides = VARIANTS[args.tool]
        messages: list[str] = []
        t0 = time.perf_counter()
        result = train(model=args.model, data=args.pairs, eval_data=None, output_dir=args.tmp,
                       max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                       max_prompt_length=None, lr=5e-6, warmup_steps=0, shuffle=False, progress=False,
                       dtype=args.dtype, log=lambda *a, **_: messages.append(" ".join(map(str, a))),
                       **overrides)
        total = time.perf_counter() - t0
        records = [json.loads(line) for line in open(result.output_dir / "metrics.jsonl")]
        records = [r for r in records if "pairs_per_s" in r]
        step_times = [args.batch_size / r["pairs_per_s"] for r in records]
        first = {k: records[0][k] for k in ("loss", "logps/chosen", "logps/rejected")}
        setup = total - sum(step_times)  # model load, tokenization, reference cache build
        computed = re.compile(r"reference log-probs: computed for \d+ pairs in ([\d.]+) s")
        times = [float(m.group(1)) for m in map(computed.search, messages) if m]
        ref_s = sum(times) if times else None  # None: no reference pass (reference-free, or read from a cache)
    return {"tool": args.tool, "step_times": step_times, "first": first, "setup_s": setup, "ref_s": ref_s,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def run(args) -> None:
    if args.prompt_tokens:
        from dpokit.bench_long import run_long
        return run_long(args)
    if args.data is None:
        from dpokit.data import builtin_path
        args.data = builtin_path("helpful_train")
    args.batch_size = args.batch_size or 4
    args.max_length = args.max_length or 512
    args.tools = args.tools or "trl,dpokit"
    out = Path(tempfile.mkdtemp(prefix="dpokit-bench-"))
    pairs, tokens = select_pairs(args.data, args.steps * args.batch_size, args.max_length, args.model, out)
    n_pairs = args.steps * args.batch_size
    peak, machine = measure_peak(args)
    print(f"data {args.data}: {n_pairs} pairs ≤ {args.max_length} tokens, {tokens / n_pairs:.0f} unique tokens/pair; "
          f"{machine}", flush=True)
    results = []
    for tool in check_tools([t for t in args.tools.split(",") if t]):
        print(f"running {tool} …", flush=True)
        result, failure = spawn(tool, pairs, args, args.batch_size, args.max_length, out / tool)
        if failure:
            raise SystemExit(f"bench: {tool} failed: {failure}")
        results.append(result)
    n_params = _count_params(args.model)
    useful = 8 * n_params * tokens / n_pairs  # FLOPs per pair
    print(f"\n{'tool':<15}{'s/pair':>8}{'pairs/s':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'of peak':>8}{'RSS GB':>8}"
          f"{'GPU GB':>8}{'setup s':>9}{'loss@1':>10}{'logps/chosen@1':>16}")
    base = next((r for r in results if r["tool"] == "trl"), None)
    for r in results:
        # steady state: skip the first step (allocator warm-up, lazy init) when there are enough steps
        times = r["step_times"][1:] if len(r["step_times"]) > 2 else r["step_times"]
        s_pair = statistics.median(times) / args.batch_size
        r["s_pair"] = s_pair
        gflops = useful / s_pair / 1e9
        print(f"{r['tool']:<15}{s_pair:>8.3g}{1 / s_pair:>9.4g}{tokens / n_pairs / s_pair:>10.0f}{gflops:>9.0f}"
              f"{gflops / peak:>8.0%}{r['peak_rss_gb']:>8.2f}"
              f"{r['peak_gpu_gb'] if r['peak_gpu_gb'] is not None else float('nan'):>8.2f}"
              f"{r['setup_s']:>9.1f}{r['first']['loss']:>10.6f}"
              f"{r['first']['logps/chosen']:>16.4f}")
    floor = useful / (peak * 1e9)
    print(f"\nfloor (useful FLOPs at the measured peak): {floor:.3g} s/pair")
    for r in results:
        # a tool that caches the reference computes it before its steps: its share of the floor counts that pass
        # (the floor's FLOPs include the reference forward), spread over the pairs it covered
        with_ref = r["s_pair"] + (r.get("ref_s") or 0.0) / n_pairs
        r["s_pair_with_ref"] = with_ref
        vs_trl = "" if base is None or r is base else (
            f"{base['s_pair'] / with_ref:.2f}× TRL pairs/s with its reference pass ({base['s_pair'] / r['s_pair']:.2f}× "
            f"steps alone), {r['peak_rss_gb'] / base['peak_rss_gb']:.2f}× TRL peak RSS, first-step loss Δ "
            f"{abs(r['first']['loss'] - base['first']['loss']):.1e}, logps/chosen rel Δ "
            f"{abs(r['first']['logps/chosen'] / base['first']['logps/chosen'] - 1):.1e}; ")
        ref = (f" with its reference pass ({r['ref_s']:.1f} s for {n_pairs} pairs), {floor / r['s_pair']:.0%} steps "
               "alone" if r.get("ref_s") is not None else "")
        print(f"{r['tool']}: {vs_trl}{floor / with_ref:.0%} of the floor{ref}")
    print("\nreproduce: dpokit bench " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                               (("data", args.data), ("model", args.model), ("steps", args.steps),
                                                ("batch_size", args.batch_size), ("max_length", args.max_length),
                                                ("dtype", args.dtype), ("tools", args.tools))))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "peak_gflops": peak, "floor_s_pair": floor,
                                               "tokens_per_pair": tokens / n_pairs}, indent=1))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="pairs file (default: the built-in training pairs); for HH use "
                   "../shared/data/hh_helpful_base_test_1k.jsonl. With --prompt-tokens: where the turns come from "
                   "(default: that HH file when present, else the built-in pairs)")
    p.add_argument("--model", default="embedded")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per tool (the first is not timed when "
                   "there are more than 2)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 4; 1 with --prompt-tokens)")
    p.add_argument("--max-length", type=int, default=None, help="default 512; with --prompt-tokens it is set per "
                   "length so no pair is cut")
    p.add_argument("--tools", default=None, help=f"comma list of trl and {', '.join(VARIANTS)} (both tools "
                   "read the pairs in file order, so their first steps see the same batch; default trl,dpokit, "
                   "with --prompt-tokens dpokit-dense,dpokit-segments,trl)")
    p.add_argument("--prompt-tokens", default=None, help="long rows: comma list of prompt lengths (e.g. "
                   "256,1024,2048,4096); at each, long multi-turn pairs are built (data/long_pairs.py) and every "
                   "tool trains on them; prints s/pair, the reference pass, peak RSS and a fit of peak RSS against "
                   "tokens (a + b·T + c·T²) per tool")
    p.add_argument("--trl-max-tokens", type=int, default=2048, help="with --prompt-tokens: run TRL only up to this "
                   "prompt length (and only where its peak RSS, extrapolated from the shorter lengths, fits in the "
                   "memory available); longer lengths print 'not run' with the reason")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="compute precision for both tools (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--json", default=None, help="also write the raw results here")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dpokit bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pairs", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.tool = args.worker
        print(json.dumps(worker(args)))
        return
    run(args)


if __name__ == "__main__":
    main()
