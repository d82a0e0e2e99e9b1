"""Generation speed of RQTransformerForCausalLM against the plain Qwen3 baseline, measured in one run.

Both sides get the same machine, threads, dtype and prompts (B random prompts of T0 tokens, no padding),
greedy decoding with KV caches, EOS ignored (`eos_token_id=None`, so every run makes exactly the asked
number of new tokens). Per (shape, batch):
  - the baseline `Qwen3ForCausalLM.generate` two or three ways: default settings (dynamic cache, what
    users run), `cache_implementation="static"`, and static + `torch.compile` where asked; the headline
    compares with the fastest of them;
  - the RQ model at one or more (C, depth mode) variants over a VAE at the CPU defaults (D=8, K=1024,
    d=64, no encoder / decoder / latent layers) with a 1-layer depth transformer.
Measured per run: new tokens/s, time to first token (a streamer's clock), the RQ model's per-step time
split into spatial / depth / decoder / sampling / other (timing wrappers put on the model instance at
runtime, see `part_timers`), peak memory (torch.profiler memory events, `speed.peak_bytes`) and the
KV-cache bytes the run ends with. Random weights: the speed of a step does not depend on them.
Both sides run under `rqlm.kernels.cpu_kernels` (their multi-row linear calls, the RQ decoder's C rows and
a batch's rows, through oneDNN; the RQ stacks' lean steps) unless `kernels=False` (`rqlm bench --no_cpu_kernels`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import CompileConfig

from rqlm.benchmarks.generation_models import (
    Variant,
    baseline_cache_bytes,
    build_baseline,
    build_variant,
    count_parameters,
    prompts,
    rq_cache_bytes,
    shape_config,
)
from rqlm.benchmarks.generation_parts import StepClock, part_timers
from rqlm.benchmarks.speed import DTYPES, MB, peak_bytes, synchronize
from rqlm.kernels import cpu_kernels

BASELINE_WAYS = ("default", "static", "static+compile")


# ----------------------------------------------------------------------------- one run


@dataclass
class Run:
    """One measured `generate` call."""

    tokens_per_second: float
    seconds: float
    time_to_first_token: float
    new_tokens: int
    parts: dict[str, float] | None = None  # seconds per decoding step of each part (RQ model only)
    steps: int | None = None


def measure(
    generate: Callable[..., torch.LongTensor],
    input_ids: torch.LongTensor,
    new_tokens: int,
    device: torch.device,
    model=None,
    repeats: int = 1,
) -> Run:
    """Median of `repeats` timed `generate(input_ids, streamer=...)` calls; with `model`, the RQ parts too."""
    runs = []
    for _ in range(repeats):
        clock = StepClock(device)
        timers = part_timers(model, device) if model is not None else _no_timers()
        with timers as parts:
            synchronize(device)
            start = time.perf_counter()
            ids = generate(input_ids, streamer=clock)
            synchronize(device)
            seconds = time.perf_counter() - start
        made = ids.shape[1] - input_ids.shape[1]
        if made != new_tokens:
            raise RuntimeError(f"generate made {made} new tokens, not the {new_tokens} asked for")
        run = Run(
            tokens_per_second=ids.shape[0] * made / seconds,
            seconds=seconds,
            time_to_first_token=clock.times[1] - start,
            new_tokens=made,
        )
        if parts is not None:
            step_seconds = seconds - (parts.first_step_at - start)
            per_step = dict(parts.parts)
            per_step["other"] = step_seconds - sum(per_step.values())
            run.parts = {k: v / parts.steps for k, v in per_step.items()}
            run.steps = parts.steps
        runs.append(run)
    return sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]


@contextmanager
def _no_timers():
    yield None


def rq_generate(model, new_tokens: int, kernels: bool = True) -> Callable[..., torch.LongTensor]:
    """The latent LM's greedy `generate`, under `cpu_kernels` with `kernels`."""
    settings = {} if _runs_own_loop(model) or _plans_codes(model) else {"pad_token_id": 0}

    def generate(input_ids, streamer=None, max_new_tokens=new_tokens):
        with cpu_kernels(model, enabled=kernels):
            return model.generate(
                input_ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, streamer=streamer, **settings
            )

    return generate


def _plans_codes(model) -> bool:
    """Whether a latent LM is a codes_then_tokens RQ model (rqlm's own loop, without the codes loop's part timers)."""
    return getattr(model.config, "depth_output", None) == "codes_then_tokens"


def _runs_own_loop(model) -> bool:
    """Whether a latent LM generates through rqlm's own loop (the codes mode), not transformers' (the tokens mode)."""
    from rqlm.modeling.generation_rq_transformer import RQTransformerGenerationMixin

    return isinstance(model, RQTransformerGenerationMixin) and getattr(model.config, "depth_output", "codes") == "codes"


