"""Reward functions: the ground truth that generation metrics, pair making and online methods score with.

A reward function takes `(prompts, completions)` — two equal-length lists, prompts as given (strings or
message lists), completions as strings — and returns one float per row, higher = better. `load_reward`
turns a spec into one:

- `sentiment`: the VADER lexicon's compound score of prompt + completion, in [-1, 1] (Hutto & Gilbert
  2014, the `vaderSentiment` package). Offline, deterministic, ~0.1 ms a text. The prompt is included
  because the review is prompt + continuation; the built-in prompts are chosen to be neutral.
- a local folder of an HF sequence-classification model (a reward model, e.g. `dpokit train-rm`'s final/): its
  logit for one label. One-label models give their only logit; others need the label named after `#`
  (`./clf#POSITIVE`). Loaded from safetensors only, without remote code, like every dpokit model. What it reads:
  if its tokenizer has a chat template, the conversation [user: prompt, assistant: completion] (a message
  list prompt, plus the assistant turn) rendered by that template, as chat reward models are trained;
  otherwise the plain text prompt + completion. Token ids: `reward_model_ids` (truncated to the tokenizer's
  model_max_length, which train-rm sets to its --max-length), batches right-padded by `reward_model_batch`;
  `dpokit train-rm` trains on exactly these, so its scores in training are the scores here. Each call that
  scores rows reaching model_max_length says so in one warning (RewardTruncationWarning: how many rows, the
  limit, the side cut): a cut row is scored without its end, so its reward is not the whole completion's.
- `module:function`: any importable Python callable with the signature above.
"""

from __future__ import annotations

import importlib
import math
import warnings
from pathlib import Path
from typing import Callable

RewardFn = Callable[[list, list[str]], list[float]]


class RewardError(ValueError):
    """A reward spec that cannot be loaded, or a reward function that returned something unusable."""


class RewardTruncationWarning(UserWarning):
    """A reward model scored rows cut at its tokenizer's model_max_length (one warning per call, with the count)."""


def _text(prompt) -> str:
    if isinstance(prompt, list):  # a conversation (or a completion's messages): the text of its messages
        return "\n".join(str(m.get("content", "")) for m in prompt)
    return prompt


def _conversation(prompt, completion: str) -> list[dict]:
    user = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    return user + reply


def reward_model_inputs(tokenizer, prompts: list, completions: list[str]) -> tuple[list[str], bool]:
    """(texts, add_special_tokens) a reward model reads (module docstring): chat-rendered texts already hold
    the template's special tokens, so the tokenizer must not add its own again."""
    if tokenizer.chat_template:
        return [tokenizer.apply_chat_template(_conversation(p, c), tokenize=False)
                for p, c in zip(prompts, completions)], False
    return [_text(p) + _text(c) for p, c in zip(prompts, completions)], True


def reward_model_ids(tokenizer, prompts: list, completions: list) -> list[list[int]]:
    """The token ids a reward model scores for each (prompt, completion): `reward_model_inputs` tokenized, cut
    at the tokenizer's model_max_length from the end (the score is read at the last token that remains)."""
    texts, special = reward_model_inputs(tokenizer, prompts, completions)
    return tokenizer(texts, truncation=True, add_special_tokens=special)["input_ids"]


def reward_model_batch(tokenizer, ids: list[list[int]], device="cpu") -> dict:
    """input_ids and attention_mask of a batch, padded on the right with the tokenizer's pad id: without
    position ids, left padding would shift a row's positions by its padding, so its score would depend on the
    rows it is batched with. HF's classifier reads each row at its last non-pad token."""
    import torch
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], dtype=torch.long, device=device)
    return {"input_ids": input_ids, "attention_mask": mask}


def sentiment_reward() -> RewardFn:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = SentimentIntensityAnalyzer()

    def sentiment(prompts: list, completions: list[str]) -> list[float]:
        return [analyzer.polarity_scores(_text(p) + c)["compound"] for p, c in zip(prompts, completions)]
    return sentiment


