"""Loss curves of the staged training: one figure per stage folder, one across all stages.

A person judging a week-long run looks at curves, not tables: is the train loss falling, does
the English valid loss (forgetting) stay flat while the Korean one falls.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from kormedgemma.core.plots import new_figure  # no pyplot: leaves a notebook's backend alone
from kormedgemma.training.results import StageMetrics


def plot_stage(metrics: StageMetrics, ax: Any) -> None:
    history, evals = metrics["history"], metrics["evals"]
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1, label="train", color="0.5")
    for language, colour in (("korean", "tab:blue"), ("english", "tab:orange")):
        key = f"{language}_valid_loss"
        points = [(e["step"], e[key]) for e in evals if key in e]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, label=f"{language} valid", color=colour)
    ax.set_title(f"stage {metrics['stage']}: {metrics['name']}", fontsize=9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)


def evals_table(metrics: StageMetrics) -> Any:
    """A stage's valid losses by step (empty for a stage that was skipped)."""
    import pandas as pd

    return pd.DataFrame(metrics["evals"], columns=None if metrics["evals"] else ["step"]).set_index("step")


def save_stage_plot(metrics: StageMetrics, path: Path) -> None:

    figure = new_figure((5, 3.2))
    plot_stage(metrics, figure.subplots())
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_all_stages(all_metrics: Sequence[StageMetrics]) -> Any:
    """Valid losses across the stages, on one step axis (stage boundaries dashed).

    A pyplot figure, unlike the other helpers' (`kormedgemma.core.plots`): notebook 3.07 draws it and
    calls `plt.show()`, which shows and closes it on the inline backend."""
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(8, 3.5))
    offset = 0
    for metrics in all_metrics:
        for language, colour in (("korean", "tab:blue"), ("english", "tab:orange")):
            key = f"{language}_valid_loss"
            points = [(offset + e["step"], e[key]) for e in metrics["evals"] if key in e]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, color=colour,
                        label=f"{language} valid" if metrics is all_metrics[0] else None)
        offset += metrics["steps"]
        ax.axvline(offset, ls="--", lw=0.6, color="0.7")
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("valid loss")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure
