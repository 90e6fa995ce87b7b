"""`dpokit sweep --online rlhf,ppo-gt` (issue 17 part 3) on a tiny random model: a reward model trained on the sweep's
own pairs, PPO against it at each --rlhf-kl, PPO on the task's reward, their checkpoints on the frontier with the
reward model's held-out accuracy and each series' costs; a second sweep reuses everything; bad input refused before
anything is sampled. (The real frontier on the embedded model is docs/RESULTS.md's.)"""

import json

import pytest

from dpokit.cli import main
from dpokit.config import TrainConfig
from dpokit.tasks.sweep_rl import models_held, parse_kl_list, parse_online, run_cost

TASK = ["--reward", "conftest:letter_reward", "--limit", "6", "--samples", "2", "--k", "2",
        "--max-new-tokens", "8", "--epochs", "1", "--batch-size", "2"]


def _sweep(out, model, *extra) -> list[str]:
    return ["sweep", "beta=0.1", "--model", model, "--output-dir", str(out), "--checkpoints", "1", "--best-of", "1",
            "--no-preferred-ft", "--online", "rlhf,ppo-gt", "--online-steps", "2", "--rlhf-kl", "0.05,0.1", *TASK,
            *extra]


def test_sweep_puts_rlhf_and_ppo_gt_on_the_frontier_with_costs_and_reuses_them(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "sweep"
    assert main(_sweep(out, tiny_model_dir)) == 0
    printed = capsys.readouterr().out
    assert "[reward model] training a Bradley–Terry reward model" in printed
    frontier = json.loads((out / "frontier.json").read_text())
    points = frontier["points"]
    assert {p["method"] for p in points} == {"DPO", "Best-of-N", "RLHF", "PPO-GT"}
    # one RLHF series per KL coefficient, each (and PPO-GT) with its checkpoint along the run and its final model
    assert {(p["series"], p["label"]) for p in points if p["method"] in ("RLHF", "PPO-GT")} == \
        {(s, label) for s in ("rlhf kl=0.05", "rlhf kl=0.1", "ppo-gt") for label in ("step 1", "final")}
    assert all("win_rate" in p and p["kl"] is not None for p in points if p["method"] in ("RLHF", "PPO-GT"))

    # PPO against the reward model trained on the sweep's pairs; PPO-GT on the task's reward
    rm = frontier["reward_model"]
    assert rm["final"] == str(out / "reward-model" / "final") and 0 <= rm["accuracy"] <= 1
    assert rm["eval_pairs"] == sum(1 for line in open(out / "pairs_eval.jsonl") if line.strip()) > 0
    assert rm["cost"]["models_held"] == 1 and rm["cost"]["train_seconds"] > 0
    for kl in (0.05, 0.1):
        cfg = TrainConfig.from_yaml(str(out / f"rlhf-kl{kl:g}" / "config.yaml"))
        assert (cfg.loss, cfg.kl_coef, cfg.reward) == ("ppo", kl, rm["final"])
        assert (cfg.batch_size, cfg.grad_accum) == (4, 4)  # 16 prompts a step in micro-batches of 4 (less memory)
    gt = TrainConfig.from_yaml(str(out / "ppo-gt" / "config.yaml"))
    assert (gt.loss, gt.kl_coef, gt.reward, gt.batch_size, gt.grad_accum) == \
        ("ppo", 0.05, "conftest:letter_reward", 4, 4)
    assert f"held-out accuracy {rm['accuracy']:.3f}" in (out / "report.html").read_text()
    assert any(n.startswith("Budget:") for n in frontier["notes"])

    # the costs: every online series samples the same budget, 2 steps × 16 prompts × 2 samples
    costs = frontier["costs"]
    assert set(costs) == {"beta=0.1", "rlhf kl=0.05", "rlhf kl=0.1", "ppo-gt"}
    assert costs["rlhf kl=0.05"]["models"] == ["policy", "reference", "reward model", "value"]
    assert costs["ppo-gt"]["models"] == ["policy", "reference", "value"] and costs["ppo-gt"]["models_held"] == 3
    assert costs["beta=0.1"]["models"] == ["policy", "reference"] and costs["beta=0.1"]["samples_generated"] == 0
    for series in ("rlhf kl=0.05", "rlhf kl=0.1", "ppo-gt"):
        c = costs[series]
        assert c["samples_generated"] == c["reward_calls"] == 2 * 16 * 2
        assert c["reward_model_calls"] == (64 if series != "ppo-gt" else 0)
        assert c["optimizer_updates"] == 2 * 4  # TRL's 4 PPO passes per rollout batch
    for c in costs.values():
        assert c["train_seconds"] > 0 and c["peak_rss_gb"] > 0.05 and c["peak_rss_scope"] in ("run", "process")
    assert frontier["pairs"]["samples"] == 6 * 2 and frontier["pairs"]["seconds"] > 0

    # the same sweep again: the reward model and every run are reused, the frontier and the costs are the same
    assert main(_sweep(out, tiny_model_dir)) == 0
    printed = capsys.readouterr().out
    assert "[reward model] reusing" in printed and printed.count("reusing the finished run") == 4
    assert "] training" not in printed
    again = json.loads((out / "frontier.json").read_text())
    assert again["points"] == points and again["costs"] == costs and again["reward_model"] == rm

    # the RLHF run of KL 0.1 trained against another reward model (options X), the one on disk with X too: the reward
    # model trains again (its options are not X), and so does that RLHF run (its reward model changed); the others
    # are reused
    other = {**rm_options(out), "lr": 1.0}
    for path, key in ((out / "reward-model" / "rm.json", "options"), (out / "rlhf-kl0.1" / "points.json", "depends")):
        record = json.loads(path.read_text())
        record[key] = other if key == "options" else {"reward_model": other}
        path.write_text(json.dumps(record))
    assert main(_sweep(out, tiny_model_dir)) == 0
    printed = capsys.readouterr().out
    assert "[reward model] training" in printed and "[rlhf kl=0.1] training 2 steps" in printed
    assert printed.count("reusing the finished run") == 3  # DPO, rlhf kl=0.05 (trained against these options), PPO-GT
    assert json.loads((out / "frontier.json").read_text())["reward_model"]["accuracy"] == rm["accuracy"]  # seeded


def rm_options(out) -> dict:
    return json.loads((out / "reward-model" / "rm.json").read_text())["options"]


@pytest.mark.parametrize("extra, message", [
    (["--online", "ppo"], r"unknown method\(s\) ppo; choose from grpo, online-dpo, rlhf, ppo-gt \(PPO here is rlhf"),
    (["--online", "rlhf,bogus"], r"unknown method\(s\) bogus"),
    (["--online", "rlhf,rlhf"], r"a method named twice"),
    (["--online", "rlhf", "--rlhf-kl", "0.05,x"], r"--rlhf-kl '0.05,x': 'x' is not a number"),
    (["--online", "rlhf", "--rlhf-kl", "-0.1"], r"--rlhf-kl '-0.1': -0.1 is out of range"),
    (["--online", "rlhf", "--rlhf-kl", "0.1,0.1"], r"a coefficient named twice"),
    (["--online", "grpo", "--rlhf-kl", "0.1"], r"--rlhf-kl is read by --online rlhf only"),
    (["--ppo-gt-kl", "0.1"], r"--ppo-gt-kl is read by --online ppo-gt only"),
    (["--online", "ppo-gt", "--ppo-gt-kl", "0.1,0.2"], r"one KL coefficient"),
])
def test_bad_input_is_refused_before_anything_is_sampled(tmp_path, capsys, extra, message):
    import re
    assert main(["sweep", "beta=0.1", "--output-dir", str(tmp_path / "s"), *extra]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "s" / "pairs_train.jsonl").exists()


def test_parsers_and_the_models_each_method_holds(tiny_model_dir):
    assert parse_online("grpo, rlhf,") == ("grpo", "rlhf") and parse_online(()) == ()
    assert parse_kl_list("0.02,0.05") == (0.02, 0.05) and parse_kl_list([0, 0.1]) == (0.0, 0.1)
    assert models_held(TrainConfig.from_dict({"loss": "grpo"})) == ["policy"]  # kl_coef 0: no reference loaded
    assert models_held(TrainConfig.from_dict({"loss": "grpo", "kl_coef": 0.04})) == ["policy", "reference"]
    assert models_held(TrainConfig.from_dict({"online_dpo": True})) == ["policy", "reference"]
    assert models_held(TrainConfig.from_dict({"loss": "sft"})) == ["policy"]
    assert models_held(TrainConfig.from_dict({"stage": "reward_model"})) == ["reward model"]
    assert models_held(TrainConfig.from_dict({"loss": "ppo", "kl_coef": 0.0, "reward": tiny_model_dir})) == \
        ["policy", "reward model", "value"]
    offline = run_cost(TrainConfig.from_dict({"beta": 0.1}), 5)
    assert offline["samples_generated"] == offline["reward_calls"] == 0 and offline["optimizer_updates"] == 5
