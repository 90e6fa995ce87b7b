"""Stage 1 — data: read preference files of any supported format into `Pair`s, or fail precisely."""

from importlib import resources

from dpokit.data.errors import DataError
from dpokit.data.formats import Completion, LoadReport, Pair, load_completions, load_pairs
from dpokit.data.prompts import load_prompts


def builtin_path(name: str) -> str:
    """Path of a preference file shipped inside dpokit ("helpful_train", "helpful_eval", "sentiment_train", "sentiment_eval")."""
    return str(resources.files("dpokit.data") / "builtin" / f"{name}.jsonl")


__all__ = ["Completion", "DataError", "LoadReport", "Pair", "builtin_path", "load_completions", "load_pairs",
           "load_prompts"]
