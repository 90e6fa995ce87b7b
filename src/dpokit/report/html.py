"""report.html of a run: headline results, training curves, evaluation, sample completions, frontier, config."""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

import yaml

from dpokit.report.costs import COLUMNS, comparisons, cost_rows, series_costs
from dpokit.report.plots import plot_frontier, plot_reward_histogram, plot_training_curves

MAX_SAMPLES = 10
MAX_TEXT = 3000  # characters of one completion shown; the full text stays in eval.json

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.headline { background: #f5f7fa; border: 1px solid #d8dee6; border-radius: 6px; padding: 0.8em 1.2em; }
.headline td { padding: 0.2em 1em 0.2em 0; border: none; }
.headline td.value { font-weight: 600; font-variant-numeric: tabular-nums; }
.warning { background: #fff4e5; border-left: 4px solid #e67e22; padding: 0.5em 0.8em; margin: 0.6em 0; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85em;
          max-width: 30em; }
img { max-width: 100%; border: 1px solid #eee; }
.muted { color: #777; }
"""


def fmt(value, spec: str = ".3f") -> str:
    """A float formatted with `spec`, other values as text, a missing one as "—"."""
    if value is None:
        return "—"
    if not isinstance(value, float) or not math.isfinite(value):  # ints (counts) and text as they are
        return str(value)
    return format(value, spec)


def fmt_ci(value, ci, spec: str = ".3f") -> str:
    """'value ± ci', or just the value when the interval is missing."""
    return fmt(value, spec) if ci is None else f"{fmt(value, spec)} ± {fmt(ci, spec)}"


def fmt_percent(value, ci=None) -> str:
    """A fraction as a percentage ('62.5%'), with its interval in percentage points when given."""
    if not isinstance(value, (int, float)):
        return fmt(value)
    text = f"{100 * value:.1f}%"
    return text if not isinstance(ci, (int, float)) else f"{text} ± {100 * ci:.1f} pp"


def table(header: list[str] | None, rows: list[list[str]]) -> str:
    """An HTML table of already-escaped cells; a cell given as (html, css_class) gets that class."""
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for cell in row:
            html, cls = cell if isinstance(cell, tuple) else (cell, "")
            cells.append(f'<td class="{cls}">{html}</td>' if cls else f"<td>{html}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def scalars(result: dict, prefix: str = "") -> dict:
    """Every scalar of a nested result dict under a "/"-joined key; lists (the samples) are left out."""
    flat = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(scalars(value, f"{name}/"))
        elif value is None or isinstance(value, (str, int, float, bool)):
            flat[name] = value
    return flat


def headline(result: dict) -> str:
    """The key-results box: generation metrics, held-out preference metrics, and the chosen log-prob warning."""
    gen = result.get("generation") or {}
    pol, ref = gen.get("policy") or {}, gen.get("reference") or {}
    rows = []
    if "win_rate" in gen:
        rows.append(("win rate of policy over reference", fmt_percent(gen["win_rate"], gen.get("win_rate_ci95"))))
    if pol or ref:
        name = f" ({gen['reward']})" if gen.get("reward") else ""
        rows.append((f"mean reward{name}: policy vs reference",
                     f"{fmt_ci(pol.get('reward_mean'), pol.get('reward_ci95'))} vs "
                     f"{fmt_ci(ref.get('reward_mean'), ref.get('reward_ci95'))}"))
    if "kl_mean" in gen:
        rows.append(("KL(π‖π_ref), nats per sample", fmt_ci(gen["kl_mean"], gen.get("kl_ci95"))))
    if "length_mean" in pol or "length_mean" in ref:
        rows.append(("mean completion length: policy vs reference",
                     f"{fmt(pol.get('length_mean'), '.1f')} vs {fmt(ref.get('length_mean'), '.1f')}"))
    if "prompts" in gen:
        rows.append(("prompts × samples per prompt", f"{fmt(gen['prompts'])} × {fmt(gen.get('samples_per_prompt'))}"))
    if "eval/rewards/accuracies" in result:
        rows.append(("held-out preference accuracy", fmt_percent(result["eval/rewards/accuracies"])))
    if "eval/rewards/margins" in result:
        rows.append(("held-out reward margin", fmt(result["eval/rewards/margins"], "+.3f")))
    chosen, rejected = result.get("eval/logps/chosen_shift"), result.get("eval/logps/rejected_shift")
    if chosen is not None or rejected is not None:
        rows.append(("log-prob shift (policy − reference): chosen, rejected",
                     f"{fmt(chosen, '+.2f')}, {fmt(rejected, '+.2f')}"))
    if not rows:
        return '<p class="muted">The evaluation result has none of the headline metrics.</p>'
    body = "\n".join(f"<tr><td>{escape(k)}</td><td class=\"value\">{escape(v)}</td></tr>" for k, v in rows)
    html = f'<div class="headline"><table>\n{body}\n</table>'
    if isinstance(chosen, (int, float)) and chosen < 0:
        # Why warn: DPO only pushes the chosen-minus-rejected margin, and it often does so by lowering both;
        # a falling chosen log-prob moves mass to completions that are in neither set.
        html += (f'\n<div class="warning">⚠ The chosen completions\' log-probability fell by {abs(chosen):.2f} '
                 "nats on average: the policy widened the margin partly by making preferred answers less likely "
                 "— a known DPO failure mode (likelihood displacement). Check the samples below for degeneration; "
                 "a smaller learning rate, a larger β or an SFT term on the chosen answers counter it.</div>")
    return html + "\n</div>"


def sample_rows(samples: list[dict]) -> list[list]:
    """Table rows of the first samples: prompt, reference completion and reward, policy completion and reward."""
    def text(value) -> tuple[str, str]:
        value = "" if value is None else str(value)
        if len(value) > MAX_TEXT:
            value = value[:MAX_TEXT] + " …"
        return escape(value), "text"

    return [[text(s.get("prompt")), text(s.get("reference")), (escape(fmt(s.get("reference_reward"))), "num"),
             text(s.get("policy")), (escape(fmt(s.get("policy_reward"))), "num")] for s in samples[:MAX_SAMPLES]]


def config_rows(run_dir: Path) -> tuple[list[list[str]], str]:
    """Rows of config.yaml as key/value cells, and a note when it is missing or unreadable."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return [], "No config.yaml in the run folder."
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        return [], f"config.yaml could not be read: {e}"
    if not isinstance(config, dict):
        return [], "config.yaml is not a mapping."
    rows = []
    for key, value in config.items():
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        rows.append([escape(str(key)), (escape(shown), "text")])
    return rows, ""


def write_report(run_dir, eval_result: dict | None = None, out_path=None, frontier_points: list[dict] | None = None,
                 notes: list[str] | None = None, frontier: dict | None = None) -> Path:
    """Write run_dir/report.html (or out_path) and its PNGs next to it; return the HTML's path. `notes`: lines shown
    under the frontier (a sweep's budget rule, its reward model's held-out accuracy). `frontier`: a sweep's
    frontier.json, whose points and notes stand in for those not given and whose costs become a table."""
    if frontier:
        frontier_points, notes = frontier_points or frontier.get("points"), notes or frontier.get("notes")
    run_dir = Path(run_dir)
    out_path = Path(out_path) if out_path is not None else run_dir / "report.html"
    folder = out_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    title = run_dir.resolve().name
    parts = [f"<h1>dpokit report: {escape(title)}</h1>",
             f'<p class="muted">run folder: {escape(str(run_dir.resolve()))}</p>']

    if eval_result:
        models = [f"{label}: {escape(str(eval_result[key]))}" for key, label in
                  (("model", "policy"), ("ref_model", "reference"), ("data", "data")) if eval_result.get(key)]
        if models:
            parts.append(f'<p class="muted">{" · ".join(models)}</p>')
        parts += ["<h2>Key results</h2>", headline(eval_result)]

    parts.append("<h2>Training curves</h2>")
    metrics = run_dir / "metrics.jsonl"
    curves = plot_training_curves(metrics, folder / "training_curves.png") if metrics.is_file() else None
    parts.append(f'<img src="{curves.name}" alt="training curves">' if curves else
                 '<p class="muted">No training metrics (metrics.jsonl missing or empty).</p>')

    if eval_result:
        parts.append("<h2>Evaluation</h2>")
        gen = eval_result.get("generation") or {}
        samples = [s for s in gen.get("samples") or [] if isinstance(s, dict)]
        if samples:  # the histogram first: below the metrics table it was ~60 rows down the page
            reward = str(gen.get("reward") or "reward")
            every = gen.get("rewards") or {}  # all per-sample rewards when recorded, else the kept samples'
            hist = plot_reward_histogram(every.get("policy") or [s.get("policy_reward") for s in samples],
                                         every.get("reference") or [s.get("reference_reward") for s in samples],
                                         folder / "rewards_hist.png", reward)
            if hist:
                parts.append(f'<img src="{hist.name}" alt="reward histogram">')
        flat = scalars(eval_result)
        numeric = {k for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        cells = [[escape(k), (escape(fmt(flat[k], ".5g")), "num" if k in numeric else "")] for k in sorted(flat)]
        parts.append(table(["metric", "value"], cells))
        if samples:
            shown = min(len(samples), MAX_SAMPLES)
            parts.append(f"<h2>Sample completions ({shown} of {len(samples)})</h2>")
            parts.append(table(["prompt", "reference completion", "reward", "policy completion", "reward"],
                               sample_rows(samples)))

    if frontier_points:
        parts.append("<h2>Reward vs KL frontier</h2>")
        png = plot_frontier(frontier_points, folder / "frontier.png")
        if png:
            parts.append(f'<img src="{png.name}" alt="reward vs KL frontier">')
        rows = [[escape(str(p.get("method", ""))), escape(str(p.get("series") or "")), escape(str(p.get("label", ""))),
                 (escape(fmt(p.get("kl"))), "num"), (escape(fmt_ci(p.get("reward"), p.get("reward_ci95"))), "num")]
                for p in sorted(frontier_points, key=lambda p: (str(p.get("method", "")), str(p.get("series") or ""),
                                                        p.get("kl") or 0.0))]
        parts.append(table(["method", "series", "label", "KL (nats)", "mean reward ± 95% CI"], rows))
        parts += [f"<p>{escape(str(note))}</p>" for note in notes or []]
    cost_records = series_costs(frontier) if frontier else []
    if cost_records:
        parts.append("<h2>What each method cost</h2>")
        parts.append(table(COLUMNS, [[escape(c) for c in row] for row in cost_rows(cost_records)]))
        parts += [f"<p>{escape(line)}</p>" for line in comparisons(cost_records)]
        parts.append('<p class="muted">Wall time from the reference model on, held-out evaluation excluded; '
                     'DPO and RLHF are charged for making the pairs file, RLHF also for its reward model; '
                     'comparisons interpolate between checkpoints (dpokit/report/costs.py).</p>')

    parts.append("<h2>Config</h2>")
    rows, note = config_rows(run_dir)
    parts.append(table(["key", "value"], rows) if rows else f'<p class="muted">{escape(note)}</p>')

    html = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>dpokit report: {escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")
    out_path.write_text(html, encoding="utf-8")
    return out_path
