"""dpokit: Direct Preference Optimization in plain PyTorch.

    from dpokit import train, TrainConfig
    result = train(TrainConfig(data="pairs.jsonl", beta=0.1, output_dir="runs/x"))

The package follows the pipeline: data → batches → logprobs → objectives → loop → evaluation.
"""

from dpokit.config import ConfigError, TrainConfig
from dpokit.data import DataError, load_pairs
from dpokit.loop import TrainResult, train

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "TrainConfig", "TrainResult", "load_pairs", "train", "__version__"]
