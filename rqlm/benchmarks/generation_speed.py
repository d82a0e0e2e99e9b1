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

import copy
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import CompileConfig, Qwen3Config, Qwen3ForCausalLM
from transformers.generation.streamers import BaseStreamer

from rqlm.benchmarks import HEADLINE_C  # noqa: F401  (the headline's C, for callers of this module)
from rqlm.benchmarks.speed import DTYPES, MB, peak_bytes, synchronize
from rqlm.kernels import cpu_kernels

# the Qwen3-0.6B shape, written out so no hub access is needed (random weights)
QWEN3_0_6B = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
}
# the RQ-VAE at train-vae's CPU defaults: only the per-chunk path, no Qwen3 layers
VAE_DEFAULTS = {
    "num_quantizers": 8,
    "codebook_size": 1024,
    "latent_dim": 64,
    "num_encoder_layers": 0,
    "num_decoder_layers": 0,
    "num_latent_layers": 0,
}
DEPTH_DEFAULTS = {"depth_hidden_size": 256, "depth_num_layers": 1, "depth_num_attention_heads": 4}
# depth_output="tokens": a 4-layer token decoder of width 256 (its vocabulary head runs once per token)
TOKEN_DEPTH_DEFAULTS = {"depth_hidden_size": 256, "depth_num_layers": 4, "depth_num_attention_heads": 4}
PARTS = ("spatial", "depth", "decoder", "sampling", "other")
BASELINE_WAYS = ("default", "static", "static+compile")


def shape_config(shape: str, vocab_size: int = 8192) -> Qwen3Config:
    """'qwen3-0.6b' (the real model's shape) or a preset name ('tiny', 'test') -> a Qwen3Config without EOS."""
    from rqlm.presets import PRESETS, backbone_config

    if shape == "qwen3-0.6b":
        config = Qwen3Config(**QWEN3_0_6B)
    elif shape in PRESETS:
        config = backbone_config(shape, vocab_size=vocab_size)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose qwen3-0.6b or a preset ({', '.join(PRESETS)})")
    config.bos_token_id = config.eos_token_id = None  # EOS ignored: every run makes max_new_tokens
    config.pad_token_id = 0
    return config


def build_rq_model(
    backbone: Qwen3Config,
    compression_factor: int = 4,
    depth_mode: str = "autoregressive",
    depth_output: str = "codes",
    **overrides,
) -> torch.nn.Module:
    """A random-weight RQTransformerForCausalLM: spatial stack of `backbone`'s shape over a VAE at the CPU defaults,
    with the depth decoder of `depth_output` (DEPTH_DEFAULTS or TOKEN_DEPTH_DEFAULTS, then `overrides`)."""
    from rqlm import RQTransformerConfig, RQTransformerForCausalLM, RQVAEConfig

    vae_kwargs = {k: overrides.pop(k) for k in list(overrides) if k in VAE_DEFAULTS}
    vae_config = RQVAEConfig(
        backbone_config=copy.deepcopy(backbone),
        compression_factor=compression_factor,
        **{**VAE_DEFAULTS, **vae_kwargs},
    )
    config = RQTransformerConfig(
        backbone_config=copy.deepcopy(backbone),
        vae_config=vae_config,
        depth_mode=depth_mode,
        depth_output=depth_output,
        **{**(DEPTH_DEFAULTS if depth_output == "codes" else TOKEN_DEPTH_DEFAULTS), **overrides},
    )
    torch.manual_seed(0)
    return RQTransformerForCausalLM(config).eval()


def build_givt_model(backbone: Qwen3Config, compression_factor: int = 4, head: str = "gaussian") -> torch.nn.Module:
    """A random-weight GIVTForCausalLM: spatial stack of `backbone`'s shape over a Gaussian VAE of the same
    per-chunk path as the RQ model's (d = 64), with the given continuous head."""
    from rqlm import GIVTConfig, GIVTForCausalLM, RQVAEConfig

    sizes = {k: v for k, v in VAE_DEFAULTS.items() if k not in ("num_quantizers", "codebook_size")}
    vae_config = RQVAEConfig(
        backbone_config=copy.deepcopy(backbone), compression_factor=compression_factor, quantizer_type="gaussian", **sizes
    )
    config = GIVTConfig(backbone_config=copy.deepcopy(backbone), vae_config=vae_config, head=head)
    torch.manual_seed(0)
    return GIVTForCausalLM(config).eval()


