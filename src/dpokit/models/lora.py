"""LoRA adapters through PEFT, and switching dropout off so log-prob ratios stay deterministic."""

from __future__ import annotations

import torch

from dpokit.models.load import ModelError


def add_lora(policy, cfg, log, task_type: str = "CAUSAL_LM"):
    """Wrap the policy in PEFT LoRA adapters; only they train (B starts at 0, so π = π_ref at step 0).
    task_type "SEQ_CLS" (a reward model): PEFT also trains the classifier's fresh score head in full
    (modules_to_save), since a random head with frozen weights would learn nothing."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModelError("--lora-r needs peft: pip install 'dpokit[lora]'") from None
    targets = cfg.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    disable_dropout(policy)  # the base stays deterministic; only the LoRA path gets --lora-dropout
    policy = get_peft_model(policy, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                               target_modules=targets, task_type=task_type))
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    log(f"LoRA r={cfg.lora_r}: training {trainable:,} of {total:,} parameters ({trainable / total:.2%})")
    return policy.train(cfg.lora_dropout > 0)  # train mode only to switch the LoRA dropout on


def disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def base_weights(module) -> dict:
    """The state dict `module` (a PEFT-wrapped model or one of its submodules) had before adapters were added: the
    LoRA weights left out, each wrapped layer's `base_layer` named as the plain layer was. A plain module's own."""
    state = module.state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
