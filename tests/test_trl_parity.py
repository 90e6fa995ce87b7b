"""Loss parity with TRL 1.16: for every objective both implement, the same tiny model, the same four
pairs and the same options give the same loss (absolute 1e-5 on O(1) losses; sppo_hard 5e-5, see CASE_TOL).

No training step is taken: each TRL trainer is built once per case, its own collator batches the pairs
(in dataset order, so rows line up with dpokit's), and `trainer.compute_loss` gives TRL's loss.
The token ids TRL feeds are asserted equal to dpokit's before any loss is compared.

- DPOTrainer tokenizes explicit pairs exactly like dpokit (common-prefix boundary, EOS as text, no BOS
  from this tokenizer), so its batch must equal dpokit's `collate` output tensor for tensor.
- TRL's CPO/ORPO trainers (trl.experimental) always prepend `tokenizer.bos_token` to the prompt
  (`add_bos_token_if_needed`), whereas dpokit adds special tokens only through the tokenizer, and this
  one adds none. For those trainers the dpokit side gets the BOS prepended to its prompt ids, so both
  score identical sequences (asserted), and the comparison is of the objectives on the same tokens.
- ORPO: TRL's NLL term covers prompt *and* completion tokens ("orpo chosen nll loss is computed over the
  full prompt and response", says TRL's ORPOTrainer); dpokit's covers the completion only. The
  odds-ratio term is compared exactly, and TRL's NLL is asserted to be the full-sequence NLL.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from conftest import make_tiny_model  # noqa: E402
from dpokit.batches import collate, tokenize_pair  # noqa: E402
from dpokit.batches.tokenize import TokenizedPair  # noqa: E402
from dpokit.config import TrainConfig  # noqa: E402
from dpokit.data.formats import Pair  # noqa: E402
from dpokit.logprobs import pair_logps  # noqa: E402
from dpokit.logprobs.attention import attention_kind  # noqa: E402
from dpokit.logprobs.sequence import completion_token_logps  # noqa: E402
from dpokit.objectives.paired import sft_loss  # noqa: E402
from dpokit.objectives.reference_free import orpo_loss  # noqa: E402
from dpokit.objectives.registry import combined_loss, needs_reference  # noqa: E402

BETA, TOL = 0.5, 1e-5
# Short explicit pairs with unequal chosen/rejected lengths (4–13 tokens), so length normalisation and LD-DPO
# matter, and summed log-probs stay small (|log π| ≈ 25–85): fp32 rounding of the sums is what bounds agreement.
ROWS = [dict(prompt=f"\n\nHuman: {q}\n\nAssistant:", chosen=c, rejected=r) for q, c, r in [
    ("How do I boil an egg?", " Simmer it for nine minutes.", " No."),
    ("Is the sun a star?", " Yes.", " It is a planet, I think."),
    ("Say hi.", " Hi there!", " I will not."),
    ("What is two plus two?", " Four.", " Five, probably.")]]
N_PAIRS = len(ROWS)


@pytest.fixture(scope="module")
def env(tokenizer):
    pairs = [Pair(r["prompt"], r["chosen"], r["rejected"], f"row{i}") for i, r in enumerate(ROWS)]
    # A different reference (seed 1) so every log-ratio is non-zero (|Δ| ≈ 0.02–0.8 nats here).
    return SimpleNamespace(tok=tokenizer, dataset=datasets.Dataset.from_list(ROWS),
                           tokenized=[tokenize_pair(p, tokenizer, 1024, None) for p in pairs],
                           policy=make_tiny_model(len(tokenizer), seed=0), ref=make_tiny_model(len(tokenizer), seed=1))


def trl_args(config_cls, tmp_path, **options):
    return config_cls(output_dir=str(tmp_path), per_device_train_batch_size=N_PAIRS, report_to=[], bf16=False,
                      use_cpu=True, gradient_checkpointing=False, max_length=1024, save_strategy="no", **options)


def dpokit_loss(env, tokenized, **options):
    """dpokit's batch loss as the training step computes it; returns (loss, metrics, batch, policy logps)."""
    cfg = TrainConfig.from_dict(options)
    batch = collate(tokenized, env.tok.pad_token_id)
    with torch.no_grad():
        ref = pair_logps(env.ref, batch, cfg.ld_alpha) if needs_reference(cfg.loss_names) else None
        pol = pair_logps(env.policy, batch, cfg.ld_alpha, cfg.use_weighting)
        losses, metrics = combined_loss(cfg.loss_names, cfg.loss_weight_values, pol, ref, cfg)
    return losses.mean().item(), metrics, batch, pol


