"""Speed and peak memory of rqlm's quantizers against vector-quantize-pytorch: same settings, one run.

    rqlm bench --quantizers [--repeats 7] [--threads 1] [--device cpu]

Every case quantizes B x N vectors of dim 256 (8 x 256 by default). A training step is forward +
backward (+ the EMA update inside forward); eval is encode only, under no_grad. Ours and the reference
alternate within each repeat, so both see the same machine load; the table gives medians. Peak memory
is the highest net allocation during one step (see `speed.peak_bytes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .speed import MB, autocast, median_seconds, peak_bytes

DIM = 256


@dataclass
class Case:
    """One benchmark case: our class and the reference's, built with the same keywords."""

    name: str
    ours: type[nn.Module]
    reference: type[nn.Module]
    kwargs: dict
    train: bool


def cases() -> list[Case]:
    """The benchmark cases: RVQ and VQ (train step and eval encode), FSQ and LFQ (train step)."""
    try:
        import vector_quantize_pytorch as ref
    except ImportError:
        raise ValueError(
            "the quantizer benchmark needs vector-quantize-pytorch: pip install vector-quantize-pytorch"
        ) from None

    from rqlm.modeling.finite_scalar_quantization import FSQ
    from rqlm.modeling.lookup_free_quantization import LFQ
    from rqlm.modeling.residual_vq import ResidualVQ
    from rqlm.modeling.vector_quantize import VectorQuantize

    rvq = {"dim": DIM, "num_quantizers": 8, "codebook_size": 1024}
    vq = {"dim": DIM, "codebook_size": 1024}
    return [
        Case("ResidualVQ(Q=8, K=1024) train step", ResidualVQ, ref.ResidualVQ, rvq, True),
        Case("ResidualVQ(Q=8, K=1024) eval encode", ResidualVQ, ref.ResidualVQ, rvq, False),
        Case("VectorQuantize(K=1024) train step", VectorQuantize, ref.VectorQuantize, vq, True),
        Case("VectorQuantize(K=1024) eval encode", VectorQuantize, ref.VectorQuantize, vq, False),
        Case("FSQ([8,5,5,5]) train step", FSQ, ref.FSQ, {"levels": [8, 5, 5, 5], "dim": DIM}, True),
        Case("LFQ(K=1024) train step", LFQ, ref.LFQ, {"dim": DIM, "codebook_size": 1024}, True),
    ]


def quantizer_step(module: nn.Module, x: torch.Tensor, train: bool, dtype: torch.dtype) -> Callable[[], None]:
    """One training step (forward + backward) or one eval encode of `module` on x (B, N, dim)."""

    def step() -> None:
        if not train:
            with torch.no_grad(), autocast(x.device, dtype):
                module(x)
            return
        with autocast(x.device, dtype):
            outputs = module(x.detach().requires_grad_())
        quantized, rest = outputs[0], outputs[2:]  # (quantized, indices[, loss or losses])
        extra = sum(t.sum() for t in rest if torch.is_tensor(t) and t.is_floating_point())
        (quantized.float().square().mean() + extra).backward()

    return step


def run_case(case: Case, x: torch.Tensor, repeats: int, warmup: int, dtype: torch.dtype) -> dict[str, float]:
    """Median ms and peak MB of ours and the reference on x (B, N, dim), alternating within each repeat."""
    steps = {}
    for side in ("ours", "reference"):
        torch.manual_seed(0)
        module = getattr(case, side)(**case.kwargs).to(x.device).train(case.train)
        steps[side] = quantizer_step(module, x, case.train, dtype)
    seconds = median_seconds(steps, x.device, repeats, warmup)
    result = {f"{side}_ms": 1000 * s for side, s in seconds.items()}
    result.update({f"{side}_mb": peak_bytes(step, x.device) / MB for side, step in steps.items()})
    return result


def benchmark_quantizers(
    batch_size: int, length: int, device: torch.device, repeats: int, warmup: int, dtype: torch.dtype
) -> dict:
    """Every case on B x N random vectors -> {'setup': {...}, 'rows': [{'case', 'ours_ms', ...}]}."""
    x = torch.randn(batch_size, length, DIM, generator=torch.Generator().manual_seed(0)).to(device)
    rows = [{"case": case.name, **run_case(case, x, repeats, warmup, dtype)} for case in cases()]
    for row in rows:
        row["speedup"] = row["reference_ms"] / row["ours_ms"]
    setup = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "input": list(x.shape),
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
        "memory": "torch.cuda.max_memory_allocated" if x.is_cuda else "torch.profiler memory events",
    }
    return {"setup": setup, "rows": rows}


def format_quantizer_table(result: dict) -> str:
    """A markdown table of `benchmark_quantizers`' rows under one line describing the setup."""
    s = result["setup"]
    setup = (
        f"device {s['device']}, {s['threads']} threads, input {tuple(s['input'])}, {s['dtype']}, "
        f"median of {s['repeats']}; peak memory from {s['memory']}"
    )
    lines = [
        setup,
        "",
        "| case | ours ms | reference ms | speedup | ours peak MB | reference peak MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['case']} | {r['ours_ms']:.1f} | {r['reference_ms']:.1f} | {r['speedup']:.2f}x "
            f"| {r['ours_mb']:.1f} | {r['reference_mb']:.1f} |"
        )
    return "\n".join(lines)
