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


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (written by the training loop)."""
    import json

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass a folder written by `rqlm train-*`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metric_comparison(runs: dict[str, str | Path], metric: str, path: str | Path, title: str | None = None) -> Path:
    """One curve per run of `metric` (e.g. eval_accuracy) against step; saves a PNG."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run_dir in runs.items():
        points = [(r["step"], r[metric]) for r in read_metrics(run_dir) if metric in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
