"""LoRA through PEFT: the reference is the base with adapters disabled (no copy), training moves only
adapters, the adapter or the merged model is saved, and a LoRA run resumes exactly."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import write_jsonl
from dpokit import ConfigError, TrainConfig, train

pytest.importorskip("peft")


def _metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.mark.parametrize("ref_cache", [True, False])  # False: the live reference is the adapters-off base
def test_lora_trains_adapters_against_the_base(tmp_path, tiny_model_dir, explicit_rows, ref_cache):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    logs: list[str] = []
    result = train(model=tiny_model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"), lora_r=8,
                   lora_alpha=16, max_steps=25, batch_size=8, lr=2e-2, warmup_steps=0, beta=0.5, ref_cache=ref_cache,
                   progress=False, log=logs.append)
    first = _metrics(result.output_dir)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # B = 0: policy = reference at step 0
    assert result.eval_after["eval/rewards/accuracies"] == 1.0
    assert any(m.startswith("LoRA r=8: training") for m in logs)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    assert (result.final_dir / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, result.final_dir)
    assert isinstance(tuned, torch.nn.Module)


def test_merged_lora_saves_a_plain_model(tmp_path, tiny_model_dir, explicit_rows):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    result = train(model=tiny_model_dir, data=data, output_dir=str(tmp_path / "run"), lora_r=4, merge_lora=True,
                   max_steps=3, lr=1e-2, warmup_steps=0, progress=False, log=lambda *_: None)
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(result.final_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not (result.final_dir / "adapter_config.json").exists()
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_lora_run_resumes_exactly(tmp_path, tiny_model_dir, explicit_rows):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    common = dict(model=tiny_model_dir, data=data, lora_r=4, max_steps=6, batch_size=2, lr=1e-2, warmup_steps=0,
                  save_every=2, progress=False, log=lambda *_: None)
    full = train(output_dir=str(tmp_path / "full"), **common)
    part = tmp_path / "part"
    train(output_dir=str(part), **common)
    shutil.rmtree(part / "checkpoints" / "step-0000004")
    resumed = train(output_dir=str(part), resume="auto", **common)
    from safetensors.torch import load_file
    a = load_file(full.final_dir / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_options_need_lora_and_tr_dpo_is_refused():
    with pytest.raises(ConfigError, match="lora_alpha .* has no effect without LoRA"):
        TrainConfig.from_dict({"lora_alpha": 8.0})
    with pytest.raises(ConfigError, match="TR-DPO"):
        TrainConfig.from_dict({"lora_r": 8, "sync_ref_every": 10})


def test_kto_with_lora_uses_the_adapters_off_reference(tmp_path, tiny_model_dir, explicit_rows):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    result = train(model=tiny_model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "k"), loss="kto",
                   lora_r=4, max_steps=3, batch_size=4, lr=1e-2, warmup_steps=0, progress=False, log=lambda *_: None)
    first = _metrics(result.output_dir)[0]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kto/kl"] == pytest.approx(0.0, abs=1e-6)
