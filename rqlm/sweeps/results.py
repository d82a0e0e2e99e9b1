"""A sweep's figures collected from its run folders (VAE, evaluation, speed, FLOPs, curves), and the files
written from them: results.json, results.md (one table per sweep) and one plot per sweep."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

from rqlm.sweeps.flops import baseline_flops_per_token, rq_flops
from rqlm.sweeps.runner import BENCH_FILE, EVALUATION_FILE, PointPlan, code_bits


def _records(run_dir: Path) -> list[dict]:
    from rqlm.reporting.plots import read_metrics

    return read_metrics(run_dir)


def _last(records: list[dict], key: str):
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def tokens_per_step(records: list[dict]) -> float:
    """Tokens one optimizer step reads (constant batch x block), from the logged tokens_seen."""
    logged = [r for r in records if "tokens_seen" in r and r.get("step")]
    return logged[-1]["tokens_seen"] / logged[-1]["step"] if logged else 0.0


def curve(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every record holding `key`."""
    return [(r["step"], r[key]) for r in records if key in r]


def vae_figures(vae_dir: Path, args: argparse.Namespace) -> dict:
    """The VAE's held-out reconstruction accuracy and code usage (its last evaluation), and its sizes."""
    records = _records(vae_dir)
    usage = _last(records, "eval_usage_perplexity_mean")
    dead = _last(records, "eval_dead_fraction_mean")
    return {
        "compression_factor": args.compression_factor,
        "num_quantizers": args.num_quantizers,
        "codebook_size": args.codebook_size,
        "quantizer_type": args.quantizer_type,
        "bits": code_bits(args.quantizer_type, args.num_quantizers, args.codebook_size, args.quantizer_kwargs),
        "recon_accuracy": _last(records, "eval_accuracy"),
        "usage_perplexity": usage,
        "codes_used": None if dead is None else 1.0 - dead,
        "vae_tokens": _last(records, "tokens_seen"),
    }


