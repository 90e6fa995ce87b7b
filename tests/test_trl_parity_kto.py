"""KTO loss parity with TRL 1.16's KTOTrainer: same tiny models, same batch, same options (absolute 1e-5).

Six unpaired rows (4 desirable, 2 undesirable) form one batch on both sides: TRL's batch size equals the row
count, so its KL completions (`dataset.map(batched=True, batch_size=per_device_train_batch_size)`, then
`[last] + [:-1]`) are exactly dpokit's micro-batch cycling in `collate_kto` (x_i with y_{i-1}); KTOConfig's
default `train_sampling_strategy="sequential"` is what TRL requires for that, and the rows are collated in dataset
order by TRL's own data collator. dpokit's loss is the one `kto_step` trains on (it is called as the loop calls it).

Tokenization is identical, as asserted before any number is compared: both tokenize prompt and prompt+completion+EOS
(EOS as text, appended only if missing) with the tokenizer's default special tokens (none from this tokenizer, so no
BOS in either), and both cut the completion where the two token lists diverge.

The reference is a different random model (seed 1 vs policy seed 0), so log-ratios and the KL estimate are
non-zero. Swapping the two models negates the raw KL estimate exactly, so one order exercises z_ref > 0 and the
other the clamp at 0 (both asserted).

Tolerances: the loss (O(1)) agrees to 1e-5. The statistics built from summed log-probs (the KL estimate, rewards,
mean log-probs) are compared at 3e-5: per-token log-probs are bitwise TRL's (asserted below, for the policy and
the reference, on the main and the KL rows, although TRL pads the two groups to separate widths and dpokit pads all
2N rows to one), but the per-row sums (|log π| ≈ 40–116 here, fp32 ulp 3.8e-6–7.6e-6) are added in a different
order (TRL: torch.sum over the padded row; dpokit: index_add) and differ by ≤ 3 ulp. Measured: KL 1.08e-5 apart,
rewards ≤ 3.8e-6, loss ≤ 1e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from conftest import make_tiny_model, write_jsonl  # noqa: E402
from dpokit.batches import collate_kto, tokenize_completions  # noqa: E402
from dpokit.config import TrainConfig  # noqa: E402
from dpokit.data import load_completions  # noqa: E402
from dpokit.logprobs import sequence_logps  # noqa: E402
from dpokit.logprobs.attention import attention_kind  # noqa: E402
from dpokit.logprobs.sequence import completion_token_logps  # noqa: E402
from dpokit.loop.steps import finish_kto_metrics, kto_step  # noqa: E402

TOL, SUM_TOL = 1e-5, 3e-5  # loss; statistics of summed log-probs (see the module docstring)
ROWS = [dict(prompt=f"\n\nHuman: {q}\n\nAssistant:", completion=c, label=lab) for q, c, lab in [
    ("How do I boil an egg?", " Simmer it for nine minutes.", True),
    ("Is the sun a star?", " It is a planet, I think.", False),
    ("Say hi.", " Hi there!", True),
    ("Tell me a joke.", " Why did the chicken cross the road?", True),
    ("Is water wet?", " Water is a rock.", False),
    ("What is the capital of Japan?", " Tokyo.", True)]]
N = len(ROWS)
SEEDS = {"z_positive": (0, 1), "z_clamped": (1, 0)}  # (policy seed, reference seed)
CASES = [(beta, weights) for beta in (0.1, 0.5) for weights in ((1.0, 1.0), (1.0, 1.5))]


@pytest.fixture(scope="module")
def env(tokenizer, tmp_path_factory):
    examples, _ = load_completions(write_jsonl(tmp_path_factory.mktemp("kto") / "u.jsonl", ROWS))
    tokenized, report = tokenize_completions(examples, tokenizer, 1024, None)
    assert report.pairs == N and [t.label for t in tokenized] == [r["label"] for r in ROWS]
    models = {s: make_tiny_model(len(tokenizer), seed=s) for s in (0, 1)}
    return dict(tok=tokenizer, tokenized=tokenized, models=models, dataset=datasets.Dataset.from_list(ROWS))


def kto_trainer(env, tmp_path, seeds, beta, weights):
    args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=N, report_to=[], bf16=False,
                         use_cpu=True, gradient_checkpointing=False, max_length=1024, save_strategy="no",
                         beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
    assert args.train_sampling_strategy == "sequential" and args.loss_type == "kto"
    policy, ref = (copy.deepcopy(env["models"][s]) for s in seeds)
    return trl.KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=env["dataset"],
                          processing_class=env["tok"])


def dpokit_kto(env, seeds, beta, weights):
    """dpokit's batch metrics exactly as the training loop gets them from kto_step (one micro-batch = one step)."""
    cfg = TrainConfig.from_dict({"loss": "kto", "beta": beta, "kto_desirable_weight": weights[0],
                                 "kto_undesirable_weight": weights[1], "batch_size": N, "max_length": 1024})
    policy, ref = (copy.deepcopy(env["models"][s]) for s in seeds)
    sums, _ = kto_step(policy, ref, env["tokenized"], cfg, env["tok"].pad_token_id, torch.device("cpu"), N, 0)
    out = finish_kto_metrics(dict(sums))
    out["loss"], out["kto/kl"] = sums["loss"] / N, sums["kto/kl"] / N  # step means (sums over N examples)
    return out


