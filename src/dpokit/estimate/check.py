"""What is available, what would fit instead, the `dpokit estimate` report, and train's pre-load check."""

from __future__ import annotations

import os
from pathlib import Path

from dpokit.estimate.parts import GiB, Estimate, estimate
from dpokit.estimate.shape import Shape, data_for, micro_batch_tokens, shapes_for

MARGIN = 1.1  # refuse only above 110 % of what is available: a false refusal is worse than a late OOM


def available_bytes(device="cpu") -> int:
    """Free memory now, 0 when unknown (callers then skip the check): on a GPU its free memory
    (torch.cuda.mem_get_info of that very device; 0 without CUDA); on the CPU the machine's MemAvailable,
    or less where a cgroup v2 limit leaves less (containers: their limit minus what they use)."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return 0
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return 0
    free = _meminfo_available()
    limit = cgroup_free()
    return min(free, limit) if free and limit is not None else free


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cgroup_free(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """memory.max − (memory.current − inactive_file) of this process's cgroup v2 (None: no limit or no
    cgroup v2). The inactive page cache counts as free: the kernel reclaims it before killing anything, and
    counting it as used would refuse runs that fit."""
    folders = [root]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                folders.insert(0, root / line[3:].strip().lstrip("/"))
    except OSError:
        pass
    for folder in folders:
        try:
            limit = (folder / "memory.max").read_text().strip()
            current = int((folder / "memory.current").read_text())
        except (OSError, ValueError):
            continue
        if limit == "max":
            return None
        inactive = 0
        try:
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
            inactive = int(stat.get("inactive_file", 0))
        except (OSError, ValueError):
            pass
        return max(0, int(limit) - (current - inactive))
    return None


def share(free: int, device_type: str, processes: int) -> int:
    """What one process may use: on a CPU the processes of the machine share its memory; a GPU is its own."""
    return free // max(1, processes) if device_type == "cpu" else free


def fits(est: Estimate, available: int, margin: float = MARGIN) -> bool:
    return not available or est.peak <= margin * available


def alternatives(cfg, shape: Shape, processes: int, tokens, device_type: str) -> list[tuple[str, object, Estimate]]:
    """Changes that lower the peak, each as (label, its TrainConfig, its estimate): checkpointing, LoRA, bf16
    weights, FSDP, batch.
    Each is built as `train` would build it (TrainConfig.from_dict validates), so none the config refuses."""
    import dataclasses

    from dpokit.config import ConfigError, TrainConfig

    def variant(label, **changes):
        try:
            changed = TrainConfig.from_dict({**cfg.to_dict(), **changes})
        except ConfigError:
            return None
        s = dataclasses.replace(shape, lora_rank=changed.lora_r)
        scaled = None if tokens is None else tuple(max(1, t * changed.batch_size // cfg.batch_size) for t in tokens)
        return label, changed, estimate(changed, s, processes, scaled, device_type=device_type)

    out = []
    if not cfg.gradient_checkpointing:
        out.append(variant("--gradient-checkpointing", gradient_checkpointing=True))
    if not cfg.lora_r:  # LoRA trains fp32 adapters on the base: --pure-half does not apply
        out.append(variant("--lora-r 16", lora_r=16, pure_half=False))
        if cfg.model_dtype == "fp32":
            out.append(variant("--lora-r 16 --model-dtype bf16", lora_r=16, model_dtype="bf16", pure_half=False))
    if cfg.model_dtype == "fp32" and not cfg.lora_r:
        if cfg.sync_ref_every or not cfg.ref_cache:  # only the live reference shrinks
            out.append(variant("--model-dtype bf16", model_dtype="bf16"))
        out.append(variant("--model-dtype bf16 --pure-half", model_dtype="bf16", pure_half=True))
    if not cfg.fsdp and not cfg.lora_r and processes > 1:
        out.append(variant(f"--fsdp over {processes} processes", fsdp=True))
    if cfg.batch_size > 1:
        out.append(variant(f"--batch-size {cfg.batch_size // 2} --grad-accum {cfg.grad_accum * 2}",
                           batch_size=cfg.batch_size // 2, grad_accum=cfg.grad_accum * 2))
        out.append(variant("--gradient-checkpointing --batch-size 1", gradient_checkpointing=True, batch_size=1,
                           grad_accum=cfg.grad_accum * cfg.batch_size))
    return [v for v in out if v is not None]


def format_estimate(est: Estimate, title: str = "") -> str:
    lines = [title] if title else []
    for name, value in est.parts.items():
        if value:
            lines.append(f"  {name:<26} {value / GiB:8.2f} GiB")
    lines.append(f"  {'training phase':<26} {est.phases['training'] / GiB:8.2f} GiB")
    for name, value in est.phases.items():
        if name != "training":
            lines.append(f"  {name + ' phase':<26} {value / GiB:8.2f} GiB")
    lines.append(f"  {'peak (' + est.peak_phase + ')':<26} {est.peak / GiB:8.2f} GiB per process"
                 + (f" × {est.processes}" if est.processes > 1 else ""))
    lines += [f"  ({n})" for n in est.notes]
    return "\n".join(lines)


def report(cfg, processes: int, device) -> tuple[str, bool, Estimate]:
    """The `dpokit estimate` text, whether it fits in what is available now, and the estimate. With --data
    the data's own lengths (as train checks), else the worst case of --max-length."""
    import torch

    from dpokit.config import ConfigError
    if cfg.online:
        raise ConfigError("dpokit estimate: online runs (--loss grpo, rloo, ppo, --online-dpo) are not modelled "
                          "(sampling num_generations completions and its KV cache); train does not check them either")
    device = torch.device(device)
    pairs = data_for(cfg)
    tokens = micro_batch_tokens(cfg, pairs)
    shape, ref = shapes_for(cfg)
    est = estimate(cfg, shape, processes, tokens, ref, device.type)
    free = available_bytes(device)
    mine = share(free, device.type, processes)
    where = "GPU" if device.type == "cuda" else "machine"
    lengths = (f"lengths: --data {cfg.data} ({len(pairs)} examples; the batch's {cfg.batch_size} longest, as train "
               "checks)" if pairs else f"lengths: the worst case of --max-length {cfg.max_length} (no --data)")
    lines = [f"{cfg.model}: {shape.params:,} parameters" + (f", {shape.lora_params:,} in LoRA adapters"
                                                            if cfg.lora_r else ""), lengths,
             format_estimate(est, "expected peak memory by part (one process):")]
    ok = fits(est, mine)
    show_fsdp = processes > 1 and not cfg.fsdp and not cfg.lora_r
    alts = alternatives(cfg, shape, processes, tokens, device.type) if show_fsdp or not ok else []
    lines += [f"  under FSDP over {processes} processes: {e.peak / GiB:.2f} GiB per process"
              for label, _, e in alts if show_fsdp and "--fsdp" in label]
    if not free:
        lines.append(f"available now ({where}): unknown here — no comparison")
        return "\n".join(lines), True, est
    per = (f", {mine / GiB:.2f} GiB per process × {processes}" if mine != free else "")
    lines.append(f"available now ({where}): {free / GiB:.2f} GiB{per} — " + ("fits" if ok else "does NOT fit"))
    if not ok:
        lines.append("what would fit:" if any(fits(e, mine) for _, _, e in alts) else "alternatives:")
        lines += [f"  {label:<48} {alt.peak / GiB:8.2f} GiB" + ("  fits" if fits(alt, mine) else "")
                  for label, _, alt in alts]
    return "\n".join(lines), ok, est


