"""The embedded SmolLM2-135M-Instruct: a short real run, and parity with TRL 1.16's DPOTrainer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import HH_HELPFUL, requires_embedded, write_jsonl
from dpokit.batches import collate, tokenize_pairs
from dpokit.data import builtin_path, load_pairs
from dpokit.logprobs import pair_logps
from dpokit.objectives import dpo_loss

pytestmark = [pytest.mark.slow, requires_embedded]


@pytest.fixture(scope="module")
def embedded():
    from dpokit.models import load_model, load_tokenizer
    return load_tokenizer("embedded"), load_model("embedded")


def test_short_run_on_the_embedded_model_from_the_command_line(tmp_path, capsys):
    from dpokit.cli import main
    rows = [json.loads(line) for line in open(builtin_path("helpful_train"), encoding="utf-8")]
    data = write_jsonl(tmp_path / "train.jsonl", rows[:8])
    held = write_jsonl(tmp_path / "eval.jsonl", rows[8:12])
    out = tmp_path / "run"
    code = main(["train", "--data", data, "--eval-data", held, "--output-dir", str(out), "--max-steps", "2",
                 "--batch-size", "4", "--lr", "1e-5", "--warmup-steps", "0", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "held-out implicit-reward accuracy: 0.000 before →" in text
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.vocab_size == 49152 and tok.eos_token == "<|im_end|>"


def _hh_pairs(n: int):
    """Four short pairs: HH-RLHF helpful from ../shared when present, else the built-in set."""
    if HH_HELPFUL.is_file():
        pairs, _ = load_pairs(str(HH_HELPFUL), on_bad_row="skip")
        pairs = sorted(pairs[:60], key=lambda p: len(p.prompt) + len(p.chosen) + len(p.rejected))
        return pairs[:n]
    return load_pairs(builtin_path("helpful_eval"))[0][:n]


def test_parity_with_trl_dpotrainer(tmp_path, embedded):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizer, model = embedded
    pairs = _hh_pairs(4)

    # dpokit: same pairs, log-probs of the (identical) policy and reference, loss at step 0
    tokenized, _ = tokenize_pairs(pairs, tokenizer, 1024, None)
    with torch.no_grad():
        logps = pair_logps(model, collate(tokenized, tokenizer.pad_token_id))
    chosen, rejected = logps.chosen, logps.rejected
    losses, _, _ = dpo_loss(chosen, rejected, chosen, rejected, beta=0.1)

    # TRL: explicit prompt/chosen/rejected, so both tools split the texts alike; fp32 (bf16=False)
    ds = datasets.Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                                     for p in pairs])
    import copy
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=1,
                         learning_rate=1e-7, logging_steps=1, report_to=[], bf16=False,
                         gradient_checkpointing=False, max_length=1024, use_cpu=True, beta=0.1,
                         save_strategy="no", dataloader_drop_last=False, seed=0)
    trainer = trl.DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args,
                             train_dataset=ds, processing_class=tokenizer)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(losses.mean().item(), abs=1e-4)
    assert logged["logps/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-5)
    assert logged["logps/rejected"] == pytest.approx(rejected.mean().item(), rel=1e-5)
