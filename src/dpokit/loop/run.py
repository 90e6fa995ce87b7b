"""`train`: the one entry point. It chooses how the config trains — offline on a data file (loop/train.py),
a reward model (loop/reward_model.py, `dpokit train-rm`), supervised fine-tuning (loop/sft.py, `dpokit sft`),
online on the policy's own samples (loop/online.py: GRPO, RLOO, online DPO; PPO with loop/ppo.py's step) or
iterative DPO (loop/iterative.py) — and calls that loop; no loop calls another back through here."""

from __future__ import annotations

from dpokit.config import TrainConfig
from dpokit.distributed import check_launch
from dpokit.logprobs.attention import attention_kind
from dpokit.loop.checkpoint import deterministic_kernels
from dpokit.loop.iterative import iterative_dpo
from dpokit.loop.online import train_online
from dpokit.loop.ppo import ppo_method
from dpokit.loop.result import TrainResult
from dpokit.loop.reward_model import train_reward_model
from dpokit.loop.sft import train_sft
from dpokit.loop.train import train_offline


def train(config: TrainConfig | None = None, log=print, **overrides) -> TrainResult:
    """Train a policy with the configured objective (DPO by default).

    `overrides` are TrainConfig fields: train(beta=0.5, data="pairs.jsonl"). Under torchrun (or inside a
    process group the caller made) this process trains its share: DDP, or FSDP2 with fsdp=True."""
    cfg = TrainConfig.from_dict({**(config.to_dict() if config else {}), **overrides})
    if cfg.stage == "reward_model":  # `dpokit train-rm`: a Bradley–Terry classifier on the pairs file
        return train_reward_model(cfg, log)
    if cfg.stage == "sft":  # `dpokit sft`: the NLL of demonstrations
        return train_sft(cfg, log)
    if not cfg.online:
        return train_offline(cfg, log)
    # GRPO / online DPO / iterative DPO: trains on its own samples, not on a pairs file
    check_launch(cfg.loss_names)  # under torchrun: DDP (loop/online_dist.py); AOT refused
    with deterministic_kernels(cfg.deterministic), attention_kind(cfg.attention, log):
        if cfg.memory_check:
            log("memory check: not available for online runs (sampling is not modelled; docs/PERFORMANCE.md)")
        if cfg.rounds:
            return iterative_dpo(cfg, log)
        return train_online(cfg, log, ppo_method if cfg.loss_names == ["ppo"] else None)