def baseline_generate(model, new_tokens: int, way: str, kernels: bool = True) -> Callable[..., torch.LongTensor]:
    """`Qwen3ForCausalLM.generate` with default settings, a static cache, or a static cache + torch.compile.

    `kernels` (not with torch.compile): the baseline's multi-row linear calls (a batch's rows) go through
    `cpu_kernels` as the RQ model's do, so a batch compares like with like.
    """
    if way not in BASELINE_WAYS:
        raise ValueError(f"unknown baseline way {way!r}; choose from {', '.join(BASELINE_WAYS)}")
    kwargs = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    if way != "default":
        kwargs["cache_implementation"] = "static"
    if way == "static+compile":
        compile_config = CompileConfig(fullgraph=True, dynamic=False)
        compile_config._compile_all_devices = True  # transformers compiles on CPU only when told to
        kwargs["compile_config"] = compile_config
    else:
        kwargs["disable_compile"] = True

    def generate(input_ids, streamer=None, max_new_tokens=new_tokens):
        mask = torch.ones_like(input_ids)
        packing = cpu_kernels(model, enabled=kernels and way != "static+compile")
        with packing, torch.inference_mode():  # as the RQ model's generate runs
            return model.generate(
                input_ids, attention_mask=mask, streamer=streamer, max_new_tokens=max_new_tokens, **kwargs
            )

    return generate


def run_peak_mb(generate: Callable, input_ids: torch.LongTensor, model, device: torch.device) -> float:
    """Weights and buffers plus the highest net allocation during one generate call, in MB."""
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return (resident + peak_bytes(lambda: generate(input_ids), device)) / MB



# ----------------------------------------------------------------------------- the benchmark


@dataclass
class ShapeRuns:
    """What every measured run at one shape shares, and the result its rows go to."""

    shape: str
    prompt_length: int
    new_tokens: int
    device: torch.device
    dtype: torch.dtype
    repeats: int
    memory: bool
    kernels: bool
    log: Callable[[str], None]
    progress: tqdm | None
    result: dict

    def announce(self, model_name: str, batch: int, way: str | None = None) -> None:
        """Describe the progress bar with the run about to be measured."""
        if self.progress is not None:
            self.progress.set_description(f"{self.shape} {model_name}{' ' + way if way else ''} batch {batch}")

    def add_row(self, model_name, variant, batch, run, peak, cache, way=None) -> None:
        """One measured run -> a row of the result, a log line and a tick of the progress bar."""
        row = {
            "shape": self.shape,
            "model": model_name,
            "way": way,
            "compression_factor": variant.compression_factor if variant else 1,
            "depth_mode": variant.depth_mode if variant else None,
            "depth_output": variant.depth_output if variant else None,
            "head": variant.head if variant else None,
            "batch_size": batch,
            "new_tokens": run.new_tokens,
            "tokens_per_second": run.tokens_per_second,
            "seconds": run.seconds,
            "time_to_first_token_ms": 1000 * run.time_to_first_token,
            "peak_mb": peak,
            "kv_cache_mb": cache / MB,
            "parts_ms": None if run.parts is None else {k: 1000 * v for k, v in run.parts.items()},
            "load_average": os.getloadavg()[0],
        }
        self.result["rows"].append(row)
        speed = f"{run.tokens_per_second:,.1f} tok/s, TTFT {1000 * run.time_to_first_token:,.0f} ms"
        self.log(f"  {self.shape} {model_name}{' ' + way if way else ''} batch {batch}: {speed}")
        if self.progress is not None:
            self.progress.update(1)


def benchmark_shape(
    shape: str,
    variants: list[Variant],
    batch_sizes: list[int],
    prompt_length: int,
    new_tokens: int,
    ways: list[str],
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    repeats: int = 1,
    memory: bool = True,
    vocab_size: int = 8192,
    models: tuple | None = None,
    other_batch_sizes: list[int] | None = None,
    log: Callable[[str], None] = print,
    kernels: bool = True,
    progress: tqdm | None = None,
) -> dict:
    """All runs at one shape -> {'shape', 'baseline_parameters', 'rows': [...], ...}.

    The first variant (the headline, C=4) is built beside the baseline and measured right after it at
    each batch size, so both see the same machine load; the other variants follow one at a time.
    `models` = (rq_model, baseline) measures given (trained) models instead of random ones.
    `other_batch_sizes` replaces `batch_sizes` for the variants after the first. `kernels`: both sides
    under `cpu_kernels` (`rq_generate`, `baseline_generate`). `progress`: a tqdm bar, described with each
    run before it is measured and ticked after (`planned_runs` ticks in all).
    """
    device, torch_dtype = torch.device(device), DTYPES[dtype]
    backbone, baseline = _shape_baseline(shape, vocab_size, models, device, torch_dtype)
    result = {
        "shape": shape,
        "prompt_length": prompt_length,
        "new_tokens": new_tokens,
        "baseline_parameters": count_parameters(baseline),
        "rows": [],
        "rq_parameters": {},
    }
    runs = ShapeRuns(
        shape, prompt_length, new_tokens, device, torch_dtype, repeats, memory, kernels, log, progress, result
    )
    for i, variant in enumerate(variants):
        model = _latent_model(backbone, variant, models, device, torch_dtype)
        result["rq_parameters"][variant.name] = {
            "total": count_parameters(model),
            "spatial": count_parameters(model.spatial),
            "vae": count_parameters(model.vae),
        }
        for batch in variant_batch_sizes(i, batch_sizes, other_batch_sizes):
            input_ids = prompts(batch, prompt_length, baseline.config.vocab_size, device)
            if i == 0:
                _measure_baseline(runs, baseline, ways, batch, input_ids)
            _measure_latent(runs, model, variant, batch, input_ids)
        del model
    return result


