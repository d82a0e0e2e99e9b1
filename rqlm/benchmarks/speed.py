"""Speed and memory of the RQ-VAE against the plain Qwen3 baseline, measured in one run.

Both models get the same backbone config, the same token ids (B, T), the same autocast dtype, the
same threads and device; their steps alternate within every repeat, so both see the same machine load,
and each figure is a median. Measured:
  - training: tokens/s of forward + backward + AdamW step, and peak memory (weights, gradients,
    optimizer state and the step's activations);
  - inference (eval, no grad): RQ-VAE encode (tokens -> codes) and decode (codes -> logits) tokens/s,
    each next to one forward of the baseline over the same tokens.
The timing and peak-memory helpers here are shared with the quantizer benchmark (quantizer_bench.py).
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MB = 2**20


# ----------------------------------------------------------------------------- shared helpers


def resolve_device(name: str | None) -> torch.device:
    """'cuda' / 'cpu' / None (cuda when available) -> a device; one-line error for a GPU torch cannot see."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but torch sees no GPU; pass --device cpu")
    return device


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` on `device`, or nothing for float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    steps: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Median wall seconds of one call of each step; the steps alternate within every repeat."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Highest net bytes allocated while `step()` runs (CUDA's peak counter; torch.profiler events on CPU)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


@contextmanager
def native_stderr_silenced():
    """File descriptor 2 to /dev/null meanwhile: torch's CPU profiler writes `USDT: ... profiler_start/stop` lines
    there from C++, past Python's sys.stderr, into every `rqlm bench` output. Python's own stderr is flushed first
    and restored after, so an exception raised inside still prints."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- the model benchmark


def build_models(
    backbone: str,
    vocab_size: int,
    compression_factor: int,
    num_quantizers: int,
    codebook_size: int,
    quantizer_type: str,
):
    """(RQVAEModel, Qwen3ForCausalLM), seeded, from one backbone config (a preset or a pretrained Qwen3's)."""
    from transformers import Qwen3ForCausalLM

    from rqlm import RQVAEConfig, RQVAEModel
    from rqlm.presets import backbone_config, is_preset

    config = backbone_config(backbone, vocab_size=vocab_size if is_preset(backbone) else None)
    torch.manual_seed(0)
    baseline = Qwen3ForCausalLM(copy.deepcopy(config))
    rq_vae = RQVAEModel(
        RQVAEConfig(
            backbone_config=copy.deepcopy(config),
            compression_factor=compression_factor,
            num_quantizers=num_quantizers,
            codebook_size=codebook_size,
            quantizer_type=quantizer_type,
        )
    )
    return rq_vae, baseline


def benchmark_models(
    backbone: str = "tiny",
    vocab_size: int = 8192,
    batch_size: int = 8,
    block_size: int = 256,
    compression_factor: int = 4,
    num_quantizers: int = 4,
    codebook_size: int = 1024,
    quantizer_type: str = "residual_vq",
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    repeats: int = 7,
    warmup: int = 2,
) -> dict:
    """The RQ-VAE against the baseline on tokens (batch_size, block_size) -> {'setup': {...}, 'rows': [...]}.

    Each row is {'metric', 'ours', 'baseline', 'ratio'} with ratio = ours / baseline.
    """
    from rqlm.data.loading import check_block_size

    check_block_size(block_size, compression_factor)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = torch.device(device)
    rq_vae, baseline = build_models(
        backbone, vocab_size, compression_factor, num_quantizers, codebook_size, quantizer_type
    )
    models = {"ours": rq_vae.to(device), "baseline": baseline.to(device)}
    vocab = baseline.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch_size, block_size), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(device)
    amp_dtype = DTYPES[dtype]
    train_seconds, peak_mb = measure_training(models, input_ids, device, amp_dtype, repeats, warmup)
    eval_seconds = measure_inference(rq_vae, baseline, input_ids, device, amp_dtype, repeats, warmup)
    setup = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "backbone": backbone,
        "batch_size": batch_size,
        "block_size": block_size,
        "compression_factor": compression_factor,
        "num_quantizers": num_quantizers,
        "codebook_size": codebook_size,
        "quantizer_type": quantizer_type,
        "repeats": repeats,
        "ours_parameters": sum(p.numel() for p in rq_vae.parameters()),
        "baseline_parameters": sum(p.numel() for p in baseline.parameters()),
        "memory": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "torch.profiler memory events",
    }
    return {"setup": setup, "rows": model_rows(input_ids.numel(), train_seconds, peak_mb, eval_seconds)}


def measure_training(
    models: dict, input_ids: torch.LongTensor, device: torch.device, amp_dtype: torch.dtype, repeats: int, warmup: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of forward + backward + AdamW step per side, then each side's peak MB (weights,
    gradients, optimizer state and the step's activations)."""
    optimizers = {side: torch.optim.AdamW(model.parameters(), lr=1e-4) for side, model in models.items()}

    def train_step(side: str) -> Callable[[], None]:
        model, optimizer = models[side], optimizers[side]

        def step() -> None:
            with autocast(device, amp_dtype):
                loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    for model in models.values():
        model.train()
    train_steps = {side: train_step(side) for side in models}
    train_seconds = median_seconds(train_steps, device, repeats, warmup)
    peak_mb = {}  # measured after the timed steps, so the optimizer state exists
    for side, model in models.items():
        optimizer_state = [
            t for state in optimizers[side].state.values() for t in state.values() if torch.is_tensor(t)
        ]
        resident = tensor_bytes([*model.parameters(), *model.buffers(), *optimizer_state])
        peak_mb[side] = (resident + peak_bytes(train_steps[side], device)) / MB
    return train_seconds, peak_mb


def measure_inference(
    rq_vae, baseline, input_ids: torch.LongTensor, device: torch.device, amp_dtype: torch.dtype, repeats: int, warmup: int
) -> dict[str, float]:
    """Median seconds (eval, no grad) of the RQ-VAE's encode and decode and of one baseline forward."""
    for model in (rq_vae, baseline):
        model.eval()
    with torch.no_grad(), autocast(device, amp_dtype):
        codes = rq_vae.encode(input_ids).codes

    def no_grad(fn: Callable[[], object]) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad(), autocast(device, amp_dtype):
                fn()

        return step

    return median_seconds(
        {
            "encode": no_grad(lambda: rq_vae.encode(input_ids)),
            "decode": no_grad(lambda: rq_vae.decode(codes)),
            "baseline": no_grad(lambda: baseline(input_ids=input_ids)),
        },
        device,
        repeats,
        warmup,
    )


def model_rows(tokens: int, train_seconds: dict, peak_mb: dict, eval_seconds: dict) -> list[dict]:
    """The table's rows, each {'metric', 'ours', 'baseline', 'ratio'}."""

    def row(metric: str, ours: float, base: float) -> dict:
        return {"metric": metric, "ours": ours, "baseline": base, "ratio": ours / base}

    return [
        row("train step tokens/s", tokens / train_seconds["ours"], tokens / train_seconds["baseline"]),
        row("train step peak MB", peak_mb["ours"], peak_mb["baseline"]),
        row(
            "eval encode tokens/s (baseline: forward)",
            tokens / eval_seconds["encode"],
            tokens / eval_seconds["baseline"],
        ),
        row(
            "eval decode tokens/s (baseline: forward)",
            tokens / eval_seconds["decode"],
            tokens / eval_seconds["baseline"],
        ),
    ]


def format_model_table(result: dict) -> str:
    """A markdown table of `benchmark_models`' rows under one line describing the setup."""
    s = result["setup"]
    header = (
        f"RQ-VAE ({s['ours_parameters'] / 1e6:.2f}M params, C={s['compression_factor']} "
        f"D={s['num_quantizers']} K={s['codebook_size']} {s['quantizer_type']}) vs Qwen3 baseline "
        f"({s['baseline_parameters'] / 1e6:.2f}M), backbone {s['backbone']}, "
        f"{s['batch_size']} x {s['block_size']} tokens, {s['dtype']}, {s['device']}, {s['threads']} threads, "
        f"median of {s['repeats']}; peak memory = weights + optimizer state + the step's highest "
        f"allocation ({s['memory']})"
    )
    lines = [header, "", "| metric | RQ-VAE | baseline | ratio |", "|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['metric']} | {r['ours']:,.1f} | {r['baseline']:,.1f} | {r['ratio']:.2f}x |")
    return "\n".join(lines)
