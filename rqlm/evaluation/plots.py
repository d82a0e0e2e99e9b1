"""Training curves as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_training_curves(history: list[dict], path: str | Path, title: str | None = None) -> Path:
    """One panel per logged metric (training loss first, then each eval_* metric) against step; saves a PNG."""
    metrics = ["loss"] + sorted({k for record in history for k in record if k.startswith("eval_")})
    metrics = [m for m in metrics if any(m in record for record in history)]
    if not metrics:
        raise ValueError("nothing to plot: the history holds no 'loss' or 'eval_*' values")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        points = [(r["step"], r[metric]) for r in history if metric in r]
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if metric.endswith("perplexity") and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