# (TRL DPOConfig options, dpokit TrainConfig options); beta = BETA on both sides.
DPO_CASES = {
    "sigmoid": ({"loss_type": ["sigmoid"]}, {"loss": "sigmoid"}),
    "hinge": ({"loss_type": ["hinge"]}, {"loss": "hinge"}),
    "ipo": ({"loss_type": ["ipo"]}, {"loss": "ipo"}),
    "exo_pair": ({"loss_type": ["exo_pair"], "label_smoothing": 1e-3}, {"loss": "exo_pair", "label_smoothing": 1e-3}),
    "nca_pair": ({"loss_type": ["nca_pair"]}, {"loss": "nca_pair"}),
    "robust": ({"loss_type": ["robust"], "label_smoothing": 0.1}, {"loss": "robust", "label_smoothing": 0.1}),
    "bco_pair": ({"loss_type": ["bco_pair"]}, {"loss": "bco_pair"}),
    "sppo_hard": ({"loss_type": ["sppo_hard"]}, {"loss": "sppo_hard"}),
    "aot": ({"loss_type": ["aot"]}, {"loss": "aot"}),
    "aot_label_smoothing": ({"loss_type": ["aot"], "label_smoothing": 0.1}, {"loss": "aot", "label_smoothing": 0.1}),
    "aot_unpaired": ({"loss_type": ["aot_unpaired"]}, {"loss": "aot_unpaired"}),
    "apo_zero": ({"loss_type": ["apo_zero"]}, {"loss": "apo_zero"}),
    "apo_down": ({"loss_type": ["apo_down"]}, {"loss": "apo_down"}),
    "discopop": ({"loss_type": ["discopop"], "discopop_tau": 0.2}, {"loss": "discopop", "discopop_tau": 0.2}),
    "sft": ({"loss_type": ["sft"]}, {"loss": "sft"}),
    "sigmoid_norm": ({"loss_type": ["sigmoid_norm"]}, {"loss": "sigmoid_norm"}),
    "rpo": ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
            {"loss": "sigmoid,sft", "loss_weights": "1.0,0.5"}),
    "forward_kl": ({"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
                   {"loss": "sigmoid", "f_divergence": "forward_kl"}),
    "js": ({"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"}, {"loss": "sigmoid", "f_divergence": "js"}),
    "alpha": ({"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
              {"loss": "sigmoid", "f_divergence": "alpha", "f_alpha": 0.3}),
    "js_ipo": ({"loss_type": ["ipo"], "f_divergence_type": "js_divergence"}, {"loss": "ipo", "f_divergence": "js"}),
    "wpo": ({"loss_type": ["sigmoid"], "use_weighting": True}, {"loss": "sigmoid", "use_weighting": True}),
    "ld_alpha": ({"loss_type": ["sigmoid"], "ld_alpha": 0.5}, {"loss": "sigmoid", "ld_alpha": 0.5}),
    "wpo_ld_alpha_hinge": ({"loss_type": ["hinge"], "use_weighting": True, "ld_alpha": 0.5},
                           {"loss": "hinge", "use_weighting": True, "ld_alpha": 0.5}),
    "rpo_wpo": ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "use_weighting": True},
                {"loss": "sigmoid,sft", "loss_weights": "1.0,0.5", "use_weighting": True}),
    # LD weights the DPO log-ratios only; TRL's sft term is the plain NLL of every chosen token
    "rpo_ld_alpha": ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "ld_alpha": 0.3},
                     {"loss": "sigmoid,sft", "loss_weights": "1.0,0.5", "ld_alpha": 0.3}),
}
# Per-token log-probs are bitwise TRL's (test below); the per-sequence sums differ by fp32 summation order only
# (TRL: torch.sum over the padded row; dpokit: index_add), ≤ 2 ulp ≈ 1.5e-5 at |log π| ≈ 40–70. sppo_hard is a
# squared loss with slope 2|Δ ∓ 1/(2β)| ≈ 1–3 in those sums, so its fp32 floor is ≈ 1.4e-5 here (measured);
# every other case has a slope ≲ 1 and differs by ≤ 5e-6.
CASE_TOL = {"sppo_hard": 5e-5}