def check_memory(cfg, pairs, device, ctx=None, log=print) -> None:
    """Refuse a run whose estimated peak exceeds the memory available now by over 10 %, before it loads
    (a ConfigError with the estimate and what would fit). Under torchrun every rank waits here until all
    arrive (so none has loaded yet, which a CPU's shared memory would show), rank 0 decides and every rank
    follows its verdict. Whatever goes wrong while estimating is logged and the run goes on unchecked."""
    from dpokit.config import ConfigError
    from dpokit.distributed import broadcast_object
    enabled = ctx is not None and ctx.enabled
    if enabled:
        ctx.barrier()
    verdict = _refusal(cfg, pairs, device, ctx.world if ctx is not None else 1, log) \
        if ctx is None or ctx.is_main else None
    if enabled:
        verdict = broadcast_object(verdict, ctx)
    if verdict:
        raise ConfigError(verdict)


def _refusal(cfg, pairs, device, world: int, log) -> str | None:
    """The refusal message, or None when the run fits or cannot be estimated (logged)."""
    import torch
    try:
        device = torch.device(device)
        free = available_bytes(device)
        if not free:
            log("memory check skipped: the available memory is unknown here")
            return None
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        mine = share(free, device.type, local)
        shape, ref = shapes_for(cfg)
        tokens = micro_batch_tokens(cfg, pairs)
        est = estimate(cfg, shape, world, tokens, ref, device.type)
        if fits(est, mine):
            return None
        good = [f"{label} ({alt.peak / GiB:.1f} GiB)" for label, _, alt in alternatives(cfg, shape, world, tokens,
                                                                                     device.type) if fits(alt, mine)]
    except Exception as e:  # noqa: BLE001 — a check that crashes must not stop a run that may well fit
        log(f"memory check skipped: {type(e).__name__}: {e}")
        return None
    return (f"this run needs about {est.peak / GiB:.1f} GiB per process ({est.peak_phase}: "
            + ", ".join(f"{k} {v / GiB:.1f}" for k, v in est.parts.items() if v)
            + f") but {mine / GiB:.1f} GiB is available" + (f" per process ({local} here)" if mine != free else "")
            + "; " + ("what would fit: " + "; ".join(good) if good else "none of checkpointing, LoRA, bf16 weights, "
                      "FSDP or a smaller batch fits alone")
            + ". `dpokit estimate` with the same options shows the parts; --no-memory-check skips this check")
