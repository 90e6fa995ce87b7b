"""LoRA (PEFT) in online runs: GRPO, RLOO, PPO, online DPO and iterative DPO train adapters only (PPO's value
model: its own adapters and its head), the reference is the base with adapters off (no copy) and equals the
plain base model exactly, the KL starts at 0 (B = 0), and --merge-lora's final/ is base + adapters merged."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model, quiet
from dpokit import ConfigError, TrainConfig, train
from dpokit.loop import online, ppo
from dpokit.loop.reference import AdaptersOff

pytest.importorskip("peft")
REWARD = "conftest:letter_reward"


def _run(model, prompts, out, **extra):
    options = dict(model=model, prompts=prompts, reward=REWARD, output_dir=str(out), max_new_tokens=6, batch_size=2,
                   lr=5e-2, warmup_steps=0, progress=False, max_steps=2, num_generations=3, lora_r=4, log=quiet)
    return train(**{**options, **extra})


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]


def _keep_trained(monkeypatch) -> list:
    """The trained policy as train_online hands it to save_final (before any merge)."""
    kept = []
    original = online.save_final
    monkeypatch.setattr(online, "save_final", lambda policy, *a, **k: kept.append(policy) or original(policy, *a, **k))
    return kept


def _only_adapters_moved(policy, start_dir) -> None:
    from dpokit.models.lora import base_weights
    start = load_file(f"{start_dir}/model.safetensors")
    base = base_weights(policy.get_base_model())
    assert {k for k in base if k in start} == set(start)  # every base weight is there, under its plain name
    assert all(torch.equal(base[k], start[k]) for k in start)  # and none moved
    trained = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    assert any(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)  # B left 0: the adapters moved


@pytest.mark.parametrize("loss, mu", [("grpo", 1), ("rloo", 2)])  # GRPO's kl: a mean over its μ updates
def test_grpo_and_rloo_with_lora_train_adapters_only_from_kl_zero(tmp_path, tiny_model_dir, prompts_file, monkeypatch,
                                                                  loss, mu):
    kept = _keep_trained(monkeypatch)
    refs = []
    original = online.load_reference
    monkeypatch.setattr(online, "load_reference", lambda *a, **k: refs.append(original(*a, **k)) or refs[-1])
    result = _run(tiny_model_dir, prompts_file, tmp_path / "run", loss=loss, kl_coef=0.05, grpo_iterations=mu)
    metrics = _metrics(result.output_dir)
    assert isinstance(refs[0], AdaptersOff) and refs[0].policy is kept[0]  # the policy itself, adapters off: no copy
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[0]["kl"] == 0.0 and metrics[-1]["kl"] > 0.0  # B = 0: π = π_ref until the first update
    _only_adapters_moved(kept[0], tiny_model_dir)
    assert (result.final_dir / "adapter_model.safetensors").is_file()
    assert not (result.final_dir / "model.safetensors").exists()


def test_the_reference_is_exactly_the_base_model_with_adapters_off(tokenizer):
    from dpokit.models.lora import add_lora
    base = make_tiny_model(len(tokenizer))
    cfg = TrainConfig(lora_r=4, temperature=0.7)
    policy = add_lora(copy.deepcopy(base), cfg, quiet)
    with torch.no_grad():  # adapters that change the outputs
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    rows = [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14, 2])]
    device = torch.device("cpu")
    ref, mask = online.token_logps(AdaptersOff(policy), rows, 0, device, cfg)
    plain, plain_mask = online.token_logps(base, rows, 0, device, cfg)
    adapted, _ = online.token_logps(policy, rows, 0, device, cfg)
    assert torch.equal(ref, plain) and torch.equal(mask, plain_mask)
    assert not torch.allclose(adapted, plain)


def test_online_dpo_with_lora_trains_adapters_against_the_base(tmp_path, tiny_model_dir, prompts_file, monkeypatch):
    kept = _keep_trained(monkeypatch)
    result = _run(tiny_model_dir, prompts_file, tmp_path / "run", online_dpo=True, beta=0.5)
    metrics = _metrics(result.output_dir)
    assert metrics[0]["rewards/margins"] == 0.0  # the reference is the starting policy
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    _only_adapters_moved(kept[0], tiny_model_dir)


def test_ppo_with_lora_gives_the_value_model_its_own_adapters_and_a_trained_head(tmp_path, tiny_model_dir,
                                                                               prompts_file, monkeypatch):
    kept, values = _keep_trained(monkeypatch), []
    original = ppo.load_value_model
    monkeypatch.setattr(ppo, "load_value_model", lambda *a, **k: values.append(original(*a, **k)) or values[-1])
    result = _run(tiny_model_dir, prompts_file, tmp_path / "run", loss="ppo", kl_coef=0.05, num_generations=2)
    metrics = _metrics(result.output_dir)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["loss/value"]) for m in metrics)
    assert metrics[0]["kl"] == 0.0 and metrics[-1]["kl"] != 0.0
    _only_adapters_moved(kept[0], tiny_model_dir)
    value = values[0]
    trained = [n for n, p in value.named_parameters() if p.requires_grad]
    assert any(".lora_" in n for n in trained) and any("score" in n for n in trained)
    assert all(".lora_" in n or "score" in n for n in trained)  # the backbone is frozen
    from dpokit.models.lora import base_weights
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    backbone = base_weights(value.get_base_model().base_model)  # the policy's starting weights, untouched
    assert all(torch.equal(backbone[k.removeprefix("model.")], t) for k, t in start.items() if k.startswith("model."))


def test_merge_lora_final_is_base_plus_adapters_merged(tmp_path, tiny_model_dir, prompts_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    common = dict(loss="grpo", kl_coef=0.05)
    adapter = _run(tiny_model_dir, prompts_file, tmp_path / "adapter", **common)
    merged = _run(tiny_model_dir, prompts_file, tmp_path / "merged", merge_lora=True, **common)
    assert not (merged.final_dir / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(merged.final_dir)  # a whole model
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                         adapter.final_dir).merge_and_unload()
    got, want = plain.state_dict(), expected.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    assert any(not torch.equal(got[k], start[k]) for k in start)


def test_iterative_dpo_with_lora_merges_every_round(tmp_path, tiny_model_dir, prompts_file):
    result = _run(tiny_model_dir, prompts_file, tmp_path / "run", online_dpo=True, rounds=2, max_steps=1,
                  num_generations=2, merge_lora=True)
    assert [m["round"] for m in _metrics(result.output_dir)] == [1, 2]
    assert (result.output_dir / "round-1" / "final" / "model.safetensors").is_file()
    start, final = (load_file(f"{d}/model.safetensors") for d in (tiny_model_dir, result.final_dir))
    assert any(not torch.equal(final[k], start[k]) for k in start)


@pytest.mark.parametrize("options, message", [
    (dict(online_dpo=True, rounds=2, lora_r=4), "with LoRA needs --merge-lora"),
    (dict(online_dpo=True, lora_r=4, sync_ref_every=2), "sync_ref_every (TR-DPO) with LoRA is not supported"),
])
def test_refusals(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig.from_dict(dict(reward=REWARD, **options))


def test_lora_options_are_read_by_online_runs():
    for options in (dict(loss="grpo"), dict(loss="ppo", kl_coef=0.05), dict(online_dpo=True),
                    dict(online_dpo=True, rounds=2)):
        TrainConfig.from_dict(dict(reward=REWARD, lora_r=8, lora_alpha=16, lora_dropout=0.1,
                                   lora_target_modules="q_proj,v_proj", merge_lora=True, **options))


def test_a_lora_ppo_run_resumes_exactly(tmp_path, tiny_model_dir, prompts_file):
    """The checkpoint holds the policy's and the value model's adapters (and head): a resume from step 2 of 3 ends
    with the uninterrupted run's adapter bit for bit."""
    import shutil
    common = dict(loss="ppo", kl_coef=0.05, num_generations=2, max_steps=3, save_every=1)
    full = _run(tiny_model_dir, prompts_file, tmp_path / "full", **common)
    part = tmp_path / "part"
    _run(tiny_model_dir, prompts_file, part, **common)
    assert [c.name for c in sorted((part / "checkpoints").iterdir())] == ["step-0000001", "step-0000002"]
    shutil.rmtree(part / "final")  # as if stopped after step 2's checkpoint
    resumed = _run(tiny_model_dir, prompts_file, part, resume="auto", **common)
    assert resumed.resumed_at == 2
    a, b = (load_file(r.final_dir / "adapter_model.safetensors") for r in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_grpo_with_checkpointing_and_held_out_evaluation(tmp_path, tiny_model_dir, prompts_file):
    """--gradient-checkpointing and --eval-prompts with LoRA: the evaluation samples the reference through its
    adapters-off view; every logged value finite; the log says how to load the adapter."""
    logs: list[str] = []
    result = _run(tiny_model_dir, prompts_file, tmp_path / "run", loss="grpo", kl_coef=0.05, gradient_checkpointing=True,
                  eval_prompts=prompts_file, eval_every=1, log=logs.append)
    metrics = _metrics(result.output_dir)
    assert metrics[0]["kl"] == 0.0
    evals = [m for m in metrics if "eval/reward" in m]
    assert evals and all(math.isfinite(v) for m in metrics for v in m.values() if isinstance(v, float))
    assert any("PeftModel.from_pretrained" in line for line in logs)


def test_a_lora_value_model_started_from_a_reward_model_keeps_its_backbone(tmp_path, tokenizer, tiny_model_dir,
                                                                         prompts_file, monkeypatch):
    """--reward DIR (a one-label classifier reading the policy's tokens): the value model starts from it, gets
    adapters and a trained head, and its backbone stays the reward model's."""
    from transformers import LlamaForSequenceClassification
    config = make_tiny_model(len(tokenizer), seed=3).config
    config.num_labels = 1
    torch.manual_seed(3)
    rm = tmp_path / "rm"
    LlamaForSequenceClassification(config).save_pretrained(rm, safe_serialization=True)
    tokenizer.save_pretrained(rm)
    values = []
    original = ppo.load_value_model
    monkeypatch.setattr(ppo, "load_value_model", lambda *a, **k: values.append(original(*a, **k)) or values[-1])
    result = _run(tiny_model_dir, prompts_file, tmp_path / "run", loss="ppo", kl_coef=0.05, num_generations=2,
                  reward=str(rm))
    assert all(math.isfinite(m["loss/value"]) for m in _metrics(result.output_dir))
    from dpokit.models.lora import base_weights
    start = load_file(f"{rm}/model.safetensors")
    got = base_weights(values[0].get_base_model())
    assert all(torch.equal(got[k], t) for k, t in start.items() if not k.startswith("score"))
    head = [p for n, p in values[0].named_parameters() if "score" in n and p.requires_grad]
    assert head and not torch.equal(head[0], start["score.weight"])  # the trained copy moved
