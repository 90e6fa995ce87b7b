"""Activations one forward keeps for backward on the embedded SmolLM2-135M, with and without models/lean.py.

    .venv/bin/python docs/lean_measure.py 1024 lean     # then: … 1024 plain (each in a fresh process)

Prints the RSS growth over one forward of T random tokens with grad on, per token and layer in fp32 floats, and a
gradient norm and output sum that must agree between the two modes (the change is exact).
"""
import gc
import os
import sys

import psutil
import torch

import dpokit.models.lean as lean
from dpokit.models import load_model

T = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
use = (sys.argv[2] if len(sys.argv) > 2 else "lean") == "lean"
if not use:
    lean.install = lambda model: 0  # load_model then leaves the stock forwards in place
model = load_model("embedded", "cpu")
torch.manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (1, T))
proc = psutil.Process(os.getpid())
gc.collect()
before = proc.memory_info().rss
hidden = model.model(input_ids=ids).last_hidden_state
kept = proc.memory_info().rss - before
hidden.float().pow(2).mean().backward()
layers = model.config.num_hidden_layers
print(f"{'lean' if use else 'plain'} T={T}: forward kept {kept / 1e6:.0f} MB = {kept / T / layers / 4:.0f} floats per "
      f"token and layer; grad norm {model.model.layers[3].mlp.gate_proj.weight.grad.norm().item():.6g}, output sum "
      f"{hidden.sum().item():.6g}")
