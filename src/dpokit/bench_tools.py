"""What `dpokit bench` (bench.py) and its long-prompt mode (bench_long.py) share: the variants timed, the
matmul peak, the tools check, one worker per process and the parameter count. Both import it; neither imports
the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


VARIANTS = {
    # name: TrainConfig overrides. "dpokit" is the default configuration.
    "dpokit": {},
    "dpokit-plain": {"prefix_sharing": False, "pack_tokens": 0, "ref_cache": False},
    "dpokit-prefix": {"pack_tokens": 0, "ref_cache": False},
    "dpokit-packed": {"ref_cache": False},
    "dpokit-gc": {"gradient_checkpointing": True},
    "dpokit-dense": {"attention": "dense"},        # the [rows, 1, T, T] float mask path
    "dpokit-segments": {"attention": "segments"},  # segment-wise fused SDPA, no T×T tensor (auto's choice on CPU)
}


def uses_bf16(dtype: str, cuda: bool) -> bool:
    return dtype == "bf16" or (dtype == "auto" and cuda)


def matmul_peak(bf16: bool, cuda: bool, repeats: int = 5) -> float:
    """GFLOP/s of an n³ matmul in the compute dtype on this machine (best of `repeats`)."""
    import torch
    n = 8192 if cuda else 2048
    kind = dict(device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if bf16 else torch.float32)
    a, b = torch.randn(n, n, **kind), torch.randn(n, n, **kind)
    a @ b
    best = min(_timed(lambda: a @ b, cuda) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn, cuda: bool = False) -> float:
    import torch
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_peak(args) -> tuple[float, str]:
    """(matmul peak in GFLOP/s, "<dtype> matmul peak … on <device>") for the run's compute dtype."""
    import torch
    cuda = torch.cuda.is_available()
    bf16 = uses_bf16(args.dtype, cuda)
    peak = matmul_peak(bf16, cuda)
    where = torch.cuda.get_device_name() if cuda else f"{os.cpu_count()} CPU cores"
    return peak, f"{'bf16' if bf16 else 'fp32'} matmul peak {peak:.0f} GFLOP/s on {where}"


def check_tools(tools: list[str]) -> list[str]:
    """The tools to run: unknown names refused, trl dropped (with a line saying so) when it is not installed."""
    unknown = [t for t in tools if t != "trl" and t not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench: --tools {','.join(unknown)}: unknown; choose from trl, {', '.join(VARIANTS)}")
    if "trl" in tools:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl not installed: skipping the TRL run (pip install trl==1.16.0)")
            tools = [t for t in tools if t != "trl"]
    return tools


def spawn(tool: str, pairs: str, args, batch_size: int, max_length: int, tmp: Path) -> tuple[dict | None, str]:
    """Run one tool's worker in its own process: (its result, "") or (None, why it failed). Each worker gets
    an empty reference cache (models shared), so dpokit's reference pass is measured on every run, not read
    back from an earlier one."""
    from dpokit.cache import cache_dir
    (cache_dir() / "models").mkdir(parents=True, exist_ok=True)
    (tmp / "cache").mkdir(parents=True, exist_ok=True)
    if not (tmp / "cache" / "models").exists():
        (tmp / "cache" / "models").symlink_to(cache_dir() / "models")
    cmd = [sys.executable, "-m", "dpokit.bench", "--worker", tool, "--pairs", pairs, "--model", args.model,
           "--steps", str(args.steps), "--batch-size", str(batch_size), "--max-length", str(max_length),
           "--dtype", args.dtype, "--tmp", str(tmp / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DPOKIT_CACHE": str(tmp / "cache")})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == -9 or "out of memory" in proc.stderr.lower() or "MemoryError" in proc.stderr:
        return None, f"did not fit (killed or out of memory, exit {proc.returncode})"
    if proc.returncode or not line:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return None, f"exit {proc.returncode}"
    return json.loads(line[-1]), ""


def _count_params(model: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM
    import torch
    from dpokit.models.load import resolve
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve(model)))
    return sum(p.numel() for p in m.parameters())
