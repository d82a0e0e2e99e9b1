"""The demo report's plots (matplotlib, PNG): the training curves of every stage side by side (the continuous
latents' too, in a run that has them), codebook usage per depth, and reconstruction accuracy by position inside
a chunk."""

from __future__ import annotations

import math
from pathlib import Path

from rqlm.reporting.plots import _save, plt, read_metrics

# stage -> (title, held-out metric drawn under its training loss, its axis label, log scale)
STAGE_CURVES = {
    "baseline": ("Qwen3 baseline", "eval_perplexity", "held-out perplexity", True),
    "vae": ("RQ-VAE", "eval_accuracy", "held-out reconstruction accuracy", False),
    "lm": ("RQ-Transformer (tokens mode)", "eval_perplexity", "held-out perplexity (exact)", True),
    "lm_codes": ("RQ-Transformer (codes mode)", "eval_perplexity_bound", "held-out perplexity bound", True),
    # the continuous latents of `rqlm demo --continuous`
    "gaussian_vae": ("Gaussian VAE", "eval_accuracy", "held-out reconstruction accuracy", False),
    "givt": ("GIVT (Gaussian head)", "eval_perplexity_bound", "held-out ELBO perplexity bound", True),
    "givt_energy": ("GIVT (energy head)", "eval_loss", "held-out energy-score loss", False),
}
STAGES_PER_ROW = 4  # stage columns of the training-curve figure; more stages wrap onto another pair of rows


def _points(history: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the records holding a finite `key`."""
    pairs = [(r["step"], r[key]) for r in history if key in r and math.isfinite(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_stage_curves(run_dirs: dict[str, str | Path], path: str | Path,
                      finals: dict[str, tuple[float, str]] | None = None) -> Path:
    """One column per training stage (keys of STAGE_CURVES), STAGES_PER_ROW a row: training loss over steps,
    and under it the stage's held-out figure as the training loop measured it on a few held-out batches;
    `finals` (stage -> (value, its text in the report's tables)) is drawn as a star at the last step, labelled
    with that text, so the plot shows the tables' figure. A stage whose folder has no metrics.jsonl is left out."""
    histories = {}
    for stage, run_dir in run_dirs.items():
        try:
            histories[stage] = read_metrics(run_dir)
        except FileNotFoundError:
            continue
    if not histories:
        raise ValueError(f"no training run to plot: none of {[str(d) for d in run_dirs.values()]} has metrics.jsonl")
    finals = finals or {}
    columns = min(STAGES_PER_ROW, len(histories))
    pairs = math.ceil(len(histories) / columns)
    fig, axes = plt.subplots(2 * pairs, columns, figsize=(4.8 * columns, 6.6 * pairs), squeeze=False)
    for index, (stage, history) in enumerate(histories.items()):
        title, key, label, log_scale = STAGE_CURVES[stage]
        column, pair = index % columns, index // columns
        loss_ax, eval_ax = axes[2 * pair, column], axes[2 * pair + 1, column]
        steps, losses = _points(history, "loss")
        loss_ax.plot(steps, losses, marker="o" if len(steps) < 30 else None, markersize=3)
        loss_ax.set_title(title)
        loss_ax.set_ylabel("training loss")
        steps, values = _points(history, key)
        eval_ax.plot(steps, values, marker="o", markersize=4, label="training loop's held-out batches")
        if stage in finals and steps:
            value, text = finals[stage]
            eval_ax.plot([steps[-1]], [value], marker="*", markersize=11, linestyle="none", color="C3",
                         label="all held-out blocks (the report's tables)")
            eval_ax.annotate(text, (steps[-1], value), xytext=(-8, 6), textcoords="offset points", ha="right",
                             fontsize=8, color="C3")
            values = [*values, value]
        if log_scale and values and min(values) > 0 and max(values) > 10 * min(values):  # over a decade
            eval_ax.set_yscale("log")
        eval_ax.margins(y=0.15)  # room for the final figure's label
        eval_ax.set_ylabel(label)
        eval_ax.legend(fontsize=7)
        for ax in (loss_ax, eval_ax):
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
    for index in range(len(histories), pairs * columns):  # the empty cells of the last pair of rows
        axes[2 * (index // columns), index % columns].set_visible(False)
        axes[2 * (index // columns) + 1, index % columns].set_visible(False)
    return _save(fig, path)


def plot_codebook_usage(usage_perplexity: list[float], dead_fraction: list[float], codebook_size: int,
                        path: str | Path) -> Path:
    """Per depth: usage perplexity as a fraction of K (bars) and the fraction of codes never used (bars)."""
    depths = list(range(len(usage_perplexity)))
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(depths) + 2), 4))
    ax.bar([d - width / 2 for d in depths], [p / codebook_size for p in usage_perplexity], width,
           label=f"usage perplexity / K (K={codebook_size})")
    ax.bar([d + width / 2 for d in depths], dead_fraction, width, label="codes unused on held-out text")
    ax.set_xticks(depths)
    ax.set_xlabel("residual depth")
    ax.set_ylabel("fraction of the codebook")
    ax.set_ylim(0, 1.05)
    ax.set_title("RQ-VAE codebook usage per depth (held-out)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_position_accuracy(accuracy_by_position: dict[str, list[float]], accuracy: dict[str, float],
                           path: str | Path) -> Path:
    """Reconstruction accuracy of each token position inside a chunk of C tokens, and the overall one, for
    each VAE (keys: its label, e.g. 'RQ-VAE' and, in a run with continuous latents, 'Gaussian VAE')."""
    positions = list(range(len(next(iter(accuracy_by_position.values())))))
    width = 0.8 / len(accuracy_by_position)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.7 * len(positions) * len(accuracy_by_position) + 2), 4))
    for i, (vae, values) in enumerate(accuracy_by_position.items()):
        offset = (i - (len(accuracy_by_position) - 1) / 2) * width
        bars = ax.bar([p + offset for p in positions], values, width, label=f"{vae}: all positions {accuracy[vae]:.1%}")
        ax.axhline(accuracy[vae], color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=1)
        for position, value in zip(positions, values):
            ax.annotate(f"{value:.1%}", (position + offset, value), xytext=(0, 3), textcoords="offset points",
                        ha="center", fontsize=7)
    ax.set_xticks(positions)
    ax.set_xlabel("token position inside a chunk")
    ax.set_ylabel("held-out tokens reconstructed")
    ax.set_ylim(0, 1.05)
    ax.set_title("reconstruction accuracy by position (dashed: all positions)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)
