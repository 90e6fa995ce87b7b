"""What each series of a sweep cost, from its frontier.json (issue 17 part 4): the cost table and the DPO-vs-RLHF
comparisons at equal held-out reward and at equal wall time.

A series' total counts every stage the method needs after the reference model (held-out evaluation excluded):
  DPO, Preferred-FT   making the pairs file (sampling and scoring the prompts; both files' seconds, as recorded)
                      + training (its reference pass included);
  RLHF                the same pairs file + the reward model fitted to it + PPO (its sampling and reward-model
                      calls included);
  GRPO, PPO-GT, …     training alone: they sample and score their own completions.
The pairs file is made once per sweep and shared, but each method is charged for it in full: a user who runs
only that method pays it.

Timeline: a checkpoint at step s of a run of S steps is placed at setup + train_seconds × s / S (training time is
close to linear in steps); from 0 to setup the policy is the reference, with its reward. `time_to_reward` and `reward_at`
interpolate linearly along it, so the comparisons at equal reward or time are estimates between measured points.
"""

from __future__ import annotations

import re

OFFLINE = ("DPO", "Preferred-FT")


def series_costs(frontier: dict) -> list[dict]:
    """One record per trained series of frontier.json: its totals and its (seconds, reward, KL) timeline."""
    pairs, rm = frontier.get("pairs") or {}, (frontier.get("reward_model") or {}).get("cost") or {}
    reference_reward = frontier.get("reference_reward")
    rows = []
    for series, cost in (frontier.get("costs") or {}).items():
        method = cost.get("method", series)
        stages = []  # (name, seconds, peak RSS) before training
        if method in OFFLINE or method == "RLHF":
            stages.append(("pairs", pairs.get("seconds"), pairs.get("peak_rss_gb")))
        if method == "RLHF":
            stages.append(("reward model", _whole(rm.get("train_seconds"), (frontier.get("reward_model") or {})
                                                  .get("steps"), rm.get("resumed_at_step")), rm.get("peak_rss_gb")))
        setup = sum(s or 0.0 for _, s, _ in stages)
        steps = cost.get("steps") or 1
        train_s = _whole(cost.get("train_seconds") or 0.0, steps, cost.get("resumed_at_step"))
        labelled = pairs.get("reward_calls", 0) if stages else 0  # the pairs' labels (human ones in practice)
        # until training starts the policy is the reference: its reward from time 0 to the end of the stages
        timeline = [] if reference_reward is None else \
            [(0.0, reference_reward, 0.0)] + ([(setup, reference_reward, 0.0)] if setup > 0 else [])
        final = None
        for p in (p for p in frontier.get("points", []) if p.get("series") == series):
            step = re.fullmatch(r"step (\d+)", str(p.get("label")))
            at = steps if p.get("label") == "final" else int(step.group(1)) if step else None
            if at is not None:
                timeline.append((setup + train_s * at / steps, p.get("reward"), p.get("kl")))
            if p.get("label") == "final":
                final = p
        rss = [r for r in [*(r for _, _, r in stages), cost.get("peak_rss_gb")] if r is not None]
        rows.append({"method": method, "series": series, "stages": [(n, s) for n, s, _ in stages],
                     "setup_seconds": setup, "train_seconds": train_s, "seconds": setup + train_s,
                     "peak_rss_gb": max(rss) if rss else None, "models_held": cost.get("models_held"),
                     "models": cost.get("models") or [],
                     "samples": (pairs.get("samples", 0) if stages else 0) + (cost.get("samples_generated") or 0),
                     "labels": labelled, "reward_calls": cost.get("reward_calls") or 0,
                     "reward_model_calls": cost.get("reward_model_calls") or 0,
                     "final": final, "timeline": sorted(timeline, key=lambda t: t[0]),
                     # a run a signal stopped and the sweep resumed: its time is extrapolated from the steps after
                     # the checkpoint (_whole), and the table says so
                     "resumed": [f"{name} after step {c['resumed_at_step']}" for name, c in
                                 (("training", cost), ("reward model", rm if method == "RLHF" else {}))
                                 if c.get("resumed_at_step")]})
    return rows


def _whole(seconds, steps, resumed_at):
    """A run's time, extrapolated to all its steps when it was resumed at step `resumed_at` (its measured time
    covers the steps after it only); as measured otherwise."""
    if seconds is None or not resumed_at or not steps or steps <= resumed_at:
        return seconds
    return seconds * steps / (steps - resumed_at)


