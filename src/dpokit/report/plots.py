"""PNG plots of a run: training curves from metrics.jsonl, reward histograms, and the reward-vs-KL frontier."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, work on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# (panel title, metric keys drawn on it). A key is drawn from training rows and, as markers, from the
# evaluation rows' "eval/<key>"; a panel with none of its keys in the file is left out.
PANELS = [
    ("loss", ["loss"]),
    ("reward accuracy", ["rewards/accuracies"]),
    ("reward margin (chosen − rejected)", ["rewards/margins"]),
    ("rewards: chosen vs rejected", ["rewards/chosen", "rewards/rejected"]),
    ("log-probs: chosen vs rejected", ["logps/chosen", "logps/rejected"]),
    ("KTO reference point (KL estimate)", ["kto/kl"]),
    ("reward (online: samples of the step; eval: held-out prompts)", ["reward"]),  # loop/online_eval.py's eval/…
    ("KL to the reference, per token", ["kl"]),
    ("win rate vs the reference's samples (held-out)", ["win_rate"]),
]
COLORS = ["tab:blue", "tab:red"]  # first and second key of a panel (chosen blue, rejected red)

# One look per method on the frontier; methods not listed get the next of EXTRA_STYLES.
METHOD_STYLES = {
    "DPO": ("tab:red", "o"),
    "Preferred-FT": ("tab:green", "s"),
    "Best-of-N": ("tab:orange", "^"),
    "GRPO": ("tab:purple", "D"),
    "reference": ("black", "*"),
}
LINE_STYLES = ["-", "--", ":", "-."]
EXTRA_STYLES = [("tab:blue", "v"), ("tab:brown", "P"), ("tab:pink", "X"), ("tab:olive", "<"), ("tab:cyan", ">"),
                ("tab:gray", "h")]


def read_metrics(metrics_path) -> list[dict]:
    """The JSON rows of a metrics.jsonl; lines that are not a JSON object (a killed run's last line) are skipped."""
    rows = []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows where `key` holds a finite number."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over `window` values; the first points average what exists so far (no lag-free trimming)."""
    v = np.asarray(values, dtype=float)
    cumsum = np.concatenate([[0.0], np.cumsum(v)])
    ends = np.arange(1, len(v) + 1)
    starts = np.maximum(0, ends - window)
    return (cumsum[ends] - cumsum[starts]) / (ends - starts)


def plot_training_curves(metrics_path, out_png) -> Path | None:
    """A grid of training-curve panels from a run's metrics.jsonl; None when the file has no rows."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    panels = []
    for title, keys in PANELS:
        drawn = [(k, _series(rows, k), _series(rows, f"eval/{k}")) for k in keys]
        drawn = [d for d in drawn if d[1][0] or d[2][0]]
        if drawn:
            panels.append((title, drawn))
    if not panels:
        return None

    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (title, drawn) in zip(axes.flat, panels):
        for color, (key, (steps, values), (eval_steps, eval_values)) in zip(COLORS, drawn):
            name = key.split("/")[-1] if len(drawn) > 1 else "train"
            if steps:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                window = max(1, len(values) // 20)
                ax.plot(steps, moving_average(values, window), color=color, linewidth=1.6,
                        label=f"{name} (avg of {window})" if window > 1 else name)
            if eval_steps:
                ax.plot(eval_steps, eval_values, linestyle="none", marker="o", markersize=6, color=color,
                        markeredgecolor="black", label=f"eval {name}" if len(drawn) > 1 else "eval")
        if title == "reward accuracy" or title.startswith("win rate"):
            ax.axhline(0.5, color="gray", linewidth=0.8, linestyle=":")  # chance level
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return _save(fig, out_png)


def plot_reward_histogram(policy_rewards, reference_rewards, out_png, reward_name: str = "reward") -> Path | None:
    """Overlaid histograms of per-sample rewards, policy vs reference; None when there are no finite rewards."""
    policy = [float(r) for r in policy_rewards if r is not None and math.isfinite(r)]
    reference = [float(r) for r in reference_rewards if r is not None and math.isfinite(r)]
    if not policy and not reference:
        return None
    both = policy + reference
    # Shared bin edges so the two histograms are comparable bar for bar.
    low, high = min(both), max(both)
    if low == high:
        low, high = low - 0.5, high + 0.5
    bins = np.linspace(low, high, min(40, max(10, len(both) // 4)) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for values, name, color in ((reference, "reference", "tab:gray"), (policy, "policy", "tab:red")):
        if values:
            mean = sum(values) / len(values)
            ax.hist(values, bins=bins, alpha=0.5, color=color, label=f"{name} (mean {mean:.3f}, n={len(values)})")
            ax.axvline(mean, color=color, linestyle="--", linewidth=1.2)
    ax.set_xlabel(f"{reward_name} reward per sample")
    ax.set_ylabel("samples")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # counts: no 0.5-sample ticks
    ax.set_title(f"{reward_name}: policy vs reference")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, out_png)


def _save(fig, out_png) -> Path:
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def plot_frontier(points: list[dict], out_png, title: str = "reward vs KL frontier") -> Path | None:
    """Reward (y) against sequence KL(π‖π_ref) (x), one colour and marker per method, as in the DPO paper's
    Fig. 2 (left). Points sharing a method and a "series" are joined in order of KL; None when no points."""
    points = [p for p in points if p.get("kl") is not None and p.get("reward") is not None]
    if not points:
        return None
    styles, extra = {}, iter(EXTRA_STYLES * 10)
    for p in points:
        method = str(p.get("method", "?"))
        if method not in styles:
            styles[method] = METHOD_STYLES.get(method) or next(extra)

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for method, (color, marker) in styles.items():
        mine = [p for p in points if str(p.get("method", "?")) == method]
        xs = [p["kl"] for p in mine]
        ys = [p["reward"] for p in mine]
        errors = [p.get("reward_ci95") or 0.0 for p in mine]
        ax.errorbar(xs, ys, yerr=errors if any(errors) else None, linestyle="none", marker=marker, color=color,
                    markersize=11 if marker == "*" else 7, capsize=3, label=method)
        for i, series in enumerate(sorted({str(p["series"]) for p in mine if p.get("series")})):
            line = sorted((p for p in mine if str(p.get("series")) == series), key=lambda p: p["kl"])
            if len(line) > 1:  # same colour as the method; the line style tells its series apart
                ax.plot([p["kl"] for p in line], [p["reward"] for p in line], color=color, alpha=0.6, linewidth=1.2,
                        linestyle=LINE_STYLES[i % len(LINE_STYLES)])
                if series != method:  # name the line (e.g. "beta=0.1") at its far end
                    ax.annotate(series, (line[-1]["kl"], line[-1]["reward"]), textcoords="offset points",
                                xytext=(6, -12), fontsize=8, color=color, fontweight="bold")
        if len(points) <= 30:  # beyond that the labels only hide the points; the report's table has them
            for p in mine:
                if p.get("label"):
                    ax.annotate(str(p["label"]), (p["kl"], p["reward"]), textcoords="offset points",
                                xytext=(5, 4), fontsize=7, color=color)
    ax.set_xlabel("KL(π‖π_ref), nats per sample")
    ax.set_ylabel("mean reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, out_png)
