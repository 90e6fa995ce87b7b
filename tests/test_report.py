"""Report stage: plots and report.html from a fake run folder (no model involved)."""

import json
import math

import pytest

from dpokit.report import plot_frontier, plot_reward_histogram, plot_training_curves, read_metrics, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1024


def dpo_rows(n=30):
    rows = []
    for step in range(1, n + 1):
        chosen, rejected = 0.02 * step, -0.03 * step
        rows.append({"step": step, "epoch": step / n, "loss": 0.69 - 0.01 * step + 0.02 * math.sin(step),
                     "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                     "rewards/accuracies": min(1.0, 0.5 + 0.015 * step), "logps/chosen": -80 - 0.1 * step,
                     "logps/rejected": -90 - 0.5 * step, "lr": 1e-6, "grad_norm": 1.0})
    return rows


def eval_rows():
    return [{"step": 15, "eval/rewards/accuracies": 0.6, "eval/rewards/margins": 0.3, "eval/rewards/chosen": 0.1,
             "eval/rewards/rejected": -0.2, "eval/logps/chosen": -81.0, "eval/logps/rejected": -95.0,
             "eval/loss": 0.6},
            {"step": 30, "eval/rewards/accuracies": 0.7, "eval/rewards/margins": 0.6, "eval/rewards/chosen": 0.2,
             "eval/rewards/rejected": -0.4, "eval/logps/chosen": -82.0, "eval/logps/rejected": -99.0,
             "eval/loss": 0.5}]


def write_metrics(path, rows, truncated=True):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        if truncated:
            f.write('{"step": 31, "loss": 0.4')  # a run killed mid-write


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "dpo-beta0.1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: smollm2-135m\nbeta: 0.1\nloss: sigmoid\ntarget_modules: [q_proj, v_proj]\n"
                                     "note: a <b>bold</b> & odd value\n", encoding="utf-8")
    write_metrics(run / "metrics.jsonl", dpo_rows() + eval_rows())
    return run


def eval_result(chosen_shift=-1.25):
    samples = [{"prompt": f"Prompt {i}: <script>alert('x')</script>", "policy": f"Tom & Jerry answer {i}",
                "policy_reward": 0.5 + 0.01 * i, "reference": f"plain <i>answer</i> {i}",
                "reference_reward": 0.1 * (i % 3)} for i in range(12)]
    return {"model": "runs/dpo-beta0.1/final", "ref_model": "smollm2-135m", "data": "helpful_eval",
            "eval/rewards/accuracies": 0.64, "eval/rewards/margins": 0.42, "eval/logps/chosen_shift": chosen_shift,
            "eval/logps/rejected_shift": -3.5,
            "generation": {"reward": "sentiment", "prompts": 12, "samples_per_prompt": 1,
                           "policy": {"reward_mean": 0.555, "reward_ci95": 0.02, "length_mean": 41.2},
                           "reference": {"reward_mean": 0.1, "reward_ci95": 0.05, "length_mean": 38.0},
                           "win_rate": 0.625, "win_rate_ci95": 0.041, "kl_mean": 2.31, "kl_ci95": 0.4,
                           "samples": samples}}


def frontier_points():
    points = [{"method": "reference", "label": "π_ref", "kl": 0.0, "reward": 0.1, "reward_ci95": 0.05}]
    for beta in (0.1, 0.5):
        for i, step in enumerate((20, 40, 60)):
            points.append({"method": "DPO", "series": f"β={beta}", "label": f"β={beta} step {step}",
                           "kl": (3 - i) * beta + i * 2.0, "reward": 0.2 + 0.1 * i, "reward_ci95": 0.03})
    points += [{"method": "Best-of-N", "label": f"N={n}", "kl": math.log(n) - (n - 1) / n, "reward": 0.1 + 0.05 * n,
                "reward_ci95": None} for n in (2, 4, 16)]
    return points


