"""How generation speed and KV-cache size grow with the work: tokens/s and MB of the RQ model and the baseline
against prompt length and batch size (`rqlm bench --plot`), and the 2x2 plot of them."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from rqlm.benchmarks.generation_models import (
    baseline_cache_bytes,
    build_baseline,
    build_rq_model,
    prompts,
    rq_cache_bytes,
    shape_config,
)
from rqlm.benchmarks.generation_speed import baseline_generate, measure, rq_generate, warm_up
from rqlm.benchmarks.speed import DTYPES, MB


def sweep(
    shape: str,
    contexts: list[int],
    batch_sizes: list[int],
    new_tokens: int,
    baseline_way: str = "default",
    compression_factor: int = 4,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
    kernels: bool = True,
) -> dict:
    """Tokens/s and KV-cache MB of both models against prompt length (batch 1) and batch size (prompt contexts[0])."""
    device, torch_dtype = torch.device(device), DTYPES[dtype]
    backbone = shape_config(shape)
    backbone.max_position_embeddings = max(backbone.max_position_embeddings, max(contexts) + new_tokens)
    baseline = build_baseline(backbone).to(device, torch_dtype)
    model = build_rq_model(backbone, compression_factor).to(device, torch_dtype)
    sides = {
        "baseline": (baseline_generate(baseline, new_tokens, baseline_way, kernels), None),
        "rq": (rq_generate(model, new_tokens, kernels), model),
    }
    points = [("context", t, 1) for t in contexts] + [("batch", contexts[0], b) for b in batch_sizes]
    result = {
        "shape": shape,
        "new_tokens": new_tokens,
        "baseline_way": baseline_way,
        "compression_factor": compression_factor,
        "points": [],
    }
    for axis, context, batch in points:
        input_ids = prompts(batch, context, backbone.vocab_size, device)
        point = {"axis": axis, "context": context, "batch_size": batch}
        for side, (generate, rq) in sides.items():
            warm_up(generate, input_ids, 2 * compression_factor)
            run = measure(generate, input_ids, new_tokens, device)
            cache = (
                rq_cache_bytes(rq, context, new_tokens, batch, torch_dtype)
                if rq is not None
                else baseline_cache_bytes(backbone, context, new_tokens, batch, torch_dtype)
            )
            point[f"{side}_tokens_per_second"] = run.tokens_per_second
            point[f"{side}_kv_cache_mb"] = cache / MB
        log(
            f"  sweep {axis}: prompt {context}, batch {batch}: RQ {point['rq_tokens_per_second']:,.0f} tok/s, "
            f"baseline {point['baseline_tokens_per_second']:,.0f} tok/s"
        )
        result["points"].append(point)
    return result


def plot_sweep(result: dict, path: str) -> str:
    """A 2x2 PNG: tokens/s and KV-cache MB of both models against prompt length and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    labels = {
        "rq": f"RQ C={result['compression_factor']}",
        "baseline": f"Qwen3 baseline ({result['baseline_way']})",
    }
    for col, (axis, xlabel, x_key) in enumerate(
        (("context", "prompt tokens (batch 1)", "context"), ("batch", "batch size", "batch_size"))
    ):
        points = [p for p in result["points"] if p["axis"] == axis]
        x = [p[x_key] for p in points]
        for row, (metric, ylabel) in enumerate(
            (("tokens_per_second", "new tokens/s"), ("kv_cache_mb", "KV cache at the end (MB)"))
        ):
            ax = axes[row, col]
            for side, label in labels.items():
                ax.plot(x, [p[f"{side}_{metric}"] for p in points], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(
        f"Generation at the {result['shape']} shape: {result['new_tokens']} new tokens, greedy, KV caches"
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