def variant_batch_sizes(index: int, batch_sizes: list[int], other_batch_sizes: list[int] | None) -> list[int]:
    """The batch sizes the `index`-th variant runs at: all for the first, `other_batch_sizes` (if given) after."""
    return batch_sizes if index == 0 or other_batch_sizes is None else other_batch_sizes


def planned_runs(
    variants: list[Variant], batch_sizes: list[int], ways: list[str], other_batch_sizes: list[int] | None = None
) -> int:
    """How many (model, batch) runs `benchmark_shape` measures: each baseline way beside the first variant, then
    every variant at its batch sizes."""
    latent = sum(len(variant_batch_sizes(i, batch_sizes, other_batch_sizes)) for i in range(len(variants)))
    return len(ways) * len(batch_sizes) + latent


def _shape_baseline(shape, vocab_size, models, device, torch_dtype) -> tuple:
    """(backbone config, baseline on the device): a random-weight Qwen3 at `shape`, or the given trained one."""
    backbone = shape_config(shape, vocab_size) if models is None else models[1].config
    baseline = (build_baseline(backbone) if models is None else models[1]).to(device, torch_dtype).eval()
    if models is not None:
        baseline.generation_config.eos_token_id = None
    return backbone, baseline


def _latent_model(backbone, variant: Variant, models, device, torch_dtype) -> torch.nn.Module:
    """The latent LM to measure on the device: the `variant` at random weights, or the given trained one."""
    if models is not None:
        model = models[0]
        model.generation_config.eos_token_id = None
    else:
        model = build_variant(backbone, variant)
    return model.to(device, torch_dtype).eval()


def _measure_baseline(runs: ShapeRuns, baseline, ways: list[str], batch: int, input_ids: torch.LongTensor) -> None:
    """The baseline each of `ways` at one batch: warmed up (compile time noted), timed, memory, cache."""
    for way in ways:
        runs.announce("Qwen3 baseline", batch, way)
        generate = baseline_generate(baseline, runs.new_tokens, way, runs.kernels)
        start = time.perf_counter()
        # compiled graphs are specialised to the static cache's length: warm up with the full run
        warm_up(generate, input_ids, runs.new_tokens if way == "static+compile" else 1)
        warmup = time.perf_counter() - start
        if way == "static+compile":
            runs.result.setdefault("compile_seconds", {})[str(batch)] = warmup
        run = measure(generate, input_ids, runs.new_tokens, runs.device, repeats=runs.repeats)
        peak = run_peak_mb(generate, input_ids, baseline, runs.device) if runs.memory else None
        cache = baseline_cache_bytes(baseline.config, runs.prompt_length, runs.new_tokens, batch, runs.dtype)
        runs.add_row("Qwen3 baseline", None, batch, run, peak, cache, way=way)


def _measure_latent(runs: ShapeRuns, model, variant: Variant, batch: int, input_ids: torch.LongTensor) -> None:
    """The latent LM at one batch: warmed up, timed (with its parts where its own loop runs), memory, cache."""
    runs.announce(variant.name, batch)
    generate = rq_generate(model, runs.new_tokens, runs.kernels)
    warm_up(generate, input_ids, variant.compression_factor)
    timed = model if _runs_own_loop(model) or variant.head is not None else None  # parts: the codes loop's
    run = measure(generate, input_ids, runs.new_tokens, runs.device, model=timed, repeats=runs.repeats)
    peak = run_peak_mb(generate, input_ids, model, runs.device) if runs.memory else None
    cache = rq_cache_bytes(model, runs.prompt_length, runs.new_tokens, batch, runs.dtype)
    runs.add_row(variant.name, variant, batch, run, peak, cache)


def warm_up(generate: Callable, input_ids: torch.LongTensor, new_tokens: int) -> None:
    """One untimed call first (allocations, kernels, compilation)."""
    generate(input_ids, max_new_tokens=new_tokens)
