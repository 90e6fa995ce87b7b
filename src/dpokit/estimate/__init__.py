"""Peak memory of a training run, by part, from the model's config alone: no weights are read.

shape.py: the model's config → `Shape` (the meta device) and the data's tokens per micro-batch;
parts.py: the arithmetic, part by part and phase by phase (its docstring says how each part is counted);
check.py: what is available, what would fit, the `dpokit estimate` report and train's pre-load check.
"""

import os

from dpokit.estimate.check import (alternatives, available_bytes, cgroup_free, check_memory, fits,
                                   format_estimate, report, share)
from dpokit.estimate.parts import GiB, Estimate, activation_bytes, estimate, head_bytes
from dpokit.estimate.shape import Shape, data_for, load_config, micro_batch_tokens, model_shape, shapes_for


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


__all__ = ["GiB", "Estimate", "Shape", "activation_bytes", "alternatives", "available_bytes", "cgroup_free",
           "check_memory", "data_for", "estimate", "fits", "format_estimate", "head_bytes", "load_config",
           "micro_batch_tokens", "model_shape", "report", "share", "shapes_for", "world_size"]
