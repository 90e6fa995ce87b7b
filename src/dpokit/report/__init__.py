"""Stage 7 — report: PNG plots and report.html of a run, its evaluation and a sweep's frontier."""

from dpokit.report.html import write_report
from dpokit.report.plots import plot_frontier, plot_reward_histogram, plot_training_curves, read_metrics

__all__ = ["plot_frontier", "plot_reward_histogram", "plot_training_curves", "read_metrics", "write_report"]
