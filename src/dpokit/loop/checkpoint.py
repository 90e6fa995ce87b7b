"""Resumable checkpoints: policy weights (safetensors), optimizer/scheduler state, RNG, position, config.

The held-out reference log-probs are not saved: a resumed run recomputes them (or reads the reference
cache) from the *starting* reference before the checkpoint's weights are loaded — also under TR-DPO,
whose moving reference only the checkpoint holds — so they always match the --eval-data of this run.

Written to a temporary folder, every file fsynced, a manifest of sha256 checksums written last, then
renamed into place: a checkpoint folder either verifies against its manifest or is reported as
partial/corrupt and skipped in favour of the previous one. Old checkpoints are pruned (`keep_last`)
only after the new one is complete. `state.pt` holds only tensors and plain Python values and is read
with `weights_only=True` (no arbitrary unpickling).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model

STATE = "state.pt"
REFERENCE = "reference.safetensors"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not match the run."""


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(output_dir: str, step: int, policy, tokenizer, optimizer_state: dict, scheduler,
                    config_yaml: str, reference=None, keep_last: int = 0, model_state=None, world: int = 1,
                    scaler_state: dict | None = None, rng: list[dict] | None = None, device_type: str = "cpu",
                    extra_models: dict | None = None) -> Path:
    """Write a complete checkpoint atomically. `reference` is saved only when it moves (TR-DPO).
    `extra_models`: other trained models, name → module, each saved as NAME.safetensors (PPO's value model);
    `load_extra_weights` reads them back.
    `model_state`: whole weights gathered from an FSDP-sharded policy (else the policy's own);
    `world`: the number of processes, which fixes the global batch and so the data order;
    `rng`: every rank's `rng_state()` in rank order (default: this process's)."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
    if hasattr(policy, "peft_config"):  # a PEFT model saves only its adapter: keep every weight for resume
        save_model(policy, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    if reference is not None:
        save_model(reference, str(tmp / REFERENCE))  # drops tied duplicates (embeddings = lm_head)
    for name, model in (extra_models or {}).items():
        save_model(model, str(tmp / f"{name}.safetensors"))
    torch.save({
        "step": step,
        "optimizer": optimizer_state,
        "world_size": world,
        "scaler": scaler_state or {},  # fp16's loss scale and growth tracker
        "scheduler": scheduler.state_dict(),
        "rng": rng or [rng_state(torch.device(device_type))],
        "device_type": device_type,  # cpu or cuda: the kernels, hence the numbers, differ
    }, tmp / STATE)
    (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    for p in files:
        _fsync(p)
    manifest = {"step": step, "files": {p.name: _sha256(p) for p in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(root)
    if keep_last:
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def verify(path: Path) -> str | None:
    """None if the checkpoint at `path` matches its manifest, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable manifest (partial write)"
    for name, digest in manifest.get("files", {}).items():
        if not (path / name).is_file():
            return f"{name} missing"
        if _sha256(path / name) != digest:
            return f"{name} does not match its checksum"
    return None if STATE in manifest.get("files", {}) else f"manifest lists no {STATE}"


def complete_checkpoints(output_dir: str) -> list[Path]:
    """Checkpoint folders in step order (temporary folders of interrupted saves excluded)."""
    return sorted(p for p in checkpoint_root(output_dir).glob("step-*") if p.is_dir())