def build_variant(backbone: Qwen3Config, variant: Variant) -> torch.nn.Module:
    """The random-weight latent LM a `Variant` names: an RQ model, or a GIVT model with its head."""
    if variant.head is not None:
        return build_givt_model(backbone, variant.compression_factor, variant.head)
    return build_rq_model(backbone, variant.compression_factor, variant.depth_mode, variant.depth_output, **variant.depth)


def build_baseline(backbone: Qwen3Config) -> Qwen3ForCausalLM:
    """A random-weight Qwen3ForCausalLM of `backbone`'s shape."""
    torch.manual_seed(0)
    return Qwen3ForCausalLM(copy.deepcopy(backbone)).eval()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def kv_cache_bytes(config: Qwen3Config, positions: int, batch_size: int, dtype: torch.dtype) -> int:
    """Bytes of a full KV cache of `positions` positions: keys and values of every layer."""
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_position * positions * batch_size * torch.empty((), dtype=dtype).element_size()


def baseline_cache_bytes(
    config: Qwen3Config, prompt_length: int, new_tokens: int, batch_size: int, dtype
) -> int:
    """The baseline's dynamic KV cache at the end of a run: every position but the last new token."""
    return kv_cache_bytes(config, prompt_length + new_tokens - 1, batch_size, dtype)


def rq_cache_bytes(model, prompt_length: int, new_tokens: int, batch_size: int, dtype: torch.dtype) -> int:
    """The RQ model's KV caches at the end of a run: spatial (start + one per chunk), depth (D) and VAE decoder."""
    c = model.compression_factor
    chunks = -(-prompt_length // c) + -(-new_tokens // c)
    vae = model.vae
    spatial = kv_cache_bytes(model.config.backbone_config, chunks + 1, batch_size, dtype)
    # GIVT has no depth transformer; the token decoder re-reads its open chunk and keeps no cache; codes_then_tokens'
    # code depth decoder is a submodule
    code_depth = getattr(model, "code_depth", model)
    depth = (
        kv_cache_bytes(code_depth.depth.config, model.num_quantizers, batch_size, dtype)
        if getattr(model.config, "depth_mode", None) == "autoregressive" and getattr(model.config, "depth_output", "codes") != "tokens"
        else 0
    )
    decoder = 0
    if len(getattr(vae.decoder, "layers", [])):
        decoder += kv_cache_bytes(vae.decoder.config, chunks * c, batch_size, dtype)
    if len(getattr(vae.latent_decoder, "layers", [])):
        decoder += kv_cache_bytes(vae.latent_decoder.config, chunks, batch_size, dtype)
    return spatial + depth + decoder


# ----------------------------------------------------------------------------- clocks


class StepClock(BaseStreamer):
    """A streamer that notes when each put arrives: the first holds the prompt, the second the first new tokens."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def put(self, value) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class PartTimes:
    """Seconds spent in each part of the RQ model's generate, split into prefill and the decoding steps."""

    prefill: float = 0.0
    steps: int = 0
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS[:-1], 0.0))
    first_step_at: float | None = None


