"""`dpokit demo`, `sweep`, `make-pairs`, `eval --prompts` and `report` end to end on a tiny random model
(the real task on the embedded model is recorded in docs/RESULTS.md; these check the plumbing)."""

import json

import pytest

from conftest import write_jsonl
from dpokit.cli import main

TASK = ["--reward", "conftest:letter_reward", "--limit", "6", "--samples", "3", "--k", "2",
        "--max-new-tokens", "8", "--epochs", "1", "--batch-size", "2"]


def test_demo_writes_pairs_model_eval_and_report(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", tiny_model_dir, "--output-dir", str(out), "--no-progress", *TASK]) == 0
    for name in ("pairs_train.jsonl", "pairs_eval.jsonl", "metrics.jsonl", "config.yaml", "final/config.json",
                 "eval.json", "report.html", "training_curves.png"):
        assert (out / name).exists(), name
    result = json.loads((out / "eval.json").read_text())
    g = result["generation"]
    assert g["prompts"] == 6 and g["samples_per_prompt"] == 2 and 0 <= g["win_rate"] <= 1
    assert "eval/rewards/accuracies" in result and result["timings"]["total_s"] > 0
    html = (out / "report.html").read_text()
    assert "win rate" in html.lower()
    printed = capsys.readouterr().out
    assert "win rate over the reference" in printed and str(out / "report.html") in printed
    rows = [json.loads(line) for line in open(out / "pairs_train.jsonl")]  # ranked: one row per prompt
    assert rows and all(2 <= len(r["completions"]) == len(r["scores"]) <= 3 and len(set(r["scores"])) > 1
                        for r in rows)
    assert "ranked rows: an epoch computes" in printed  # each sample computed once, not once per pair
    # the reference's side of the win rate: the held-out samples of the pairs phase (first k=2 of 3 per prompt)
    kept = json.loads((out / "reference_eval_samples.json").read_text())
    first_k = [r for i in range(0, len(kept["rewards"]), 3) for r in kept["rewards"][i:i + 2]]
    assert g["rewards"]["reference"] == first_k and kept["samples"]["n"] == 3
    from dpokit.tasks.demo import SentimentTask, held_out_reference_samples
    task = SentimentTask(model=tiny_model_dir, reward="conftest:letter_reward", limit=6, samples=3, k=2,
                         max_new_tokens=8)
    assert held_out_reference_samples(out, task) is not None
    assert held_out_reference_samples(out, SentimentTask(model=tiny_model_dir, limit=6, k=4, max_new_tokens=8)) is None

    # eval on the trained model with generation metrics; report regenerated from the run folder
    assert main(["eval", str(out / "final"), str(out / "pairs_eval.jsonl"), "--prompts", str(out / "pairs_eval.jsonl"),
                 "--reward", "conftest:letter_reward", "--samples", "2", "--max-new-tokens", "6",
                 "--output", str(out / "eval2" / "eval.json")]) == 0
    again = json.loads((out / "eval2" / "eval.json").read_text())
    assert again["ref_model"] == tiny_model_dir and "generation" in again and "eval/rewards/margins" in again
    assert (out / "eval2" / "report.html").exists()
    assert main(["report", str(out)]) == 0


def test_sweep_puts_runs_and_baselines_on_one_frontier(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "beta=0.1,0.5", "--model", tiny_model_dir, "--output-dir", str(out),
                 "--checkpoints", "1", "--best-of", "1,2", *TASK]) == 0
    frontier = json.loads((out / "frontier.json").read_text())
    methods = {p["method"] for p in frontier["points"]}
    assert methods == {"DPO", "Preferred-FT", "Best-of-N"}
    series = {p["series"] for p in frontier["points"] if p["method"] == "DPO"}
    assert series == {"beta=0.1", "beta=0.5"}
    assert [p["kl"] for p in frontier["points"] if p["method"] == "Best-of-N"] == pytest.approx([0.0, 0.19314718])
    finals = [p for p in frontier["points"] if p["label"] == "final"]
    assert len(finals) == 3 and all(p["label"] != "final" or "win_rate" in p for p in frontier["points"])
    assert (out / "frontier.png").stat().st_size > 1000 and (out / "report.html").exists()
    assert not (out / "beta-0.1" / "checkpoints").exists()  # evaluated, then deleted
    assert any(p["label"].startswith("step ") for p in frontier["points"])

    # the same sweep plus online methods: finished runs are reused, only GRPO and online DPO train
    assert main(["sweep", "beta=0.1,0.5", "--model", tiny_model_dir, "--output-dir", str(out), "--checkpoints", "1",
                 "--best-of", "1,2", "--online", "grpo,online-dpo", "--online-steps", "2", *TASK]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing the finished run") == 3 and "[grpo] training 2 steps" in printed
    assert "reusing the reference's 2 held-out continuations" in printed  # not sampled again
    assert "what each method cost" in printed and "| GRPO | grpo |" in printed  # the cost table, printed and in the report
    assert "What each method cost" in (out / "report.html").read_text()
    again = json.loads((out / "frontier.json").read_text())
    assert {p["method"] for p in again["points"]} == {"DPO", "Preferred-FT", "Best-of-N", "GRPO", "Online DPO"}
    assert {(p["method"], p["label"]) for p in again["points"] if p["method"] in ("GRPO", "Online DPO")} == \
        {(m, label) for m in ("GRPO", "Online DPO") for label in ("step 1", "final")}  # checkpoints along the run
    assert [p for p in again["points"] if p["method"] == "DPO"] == \
        [p for p in frontier["points"] if p["method"] == "DPO"]
    assert [p for p in again["points"] if p["method"] == "Best-of-N"] == \
        [p for p in frontier["points"] if p["method"] == "Best-of-N"]
    assert main(["sweep", "beta=0.1", "--output-dir", str(out), "--online", "ppo"]) == 2


def test_sweep_axis_is_checked(tmp_path):
    assert main(["sweep", "betta=0.1", "--output-dir", str(tmp_path)]) == 2
    assert main(["sweep", "beta=-1", "--output-dir", str(tmp_path)]) == 2


def test_make_pairs_command(tmp_path, tiny_model_dir, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "The film"}, {"prompt": "My uncle said"}])
    assert main(["make-pairs", "--prompts", prompts, "--output", str(tmp_path / "pairs.jsonl"), "--model",
                 tiny_model_dir, "--reward", "conftest:letter_reward", "--samples", "3", "--pairing", "all",
                 "--max-new-tokens", "6"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    assert 1 <= len(rows) <= 6 and "pairs from 2 prompts" in capsys.readouterr().out
    assert main(["make-pairs", "--prompts", prompts, "--output", str(tmp_path / "x.jsonl"), "--model",
                 tiny_model_dir, "--reward", "nope"]) == 2


def test_a_stopped_sweep_continues_its_run_from_the_checkpoint(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import importlib
    import signal
    offline = importlib.import_module("dpokit.loop.train")  # the module: dpokit.loop's `train` is a function
    step_fn = offline.optimizer_step

    def interrupted(run, step):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)  # mid-step 2: the loop checkpoints after it, then stops
        return step_fn(run, step)
    monkeypatch.setattr(offline, "optimizer_step", interrupted)
    out, args = tmp_path / "sweep", ["--checkpoints", "1", "--best-of", "1", "--no-preferred-ft", *TASK]
    assert main(["sweep", "beta=0.1", "--model", tiny_model_dir, "--output-dir", str(out), *args]) == \
        128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "dpokit sweep: stopped by SIGTERM" in err and "Traceback" not in err and "the same command continues" in err
    monkeypatch.setattr(offline, "optimizer_step", step_fn)
    # a checkpoint of other options (an earlier sweep's) is not resumed but removed: that run starts fresh
    import shutil

    from dpokit.config import TrainConfig
    from dpokit.tasks.sweep_runs import continue_or_start
    other = tmp_path / "other"
    shutil.copytree(out / "beta-0.1", other)
    cfg = TrainConfig.from_dict({**TrainConfig.from_yaml(str(other / "config.yaml")).to_dict(), "beta": 0.5,
                                 "output_dir": str(other)})
    continue_or_start(cfg, print)
    assert not (other / "checkpoints").exists() and cfg.resume == "auto"

    assert main(["sweep", "beta=0.1", "--model", tiny_model_dir, "--output-dir", str(out), *args]) == 0
    frontier = json.loads((out / "frontier.json").read_text())
    assert frontier["costs"]["beta=0.1"]["resumed_at_step"] == 2
    every = TrainConfig.from_yaml(str(out / "beta-0.1" / "config.yaml")).save_every
    labels = [p["label"] for p in frontier["points"] if p["method"] == "DPO"]
    assert labels[-1] == "final" and labels[:-1] == [f"step {every}"]  # the signal's checkpoint is not a point
    assert every != 2
