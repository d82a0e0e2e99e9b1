"""Speed and peak memory of rqlm's quantizers against vector-quantize-pytorch: same settings, one run.

    python benchmarks/quantizers.py [--repeats 7] [--threads 1] [--device cpu]

Every case quantizes 8 x 256 vectors of dim 256. A training step is forward + backward (+ the EMA
update inside forward); eval is encode only, under no_grad. Ours and the reference alternate within
each repeat, so both see the same machine load; the table gives medians. Peak memory is the highest
net allocation during one step: torch.profiler's memory events on CPU, max_memory_allocated on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

BATCH, LENGTH, DIM = 8, 256, 256


@dataclass
class Case:
    name: str
    ours: Callable[[], nn.Module]
    reference: Callable[[], nn.Module]
    train: bool


def _cases() -> tuple[list[Case], list[str]]:
    """The benchmark cases, and notes on cases skipped because a module is missing."""
    import vector_quantize_pytorch as ref

    from rqlm.modeling.residual_vq import ResidualVQ
    from rqlm.modeling.vector_quantize import VectorQuantize

    rvq = {"dim": DIM, "num_quantizers": 8, "codebook_size": 1024}
    vq = {"dim": DIM, "codebook_size": 1024}
    cases = [
        Case(
            "ResidualVQ(Q=8, K=1024) train step",
            lambda: ResidualVQ(**rvq),
            lambda: ref.ResidualVQ(**rvq),
            True,
        ),
        Case(
            "ResidualVQ(Q=8, K=1024) eval encode",
            lambda: ResidualVQ(**rvq),
            lambda: ref.ResidualVQ(**rvq),
            False,
        ),
        Case(
            "VectorQuantize(K=1024) train step",
            lambda: VectorQuantize(**vq),
            lambda: ref.VectorQuantize(**vq),
            True,
        ),
        Case(
            "VectorQuantize(K=1024) eval encode",
            lambda: VectorQuantize(**vq),
            lambda: ref.VectorQuantize(**vq),
            False,
        ),
    ]
    notes = []
    fsq = {"levels": [8, 5, 5, 5], "dim": DIM}
    lfq = {"dim": DIM, "codebook_size": 1024}
    try:
        from rqlm.modeling.finite_scalar_quantization import FSQ

        cases.append(Case("FSQ([8,5,5,5]) train step", lambda: FSQ(**fsq), lambda: ref.FSQ(**fsq), True))
    except ImportError:
        notes.append("FSQ skipped: rqlm.modeling.finite_scalar_quantization is not there yet")
    try:
        from rqlm.modeling.lookup_free_quantization import LFQ

        cases.append(Case("LFQ(K=1024) train step", lambda: LFQ(**lfq), lambda: ref.LFQ(**lfq), True))
    except ImportError:
        notes.append("LFQ skipped: rqlm.modeling.lookup_free_quantization is not there yet")
    return cases, notes


def _step(module: nn.Module, x: torch.Tensor, train: bool) -> None:
    """One training step (forward + backward) or one eval encode."""
    if not train:
        with torch.no_grad():
            module(x)
        return
    outputs = module(x.detach().requires_grad_())
    quantized, rest = outputs[0], outputs[2:]  # (quantized, indices[, loss or losses])
    loss = quantized.square().mean() + sum(
        t.sum() for t in rest if torch.is_tensor(t) and t.is_floating_point()
    )
    loss.backward()


def _seconds(module: nn.Module, x: torch.Tensor, train: bool) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    _step(module, x, train)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _peak_bytes(module: nn.Module, x: torch.Tensor, train: bool) -> int:
    """Highest net memory allocated during one step."""
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(module, x, train)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(module, x, train)
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


def run_case(case: Case, x: torch.Tensor, repeats: int, warmup: int) -> dict[str, float]:
    """Median ms and peak MB of ours and the reference, alternating within each repeat."""
    modules = {}
    for side in ("ours", "reference"):
        torch.manual_seed(0)
        modules[side] = getattr(case, side)().to(x.device).train(case.train)
    for _ in range(warmup):
        for module in modules.values():
            _step(module, x, case.train)
    times = {side: [] for side in modules}
    for _ in range(repeats):
        for side, module in modules.items():
            times[side].append(_seconds(module, x, case.train))
    result = {f"{side}_ms": 1000 * statistics.median(t) for side, t in times.items()}
    result.update({f"{side}_mb": _peak_bytes(m, x, case.train) / 2**20 for side, m in modules.items()})
    return result


def format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    header = "| case | ours ms | reference ms | speedup | ours peak MB | reference peak MB |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        speedup = r["reference_ms"] / r["ours_ms"]
        lines.append(
            f"| {name} | {r['ours_ms']:.1f} | {r['reference_ms']:.1f} | {speedup:.2f}x "
            f"| {r['ours_mb']:.1f} | {r['reference_mb']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed steps per case and side (median reported)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case and side")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no GPU")

    cases, notes = _cases()
    x = torch.randn(BATCH, LENGTH, DIM, generator=torch.Generator().manual_seed(0)).to(args.device)
    memory = "torch.cuda.max_memory_allocated" if x.is_cuda else "torch.profiler memory events"
    print(
        f"device {args.device}, {torch.get_num_threads()} threads, input {tuple(x.shape)}, fp32, "
        f"median of {args.repeats}; peak memory from {memory}"
    )
    rows = [(case.name, run_case(case, x, args.repeats, args.warmup)) for case in cases]
    print(format_table(rows))
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