def dpo_trainer(env, tmp_path, **options):
    return trl.DPOTrainer(model=copy.deepcopy(env.policy), ref_model=copy.deepcopy(env.ref),
                          args=trl_args(trl.DPOConfig, tmp_path, beta=BETA, **options),
                          train_dataset=env.dataset, processing_class=env.tok)


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_trainer_loss_parity(env, tmp_path, case):
    theirs_opts, ours_opts = DPO_CASES[case]
    trainer = dpo_trainer(env, tmp_path, **theirs_opts)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(N_PAIRS)])
    ours, _, our_batch, pol = dpokit_loss(env, env.tokenized, beta=BETA, **ours_opts)
    assert sorted(batch) == sorted(our_batch)
    for key in our_batch:  # rows: B chosen then B rejected in both, right-padded with the same pad id
        assert torch.equal(batch[key], our_batch[key]), key
    try:
        with torch.no_grad():
            theirs = trainer.compute_loss(trainer.model, batch).item()
    except RuntimeError as e:
        if "written-to tensor refers to a single memory location" in str(e) and case == "rpo_wpo":
            pytest.skip("TRL 1.16 DPOTrainer cannot compute use_weighting with loss_type 'sft': "
                        "`per_sequence_loss *= chosen_weights * rejected_weights` is in place on the SFT loss "
                        f"made by `batch_loss.expand(batch_size)`, so it raises RuntimeError: {e}")
        raise
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    assert logged["logps/chosen"][-1] == pytest.approx(pol.chosen.mean().item(), rel=1e-6)  # LD-weighted in both
    assert logged["logps/rejected"][-1] == pytest.approx(pol.rejected.mean().item(), rel=1e-6)
    assert ours == pytest.approx(theirs, abs=CASE_TOL.get(case, TOL)), f"{case}: dpokit {ours:.8f} vs TRL {theirs:.8f}"


def test_token_logps_equal_trl_fused_head(env, tmp_path):
    """The floor of every comparison: per-token log π (and WPO's log Σ_v π²) as TRL's fused LM head gives them."""
    trainer = dpo_trainer(env, tmp_path, loss_type=["sigmoid"], use_weighting=True)
    batch = collate(env.tokenized, env.tok.pad_token_id)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    scored = batch["completion_mask"][:, 1:].bool()
    with torch.no_grad():
        out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                            fused_lm_head=True)
        with attention_kind("dense"):  # the same attention call as TRL's: bit for bit
            ours = completion_token_logps(env.policy, batch["input_ids"], batch["attention_mask"],
                                          batch["completion_mask"], with_sq=True)
        with attention_kind("segments"):  # one SDPA call per row instead: the same to fp32 rounding
            segments = completion_token_logps(env.policy, batch["input_ids"], batch["attention_mask"],
                                              batch["completion_mask"])
    assert torch.equal(out.log_probs[scored], ours.values)
    torch.testing.assert_close(out.log_sum_sq_probs[scored], ours.log_sum_sq, rtol=0, atol=1e-5)
    torch.testing.assert_close(segments.values, ours.values, rtol=1e-6, atol=1e-6)


def with_bos(env) -> list[TokenizedPair]:
    """dpokit's pairs with TRL CPO/ORPO's forced BOS in front of the prompt (see the module docstring)."""
    bos = env.tok.bos_token_id
    return [TokenizedPair([bos] + p.prompt_ids, p.chosen_ids, p.rejected_ids, p.source) for p in env.tokenized]


