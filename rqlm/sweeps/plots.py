"""One figure per sweep, by its kind (see rqlm/sweeps/runner.py's docstring for what each kind plots)."""

from __future__ import annotations

from pathlib import Path

from rqlm.sweeps.results import format_value


def plot_sweep(name: str, sweep: dict, baseline: dict | None, path: Path) -> Path:
    """The sweep's figure (see rqlm/sweeps/runner.py's docstring for each kind); saves a PNG."""
    from rqlm.reporting.plots import plt  # pyplot with the Agg backend selected

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    kind = sweep["kind"]
    if kind == "compression":
        _plot_compression(*axes, sweep["points"], baseline)
    elif kind in ("codebook", "quantizer"):
        _plot_bit_budget(fig, *axes, name, kind, sweep["points"], baseline)
    elif kind == "backbone":
        _plot_backbone(*axes, sweep["points"], baseline)
    elif kind == "compute":
        _plot_compute(*axes, sweep["points"], baseline)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if kind not in ("codebook", "quantizer"):
        fig.suptitle(f"{name} ({kind})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_compression(left, right, points: list[dict], baseline: dict | None) -> None:
    """Left: the perplexity bound against C; right: the generation speedup against C, per batch size."""
    ordered = sorted(points, key=lambda p: p["compression_factor"])
    cs = [p["compression_factor"] for p in ordered]
    left.plot(cs, [p.get("perplexity_bound") for p in ordered], marker="o", label="RQ perplexity bound")
    _baseline_line(left, baseline)
    left.set(xlabel="compression C (tokens per latent position)", ylabel="perplexity", yscale="log",
             xticks=cs, title="quality")
    for key in sorted({k for p in ordered for k in p if k.startswith("speedup_batch")}):
        batch = key.removeprefix("speedup_batch")
        right.plot(cs, [p.get(key) for p in ordered], marker="o", label=f"batch {batch}")
    right.axhline(1.0, color="gray", linestyle=":", label="baseline speed")
    right.set(xlabel="compression C", ylabel="tokens/s against the baseline", xticks=cs, title="generation speedup")


def _plot_bit_budget(fig, left, right, name: str, kind: str, points: list[dict], baseline: dict | None) -> None:
    """Points at one bit budget. Left: the bound (codebook) or the codes used (quantizer); right: VAE accuracy."""
    bits = [p["bits"] for p in points]
    names = [f"{p['name']}\nK={p['codebook_size']} D={p['num_quantizers']}" for p in points]
    if kind == "codebook":
        _bars(left, names, [p.get("perplexity_bound") for p in points], "perplexity bound")
        left.set_yscale("log")
        _baseline_line(left, baseline)
    else:
        _bars(left, names, [p.get("codes_used") for p in points], "fraction of codes used (held-out)")
    _bars(right, names, [p.get("recon_accuracy") for p in points], "VAE reconstruction accuracy (held-out)")
    fig.suptitle(f"{name}: {kind} at {min(bits):.1f}-{max(bits):.1f} bits per position"
                 if max(bits) - min(bits) > 1e-6 else f"{name}: {kind} at {bits[0]:.0f} bits per position")


def _plot_backbone(left, right, points: list[dict], baseline: dict | None) -> None:
    """Left: held-out code NLL over training per point; right: each point's final bound."""
    for p in points:
        if p.get("curve_code_nll"):
            steps, values = zip(*p["curve_code_nll"])
            left.plot(steps, values, marker="o", markersize=3, label=p["name"])
    left.set(xlabel="step", ylabel="held-out code NLL (nats per code)", title="code NLL over training")
    _bars(right, [p["name"] for p in points], [p.get("perplexity_bound") for p in points], "final perplexity bound")
    right.set_yscale("log")
    _baseline_line(right, baseline)


def _plot_compute(left, right, points: list[dict], baseline: dict | None) -> None:
    """Left: perplexity against training FLOPs (baseline and each RQ run); right: both at the RQ run's FLOPs."""
    if baseline and baseline.get("curve_flops_perplexity"):
        xs, ys = zip(*baseline["curve_flops_perplexity"])
        left.plot(xs, ys, marker="s", markersize=3, color="black", label="baseline perplexity")
    for p in points:
        if p.get("curve_flops_bound"):
            xs, ys = zip(*p["curve_flops_bound"])
            (line,) = left.plot(xs, ys, marker="o", markersize=3, label=f"{p['name']}: RQ bound")
            left.axvline(p["vae_training_flops"], color=line.get_color(), linestyle=":", linewidth=1)
    left.set(xlabel="training FLOPs (RQ: VAE (dotted) + LM)", ylabel="perplexity", xscale="log",
             yscale="log", title="perplexity against training FLOPs")
    names = [n for p in points for n in (f"{p['name']}\nRQ bound", f"{p['name']}\nbaseline @FLOPs")]
    values = [v for p in points for v in (p.get("perplexity_bound"), p.get("baseline_perplexity_at_matched_flops"))]
    _bars(right, names, values, "perplexity at the RQ run's final FLOPs")
    right.set(yscale="log", title="matched training FLOPs")


def _bars(ax, names: list[str], values: list, ylabel: str) -> None:
    heights = [v if v is not None else 0.0 for v in values]
    bars = ax.bar(range(len(names)), heights)
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_ylabel(ylabel)
    for bar, v in zip(bars, values):
        ax.annotate(format_value(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7)


def _baseline_line(ax, baseline: dict | None) -> None:
    if baseline and baseline.get("perplexity"):
        ax.axhline(baseline["perplexity"], color="black", linestyle="--", label="baseline perplexity")
