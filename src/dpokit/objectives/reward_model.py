"""The Bradley–Terry reward-model loss (`dpokit train-rm`, loop/reward_model.py): scalar scores of the chosen and
rejected sequences in, one loss per pair out. Not a `--loss` of `dpokit train` (it trains a classifier, not a
policy), so it is not in the registry."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None,
                       center_coefficient: float | None = None) -> Tensor:
    """Per-pair loss of a reward model r under the Bradley–Terry model P(y_w ≻ y_l | x) = σ(r_w − r_l)
    (Bradley & Terry 1952; as a reward model for RLHF: Ziegler et al. 2019, Stiennon et al. 2020, Ouyang et al.
    2022, Eq. 1), with TRL's RewardTrainer extensions:

        loss_i = −log σ(r_c,i − r_r,i − m_i) + c · (r_c,i + r_r,i)²

    m_i: the pair's margin (Llama 2, Touvron et al. 2023, §3.2.2: a larger margin for more distinct ratings;
    0 where a row gives none); c: `center_rewards_coefficient` (Eisenstein et al. 2023, "Helping or Herding?":
    the second term pulls the rewards' mean towards 0, since the first term only sees differences). The mean of
    loss_i over the batch is TRL's loss: −mean log σ(·) + c · mean((r_c + r_r)²).

    chosen, rejected: [B] scores (fp32); margin: [B] or None; returns [B]."""
    logits = chosen - rejected
    if margin is not None:
        logits = logits - margin
    loss = -F.logsigmoid(logits)
    if center_coefficient:
        loss = loss + center_coefficient * (chosen + rejected) ** 2
    return loss