@contextmanager
def part_timers(model, device: torch.device) -> Iterator[PartTimes]:
    """Time the RQ model's parts during `generate` by wrapping its methods and VAE modules on the instance.

    spatial = embed_codes + spatial_forward; depth = depth_step / parallel_depth_logits; sampling =
    _sample_codes less its depth calls (logits processors, argmax, bookkeeping); decoder = the VAE modules
    the chunk decoder runs (codes_to_quantized, latent/upsample/decoder stacks, lm_head); a GIVT model has no
    depth, and its head counts as sampling. A call nested in
    another timed call is not counted again. Everything before the first _sample_codes is prefill. The model
    is left as it was.
    """
    times = PartTimes()
    running: list[tuple[str, float, bool]] = []  # (part, start, counted: not inside another timed call)

    def begin(part: str) -> None:
        if part == "sampling" and times.first_step_at is None:
            synchronize(device)
            times.first_step_at = time.perf_counter()
        counted = not [p for p, _, _ in running if p != "sampling"]
        synchronize(device)
        running.append((part, time.perf_counter(), counted))

    def finish() -> None:
        synchronize(device)
        part, start, counted = running.pop()
        if counted and times.first_step_at is not None:
            times.parts[part] += time.perf_counter() - start
            times.steps += part == "sampling"

    def timed(part: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            begin(part)
            try:
                return fn(*args, **kwargs)
            finally:
                finish()

        return wrapper

    vae = model.vae
    methods = [
        (model, "embed_codes", "spatial"),
        (model, "spatial_forward", "spatial"),
        (model, "depth_step", "depth"),
        (model, "parallel_depth_logits", "depth"),
        (model, "_sample_codes", "sampling"),
        (vae, "codes_to_quantized", "decoder"),
    ]
    modules = [vae.from_latent, vae.upsample, vae.latent_decoder, vae.decoder, vae.decoder.norm, vae.lm_head]
    modules += [vae.decoder_embed_tokens] if vae.decoder_embed_tokens is not None else []
    methods = [(owner, name, part) for owner, name, part in methods if hasattr(owner, name)]
    for owner, name, part in methods:
        owner.__dict__[name] = timed(part, getattr(owner, name))
    # modules get hooks, not a forward of their own: generate's prepacked_linears leaves such layers alone
    hooks = [m.register_forward_pre_hook(lambda *_: begin("decoder")) for m in modules]
    hooks += [m.register_forward_hook(lambda *_: finish()) for m in modules]
    try:
        yield times
    finally:
        for owner, name, _ in methods:
            del owner.__dict__[name]
        for hook in hooks:
            hook.remove()
    times.parts["sampling"] -= times.parts["depth"]


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


def prompts(batch_size: int, length: int, vocab_size: int, device: torch.device) -> torch.LongTensor:
    """Seeded random prompts (B, T0), ids in [1, V) so none is the pad id 0."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, vocab_size, (batch_size, length), generator=g).to(device)


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
class Variant:
    """A latent LM to measure: compression and depth mode (RQ), or a continuous head (`head`: GIVT)."""

    compression_factor: int
    depth_mode: str | None = "autoregressive"
    head: str | None = None
    depth_output: str = "codes"
    depth: dict = field(default_factory=dict)  # depth decoder overrides (depth_hidden_size, depth_num_layers)

    @property
    def name(self) -> str:
        if self.head is not None:
            return f"GIVT C={self.compression_factor} {self.head}"
        sizes = "".join(f" {k.removeprefix('depth_')}={v}" for k, v in sorted(self.depth.items()))
        return f"RQ C={self.compression_factor}" + (
            " parallel-depth" if self.depth_mode == "parallel" else ""
        ) + ("" if self.depth_output == "codes" else f" {self.depth_output}") + sizes


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
) -> dict:
    """All runs at one shape -> {'shape', 'baseline_parameters', 'rows': [...], ...}.

    The first variant (the headline, C=4) is built beside the baseline and measured right after it at
    each batch size, so both see the same machine load; the other variants follow one at a time.
    `models` = (rq_model, baseline) measures given (trained) models instead of random ones.
    `other_batch_sizes` replaces `batch_sizes` for the variants after the first. `kernels`: both sides
    under `cpu_kernels` (`rq_generate`, `baseline_generate`).
    """
    device, torch_dtype = torch.device(device), DTYPES[dtype]
    backbone = shape_config(shape, vocab_size) if models is None else models[1].config
    baseline = (build_baseline(backbone) if models is None else models[1]).to(device, torch_dtype).eval()
    if models is not None:
        baseline.generation_config.eos_token_id = None
    vocab = baseline.config.vocab_size
    result = {
        "shape": shape,
        "prompt_length": prompt_length,
        "new_tokens": new_tokens,
        "baseline_parameters": count_parameters(baseline),
        "rows": [],
        "rq_parameters": {},
    }

    def add_row(model_name, variant, batch, run, peak, cache, way=None):
        row = {
            "shape": shape,
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
        result["rows"].append(row)
        speed = f"{run.tokens_per_second:,.1f} tok/s, TTFT {1000 * run.time_to_first_token:,.0f} ms"
        log(f"  {shape} {model_name}{' ' + way if way else ''} batch {batch}: {speed}")

    def measure_baseline(batch: int, input_ids: torch.LongTensor) -> None:
        for way in ways:
            generate = baseline_generate(baseline, new_tokens, way, kernels)
            start = time.perf_counter()
            # compiled graphs are specialised to the static cache's length: warm up with the full run
            _warm(generate, input_ids, new_tokens if way == "static+compile" else 1)
            warmup = time.perf_counter() - start
            if way == "static+compile":
                result.setdefault("compile_seconds", {})[str(batch)] = warmup
            run = measure(generate, input_ids, new_tokens, device, repeats=repeats)
            peak = run_peak_mb(generate, input_ids, baseline, device) if memory else None
            cache = baseline_cache_bytes(baseline.config, prompt_length, new_tokens, batch, torch_dtype)
            add_row("Qwen3 baseline", None, batch, run, peak, cache, way=way)

    def measure_rq(model, variant: Variant, batch: int, input_ids: torch.LongTensor) -> None:
        generate = rq_generate(model, new_tokens, kernels)
        _warm(generate, input_ids, variant.compression_factor)
        timed = model if _runs_own_loop(model) or variant.head is not None else None  # parts: the codes loop's
        run = measure(generate, input_ids, new_tokens, device, model=timed, repeats=repeats)
        peak = run_peak_mb(generate, input_ids, model, device) if memory else None
        cache = rq_cache_bytes(model, prompt_length, new_tokens, batch, torch_dtype)
        add_row(variant.name, variant, batch, run, peak, cache)

    for i, variant in enumerate(variants):
        if models is not None:
            model = models[0]
            model.generation_config.eos_token_id = None
        else:
            model = build_variant(backbone, variant)
        model = model.to(device, torch_dtype).eval()
        result["rq_parameters"][variant.name] = {
            "total": count_parameters(model),
            "spatial": count_parameters(model.spatial),
            "vae": count_parameters(model.vae),
        }
        for batch in batch_sizes if i == 0 or other_batch_sizes is None else other_batch_sizes:
            input_ids = prompts(batch, prompt_length, vocab, device)
            if i == 0:
                measure_baseline(batch, input_ids)
            measure_rq(model, variant, batch, input_ids)
        del model
    return result


def _warm(generate: Callable, input_ids: torch.LongTensor, new_tokens: int) -> None:
    """One untimed call first (allocations, kernels, compilation)."""
    generate(input_ids, max_new_tokens=new_tokens)


def best_baseline(rows: list[dict], shape: str, batch: int) -> dict:
    """The fastest baseline row at (shape, batch)."""
    rows = [r for r in rows if r["shape"] == shape and r["batch_size"] == batch and r["way"]]
    return max(rows, key=lambda r: r["tokens_per_second"])


def summary_lines(result: dict, shape: str, compression_factor: int = 4) -> list[str]:
    """One line per batch size: the autoregressive RQ model at C against the fastest baseline."""
    lines = []
    rows = [r for r in result["rows"] if r["shape"] == shape]
    for batch in sorted({r["batch_size"] for r in rows}):
        rq = [
            r
            for r in rows
            if r["batch_size"] == batch
            and r["compression_factor"] == compression_factor
            and r["depth_mode"] == "autoregressive"
        ]
        if not rq:
            continue
        base = best_baseline(rows, shape, batch)
        lines.append(
            f"speedup batch {batch} C={compression_factor}: {rq[0]['tokens_per_second'] / base['tokens_per_second']:.2f}x "
            f"(RQ {rate(rq[0]['tokens_per_second'])} tok/s, baseline {rate(base['tokens_per_second'])} tok/s)"
        )
    for r in rows:  # the continuous latent LMs, when measured
        if r.get("head") is not None and r["compression_factor"] == compression_factor:
            base = best_baseline(rows, shape, r["batch_size"])
            lines.append(
                f"speedup batch {r['batch_size']} {r['model']}: {r['tokens_per_second'] / base['tokens_per_second']:.2f}x "
                f"({rate(r['tokens_per_second'])} tok/s, baseline {rate(base['tokens_per_second'])} tok/s)"
            )
    return lines


def rate(tokens_per_second: float) -> str:
    """Whole tokens/s, with one decimal below 10 so a slow CPU run does not print 0."""
    return f"{tokens_per_second:.0f}" if tokens_per_second >= 10 else f"{tokens_per_second:.1f}"


# ----------------------------------------------------------------------------- growth with the work


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
            _warm(generate, input_ids, 2 * compression_factor)
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


# ----------------------------------------------------------------------------- tables


def _steps(row: dict) -> int:
    return -(-row["new_tokens"] // row["compression_factor"])


def ms_per_step(row: dict) -> float:
    """Milliseconds per decoding step after the first (one token for the baseline, one chunk of C for RQ)."""
    steps = _steps(row)
    after_first = row["seconds"] - row["time_to_first_token_ms"] / 1000
    return 1000 * after_first / max(steps - 1, 1)


def decode_tokens_per_second(row: dict) -> float:
    """New tokens/s after the first step: C tokens per RQ step, one per baseline step, times the batch."""
    per_step = min(row["compression_factor"], row["new_tokens"]) * row["batch_size"]
    return 1000 * per_step / ms_per_step(row) if _steps(row) > 1 else float("nan")


def format_tables(result: dict) -> str:
    """The speed table, the RQ per-step split, parameter counts, and the trained model's perplexity bound."""
    s = result["setup"]
    setup = (
        f"Generation: greedy, KV caches on both, {s['prompt_length']}-token prompts, EOS ignored; {s['dtype']}, "
        f"{s['device']}, {s['threads']} threads, load average {s['load_average_before']:.1f} -> "
        f"{s.get('load_average_after', s['load_average_before']):.1f} on {s['cpu_count']} CPUs; "
        f"median of {s['repeats']}; tok/s = all new tokens / generate's wall time, decode tok/s leaves out the "
        f"first step (prefill); speedup = tok/s against the fastest baseline at the same shape and batch"
    )
    lines = [
        setup,
        "",
        "| shape | model | batch | new tokens | tok/s | decode tok/s | TTFT ms | ms/step | peak MB "
        + "| KV cache MB | speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape in result["shapes"]:
        for r in shape["rows"]:
            best = best_baseline(shape["rows"], r["shape"], r["batch_size"])
            name = r["model"] + (f" ({r['way']})" if r["way"] else "")
            peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:,.0f}"
            lines.append(
                f"| {r['shape']} | {name} | {r['batch_size']} | {r['new_tokens']} | {r['tokens_per_second']:,.1f} "
                f"| {decode_tokens_per_second(r):,.1f} | {r['time_to_first_token_ms']:,.0f} | {ms_per_step(r):,.1f} | {peak} | {r['kv_cache_mb']:,.2f} "
                f"| {r['tokens_per_second'] / best['tokens_per_second']:.2f}x |"
            )
    lines += [
        "",
        "Latent LMs, share of the per-step time (one step = one spatial position = C tokens; GIVT heads: sampling):",
        "",
        "| shape | model | batch | ms/step | " + " | ".join(PARTS) + " |",
        "|---|---|---:|---:|" + "---:|" * len(PARTS),
    ]
    for shape in result["shapes"]:
        for r in shape["rows"]:
            if r["parts_ms"] is None:
                continue
            total = sum(r["parts_ms"].values())
            shares = " | ".join(f"{100 * r['parts_ms'][p] / total:.0f}%" for p in PARTS)
            lines.append(f"| {r['shape']} | {r['model']} | {r['batch_size']} | {total:,.1f} | {shares} |")
    lines += [
        "",
        "| shape | model | parameters | spatial transformer | frozen VAE |",
        "|---|---|---:|---:|---:|",
    ]
    for shape in result["shapes"]:
        lines.append(
            f"| {shape['shape']} | Qwen3 baseline | {shape['baseline_parameters'] / 1e6:,.1f}M | - | - |"
        )
        for name, p in shape["rq_parameters"].items():
            lines.append(
                f"| {shape['shape']} | {name} | {p['total'] / 1e6:,.1f}M | {p['spatial'] / 1e6:,.1f}M "
                f"| {p['vae'] / 1e6:,.1f}M |"
            )
        if "compile_seconds" in shape:
            compiled = ", ".join(f"batch {b}: {t:.0f} s" for b, t in shape["compile_seconds"].items())
            lines.append(f"\n{shape['shape']}: torch.compile warm-up (first call, not timed) {compiled}")
        if "evaluation" in shape:
            e = shape["evaluation"]
            lines.append(
                f"\n{shape['shape']} (trained): perplexity bound {e['perplexity_bound']:,.1f}, "
                f"baseline perplexity {e['baseline_perplexity']:,.1f}"
            )
    return "\n".join(lines)