def find_checkpoint(output_dir: str, resume: str, log=print) -> Path | None:
    """The folder named by --resume, or with 'auto' the newest one that verifies; broken ones are
    reported and skipped. 'auto' with no checkpoint folder at all is a fresh start (None), so one job
    script can always pass --resume auto."""
    if resume != "auto":
        problem = verify(Path(resume))
        if problem:
            raise CheckpointError(f"--resume {resume}: not a usable dpokit checkpoint: {problem}")
        return Path(resume)
    if not complete_checkpoints(output_dir):
        log(f"--resume auto: no checkpoint under {checkpoint_root(output_dir)} yet; starting fresh")
        return None
    for path in reversed(complete_checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log(f"checkpoint {path} skipped: {problem}")
    raise CheckpointError(f"--resume auto: no complete checkpoint under {checkpoint_root(output_dir)}")


def load_weights(path: Path, policy, reference=None) -> None:
    """The checkpoint's policy (and moving reference) weights; before any FSDP sharding: whole tensors."""
    _load_weights(policy, path / "model.safetensors")
    if (path / REFERENCE).is_file():
        if reference is None:
            raise CheckpointError(f"{path}: holds a moving (TR-DPO) reference but this run has none")
        _load_weights(reference, path / REFERENCE)


def load_extra_weights(path: Path, extra_models: dict) -> None:
    """The weights of save_checkpoint's `extra_models` (name → module), each from NAME.safetensors."""
    for name, model in extra_models.items():
        _load_weights(model, path / f"{name}.safetensors")


def rng_state(device: torch.device) -> dict:
    """This process's random state: torch CPU, its own CUDA device's (dropout on a GPU draws from it;
    under torchrun each rank has its own), and Python's `random`. numpy's is never drawn from in training."""
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    py = random.getstate()
    random.setstate((py[0], tuple(state["python"]), py[2]))
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def load_training_state(path: Path, load_optimizer, scheduler, world: int = 1, scaler=None, rank: int = 0,
                        device: torch.device = torch.device("cpu")) -> int:
    """Optimizer (through `load_optimizer(state)`), schedule, fp16 loss scale, this rank's RNG; returns the step."""
    state = torch.load(path / STATE, weights_only=True)
    saved_world = state.get("world_size", 1)
    if saved_world != world:
        raise CheckpointError(f"{path} was written by {saved_world} process(es), this run has {world}: the global "
                              "batch (batch_size × grad_accum × processes) fixes the data order, so resume with "
                              f"{saved_world} process(es)")
    saved_type = state.get("device_type", device.type)
    if saved_type != device.type:
        raise CheckpointError(f"{path} was written on {saved_type}, this run is on {device.type} (--device): other "
                              f"kernels and precision (--dtype auto) would not continue that run; resume on {saved_type}")
    load_optimizer(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if "rng" in state:
        set_rng_state(state["rng"][rank], device)
    else:  # written before per-rank RNG states: rank 0's CPU and Python states only
        set_rng_state({"torch": state["torch_rng"], "python": state["python_rng"]}, device)
    return int(state["step"])


@contextmanager
def deterministic_kernels(on: bool):
    """--deterministic: torch's deterministic kernels for the run, then the previous settings back.

    On CUDA, index_add (the per-row log-prob sums), scatter_add and index_put(accumulate) otherwise
    add in a varying order, and SDPA's fused attention backward is non-deterministic; in this mode
    they take deterministic paths, and an op without one raises an error naming itself. cuBLAS needs
    CUBLAS_WORKSPACE_CONFIG (":4096:8"), read when CUDA first runs a matmul: set here unless already
    set, and unset again after the run if it was not (the workspace size already chosen stays; torch
    only checks the variable while deterministic mode is on). Untested on GPU here; CPU runs are
    deterministic without it."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    env_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        if env_before is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric lines of steps after `step` (written by a run that died before its next checkpoint)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")


def check_same_run(path: Path, config: dict) -> None:
    """Refuse to resume a checkpoint with options that change the data order, objective or schedule."""
    import yaml
    from dpokit.config import RESUME_MAY_CHANGE, TrainConfig  # bookkeeping options, eval_data, device's name, …
    # An option added after the checkpoint was written is missing from its config: that run had its default.
    saved = {**TrainConfig().to_dict(), **(yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {})}
    changed = sorted(k for k in set(saved) | set(config)
                     if k not in RESUME_MAY_CHANGE and saved.get(k) != config.get(k))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} → {config.get(k)!r}" for k in changed)
        raise CheckpointError(f"{path} was written with other options ({detail}); resuming would not continue "
                              "that run — use the same options or a new --output-dir")


def _load_weights(model, file: Path) -> None:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing from the checkpoint")
    missing, unexpected = model.load_state_dict(load_file(file), strict=False)
    # Tied tensors (embeddings = lm_head) are stored once under either name: a missing name is fine
    # when it shares storage with one that was loaded.
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in state if k not in missing}
    missing = [k for k in missing if state[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise CheckpointError(f"{file}: does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def check_writable(output_dir: str, need_bytes: int, what: str = "a checkpoint") -> None:
    """Fail at start-up, not at the first save: the output folder must be writable and hold `what` (need_bytes)."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".dpokit-write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"--output-dir {output_dir} is not writable: {e.strerror or e}") from None
    free = shutil.disk_usage(out).free
    if free < need_bytes:
        raise CheckpointError(f"--output-dir {output_dir}: {free / 2**30:.1f} GiB free, {what} needs about "
                              f"{need_bytes / 2**30:.1f} GiB; free space or point --output-dir elsewhere")
