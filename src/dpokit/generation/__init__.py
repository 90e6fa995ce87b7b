"""Sampling from a policy (KV cache, batched, seeded): for generation metrics, pair making and online methods."""

from dpokit.generation.sample import Samples, next_token, prompt_token_ids, sample

__all__ = ["Samples", "next_token", "prompt_token_ids", "sample"]