def time_to_reward(row: dict, target: float) -> float | None:
    """Seconds into the series when its held-out reward first reaches `target` (linear between points); None if
    it never does."""
    line = row["timeline"]
    for i, (t, r, _) in enumerate(line):
        if r is None or r < target:
            continue
        if i == 0 or line[i - 1][1] is None:
            return t
        t0, r0, _ = line[i - 1]  # below the target (else the loop had returned), so r > r0
        return t0 + (t - t0) * (target - r0) / (r - r0)
    return None


def reward_at(row: dict, seconds: float) -> float | None:
    """The series' held-out reward at `seconds` (linear between points; the reference's until training starts);
    None after the series ended (it cannot be read past its final model)."""
    line = row["timeline"]
    for (t0, r0, _), (t1, r1, _) in zip(line, line[1:]):
        if t0 <= seconds <= t1 and None not in (r0, r1):
            return r0 if t1 == t0 else r0 + (r1 - r0) * (seconds - t0) / (t1 - t0)
    return None


def _best(rows: list[dict], method: str) -> dict | None:
    """The series of `method` whose final model has the highest held-out reward."""
    finished = [r for r in rows if r["method"] == method and r["final"]]
    return max(finished, key=lambda r: r["final"]["reward"]) if finished else None


def comparisons(rows: list[dict]) -> list[str]:
    """The two comparisons issue 17 asks for, between the best DPO and the best RLHF series, as sentences."""
    dpo, rlhf = _best(rows, "DPO"), _best(rows, "RLHF")
    if not (dpo and rlhf):
        return []
    target = min(dpo["final"]["reward"], rlhf["final"]["reward"])
    t_dpo, t_rlhf = time_to_reward(dpo, target), time_to_reward(rlhf, target)
    lines = []
    if t_dpo is not None and t_rlhf is not None:
        ratio = f" ({t_rlhf / t_dpo:.1f}× DPO's time)" if t_dpo > 0 else ""
        lines.append(f"At equal held-out reward ({target:+.3f}): DPO {dpo['series']} reaches it after "
                     f"{t_dpo / 60:.1f} min, RLHF {rlhf['series']} after {t_rlhf / 60:.1f} min{ratio}.")
    span = min(dpo["seconds"], rlhf["seconds"])
    r_dpo, r_rlhf = reward_at(dpo, span), reward_at(rlhf, span)
    if r_dpo is not None and r_rlhf is not None:
        lines.append(f"At equal wall time ({span / 60:.1f} min): DPO {dpo['series']} {r_dpo:+.3f}, RLHF "
                     f"{rlhf['series']} {r_rlhf:+.3f} held-out reward.")
    return lines


COLUMNS = ["method", "series", "wall time, min (stages)", "peak RSS, GB", "models held", "samples generated",
           "reward labels / calls / reward-model calls", "final reward", "final KL", "win rate"]


def cost_rows(rows: list[dict]) -> list[list[str]]:
    """The cost table's cells, one row per series (COLUMNS)."""
    def num(value, spec):
        return "–" if value is None else format(value, spec)
    table = []
    for r in rows:
        parts = [f"{name} {s / 60:.1f}" for name, s in r["stages"] if s is not None] + \
            ([f"training {r['train_seconds'] / 60:.1f}"] if r["stages"] else [])
        final = r["final"] or {}
        notes = ([" + ".join(parts)] if parts else []) + \
            ([f"resumed: {', '.join(r['resumed'])}, time extrapolated"] if r["resumed"] else [])
        table.append([r["method"], r["series"], f"{r['seconds'] / 60:.1f}" + (f" ({'; '.join(notes)})" if notes else ""),
                      num(r["peak_rss_gb"], ".2f"),
                      "–" if r["models_held"] is None else f"{r['models_held']} ({', '.join(r['models'])})",
                      f"{r['samples']:,}", f"{r['labels']:,} / {r['reward_calls']:,} / {r['reward_model_calls']:,}",
                      num(final.get("reward"), "+.3f"), num(final.get("kl"), ".2f"),
                      "–" if final.get("win_rate") is None else f"{final['win_rate']:.1%}"])
    return table


def cost_markdown(frontier: dict) -> str:
    """The cost table and the comparisons as Markdown (what the sweep prints and docs/RESULTS.md holds)."""
    rows = series_costs(frontier)
    if not rows:
        return ""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in cost_rows(rows)]
    return "\n".join(lines + [""] + comparisons(rows))