def assert_same_tokens(batch, ours):
    """TRL's rows (main, then KL) hold exactly dpokit's sequences and completion positions, in the same order."""
    for prefix, rows in (("", range(N)), ("KL_", range(N, 2 * N))):
        for i, j in enumerate(rows):
            keep, our_keep = batch[f"{prefix}attention_mask"][i].bool(), ours["attention_mask"][j].bool()
            assert batch[f"{prefix}input_ids"][i][keep].tolist() == ours["input_ids"][j][our_keep].tolist()
            assert batch[f"{prefix}completion_mask"][i][keep].tolist() == ours["completion_mask"][j][our_keep].tolist()
    assert batch["label"].tolist() == ours["labels"].tolist()


@pytest.mark.parametrize("order", list(SEEDS))
@pytest.mark.parametrize("beta,weights", CASES)
def test_kto_trainer_loss_parity(env, tmp_path, order, beta, weights):
    seeds = SEEDS[order]
    trainer = kto_trainer(env, tmp_path, seeds, beta, weights)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(N)])
    assert_same_tokens(batch, collate_kto(env["tokenized"], env["tok"].pad_token_id, 1024))
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch).item()
    logged = {k: v[-1] for k, v in trainer._metrics["train" if trainer.model.training else "eval"].items()}
    ours = dpokit_kto(env, seeds, beta, weights)
    print(f"\n{order} beta={beta} w={weights}: loss {ours['loss']:.8f} vs {theirs:.8f}, "
          f"kl {ours['kto/kl']:.8f} vs {logged['kl']:.8f}, r+ {ours['rewards/chosen']:.8f} vs "
          f"{logged['rewards/chosen']:.8f}, r- {ours['rewards/rejected']:.8f} vs {logged['rewards/rejected']:.8f}")
    if order == "z_positive":
        assert logged["kl"] > 0.1 and ours["kto/kl"] > 0.1
    else:
        assert logged["kl"] == 0.0 and ours["kto/kl"] == 0.0
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert ours["kto/kl" if key == "kl" else key] == pytest.approx(logged[key], abs=SUM_TOL), key
    assert ours["loss"] == pytest.approx(theirs, abs=TOL), f"dpokit {ours['loss']:.8f} vs TRL {theirs:.8f}"


def test_token_logps_equal_trl_fused_head(env, tmp_path):
    """The floor of the comparison: every scored token's log-prob, as TRL's fused LM head gives it."""
    trainer = kto_trainer(env, tmp_path, SEEDS["z_positive"], 0.1, (1.0, 1.0))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(N)])
    ours = collate_kto(env["tokenized"], env["tok"].pad_token_id, 1024)
    for model, seed in ((trainer.model, 0), (trainer.ref_model, 1)):
        for prefix, rows in (("", slice(0, N)), ("KL_", slice(N, 2 * N))):
            ids, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}completion_mask"]
            with torch.no_grad():
                theirs = model(input_ids=ids, attention_mask=batch[f"{prefix}attention_mask"],
                               labels=ids.masked_fill(mask == 0, -100), fused_lm_head=True).log_probs
                args = (env["models"][seed], ours["input_ids"][rows], ours["attention_mask"][rows],
                        ours["completion_mask"][rows])
                with attention_kind("dense"):  # the same attention call as TRL's: bit for bit
                    mine = completion_token_logps(*args)
                with attention_kind("segments"):  # one SDPA call per row: the same to fp32 rounding
                    segments = completion_token_logps(*args)
            assert torch.equal(theirs[mask[:, 1:].bool()], mine.values), (seed, prefix)
            torch.testing.assert_close(segments.values, mine.values, rtol=1e-6, atol=1e-6)


def test_raw_kl_estimate_is_clearly_positive(env):
    """Unclamped mean(log π − log π_ref) on the KL rows, policy seed 0 vs reference seed 1: ≈ +0.307. Swapping the
    models (same forward passes) makes it exactly −0.307, so the z_clamped cases really go through the clamp."""
    kl_rows = {k: v[N:] for k, v in collate_kto(env["tokenized"], env["tok"].pad_token_id, 1024).items()
               if k != "labels"}
    with torch.no_grad():
        a, b = (sequence_logps(env["models"][s], **kl_rows) for s in (0, 1))
    raw = (a - b).mean().item()
    print(f"\nraw KL estimate, policy seed 0 vs reference seed 1: {raw:.6f}")
    assert raw > 0.1