def legacy_batch(trainer, tokenized):
    """TRL CPO/ORPO batch, after asserting each sequence and its scored tokens equal dpokit's."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(N_PAIRS)])
    for side in ("chosen", "rejected"):
        for i, p in enumerate(tokenized):
            keep = batch[f"{side}_attention_mask"][i].bool()
            completion = getattr(p, f"{side}_ids")
            assert batch[f"{side}_input_ids"][i][keep].tolist() == p.prompt_ids + completion
            assert batch[f"{side}_labels"][i][keep].tolist() == [-100] * len(p.prompt_ids) + completion
    return batch


# (TRL CPOConfig options, dpokit TrainConfig options)
CPO_CASES = {
    "cpo": ({"loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 0.5},
            {"loss": "cpo", "beta": 0.1, "cpo_alpha": 0.5}),
    "cpo_label_smoothing": ({"loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 1.0, "label_smoothing": 0.1},
                            {"loss": "cpo", "beta": 0.1, "label_smoothing": 0.1}),
    # TRL's CPO adds cpo_alpha·NLL to every loss type: 0 gives plain SimPO, 0.5 is dpokit's simpo,sft [1, 0.5]
    "simpo": ({"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.3, "cpo_alpha": 0.0},
              {"loss": "simpo", "beta": 2.0, "simpo_gamma": 0.3}),
    "simpo_nll": ({"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.3, "cpo_alpha": 0.5},
                  {"loss": "simpo,sft", "loss_weights": "1,0.5", "beta": 2.0, "simpo_gamma": 0.3}),
}


@pytest.mark.parametrize("case", list(CPO_CASES))
def test_cpo_trainer_loss_parity(env, tmp_path, case):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    theirs_opts, ours_opts = CPO_CASES[case]
    trainer = CPOTrainer(model=copy.deepcopy(env.policy), args=trl_args(CPOConfig, tmp_path, **theirs_opts),
                         train_dataset=env.dataset, processing_class=env.tok)
    tokenized = with_bos(env)
    batch = legacy_batch(trainer, tokenized)
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch).item()
    ours = dpokit_loss(env, tokenized, **ours_opts)[0]
    assert ours == pytest.approx(theirs, abs=TOL), f"{case}: dpokit {ours:.8f} vs TRL {theirs:.8f}"


def test_orpo_trainer_loss_parity(env, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    lam = 0.2
    trainer = ORPOTrainer(model=copy.deepcopy(env.policy), args=trl_args(ORPOConfig, tmp_path, beta=lam),
                          train_dataset=env.dataset, processing_class=env.tok)
    tokenized = with_bos(env)
    batch = legacy_batch(trainer, tokenized)
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch).item()
        chosen_avg, rejected_avg, _, _, theirs_nll = trainer.concatenated_forward(trainer.model, batch)
    ours, metrics, our_batch, pol = dpokit_loss(env, tokenized, loss="orpo", orpo_lambda=lam)
    # same per-token-average log-probs (TRL's concatenated_forward averages them for ORPO)
    torch.testing.assert_close(pol.chosen_avg, chosen_avg, rtol=0, atol=TOL)
    torch.testing.assert_close(pol.rejected_avg, rejected_avg, rtol=0, atol=TOL)
    # the odds-ratio term, λ·(−log σ(log odds)), is the same
    assert ours - metrics["nll"].item() == pytest.approx(theirs - theirs_nll.item(), abs=TOL)
    # TRL's NLL is over every chosen token but the first (prompt included); dpokit's over the completion
    full = dict(our_batch, completion_mask=our_batch["attention_mask"])
    with torch.no_grad():
        everything = pair_logps(env.policy, full)
    assert sft_loss(everything.chosen, everything.chosen_tokens).item() == pytest.approx(theirs_nll.item(), abs=TOL)
    # This near-uniform model's average log-probs are ≈ −6.4, where log(1 − P) ≈ −0.002 and the odds ratio is
    # barely distinguishable from the probability ratio; so the term is also compared where P is large, on TRL's
    # own odds_ratio_loss (it returns λ·log σ(log odds) per pair, the negative of dpokit's term).
    a, b = torch.tensor([-0.05, -0.3, -1.2, -2.0]), torch.tensor([-0.9, -0.02, -0.6, -4.0])
    torch.testing.assert_close(orpo_loss(a, b, lam), -trainer.odds_ratio_loss(a, b)[0], rtol=0, atol=1e-6)
