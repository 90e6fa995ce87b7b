"""`dpokit eval` and `dpokit score`: a trained policy against its reference, after training.

score: "your language model is secretly a reward model" (the DPO paper's title) as a command — rank
candidate completions of a prompt by the implicit reward β·(log π(y|x) − log π_ref(y|x)).
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from dpokit.batches import pad_rows, tokenize_completions, tokenize_pairs
from dpokit.config import ConfigError, TrainConfig
from dpokit.data import Completion, load_pairs
from dpokit.evaluation.preference import evaluate_pairs, reference_logps
from dpokit.logprobs import compute_precision, sequence_logps
from dpokit.models import load_model, load_tokenizer
from dpokit.models.load import ModelError


def default_reference(model: str) -> str:
    """The starting model of a dpokit run folder (DIR/final → DIR/config.yaml's `model`)."""
    config = Path(model).parent / "config.yaml"
    if Path(model).name == "final" and config.is_file():
        run = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        if run.get("ref_model") or run.get("model"):
            return run.get("ref_model") or run["model"]
    raise ModelError(f"--ref-model is needed (--against): {model} is not the final/ folder of a dpokit run, "
                     "so its starting model is unknown")


def evaluate_file(model: str, ref_model: str | None, data: str, cfg: TrainConfig, log=print) -> dict[str, float]:
    """Held-out preference metrics of `model` against `ref_model` on the pairs in `data`."""
    ref_model = ref_model or default_reference(model)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device == "auto" else
                          (cfg.device if cfg.device != "auto" else "cpu"))
    tokenizer = load_tokenizer(model)
    pairs, report = load_pairs(data, cfg.on_bad_row)
    tokenized, tok_report = tokenize_pairs(pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
    log(f"{report.summary()}\n  {tok_report.summary()}")
    with compute_precision(device, cfg.dtype):
        ref = reference_logps(load_model(ref_model, device), tokenized, cfg.eval_batch_size, tokenizer.pad_token_id,
                              device, prefix_sharing=cfg.prefix_sharing, pack_tokens=cfg.pack_tokens)
        metrics = evaluate_pairs(load_model(model, device), tokenized, ref, cfg, tokenizer.pad_token_id, device)
    return {"model": model, "ref_model": ref_model, "data": data, "pairs": len(tokenized), "beta": cfg.beta,
            **metrics}


@torch.no_grad()
def score_completions(model: str, ref_model: str | None, prompt, completions: list, beta: float,
                      cfg: TrainConfig) -> list[tuple[float, object]]:
    """(implicit reward, completion) for each candidate, best first. prompt/completions are strings, or
    message lists rendered with the chat template."""
    ref_model = ref_model or default_reference(model)
    tokenizer = load_tokenizer(model)
    conversational = isinstance(prompt, list)
    examples = [Completion(prompt, c, True, f"candidate {i + 1}", conversational) for i, c in enumerate(completions)]
    tokenized, report = tokenize_completions(examples, tokenizer, cfg.max_length, cfg.max_prompt_length)
    if len(tokenized) != len(examples):
        raise ConfigError(f"some candidates do not fit max_length: {report.summary()}")
    batch = pad_rows([(t.prompt_ids, t.completion_ids) for t in tokenized], tokenizer.pad_token_id)
    policy_logps = sequence_logps(load_model(model), **batch)
    ref_logps = sequence_logps(load_model(ref_model), **batch)
    rewards = (beta * (policy_logps - ref_logps)).tolist()
    return sorted(zip(rewards, completions), key=lambda rc: -rc[0])
