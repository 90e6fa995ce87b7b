"""dpokit: Direct Preference Optimization in plain PyTorch.

    from dpokit import train, TrainConfig
    result = train(TrainConfig(data="pairs.jsonl", beta=0.1, output_dir="runs/x"))

The package follows the pipeline: data → batches → logprobs → objectives → loop → evaluation (the import order
is in docs/ARCHITECTURE.md). The names below load on first use, so `import dpokit.cli` (and `dpokit --help`)
does not import torch.
"""

from importlib import import_module

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "TrainConfig", "TrainResult", "load_pairs", "train", "__version__"]

_HOME = {"ConfigError": "dpokit.config", "TrainConfig": "dpokit.config", "DataError": "dpokit.data",
         "load_pairs": "dpokit.data", "TrainResult": "dpokit.loop", "train": "dpokit.loop"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(_HOME[name]), name)
    raise AttributeError(f"module 'dpokit' has no attribute {name!r}")
