"""`dpokit eval` and `dpokit score` on a tiny trained run: the implicit reward ranks like training did."""

from __future__ import annotations

import ast
import json

import pytest
import torch

from conftest import write_jsonl
from dpokit import train
from dpokit.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("offline")
    rows = [json.loads(line) for line in open(__import__("dpokit").data.builtin_path("helpful_train"))][:8]
    data = write_jsonl(base / "d.jsonl", rows)
    result = train(model=tiny_model_dir, data=data, eval_data=data, output_dir=str(base / "run"), max_steps=30,
                   batch_size=8, lr=3e-3, warmup_steps=0, beta=0.5, progress=False, log=lambda *_: None)
    return result, data, rows


def test_eval_reproduces_the_final_training_evaluation(trained, tmp_path, tiny_model_dir):
    """Without flags: the run's β (0.5, not the default 0.1), loss and reference, from its config.yaml."""
    result, data, _ = trained
    out = tmp_path / "eval.json"
    assert main(["eval", str(result.final_dir), data, "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["ref_model"] == tiny_model_dir  # the run's starting model, read from its config.yaml
    assert metrics["beta"] == 0.5 and metrics["eval/loss"] == pytest.approx(result.eval_after["eval/loss"], rel=1e-4)
    for key in ("eval/rewards/accuracies", "eval/rewards/margins", "eval/logps/chosen_shift"):
        assert metrics[key] == pytest.approx(result.eval_after[key], rel=1e-4, abs=1e-5)
    assert metrics["eval/rewards/accuracies"] == 1.0


def test_score_ranks_the_trained_preference_first(trained, capsys):
    result, _, rows = trained
    row = rows[0]
    assert main(["score", str(result.final_dir), "--prompt", row["prompt"], "--completion", row["rejected"],
                 "--completion", row["chosen"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("implicit reward β·(log π − log π_ref): β = 0.5 (from ")
    assert repr(row["chosen"]) in lines[1] and repr(row["rejected"]) in lines[2]


def test_eval_needs_a_reference_outside_a_run_folder(tiny_model_dir, trained, capsys):
    _, data, _ = trained
    assert main(["eval", tiny_model_dir, data]) == 2
    assert "--against is needed" in capsys.readouterr().err


def _run_folder(base, tokenizer, tiny_model_dir, **options) -> str:
    """A dpokit run folder without training: config.yaml (the full TrainConfig) and final/ (another random model)."""
    from conftest import make_tiny_model
    from dpokit.config import TrainConfig
    run = base / "run"
    run.mkdir()
    (run / "config.yaml").write_text(TrainConfig.from_dict({"model": tiny_model_dir, **options}).to_yaml())
    make_tiny_model(len(tokenizer), seed=1).save_pretrained(run / "final", safe_serialization=True)
    tokenizer.save_pretrained(run / "final")
    return str(run / "final")


def _eval(args, tmp_path, name) -> dict:
    out = tmp_path / f"{name}.json"
    assert main(["eval", *args, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_eval_takes_beta_and_loss_from_the_run(tmp_path, tokenizer, tiny_model_dir, explicit_rows, capsys):
    final = _run_folder(tmp_path, tokenizer, tiny_model_dir, loss="ipo", beta=0.5)
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    from_run = _eval([final, data], tmp_path, "run")
    assert "β = 0.5 (from " + str(tmp_path / "run" / "config.yaml") + "), loss ipo (from " in capsys.readouterr().out
    assert (from_run["beta"], from_run["loss"]) == (0.5, "ipo")
    assert from_run == _eval([final, data, "--beta", "0.5", "--loss", "ipo"], tmp_path, "flags")
    sigmoid = _eval([final, data, "--loss", "sigmoid"], tmp_path, "sigmoid")  # a flag wins; β still the run's
    out = capsys.readouterr().out
    assert "β = 0.5 (from " in out and "loss sigmoid (from --loss)" in out
    assert sigmoid["beta"] == 0.5 and sigmoid["eval/loss"] != pytest.approx(from_run["eval/loss"])
    assert sigmoid["eval/rewards/margins"] == pytest.approx(from_run["eval/rewards/margins"])
    smaller = _eval([final, data, "--beta", "0.1"], tmp_path, "beta")
    assert smaller["eval/rewards/margins"] == pytest.approx(from_run["eval/rewards/margins"] / 5, rel=1e-5)
    (tmp_path / "e.yaml").write_text("beta: 0.25\n")  # a --config file's keys count as given too
    from_file = _eval([final, data, "--config", str(tmp_path / "e.yaml")], tmp_path, "file")
    assert (from_file["beta"], from_file["loss"]) == (0.25, "ipo")
    assert f"β = 0.25 (from {tmp_path / 'e.yaml'})" in capsys.readouterr().out


def test_explicit_loss_keeps_the_run_options_that_loss_reads(tmp_path, tokenizer, tiny_model_dir, explicit_rows,
                                                             capsys):
    """An exo_pair run's label_smoothing (EXO's ε) stays with `--loss exo_pair`; eval has no flag for it.
    Failed before the fix: "loss exo_pair needs label_smoothing > 0". Options the given loss does not read
    (ipo_normalize for sigmoid) are still dropped."""
    from dpokit.evaluation.offline import resolve
    final = _run_folder(tmp_path, tokenizer, tiny_model_dir, loss="exo_pair", label_smoothing=0.01, beta=0.5)
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    assert _eval([final, data], tmp_path, "run") == _eval([final, data, "--loss", "exo_pair"], tmp_path, "flag")
    settings = resolve(final, {"loss": ("exo_pair,hinge", "--loss")}, None)
    assert (settings.cfg.label_smoothing, settings.cfg.beta) == (0.01, 0.5)
    (tmp_path / "run").rename(tmp_path / "exo")
    final = _run_folder(tmp_path, tokenizer, tiny_model_dir, loss="ipo", ipo_normalize="sum")
    assert resolve(final, {"loss": ("sigmoid", "--loss")}, None).cfg.ipo_normalize == "token"  # the default


def test_eval_of_an_ld_dpo_run_uses_ld_alpha_for_policy_and_reference(tmp_path, tokenizer, tiny_model_dir,
                                                                     explicit_rows):
    """LD-DPO's log-probs (tokens past the shorter completion weighted by ld_alpha), for both models, as the
    run's own held-out evaluation computes them."""
    from dpokit.batches import tokenize_pairs
    from dpokit.data import Pair
    from dpokit.logprobs import pairs_logps
    from dpokit.models import load_model
    final = _run_folder(tmp_path, tokenizer, tiny_model_dir, ld_alpha=0.5)
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    metrics = _eval([final, data], tmp_path, "ld")
    pairs = [Pair(r["prompt"], r["chosen"], r["rejected"], f"d:{i}") for i, r in enumerate(explicit_rows)]
    tokenized, _ = tokenize_pairs(pairs, tokenizer, 512, 256)
    cpu = torch.device("cpu")
    pol = pairs_logps(load_model(final, cpu), tokenized, 8, tokenizer.pad_token_id, cpu, ld_alpha=0.5)
    ref = pairs_logps(load_model(tiny_model_dir, cpu), tokenized, 8, tokenizer.pad_token_id, cpu, ld_alpha=0.5)
    assert metrics["eval/logps/chosen"] == pytest.approx(pol.chosen.mean().item(), rel=1e-5)
    assert metrics["eval/logps/chosen_shift"] == pytest.approx((pol.chosen - ref.chosen).mean().item(), rel=1e-4)


def test_score_of_a_reference_free_run_is_its_objectives_reward(tmp_path, tokenizer, tiny_model_dir, capsys):
    """simpo: β·(mean token log π), no reference loaded; β from the run."""
    from dpokit.batches import pad_rows, tokenize_completions
    from dpokit.data import Completion
    from dpokit.logprobs import sequence_logps
    from dpokit.models import load_model
    final = _run_folder(tmp_path, tokenizer, tiny_model_dir, loss="simpo", beta=2.0)
    prompt, candidates = "How do I boil an egg?", [" Simmer it for nine minutes.", " No idea."]
    assert main(["score", final, "--prompt", prompt, "--completion", candidates[0], "--completion", candidates[1]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("implicit reward β·(mean token log π): β = 2.0 (from ") and "no reference" in lines[0]
    tokenized, _ = tokenize_completions([Completion(prompt, c, True, "x") for c in candidates], tokenizer, 512, 256)
    logps = sequence_logps(load_model(final), **pad_rows([(t.prompt_ids, t.completion_ids) for t in tokenized],
                                                          tokenizer.pad_token_id))
    expected = {c: 2.0 * lp / len(t.completion_ids) for c, lp, t in zip(candidates, logps.tolist(), tokenized)}
    printed = {ast.literal_eval(line.strip().split("  ", 1)[1]): float(line.split()[0]) for line in lines[1:]}
    assert printed == pytest.approx(expected, abs=1e-4)
    # with a reference given, the DPO form against it
    assert main(["score", final, "--prompt", prompt, "--completion", candidates[0], "--against", tiny_model_dir]) == 0
    assert "β·(log π − log π_ref): β = 2.0" in capsys.readouterr().out


def test_eval_and_score_refuse_grpo(tmp_path, tokenizer, tiny_model_dir, capsys):
    final = _run_folder(tmp_path, tokenizer, tiny_model_dir)
    assert main(["score", final, "--prompt", "Hi", "--completion", " yes", "--loss", "grpo"]) == 2
    assert "loss grpo is online" in capsys.readouterr().err


def _forwards_autocast(run) -> list:
    """The autocast dtype (None: off) of every decoder forward while `run()` runs (a global forward pre-hook)."""
    from transformers.models.llama.modeling_llama import LlamaModel
    seen = []

    def hook(module, _args):
        if isinstance(module, LlamaModel):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_eval_and_score_compute_in_dtype_as_training_does(tmp_path, tokenizer, tiny_model_dir, explicit_rows):
    """--dtype reaches the forward passes (autocast, as `compute_precision` gives training); the models are loaded
    and probed outside it, as training loads them. Before, score took no --dtype and ran fp32 on the CPU."""
    final = _run_folder(tmp_path, tokenizer, tiny_model_dir)
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)  # 8 pairs: one --eval-batch-size batch per model
    score = ["score", final, "--prompt", "Hi", "--completion", " yes", "--completion", " no"]
    for args, passes in ((["eval", final, data], 2), (score, 2)):
        bf16 = _forwards_autocast(lambda: main([*args, "--dtype", "bf16"]))
        assert [d for d in bf16 if d is not None] == [torch.bfloat16] * passes, args[0]
        assert bf16[-1] == torch.bfloat16 and None in bf16, args[0]  # the load-time probes run without autocast
        assert set(_forwards_autocast(lambda: main(args))) == {None}, args[0]  # auto on a CPU: fp32


def test_eval_and_score_refuse_a_device_this_machine_lacks(tmp_path, tokenizer, tiny_model_dir, explicit_rows,
                                                           capsys):
    final = _run_folder(tmp_path, tokenizer, tiny_model_dir)
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    score = ["score", final, "--prompt", "Hi", "--completion", " yes"]
    for args in (["eval", final, data], score):
        assert main([*args, "--device", "cuda:63"]) == 2
        assert "--device cuda:63: this machine has " in capsys.readouterr().err
        assert main([*args, "--device", "gpu"]) == 2
        assert "--device gpu: not a device" in capsys.readouterr().err
    assert main([*score, "--device", "cpu"]) == 0