def classifier_reward(folder: str, label: str | None = None, device: str = "cpu", batch_size: int = 32) -> RewardFn:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True,
                                                                   trust_remote_code=False).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise RewardError(f"reward model {folder}: cannot load a safetensors sequence-classification model: {e}")
    labels = model.config.id2label or {}
    if label is None and model.config.num_labels != 1:
        names = sorted(str(v) for v in labels.values())
        raise RewardError(f"reward model {folder}: a classifier with {model.config.num_labels} labels ({names}) "
                          f"gives no single reward; name the label to use as {folder}#LABEL, e.g. "
                          f"{folder}#{names[-1]}, or train a one-label reward model (`dpokit train-rm`)")
    if label is None:
        index = 0
    else:
        by_name = {str(v): int(k) for k, v in labels.items()}
        if label not in by_name:
            raise RewardError(f"reward model {folder}: no label {label!r}; it has {sorted(by_name)}")
        index = by_name[label]
    # HF finds each row's last real token as the last one that is not config.pad_token_id, and refuses
    # batches > 1 without one: the tokenizer must pad with exactly that id.
    if tokenizer.pad_token is None:
        if model.config.pad_token_id is not None:
            tokenizer.pad_token_id = model.config.pad_token_id
        else:
            tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    @torch.no_grad()
    def classifier(prompts: list, completions: list[str]) -> list[float]:
        ids = reward_model_ids(tokenizer, prompts, completions)
        cut = sum(len(x) >= tokenizer.model_max_length for x in ids)  # counted as train-rm counts its rows
        if cut:
            warnings.warn(f"reward model {folder}: {cut} of {len(ids)} rows reached its tokenizer's model_max_length "
                          f"of {tokenizer.model_max_length} tokens and were cut on the {tokenizer.truncation_side}: "
                          "their scores miss the " + ("end of the completion" if tokenizer.truncation_side == "right"
                                                      else "start of the prompt") + "; raise model_max_length in "
                          f"{folder}/tokenizer_config.json (train-rm sets it to its --max-length) or shorten the "
                          "prompts or --max-new-tokens", RewardTruncationWarning, stacklevel=2)
        scores = []
        for i in range(0, len(ids), batch_size):
            scores += model(**reward_model_batch(tokenizer, ids[i:i + batch_size], device)).logits[:, index].float() \
                .tolist()
        return scores
    return classifier


def callable_reward(spec: str) -> RewardFn:
    module_name, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"reward {spec!r}: cannot import {name!r} from module {module_name!r}: {e}")
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {name!r} is not callable")
    return fn


def classifier_folder(spec: str) -> tuple[str, str | None] | None:
    """(folder, label or None) when `spec` names a classifier folder (`DIR` or `DIR#LABEL`), else None. What
    load_reward and PPO's value model (loop/ppo.py) both read it as: `sentiment` is the built-in reward, even
    where a folder of that name exists."""
    if spec == "sentiment":
        return None
    folder, _, label = spec.partition("#")
    return (folder, label or None) if Path(folder).is_dir() else None


def load_reward(spec: str, device: str = "cpu") -> RewardFn:
    """A reward function from a spec: `sentiment`, a classifier folder (`dir` or `dir#LABEL`), or
    `module:function`. The result checks what the function returns (one finite float per row)."""
    if spec == "sentiment":
        fn = sentiment_reward()
    elif (source := classifier_folder(spec)) is not None:
        fn = classifier_reward(*source, device)
    elif ":" in spec:
        fn = callable_reward(spec)
    else:
        raise RewardError(f"reward {spec!r}: not 'sentiment', an existing model folder, or module:function")
    return checked(fn, spec)


def checked(fn: RewardFn, name: str) -> RewardFn:
    def reward(prompts: list, completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise RewardError(f"reward {name}: {len(prompts)} prompts but {len(completions)} completions")
        values = list(fn(prompts, completions))
        if len(values) != len(completions):
            raise RewardError(f"reward {name}: returned {len(values)} values for {len(completions)} completions")
        out = []
        for i, v in enumerate(values):
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise RewardError(f"reward {name}: value {i} is {v!r}, not a number")
            if not math.isfinite(v):
                raise RewardError(f"reward {name}: value {i} is {v} for completion {completions[i][:80]!r}")
            out.append(v)
        return out
    reward.__name__ = name
    return reward


class Scores(list):
    """The weighted rewards of a batch, one float per row (a list), carrying each reward function's own
    unweighted rewards by name in `columns`: online runs log them as rewards/<name>/mean and /std (TRL's)."""

    def __init__(self, values, columns: dict[str, list[float]]):
        super().__init__(values)
        self.columns = columns


def reward_names(specs: list[str]) -> list[str]:
    """A short name per spec, as TRL names reward functions: the function's name for `module:function`, the
    folder's name (and #label) for a classifier, `sentiment`; a repeated name gets _2, _3, … after it."""
    names: list[str] = []
    for spec in specs:
        if (source := classifier_folder(spec)) is not None:
            base = Path(source[0]).resolve().name + (f"#{source[1]}" if source[1] else "")
        else:
            base = spec.rpartition(":")[2] or spec
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


def combine(specs: list[str], weights: list[float] | None = None, device: str = "cpu") -> RewardFn:
    """Σ_i w_i · r_i(prompt, completion) over several reward specs (all weights 1 by default). Several specs
    or a weight ≠ 1: the result is `Scores`, each function's column named by `reward_names`."""
    weights = weights or [1.0] * len(specs)
    if len(weights) != len(specs):
        raise RewardError(f"{len(specs)} rewards but {len(weights)} weights")
    fns = [load_reward(s, device) for s in specs]
    if len(fns) == 1 and weights[0] == 1.0:
        return fns[0]
    names = reward_names(specs)

    def weighted(prompts: list, completions: list[str]) -> Scores:
        columns = [fn(prompts, completions) for fn in fns]
        return Scores([sum(w * c[i] for w, c in zip(weights, columns)) for i in range(len(completions))],
                      dict(zip(names, columns)))
    weighted.__name__ = "+".join(f"{w:g}*{s}" for w, s in zip(weights, specs))
    return weighted
