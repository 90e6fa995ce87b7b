"""`dpokit demo` sized to a budget and resumable: the planner's sizing, the plan on record, a stop in each
kind of phase (a signal in-process during pairs, SIGTERM to a subprocess during training) continued by
`--resume`, and the refusals that keep one output folder from mixing two demos."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpokit.cli import main
from dpokit.tasks import demo_plan
from dpokit.tasks.demo_plan import FLOORS, Machine, make_plan

TASK = ["--reward", "conftest:letter_reward", "--limit", "4", "--samples", "3", "--k", "2",
        "--max-new-tokens", "8", "--batch-size", "2", "--no-progress"]
# the embedded model's scale on a slow 2-core CPU: the full task does not fit a few minutes
SLOW = Machine(matmul_gflops=45, step_overhead_s=0.05, params=135_000_000, prompt_tokens=20)
FULL = dict(train_prompts=280, samples=4, eval_prompts=60, k=4, batch_size=16, epochs=1, max_new_tokens=32,
            pairing="all")
SIZES = ("train_prompts", "samples", "steps", "eval_prompts", "k")


def test_plan_grows_with_the_budget_cuts_in_order_and_stops_at_floors():
    plans = [make_plan(m, SLOW, **FULL) for m in (1, 3, 5, 8, 12, 15, 20, 30, 45, 60, 120, 600)]
    for smaller, larger in zip(plans, plans[1:]):
        assert all(getattr(smaller, s) <= getattr(larger, s) for s in SIZES), (smaller, larger)
    for p in plans:
        assert all(getattr(p, s) >= FLOORS.get(s, 4) for s in SIZES) and p.samples == 4
        assert p.predicted_s["total_s"] <= p.minutes * 60 or p.warning
        # the kept prompts give at least one pass of pairs for the planned steps (or sit at their floor)
        assert p.train_prompts * demo_plan.pairs_per_prompt(4, "all") >= p.steps * 16 \
            or p.train_prompts in (FLOORS["train_prompts"], 280)
        if p.eval_prompts < 60 or p.k < 4:  # held-out evaluation is cut only once steps are at their floor
            assert p.steps == FLOORS["steps"]
    smallest, largest = plans[0], plans[-1]
    assert smallest.warning and "too small" in smallest.warning
    assert all(getattr(smallest, s) == FLOORS[s] for s in ("steps", "eval_prompts", "k"))
    assert demo_plan.prompts_for(smallest) == 58 and smallest.train_prompts == FLOORS["train_prompts"] == 64
    assert not largest.cuts and not largest.warning
    assert (largest.train_prompts, largest.samples, largest.eval_prompts, largest.k) == (280, 4, 60, 4)
    assert largest.steps == demo_plan.full_steps(280, 4, "all", 16, 1) == 97
    # fewer steps than the full plan train with a proportionally larger lr, up to LR_SCALE_MAX
    for p in plans:
        assert p.lr_scale == pytest.approx(min(demo_plan.LR_SCALE_MAX, 97 / p.steps), rel=1e-3)
        assert (p.lr_scale > 1) == (p.steps < 97) and ("lr ×" in demo_plan.describe(p)) == (p.lr_scale > 1)
    # a faster machine gets a bigger plan for the same budget
    fast = make_plan(15, Machine(263, 0.01, 135_000_000, 20), **FULL)
    assert all(getattr(fast, s) >= getattr(plans[5], s) for s in SIZES)
    assert "plan for 15 min" in demo_plan.describe(fast) and "total" in demo_plan.describe(fast)


def _demo(model, out, *extra):
    return ["demo", "--model", model, "--output-dir", str(out), *TASK, *extra]


def test_stop_during_pairs_then_resume_skips_what_is_done(tmp_path, tiny_model_dir, monkeypatch, capsys):
    out = tmp_path / "demo"
    import dpokit.loop

    def stop(*args, **kwargs):  # Ctrl-C just as training starts: pairs are done, nothing trained
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("the signal should have stopped the demo")

    monkeypatch.setattr(dpokit.loop, "train", stop)
    # make demo's --started-at: a minute spent on the install comes out of the budget
    assert main(_demo(tiny_model_dir, out, "--minutes", "3", "--started-at", str(time.time() - 60))) == \
        128 + signal.SIGINT
    printed = capsys.readouterr()
    assert "1.0 of the 3 minutes went before the demo started (install): planning for 2.0" in printed.out
    err = printed.err.strip()
    assert err == f"dpokit demo: stopped during training; continue with: dpokit demo --resume --output-dir {out}"
    record = json.loads((out / "demo.json").read_text())
    assert record["done"] == ["measure", "pairs"] and record["options"]["minutes"] == 3
    plan = record["plan"]
    assert plan["train_prompts"] == 4 and plan["samples"] == 3 and plan["predicted_s"]["total_s"] > 0
    assert plan["minutes"] == pytest.approx(2.0, abs=0.1)
    assert record["machine"]["matmul_gflops"] > 0 and record["actual_s"]["pairs_s"] > 0
    pairs_written = (out / "pairs_train.jsonl").stat().st_mtime_ns
    monkeypatch.undo()

    # the same folder without --resume, or with other options, is refused naming what to do
    assert main(_demo(tiny_model_dir, out)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(_demo(tiny_model_dir, out, "--resume", "--samples", "2")) == 2
    err = capsys.readouterr().err
    assert "--samples 2 differs from the 3" in err and "Traceback" not in err
    assert main(["demo", "--output-dir", str(out), "--resume", "--max-new-tokens", "9"]) == 2
    assert "--max-new-tokens 9" in capsys.readouterr().err

    # options not given come from the record (--minutes 3, the tiny model, the reward …)
    assert main(["demo", "--output-dir", str(out), "--resume", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "train pairs: reusing" in printed and "eval pairs: reusing" in printed and "machine:" not in printed
    assert (out / "pairs_train.jsonl").stat().st_mtime_ns == pairs_written
    result = json.loads((out / "eval.json").read_text())
    assert result["plan"] == plan and result["timings"]["train_s"] > 0 and result["timings"]["total_s"] > 0
    assert sum(1 for _ in open(out / "metrics.jsonl")) >= plan["steps"]
    record = json.loads((out / "demo.json").read_text())
    assert record["done"] == ["measure", "pairs", "train", "eval"] and record["invocations"] == 2

    # all done: --resume again only says so (and rewrites a report that is missing)
    (out / "report.html").unlink()
    assert main(["demo", "--output-dir", str(out), "--resume"]) == 0
    assert "evaluation: done before" in capsys.readouterr().out and (out / "report.html").is_file()


@pytest.mark.parametrize("given_lr", [None, "1e-5"])
def test_a_cut_plan_trains_with_the_scaled_lr_unless_lr_is_given(given_lr, tmp_path, tiny_model_dir, monkeypatch):
    import dpokit.loop
    from dpokit.tasks.demo import DEMO_LR
    planned, used = make_plan, []

    def cut_plan(*args, **kwargs):  # the tiny task is never cut: pretend this one was
        plan = planned(*args, **kwargs)
        plan.lr_scale = 2.5
        return plan

    def record_lr(cfg, **kwargs):
        used.append(cfg.lr)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(demo_plan, "make_plan", cut_plan)
    monkeypatch.setattr(dpokit.loop, "train", record_lr)
    extra = ["--lr", given_lr] if given_lr else []
    assert main(_demo(tiny_model_dir, tmp_path / "demo", *extra)) == 128 + signal.SIGINT
    assert used == [float(given_lr) if given_lr else pytest.approx(2.5 * DEMO_LR)]


def test_output_folder_of_something_else_is_refused(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    for extra in ((), ("--resume",)):
        assert main(_demo(tiny_model_dir, tmp_path, *extra)) == 2
        assert "choose another --output-dir" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "demo.json").exists()


def test_sigterm_during_training_is_one_line_and_resume_finishes(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "demo"
    tests, src = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(tests)])}
    args = _demo(tiny_model_dir, out, "--epochs", "3")
    proc = subprocess.Popen([sys.executable, "-m", "dpokit", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    lines = [line for line in proc.stderr.read().splitlines() if line.strip()]
    assert lines[-1].startswith("dpokit demo: stopped during training (checkpoint at ")
    assert lines[-1].endswith(f"; continue with: dpokit demo --resume --output-dir {out}")
    assert not any("Traceback" in line for line in lines) and "--resume auto" not in lines[-1]
    assert not (out / "final").exists()

    assert main(["demo", "--output-dir", str(out), "--resume", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and (out / "eval.json").is_file()
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if "loss" in json.loads(line)]
    assert steps == list(range(1, len(steps) + 1))  # continued, not restarted: no step twice


def test_replan_cuts_steps_then_k_when_the_pairs_ran_slower_than_predicted():
    machine = Machine(matmul_gflops=120, step_overhead_s=0.05, params=135_000_000, prompt_tokens=20)
    plan = make_plan(15, machine, **FULL)
    assert FLOORS["steps"] < plan.steps < 97 and plan.full_steps == 97
    predicted = plan.predicted_s["pairs_s"]
    # as predicted, or faster: the plan stays (the same object)
    for ratio in (0.5, 1.0, demo_plan.REPLAN_SLACK):
        assert demo_plan.replan(plan, machine, predicted * ratio, 60 + predicted * ratio)[0] is plan
    previous = plan
    for ratio in (1.3, 2.0, 3.0, 50.0):
        new, slower = demo_plan.replan(plan, machine, predicted * ratio, 60 + predicted * ratio)
        assert slower == pytest.approx(ratio)
        # what was sampled stays; steps (then k) shrink as the machine reads slower, never below their floors
        assert (new.train_prompts, new.samples, new.eval_prompts) == (plan.train_prompts, 4, plan.eval_prompts)
        assert FLOORS["steps"] <= new.steps <= previous.steps and new.steps < plan.steps and new.k <= previous.k
        assert new.k == plan.k or new.steps == FLOORS["steps"]
        assert new.lr_scale == pytest.approx(min(demo_plan.LR_SCALE_MAX, 97 / new.steps), rel=1e-3)
        assert any(f"pairs took {ratio:.2f}×" in c for c in new.cuts) and plan.cuts == new.cuts[:len(plan.cuts)]
        assert new.predicted_s["pairs_s"] == pytest.approx(predicted * ratio, abs=0.1)
        assert new.predicted_s["total_s"] <= 15 * 60 + 0.1 or "running it anyway" in new.warning
        previous = new
    assert previous.steps == FLOORS["steps"] and previous.k == FLOORS["k"] and "slower than predicted" in \
        previous.warning


def test_demo_replans_after_slow_pairs_once_and_trains_the_new_steps(tmp_path, tiny_model_dir, monkeypatch, capsys):
    out, real, calls = tmp_path / "demo", demo_plan.replan, []

    def slow_pairs(plan, machine, pairs_s, elapsed_s, held_out_only=False):  # slow once both files are made
        if held_out_only:
            return real(plan, machine, pairs_s, elapsed_s, held_out_only)
        calls.append(plan.steps)  # the tiny plan sits at its floors: lower them
        monkeypatch.setitem(demo_plan.FLOORS, "steps", 1)
        return real(plan, machine, pairs_s * 1e4, elapsed_s)

    monkeypatch.setattr(demo_plan, "replan", slow_pairs)
    assert main(_demo(tiny_model_dir, out, "--minutes", "3")) == 0
    printed = capsys.readouterr().out
    assert "re-plan: the pairs took" in printed and "warning: sampling ran" in printed
    record = json.loads((out / "demo.json").read_text())
    before, after = record["replan"]["steps"]
    assert calls == [before] and after == record["plan"]["steps"] == 1 < before
    assert record["replan"]["slower"] > 1e3 and record["replan"]["cut"]
    assert sum(1 for r in map(json.loads, open(out / "metrics.jsonl")) if "pairs_per_s" in r) == 1
    assert json.loads((out / "eval.json").read_text())["replan"] == record["replan"]
    assert main(["demo", "--output-dir", str(out), "--resume"]) == 0 and calls == [before]  # not again


def test_held_out_replan_cuts_the_training_prompts_still_to_sample():
    machine = Machine(matmul_gflops=120, step_overhead_s=0.05, params=135_000_000, prompt_tokens=20)
    plan = make_plan(15, machine, **FULL)
    held_out = demo_plan.sampling_s(plan.eval_prompts * plan.samples, plan, machine)
    for ratio in (0.5, 1.0, demo_plan.REPLAN_SLACK):
        assert demo_plan.replan(plan, machine, held_out * ratio, 60 + held_out * ratio, held_out_only=True)[0] is plan
    previous = plan
    for ratio in (1.3, 2.0, 3.0, 50.0):
        new, slower = demo_plan.replan(plan, machine, held_out * ratio, 60 + held_out * ratio, held_out_only=True)
        assert slower == pytest.approx(ratio)
        # the training prompts are not sampled yet: they follow the cut steps down (one pass over their pairs)
        assert new.train_prompts == max(FLOORS["train_prompts"], demo_plan.prompts_for(new)) < plan.train_prompts
        assert new.train_prompts <= previous.train_prompts and new.steps <= previous.steps
        assert (new.samples, new.eval_prompts) == (4, plan.eval_prompts) and new.k <= previous.k
        assert any(f"train_prompts {plan.train_prompts} → {new.train_prompts} (held-out samples took {ratio:.2f}×"
                   in c for c in new.cuts)
        # pairs: the held-out part as measured, the training part predicted on the machine found
        busy = demo_plan.slowed(machine, ratio)
        expected = held_out * ratio + demo_plan.sampling_s(new.train_prompts * 4, new, busy)
        assert new.predicted_s["pairs_s"] == pytest.approx(expected, abs=0.1)
        assert new.predicted_s["total_s"] <= 15 * 60 + 0.1 or "running it anyway" in new.warning
        # cut before sampling, the same slow machine fits more steps than a re-plan after sampling the full prompts
        late, _ = demo_plan.replan(plan, machine, plan.predicted_s["pairs_s"] * ratio,
                                   60 + plan.predicted_s["pairs_s"] * ratio)
        assert new.steps >= late.steps
        previous = new
    assert previous.steps == FLOORS["steps"] and previous.train_prompts == FLOORS["train_prompts"]


def test_demo_cuts_training_prompts_when_held_out_sampling_is_slow(tmp_path, tiny_model_dir, monkeypatch, capsys):
    out, real, calls = tmp_path / "demo", demo_plan.replan, []

    def slow_held_out(plan, machine, sampled_s, elapsed_s, held_out_only=False):
        calls.append((held_out_only, machine))
        return real(plan, machine, sampled_s * (1e4 if held_out_only else 1.0), elapsed_s, held_out_only)

    monkeypatch.setattr(demo_plan, "replan", slow_held_out)
    monkeypatch.setattr(demo_plan, "FLOORS", dict(train_prompts=2, steps=1, eval_prompts=1, k=1))
    assert main(_demo(tiny_model_dir, out, "--minutes", "3")) == 0
    printed = capsys.readouterr().out
    assert "re-plan: the held-out samples took" in printed and printed.index("eval pairs:") < \
        printed.index("train pairs:")  # held-out first, then only the prompts the cut plan uses
    record = json.loads((out / "demo.json").read_text())
    early = record["held_out_replan"]
    probe = Machine(**record["machine"])
    assert calls == [(True, probe), (False, demo_plan.slowed(probe, early["slower"]))]
    assert early["cut"] and early["slower"] > 1e3
    assert early["train_prompts"] == [4, 2] and record["plan"]["train_prompts"] == 2
    rows = {name: sum(1 for _ in open(out / f"pairs_{name}.jsonl")) for name in ("train", "eval")}
    assert 1 <= rows["train"] <= 2 and rows["eval"] > 1
    # the later re-plan predicts on the slow machine found: the pairs were not slower than that, nothing more cut
    assert not record["replan"]["cut"] and record["replan"]["slower"] < 1
    assert json.loads((out / "eval.json").read_text())["held_out_replan"] == early
