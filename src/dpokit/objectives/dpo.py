"""DPO (Rafailov et al. 2023, arXiv:2305.18290) and conservative DPO (cDPO, Mitchell 2023)."""

from __future__ import annotations

import torch

from dpokit.objectives.paired import sigmoid_loss


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss (paper Eq. 7), with cDPO label smoothing ε.

        h    = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))
        loss = −(1 − ε) · log σ(β h) − ε · log σ(−β h)

    ε = 0 is plain DPO; ε > 0 assumes each label is flipped with probability ε (cDPO).
    All inputs are [B] summed completion log-probs. Returns (losses [B], chosen_rewards [B],
    rejected_rewards [B]) where the implicit rewards are β · (log π − log π_ref), detached.
    log σ is computed as `F.logsigmoid`, finite with a finite gradient for any |β h|.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = sigmoid_loss(chosen_logratios, rejected_logratios, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