def bench_figures(bench_file: Path) -> dict:
    """tokens/s of the trained RQ model and the fastest baseline way per batch size, and their ratio."""
    result = json.loads(bench_file.read_text())
    figures = {}
    for shape in result["shapes"]:
        rows = shape["rows"]
        for batch in sorted({r["batch_size"] for r in rows}):
            base = max((r["tokens_per_second"] for r in rows if r["batch_size"] == batch
                        and r["model"].startswith("Qwen3")), default=None)
            rq = [r["tokens_per_second"] for r in rows if r["batch_size"] == batch and r["model"].startswith("RQ")]
            if base and rq:
                figures[f"tokens_per_second_batch{batch}"] = rq[0]
                figures[f"baseline_tokens_per_second_batch{batch}"] = base
                figures[f"speedup_batch{batch}"] = rq[0] / base
    return figures


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on a polyline of (x, y) sorted by x, linear in log x; None outside its range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1 and x0 > 0:
            f = 0.0 if x1 == x0 else (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + f * (y1 - y0)
    return points[0][1] if len(points) == 1 and points[0][0] == x else None


def collect_results(plans: list[PointPlan], baseline_dir: Path | None, block_size: int) -> dict:
    """Every point's figures (VAE, evaluation, speed, FLOPs and curves) and the baseline's, as one dict."""
    results = {"baseline": None, "sweeps": {}}
    baseline_curve = []
    if baseline_dir is not None and (baseline_dir / "config.json").is_file():
        records = _records(baseline_dir)
        per_token = baseline_flops_per_token(baseline_dir, block_size)
        step_tokens = tokens_per_step(records)
        baseline_curve = [(per_token * step_tokens * s, math.exp(min(v, 700)))
                          for s, v in curve(records, "eval_loss")]
        results["baseline"] = {
            "folder": str(baseline_dir),
            "perplexity": _last(records, "eval_perplexity"),
            "tokens": _last(records, "tokens_seen"),
            "flops_per_token": per_token,
            "training_flops": per_token * (_last(records, "tokens_seen") or 0),
            "curve_flops_perplexity": baseline_curve,
        }
    for plan in plans:
        sweep = results["sweeps"].setdefault(plan.sweep.name, {"kind": plan.sweep.kind, "points": []})
        point = {"name": plan.point.name, "vae_overrides": plan.point.vae, "lm_overrides": plan.point.lm,
                 "vae_dir": str(plan.vae_dir), **vae_figures(plan.vae_dir, plan.vae_args)}
        if plan.lm_dir is not None:
            point.update(_lm_figures(plan, block_size, baseline_curve))
        if plan.bench_dir is not None and (plan.bench_dir / BENCH_FILE).is_file():
            point.update(bench_figures(plan.bench_dir / BENCH_FILE))
        sweep["points"].append(point)
    return results


def _lm_figures(plan: PointPlan, block_size: int, baseline_curve) -> dict:
    records = _records(plan.lm_dir)
    evaluation = json.loads((plan.eval_dir / EVALUATION_FILE).read_text())
    flops = rq_flops(plan.lm_dir, block_size)
    vae_flops = flops["vae_flops_per_token"] * (_last(_records(plan.vae_dir), "tokens_seen") or 0)
    step_tokens = tokens_per_step(records)
    lm_tokens = _last(records, "tokens_seen") or 0
    total = vae_flops + flops["lm_flops_per_token"] * lm_tokens
    figures = {
        "lm_dir": str(plan.lm_dir),
        "perplexity_bound": evaluation["perplexity_bound"],
        "baseline_perplexity": evaluation["baseline_perplexity"],
        "ratio": evaluation["ratio"],
        "bits_per_token": evaluation["bits_per_token"],
        "brier_lm": evaluation.get("brier_lm"),
        "baseline_brier_lm": evaluation.get("baseline_brier_lm"),
        "code_nll": _last(records, "eval_code_nll"),
        "lm_tokens": lm_tokens,
        **flops,
        "vae_training_flops": vae_flops,
        "training_flops": total,
        "baseline_perplexity_at_matched_flops": interpolate(baseline_curve, total) if baseline_curve else None,
        "curve_code_nll": curve(records, "eval_code_nll"),
        "curve_flops_bound": [(vae_flops + flops["lm_flops_per_token"] * step_tokens * s, v)
                              for s, v in curve(records, "eval_perplexity_bound")],
    }
    return figures


# ----------------------------------------------------------------------------- tables


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        if abs(value) >= 1e6:
            return f"{value:.3g}"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


TABLE_COLUMNS = (
    ("point", "name"), ("C", "compression_factor"), ("D", "num_quantizers"), ("K", "codebook_size"),
    ("quantizer", "quantizer_type"), ("bits", "bits"), ("recon acc", "recon_accuracy"),
    ("codes used", "codes_used"), ("code NLL", "code_nll"), ("bound", "perplexity_bound"),
    ("baseline ppl", "baseline_perplexity"), ("BrierLM", "brier_lm"), ("baseline BrierLM", "baseline_brier_lm"),
    ("speedup b1", "speedup_batch1"), ("speedup b8", "speedup_batch8"),
    ("train FLOPs", "training_flops"), ("baseline ppl @FLOPs", "baseline_perplexity_at_matched_flops"),
)


def results_markdown(results: dict) -> str:
    """One markdown table per sweep (columns without a value in the sweep left out)."""
    lines = ["# Sweep results", ""]
    base = results.get("baseline")
    if base:
        lines += [(f"Baseline: perplexity {format_value(base['perplexity'])} after {format_value(base['tokens'])} tokens, "
                   f"{format_value(base['training_flops'])} training FLOPs."), ""]
    for name, sweep in results["sweeps"].items():
        columns = [(t, k) for t, k in TABLE_COLUMNS if any(p.get(k) is not None for p in sweep["points"])]
        lines += [f"## {name} ({sweep['kind']})", "", f"![{name}]({name}.png)", "",
                  "| " + " | ".join(t for t, _ in columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(format_value(p.get(k)) for _, k in columns) + " |" for p in sweep["points"]]
        lines.append("")
    return "\n".join(lines)


def write_results(results: dict, output_dir: Path) -> list[Path]:
    """results.json, results.md and one PNG per sweep under output_dir; returns the files written."""
    from rqlm.sweeps.plots import plot_sweep  # imported here: plots.py labels its bars with format_value

    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / "results.json", output_dir / "results.md"]
    written[0].write_text(json.dumps(results, indent=1) + "\n")
    written[1].write_text(results_markdown(results))
    for name, sweep in results["sweeps"].items():
        written.append(plot_sweep(name, sweep, results.get("baseline"), output_dir / f"{name}.png"))
    return written
