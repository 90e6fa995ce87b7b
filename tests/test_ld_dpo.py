"""LD-DPO (--ld-alpha) down-weights the tokens beyond the shorter completion in the DPO log-ratios only:
every NLL term (sft, cpo's, the `nll` metric) stays the plain NLL of all chosen tokens, as in TRL 1.16 (its
sft loss is −mean of the per-token chosen log-probs, whatever ld_alpha is). Checked here against the formulas
written out from the model's full logits; tests/test_trl_parity.py checks TRL. simpo and orpo (per-token
averages) are refused with ld_alpha."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from dpokit.batches import collate, tokenize_pair
from dpokit.config import ConfigError, TrainConfig
from dpokit.data.formats import Pair
from dpokit.logprobs import pair_logps
from dpokit.objectives.registry import combined_loss

ALPHA, BETA, W_SFT = 0.3, 0.5, 0.5


def per_token(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log π(y_t | x, y_<t) of each completion token, from the model's full logits of one sequence."""
    x = torch.tensor([prompt + completion])
    logps = F.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1).gather(-1, x[0, 1:, None]).squeeze(-1)
    return logps[len(prompt) - 1:]


def ld_sum(tokens: torch.Tensor, shared: int) -> torch.Tensor:
    return tokens[:shared].sum() + ALPHA * tokens[shared:].sum()


@pytest.fixture
def setup(tokenizer, explicit_rows):
    pairs = [tokenize_pair(Pair(r["prompt"], r["chosen"], r["rejected"], f"x:{i}"), tokenizer, 512, None)
             for i, r in enumerate(explicit_rows[:4])]
    assert any(len(p.chosen_ids) > len(p.rejected_ids) for p in pairs)  # LD really cuts some chosen tails
    return pairs, make_tiny_model(len(tokenizer), seed=0), make_tiny_model(len(tokenizer), seed=1)


@pytest.mark.parametrize("second", ["sft", "cpo"])
def test_ld_alpha_leaves_the_nll_terms_plain(tokenizer, setup, second):
    """sigmoid + {sft (RPO), cpo} under LD-DPO. Failed before the fix: the NLL summed the LD-weighted
    chosen log-probs (nll 5.48 instead of 6.39 here, every loss off by w · 0.91)."""
    pairs, policy, ref = setup
    options = dict(loss=f"sigmoid,{second}", loss_weights=f"1.0,{W_SFT}", beta=BETA, ld_alpha=ALPHA)
    cfg = TrainConfig.from_dict(options | ({"cpo_alpha": 0.7} if second == "cpo" else {}))
    batch = collate(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        pol, rf = pair_logps(policy, batch, ALPHA), pair_logps(ref, batch, ALPHA)
        ours, metrics = combined_loss(cfg.loss_names, cfg.loss_weight_values, pol, rf, cfg)
        terms = []
        for p in pairs:
            shared = min(len(p.chosen_ids), len(p.rejected_ids))
            tok = {(m, side): per_token(m, p.prompt_ids, getattr(p, f"{side}_ids"))
                   for m in (policy, ref) for side in ("chosen", "rejected")}
            terms.append(dict(pw=ld_sum(tok[policy, "chosen"], shared), pl=ld_sum(tok[policy, "rejected"], shared),
                              rw=ld_sum(tok[ref, "chosen"], shared), rl=ld_sum(tok[ref, "rejected"], shared),
                              nw=len(p.chosen_ids), nl=len(p.rejected_ids), plain_w=tok[policy, "chosen"].sum()))
    nll = -sum(t["plain_w"] for t in terms) / sum(t["nw"] for t in terms)  # every chosen token, weight 1
    dpo = torch.stack([-F.logsigmoid(BETA * ((t["pw"] - t["rw"]) - (t["pl"] - t["rl"]))) for t in terms]).mean()
    if second == "sft":     # RPO: DPO on LD-weighted log-ratios + w · plain NLL
        extra = nll
    else:                   # cpo: −log σ(β (LD log π(y_w) − LD log π(y_l))) + α · plain NLL
        extra = torch.stack([-F.logsigmoid(BETA * (t["pw"] - t["pl"])) for t in terms]).mean() + 0.7 * nll
    assert metrics["nll"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert ours.mean().item() == pytest.approx((dpo + W_SFT * extra).item(), rel=1e-5, abs=1e-6)
    # the LD weighting is real here: the weighted chosen sums differ from the plain ones
    assert not torch.allclose(pol.chosen.double(), torch.stack([t["plain_w"] for t in terms]), rtol=1e-3)


@pytest.mark.parametrize("second", ["simpo", "orpo"])
def test_ld_alpha_is_refused_with_simpo_and_orpo(second):
    """Their per-token averages would divide an LD-weighted sum by the unweighted token count (neither TRL's
    CPOTrainer nor its ORPOTrainer has ld_alpha): refused, naming both options."""
    with pytest.raises(ConfigError, match=f"ld_alpha.*{second}"):
        TrainConfig.from_dict(dict(loss=f"sigmoid,{second}", ld_alpha=0.5))
    TrainConfig.from_dict(dict(loss=f"sigmoid,{second}"))  # fine without it


def test_plain_chosen_is_carried_only_with_ld_alpha(tokenizer, setup):
    pairs, policy, _ = setup
    batch = collate(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        plain, ld = pair_logps(policy, batch), pair_logps(policy, batch, ALPHA)
    assert plain.chosen_plain is None
    torch.testing.assert_close(ld.chosen_plain, plain.chosen)
    torch.testing.assert_close(ld.select([2, 0]).chosen_plain, plain.chosen[[2, 0]])


def test_held_out_log_probs_carry_the_plain_chosen_sum(tokenizer, setup):
    """eval/loss and eval's nll come from `pairs_logps`' concatenation: it must keep `chosen_plain`."""
    from dpokit.logprobs import pairs_logps
    pairs, policy, _ = setup
    with torch.no_grad():
        whole = pair_logps(policy, collate(pairs, tokenizer.pad_token_id), ALPHA)
        batched = pairs_logps(policy, pairs, 2, tokenizer.pad_token_id, "cpu", ld_alpha=ALPHA, prefix_sharing=False)
    torch.testing.assert_close(batched.chosen_plain, whole.chosen_plain, rtol=1e-5, atol=1e-5)
