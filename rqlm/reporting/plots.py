"""Training curves as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PANEL_COLUMNS = 4
TRAINING_LOSSES = ("loss", "recon_loss", "quantizer_loss")  # drawn together in the first panel
# eval_usage_perplexity_d3 and eval_accuracy_pos1 are drawn as one line of the panels
# eval_usage_perplexity_d and eval_accuracy_pos, labelled "depth 3" and "position 1"
INDEXED_METRIC = re.compile(r"^(.*_(d|pos))(\d+)$")
INDEX_NAMES = {"d": "depth", "pos": "position"}


def training_title(config) -> str:
    """What was trained, for a figure title: model type and its key sizes, read from a model config."""
    model_type = getattr(config, "model_type", type(config).__name__)
    if model_type == "rq_vae":
        backbone = config.backbone_config
        return (
            f"RQ-VAE: C={config.compression_factor}, D={config.num_quantizers}, K={config.codebook_size}, "
            f"d={config.latent_dim} ({config.quantizer_type}); encoder/decoder/latent layers "
            f"{config.num_encoder_layers}/{config.num_decoder_layers}/{config.num_latent_layers}, "
            f"hidden {backbone.hidden_size}"
        )
    if model_type == "qwen3":
        return (
            f"Qwen3 causal LM (baseline): {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"vocab {config.vocab_size}"
        )
    return model_type


def _panels(history: list[dict]) -> dict[str, list[str]]:
    """Panel title -> metrics drawn in it: 'loss' first, then eval_* metrics, indexed ones grouped."""
    keys = sorted({k for record in history for k in record if k.startswith("eval_")})
    losses = [k for k in TRAINING_LOSSES if any(k in r for r in history)]
    panels: dict[str, list[str]] = {"loss": losses} if losses else {}
    for key in keys:
        match = INDEXED_METRIC.match(key)
        panels.setdefault(match.group(1) if match else key, []).append(key)
    return panels


def _label(metric: str, panel: str) -> str:
    """A legend label: 'depth 3' for eval_usage_perplexity_d3, the metric's full name otherwise."""
    match = INDEXED_METRIC.match(metric)
    if match and match.group(1) == panel:
        return f"{INDEX_NAMES[match.group(2)]} {match.group(3)}"
    return metric


def _draw(ax, steps: tuple, values: tuple, label: str | None) -> None:
    """A curve; a metric measured once (e.g. only at the last step) becomes a marker with its value written."""
    if len(steps) > 1:
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        return
    (line,) = ax.plot(steps, values, linestyle="none", marker="D", markersize=6, label=label)
    left, right = ax.get_xlim()
    to_the_left = steps[0] > (left + right) / 2  # write the value on the side with room
    ax.annotate(f"{values[0]:.4g}", (steps[0], values[0]), xytext=(-7 if to_the_left else 7, 0),
                textcoords="offset points", ha="right" if to_the_left else "left", va="center", fontsize=8,
                color=line.get_color())


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_training_curves(history: list[dict], path: str | Path, title: str | None = None) -> Path:
    """One panel per logged metric (training loss first, then eval_* metrics; per-depth and per-position
    metrics share a panel) against step, PANEL_COLUMNS panels a row; saves a PNG. `title` says what was
    trained (see `training_title`)."""
    panels = _panels(history)
    if not panels:
        raise ValueError("nothing to plot: the history holds no 'loss' or 'eval_*' values")
    rows = -(-len(panels) // PANEL_COLUMNS)
    cols = min(len(panels), PANEL_COLUMNS)
    last_step = max(r["step"] for r in history)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (panel, metrics) in zip(axes.flat, panels.items()):
        margin = 0.05 * max(last_step, 1)
        ax.set_xlim(-margin, last_step + margin)  # every panel spans the whole run
        for metric in metrics:
            steps, values = zip(*[(r["step"], r[metric]) for r in history if metric in r])
            _draw(ax, steps, values, _label(metric, panel) if len(metrics) > 1 else None)
        ax.margins(y=0.15)  # room for markers at the extremes and their values
        ax.set_xlabel("step")
        ax.set_title("training loss" if panel == "loss" else panel if len(metrics) == 1 else f"{panel}*")
        ax.grid(alpha=0.3)
        if len(metrics) > 1:
            ax.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (written by the training loop)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass a folder written by `rqlm train-*`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metric_comparison(runs: dict[str, str | Path], metric: str, path: str | Path, title: str | None = None) -> Path:
    """One curve per run of `metric` (e.g. eval_accuracy) against step; saves a PNG. `metric` may name several
    comma-separated metrics: each run plots the first it logged (runs of different commands name theirs apart)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = metric.split(",")
    for name, run_dir in runs.items():
        records = read_metrics(run_dir)
        found = next((m for m in names if any(m in r for r in records)), names[0])
        points = [(r["step"], r[found]) for r in records if found in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(" or ".join(names))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)
