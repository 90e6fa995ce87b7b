"""The sweep's cost table (report/costs.py): what each method is charged, its timeline, and the DPO-vs-RLHF
comparisons at equal reward and equal time, on a frontier.json written by hand."""

import pytest

from dpokit.report import write_report
from dpokit.report.costs import comparisons, cost_markdown, reward_at, series_costs, time_to_reward


def frontier():
    def cost(method, seconds, steps, samples=0, by_model=False, models=("policy", "reference"), rss=2.0):
        return {"method": method, "steps": steps, "train_seconds": seconds, "peak_rss_gb": rss,
                "samples_generated": samples, "reward_calls": samples, "reward_model_calls": samples if by_model else 0,
                "models": list(models), "models_held": len(models)}

    def points(method, series, steps_rewards):
        return [{"method": method, "series": series, "label": label, "kl": 1.0, "reward": r, "win_rate": 0.6}
                for label, r in steps_rewards]
    return {
        "reference_reward": 0.1,
        "pairs": {"seconds": 120.0, "samples": 1120, "reward_calls": 1120, "peak_rss_gb": 1.5},
        "reward_model": {"cost": {"train_seconds": 300.0, "peak_rss_gb": 2.5}},
        "costs": {"beta=0.1": cost("DPO", 240.0, 96),
                  "rlhf kl=0.05": cost("RLHF", 1200.0, 12, 768, True,
                                       ("policy", "reference", "reward model", "value"), 3.5),
                  "ppo-gt": cost("PPO-GT", 1000.0, 12, 768, False, ("policy", "reference", "value"), 3.0)},
        "points": [{"method": "Best-of-N", "series": "Best-of-N", "label": "N=1", "kl": 0.0, "reward": 0.1},
                   *points("DPO", "beta=0.1", [("step 48", 0.3), ("final", 0.5)]),
                   *points("RLHF", "rlhf kl=0.05", [("step 6", 0.2), ("final", 0.4)]),
                   *points("PPO-GT", "ppo-gt", [("final", 0.45)])],
    }


def test_each_method_is_charged_for_its_stages():
    rows = {r["series"]: r for r in series_costs(frontier())}
    assert set(rows) == {"beta=0.1", "rlhf kl=0.05", "ppo-gt"}  # Best-of-N trains nothing
    dpo, rlhf, gt = rows["beta=0.1"], rows["rlhf kl=0.05"], rows["ppo-gt"]
    assert dpo["seconds"] == 120 + 240 and dpo["samples"] == 1120 and dpo["labels"] == 1120
    assert rlhf["seconds"] == 120 + 300 + 1200 and rlhf["samples"] == 1120 + 768
    assert (rlhf["labels"], rlhf["reward_calls"], rlhf["reward_model_calls"]) == (1120, 768, 768)
    assert rlhf["peak_rss_gb"] == 3.5 and rlhf["models_held"] == 4
    assert gt["seconds"] == 1000 and gt["samples"] == 768 and gt["labels"] == 0 and gt["reward_model_calls"] == 0
    # checkpoints placed along training, after the stages before it; the reference at the start
    assert dpo["timeline"] == [(0, 0.1, 0.0), (120, 0.1, 0.0), (240, 0.3, 1.0), (360, 0.5, 1.0)]
    assert rlhf["timeline"] == [(0, 0.1, 0.0), (420, 0.1, 0.0), (1020, 0.2, 1.0), (1620, 0.4, 1.0)]
    assert gt["timeline"][0] == (0, 0.1, 0.0) and gt["timeline"][-1] == (1000, 0.45, 1.0)
    assert not dpo["resumed"]
    resumed = frontier()
    resumed["costs"]["ppo-gt"]["resumed_at_step"] = 5
    assert "(resumed: training after step 5, time extrapolated)" in cost_markdown(resumed)
    gt = next(r for r in series_costs(resumed) if r["series"] == "ppo-gt")
    assert gt["seconds"] == pytest.approx(1000 * 12 / 7)  # 1000 s measured for the 7 steps after step 5


def test_interpolation_along_a_timeline():
    dpo = next(r for r in series_costs(frontier()) if r["method"] == "DPO")
    assert time_to_reward(dpo, 0.1) == 0             # the reference already has it
    assert time_to_reward(dpo, 0.2) == pytest.approx(180)
    assert time_to_reward(dpo, 0.4) == pytest.approx(300)
    assert time_to_reward(dpo, 0.6) is None           # never reached
    assert reward_at(dpo, 300) == pytest.approx(0.4)
    assert reward_at(dpo, 100) == 0.1 and reward_at(dpo, 400) is None  # the reference until training / finished


def test_dpo_and_rlhf_compared_at_equal_reward_and_time():
    lines = comparisons(series_costs(frontier()))
    # equal reward: RLHF's final +0.4 (the lower); DPO reaches it at 300 s, RLHF at its end, 1620 s
    assert lines[0] == ("At equal held-out reward (+0.400): DPO beta=0.1 reaches it after 5.0 min, RLHF rlhf kl=0.05 "
                        "after 27.0 min (5.4× DPO's time).")
    # equal time: DPO's whole run, 360 s — RLHF is still fitting its reward model then: the reference's reward
    assert lines[1] == "At equal wall time (6.0 min): DPO beta=0.1 +0.500, RLHF rlhf kl=0.05 +0.100 held-out reward." 
    table = cost_markdown(frontier())
    assert table.count("\n| ") == 1 + 3 and "| RLHF | rlhf kl=0.05 | 27.0 (pairs 2.0 + reward model 5.0 + training 20.0)" \
        in table and "1,120 / 768 / 768" in table


def test_report_shows_the_cost_table(tmp_path):
    path = write_report(tmp_path, None, frontier=frontier())
    html = path.read_text()
    assert "What each method cost" in html and "rlhf kl=0.05" in html and "At equal held-out reward" in html
    assert "frontier.png" in html  # points taken from the frontier too
