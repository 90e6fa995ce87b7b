"""Loading policies and references: the embedded SmolLM2, GGUF files, HF folders and hub ids."""

from dpokit.models.load import cache_dir, embedded_gguf_path, load_model, load_tokenizer

__all__ = ["cache_dir", "embedded_gguf_path", "load_model", "load_tokenizer"]
