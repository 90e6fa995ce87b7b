"""Batched sampling with the KV cache: the completions that evaluation scores and pair making compares.

Our own decode loop rather than `model.generate`: on CPU, `torch.multinomial` over a 49k vocabulary
draws an exponential variate per vocabulary entry and was ~40 % of every decode step (150 ms of 373 at
batch 128, measured with the torch profiler). Inverse-CDF sampling (one uniform per row, a cumsum and a
binary search) draws from exactly the same categorical distribution at a fraction of the cost.

Prompts are left-padded so every row's next token sits in the last column; position ids are counted
from each row's first real token, so padding changes nothing a row computes.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch

from dpokit.config import ConfigError


@dataclass
class Samples:
    """n completions per prompt, grouped: row i * n + j is sample j of prompt i."""
    prompts: list                   # the prompts as given (strings or message lists), one per prompt
    n: int
    prompt_ids: list[list[int]]     # per row
    completion_ids: list[list[int]]  # per row; ends with EOS when the model stopped by itself
    texts: list[str]                # per row; decoded completion without special tokens
    logps: list[float]              # per row; Σ log π(token | prefix) under the model itself (T = 1, no top-p),
                                    # whatever the sampling temperature: the generation metrics' KL estimate
    new_tokens: int = 0             # tokens generated in all (for the cost accounting)
    seconds: float = 0.0
    truncated: list[bool] | None = None  # per row; True: stopped by max_new_tokens, not by EOS (None: unknown)

    def prompt_of(self, row: int):
        return self.prompts[row // self.n]

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completion_ids]


def prompt_token_ids(prompt, tokenizer) -> list[int]:
    """A prompt as the model sees it: raw text as is, a message list through the chat template."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                             return_dict=False)
    return tokenizer(prompt)["input_ids"]


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Draw one token per row from softmax(logits / temperature), restricted to the top-p nucleus.
    logits: [B, V] → [B]. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)
    # a zero-probability entry can never be hit: searchsorted returns the first index with cdf >= u
    return token if order is None else order.gather(-1, token.unsqueeze(-1)).squeeze(-1)


def cache_keyword(model) -> str:
    """The name of the KV cache in a causal LM's forward arguments and outputs: `cache` in current transformers
    (5.24 deprecates `past_key_values`, to be removed in 5.40), `past_key_values` in earlier 5.x releases."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT's forward takes **kwargs
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def _decode(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int, temperature: float,
            top_p: float, generator: torch.Generator, device) -> tuple[list[list[int]], list[float]]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention[i, width - len(p):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache_arg = cache_keyword(model)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache, done = out[cache_arg], torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated, logps = [], torch.zeros(len(prompts), dtype=torch.float64, device=device)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        token = next_token(logits, temperature, top_p, generator)
        # the model's own log-prob of what it emitted: with the reference's, an estimate of KL(π‖π_ref)
        logps += torch.where(done, 0.0, logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)).double()
        token = torch.where(done, torch.full_like(token, pad_id), token)
        generated.append(token)
        done |= token == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        # finished rows keep decoding padding; their outputs are discarded, so they may attend freely
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token.unsqueeze(-1), attention_mask=attention, position_ids=positions,
                    use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        cache = out[cache_arg]
    rows = torch.stack(generated, dim=1).tolist()
    completions = []
    for row in rows:
        # keep tokens up to and including the first EOS; later columns are padding
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        completions.append(row[:end])
    return completions, logps.tolist()


def sample(model, tokenizer, prompts: list, n: int = 1, max_new_tokens: int = 32, temperature: float = 1.0,
           top_p: float = 1.0, batch_size: int = 128, seed: int = 0, device=None) -> Samples:
    """n completions of each prompt, sampled from `model` with the KV cache, `batch_size` rows at a time.

    Rows are sorted by prompt length before batching (less padding) and returned in prompt order; the
    same seed gives the same samples for the same prompts and batch size.
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    device = device or next(model.parameters()).device
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    prompt_ids = [prompt_token_ids(p, tokenizer) for p in prompts]
    rows = [prompt_ids[i] for i in range(len(prompts)) for _ in range(n)]
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    generator = torch.Generator(device=device).manual_seed(seed)
    completions: list[list[int]] = [[] for _ in rows]
    logps = [0.0] * len(rows)
    was_training, start = model.training, time.perf_counter()
    model.eval()
    try:
        for b in range(0, len(order), batch_size):
            chunk = order[b:b + batch_size]
            out, out_logps = _decode(model, [rows[r] for r in chunk], max_new_tokens, eos_id, pad_id, temperature,
                                     top_p, generator, device)
            for r, c, lp in zip(chunk, out, out_logps):
                completions[r], logps[r] = c, lp
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Samples(list(prompts), n, rows, completions, texts, logps, sum(len(c) for c in completions),
                   time.perf_counter() - start, [not c or c[-1] != eos_id for c in completions])
