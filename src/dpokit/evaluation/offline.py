"""`dpokit eval` and `dpokit score`: a trained policy against its reference, after training.

score: "your language model is secretly a reward model" (the DPO paper's title) as a command — rank
candidate completions of a prompt by the implicit reward β·(log π(y|x) − log π_ref(y|x)).

Both read the run's own settings: for a model saved by a dpokit run (DIR/final, or a checkpoint folder),
β, the objective and its options, LD-DPO's ld_alpha, the length limits, how ranked rows pair (RUN_KEYS) and
the reference come from the run's config.yaml unless given on the command line, so the implicit reward is the
one the run trained. `resolve` says where each came from. Device and precision are chosen as training chooses
them (`eval_device`; weights in --model-dtype, forward passes under `compute_precision(device, --dtype)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from dpokit.batches import pad_rows, tokenize_completions, tokenize_pairs
from dpokit.config import ConfigError, TrainConfig
from dpokit.data import Completion, load_pairs
from dpokit.distributed import Distributed
from dpokit.evaluation.preference import evaluate_pairs
from dpokit.logprobs import compute_precision, pairs_logps, sequence_logps
from dpokit.models import load_model, load_tokenizer
from dpokit.models.load import ModelError
from dpokit.objectives import OBJECTIVES, needs_reference
from dpokit.options import as_list

# What defines a run's implicit reward and held-out loss (and which pairs a ranked held-out file gives). With an
# explicit --loss only the first five are kept, and of the others those the given objectives read
# (OBJECTIVES[n].options): exo_pair keeps the run's label_smoothing, sigmoid after an ipo run drops ipo_normalize.
RUN_KEYS = ("beta", "max_length", "max_prompt_length", "ranked_pairs", "ultrafeedback_score", "loss", "loss_weights",
            "f_divergence", "f_alpha", "use_weighting", "ld_alpha") + tuple(dict.fromkeys(
                k for o in OBJECTIVES.values() if o.data != "online" for k in o.options))


@dataclass
class Settings:
    cfg: TrainConfig
    ref_model: str | None       # None: a reference-free objective scored without a reference (score only)
    sources: dict[str, str] = field(default_factory=dict)  # beta, loss, ld_alpha, reference → where from

    def describe(self) -> str:
        ld = f", ld_alpha {self.cfg.ld_alpha} ({self.sources['ld_alpha']})" if self.cfg.ld_alpha is not None else ""
        ref = f", reference {self.ref_model} ({self.sources['reference']})" if self.ref_model else ", no reference"
        return f"β = {self.cfg.beta} ({self.sources['beta']}), loss {self.cfg.loss} ({self.sources['loss']}){ld}{ref}"


def run_config(model: str) -> tuple[dict, str | None]:
    """(options, path) of the config.yaml a dpokit run saved with `model` (DIR/final → DIR/config.yaml; a
    checkpoint folder holds its own), or ({}, None)."""
    p = Path(model)
    for path in ([p.parent / "config.yaml"] if p.name == "final" else []) + [p / "config.yaml"]:
        if path.is_file():
            try:
                run = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as e:
                raise ConfigError(f"{path}: cannot read the run's config: {e}") from None
            if not isinstance(run, dict):
                raise ConfigError(f"{path}: expected a mapping of option: value, got {type(run).__name__}")
            return run, str(path)
    return {}, None


def resolve(model: str, given: dict[str, tuple[Any, str]], against: str | None,
            reference: str = "always") -> Settings:
    """Options for evaluating `model`: `given` ({key: (value, where from)}: flags, a --config file) over
    the run's RUN_KEYS over defaults. The reference: `against`, else the run's ref_model or starting model.
    reference="always" (eval: reference-free runs are measured against their starting model too) or
    "if_needed" (score: a reference-free objective's reward is β·log π, or its mean per token for
    simpo/orpo, with no reference unless `against`)."""
    run, path = run_config(model)
    run_loss = str(run.get("loss", ""))
    # GRPO trains no pairwise objective: its run supplies lengths and data options only (β is GRPO's default, unused)
    run_online = any(OBJECTIVES[n].data == "online" for n in as_list(run.get("loss") or []) if n in OBJECTIVES)
    keys = RUN_KEYS[:5] if "loss" in given or run_online else RUN_KEYS
    if "loss" in given:
        keys += tuple(k for n in as_list(given["loss"][0]) if n in OBJECTIVES for k in OBJECTIVES[n].options)
    from_run = {k: run[k] for k in keys if k in run and k not in given}
    source = " + ".join(s for s in (path, "command line" if given else None) if s) or "defaults"
    cfg = TrainConfig.from_dict({**from_run, **{k: v for k, (v, _) in given.items()}}, source=source)
    if cfg.online:
        raise ConfigError(f"loss {cfg.loss} is online (GRPO): it defines no implicit reward of a completion; "
                          "give --loss a paired objective such as sigmoid")

    def where(key: str) -> str:
        if key in given:
            return f"from {given[key][1]}"
        if key in from_run:
            return f"from {path}"
        return "default" + (f"; the run's loss {run_loss} has none on pairs" if key == "loss" and run_online
                            else "")

    sources = {k: where(k) for k in ("beta", "loss", "ld_alpha")}
    ref_model = against or run.get("ref_model") or run.get("model")
    sources["reference"] = "--against" if against else f"from {path}"
    if reference == "if_needed" and not against and not needs_reference(cfg.loss_names):
        ref_model = None
    elif not ref_model:
        raise ModelError(f"--against is needed: {model} is not the final/ or a checkpoint folder of a dpokit run, "
                         "so its starting model is unknown")
    return Settings(cfg, ref_model, sources)


def eval_device(name: str) -> torch.device:
    """The device a one-process `dpokit train --device name` takes (`Distributed().device`: 'auto' is the GPU when
    one is present), refused here when this machine has no such device, before any model is loaded."""
    try:
        device = Distributed().device(name)
    except RuntimeError as e:  # not a device string at all, e.g. "gpu"
        raise ConfigError(f"--device {name}: not a device ({e}); use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            have = f"{count} GPU(s), cuda:0 to cuda:{count - 1}" if count else "no CUDA GPU this torch can use"
            raise ConfigError(f"--device {name}: this machine has {have}")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:  # torch reports a missing backend with either
            raise ConfigError(f"--device {name}: not available here ({e})") from None
    return device


def load_as_trained(spec: str, cfg: TrainConfig, device: torch.device):
    """`spec` as training loads it: weights in --model-dtype, on `device`; run it under `compute_precision`."""
    return load_model(spec, device, dtype=cfg.model_dtype)


def evaluate_file(model: str, settings: Settings, data: str, log=print) -> dict[str, float]:
    """Held-out preference metrics of `model` against `settings.ref_model` on the pairs in `data`, computed
    as the run's own held-out evaluation does (its β, objective, ld_alpha and lengths; the reference's sums by
    the same `pairs_logps` in the same --eval-batch-size batches as the policy's, so a model evaluated against
    itself has margins exactly 0)."""
    cfg, ref_model = settings.cfg, settings.ref_model
    device = eval_device(cfg.device)
    tokenizer = load_tokenizer(model)
    pairs, report = load_pairs(data, cfg.on_bad_row, ranked_pairs=cfg.ranked_pairs,
                               ultrafeedback_score=cfg.ultrafeedback_score)
    tokenized, tok_report = tokenize_pairs(pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
    log(f"{report.summary()}\n  {tok_report.summary()}")
    reference = load_as_trained(ref_model, cfg, device)  # loaded (and probed) outside autocast, as in training
    with compute_precision(device, cfg.dtype):
        # ld_alpha as training computes the held-out reference: the policy's log-probs use it too
        ref = pairs_logps(reference, tokenized, cfg.eval_batch_size, tokenizer.pad_token_id, device,
                          ld_alpha=cfg.ld_alpha, prefix_sharing=cfg.prefix_sharing, pack_tokens=cfg.pack_tokens)
    del reference  # one model in memory at a time
    policy = load_as_trained(model, cfg, device)
    with compute_precision(device, cfg.dtype):
        metrics = evaluate_pairs(policy, tokenized, ref, cfg, tokenizer.pad_token_id, device)
    return {"model": model, "ref_model": ref_model, "data": data, "pairs": len(tokenized), "beta": cfg.beta,
            "loss": cfg.loss if isinstance(cfg.loss, str) else ",".join(cfg.loss), **metrics}


def reward_formula(settings: Settings) -> str:
    if settings.ref_model:
        return "β·(log π − log π_ref)"
    return "β·(mean token log π)" if any(o.averaged for o in settings.cfg.objectives) else "β·log π"


@torch.no_grad()
def score_completions(model: str, settings: Settings, prompt, completions: list) -> list[tuple[float, object]]:
    """(implicit reward, completion) for each candidate, best first: β·(log π − log π_ref), or without a
    reference the reference-free objective's own reward (`reward_formula`, as objectives.rewards). prompt and
    completions are strings, or message lists rendered with the chat template. ld_alpha is not applied: it
    weights a pair's tokens by the shorter completion's length, and candidates are not a pair."""
    cfg = settings.cfg
    tokenizer = load_tokenizer(model)
    conversational = isinstance(prompt, list)
    examples = [Completion(prompt, c, True, f"candidate {i + 1}", conversational) for i, c in enumerate(completions)]
    tokenized, report = tokenize_completions(examples, tokenizer, cfg.max_length, cfg.max_prompt_length)
    if len(tokenized) != len(examples):
        raise ConfigError(f"some candidates do not fit max_length: {report.summary()}")
    device = eval_device(cfg.device)
    batch = {k: v.to(device) for k, v in pad_rows([(t.prompt_ids, t.completion_ids) for t in tokenized],
                                                  tokenizer.pad_token_id).items()}

    def logps_of(spec: str) -> torch.Tensor:  # [N] on the CPU; the model is released after its pass
        net = load_as_trained(spec, cfg, device)
        with compute_precision(device, cfg.dtype):
            return sequence_logps(net, **batch).cpu()
    logps = logps_of(model)
    if settings.ref_model:
        logps = logps - logps_of(settings.ref_model)
    elif any(o.averaged for o in cfg.objectives):  # reference-free simpo, orpo: their reward is per token
        logps = logps / torch.tensor([len(t.completion_ids) for t in tokenized], dtype=logps.dtype)
    rewards = (cfg.beta * logps).tolist()
    return sorted(zip(rewards, completions), key=lambda rc: -rc[0])