def test_read_metrics_skips_truncated_line(run_dir):
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert len(rows) == 32
    assert rows[-1]["step"] == 30 and "eval/rewards/accuracies" in rows[-1]


def test_plots_are_pngs(tmp_path, run_dir):
    assert_png(plot_training_curves(run_dir / "metrics.jsonl", tmp_path / "curves.png"))
    assert_png(plot_reward_histogram([0.1, 0.5, 0.9, None], [0.0, 0.2], tmp_path / "hist.png", "sentiment"))
    assert_png(plot_frontier(frontier_points(), tmp_path / "frontier.png", title="test frontier"))


def test_training_curves_empty_file_is_none(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo', encoding="utf-8")
    assert plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()


def test_full_report(run_dir):
    path = write_report(run_dir, eval_result(), frontier_points=frontier_points())
    assert path == run_dir / "report.html"
    for name in ("training_curves.png", "rewards_hist.png", "frontier.png"):
        assert_png(run_dir / name)
    html = path.read_text(encoding="utf-8")
    assert "dpo-beta0.1" in html
    assert "62.5% ± 4.1 pp" in html  # win rate
    assert "0.555 ± 0.020 vs 0.100 ± 0.050" in html  # mean reward policy vs reference
    assert "2.310 ± 0.400" in html  # KL
    assert 'class="warning"' in html and "-1.25" in html
    # data text is escaped, never markup
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "Tom &amp; Jerry" in html and "<i>answer</i>" not in html
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; odd value" in html  # config value
    assert html.count("Tom &amp; Jerry answer") == 10  # only 10 of the 12 samples
    for src in ('src="training_curves.png"', 'src="rewards_hist.png"', 'src="frontier.png"'):
        assert src in html
    assert "β=0.1 step 40" in html and "Best-of-N" in html
    assert "eval/logps/chosen_shift" in html and "generation/kl_mean" in html  # evaluation table


def test_no_warning_when_chosen_logprob_rises(run_dir):
    html = write_report(run_dir, eval_result(chosen_shift=0.8)).read_text(encoding="utf-8")
    assert 'class="warning"' not in html
    assert "+0.80" in html
    assert not (run_dir / "frontier.png").exists()


def test_report_without_eval(run_dir, tmp_path):
    out = tmp_path / "elsewhere" / "r.html"
    path = write_report(run_dir, None, out_path=out)
    assert path == out
    assert_png(out.parent / "training_curves.png")
    html = out.read_text(encoding="utf-8")
    assert "Training curves" in html and "Key results" not in html and "win rate" not in html
    assert "<td>beta</td>" in html


def test_report_kto_metrics_and_no_config(tmp_path):
    run = tmp_path / "kto-run"
    run.mkdir()
    rows = []
    for step in range(1, 26):
        row = {"step": step, "loss": 0.5 - 0.01 * step, "kto/kl": 0.1 * step, "kto/desirable_fraction": 0.5,
               "rewards/chosen": 0.01 * step, "logps/chosen": -70.0, "lr": 1e-6}
        if step % 3:  # batches without undesirable examples log no rejected means
            row.update({"rewards/rejected": -0.01 * step, "logps/rejected": -75.0})
        rows.append(row)
    rows.append({"step": 25, "eval/rewards/accuracies": 0.55, "eval/rewards/margins": 0.1})
    write_metrics(run / "metrics.jsonl", rows, truncated=False)
    path = write_report(run, {"eval/rewards/accuracies": 0.55})
    assert_png(run / "training_curves.png")
    html = path.read_text(encoding="utf-8")
    assert "55.0%" in html and "No config.yaml" in html
    assert not (run / "rewards_hist.png").exists()


def test_report_without_metrics(tmp_path):
    html = write_report(tmp_path, {"generation": {"win_rate": 0.5}}).read_text(encoding="utf-8")
    assert "No training metrics" in html and "50.0%" in html
