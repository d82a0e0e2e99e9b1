"""`rqlm bench`: speed and memory of the RQ models against the plain Qwen3 baseline, in one run.

Default: generation tokens/s of RQTransformerForCausalLM against Qwen3ForCausalLM.generate at the
Qwen3-0.6B shape and the demo's `tiny` shape (see rqlm/benchmarks/generation_speed.py), then one
summary line per batch size. `--vae`: training tokens/s and peak memory of the RQ-VAE vs the baseline,
plus encode / decode tokens/s (rqlm/benchmarks/speed.py). `--quantizers`: rqlm's quantizers against
vector-quantize-pytorch (rqlm/benchmarks/quantizers.py). `--drafting`: batch-1 tokens/s of a causal
LM target alone, an RQ drafter alone and the target verified-with-RQ, with the acceptance per drafter
(rqlm/drafting/speed.py), trained folders (`--target DIR --model RQ_DIR[,RQ_DIR..]`) or random
weights at `--target_shape` / `--drafter_shape`. Prints markdown tables; `--output_json` also writes every
figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rqlm.benchmarks import HEADLINE_C
from rqlm.modeling.configuration_rq_transformer import DEPTH_OUTPUTS
from rqlm.presets import PRESETS


def _list_of(kind: type, what: str):
    """An argparse type: comma-separated values of `kind` -> list."""

    def parse(text: str) -> list:
        try:
            return [kind(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    return parse


_ints = _list_of(int, "integers")


def _names(text: str) -> list[str]:
    return [v.strip() for v in str(text).split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`rqlm bench`'s flags, one function per part of --help, in its order."""
    _add_mode_arguments(parser)
    gen = parser.add_argument_group("generation (the default mode)")
    _add_generation_run_arguments(gen)
    _add_random_model_arguments(gen)
    _add_measurement_arguments(gen)
    _add_drafting_arguments(parser)
    _add_vae_arguments(parser)


def _add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    """What is measured (generation unless --vae, --quantizers or --drafting), on which device and dtype,
    and where the figures go."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--vae",
        action="store_true",
        help="RQ-VAE training / encoding speed against the baseline instead of generation",
    )
    mode.add_argument(
        "--quantizers",
        action="store_true",
        help="the quantizers against vector-quantize-pytorch instead of the models",
    )
    mode.add_argument(
        "--drafting",
        action="store_true",
        help="a causal LM target verifying RQ drafts (lossless) against the target alone, at batch 1",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="dtype of both sides (generation: weights and caches; --vae: autocast)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--no_cpu_kernels", dest="cpu_kernels", action="store_false",
        help="run both sides without rqlm's CPU kernels (default: on; multi-row linear calls through oneDNN with "
        "reordered weights, the RQ stacks' lean cached steps; see rqlm.kernels)",
    )
    parser.add_argument(
        "--output_json",
        "--output",
        dest="output_json",
        default=None,
        help="also write every figure as JSON to this file",
    )


def _add_generation_run_arguments(gen) -> None:
    """Which runs generation times: shapes, prompt and output lengths, batch sizes, C."""
    gen.add_argument(
        "--quick",
        action="store_true",
        help="a seconds-long smoke run: the 'test' shape, 16-token prompts, 8 new tokens",
    )
    gen.add_argument(
        "--grid",
        action="store_true",
        help="the whole grid: shapes qwen3-0.6b and tiny, C = 4, 2, 8, the tiny baseline also compiled (tens of "
        "minutes on 2 cores); without it the headline only: qwen3-0.6b, C=4, batch 1 and 8 (about 3 minutes)",
    )
    gen.add_argument(
        "--shapes",
        type=_names,
        default=None,
        help="comma-separated: qwen3-0.6b and/or presets; the first is the headline (default: qwen3-0.6b; --grid: "
        "qwen3-0.6b,tiny)",
    )
    gen.add_argument("--prompt_length", type=int, default=64, help="T0, tokens per prompt")
    gen.add_argument("--new_tokens", type=int, default=256, help="new tokens per run (EOS ignored)")
    gen.add_argument(
        "--large_new_tokens",
        type=int,
        default=32,
        help="new tokens at the qwen3-0.6b shape, where a step takes seconds on a CPU; there the variants "
        "other than C=4 run at the first batch size only, and peak memory is not measured",
    )
    gen.add_argument("--batch_sizes", type=_ints, default=[1, 8], help="comma-separated batch sizes")
    gen.add_argument(
        "--compression_factors",
        type=_ints,
        default=None,
        help=f"comma-separated C of the RQ models; C={HEADLINE_C} is the headline (default: 4; --grid: 4,2,8)",
    )


def _add_random_model_arguments(gen) -> None:
    """The random-weight RQ models' depth decoder, and which other models are timed beside them."""
    gen.add_argument(
        "--depth_output",
        default="tokens",
        choices=DEPTH_OUTPUTS,
        help="what the random-weight RQ models' depth decoder writes: the D codes the VAE decodes (a 1-layer depth "
        "transformer), the chunk's tokens (a 4-layer token decoder of width 256), or both, the codes first",
    )
    gen.add_argument("--depth_hidden_size", type=int, default=None, help="width of the random-weight models' depth decoder")
    gen.add_argument("--depth_num_layers", type=int, default=None, help="layers of the random-weight models' depth decoder")
    gen.add_argument("--token_decoder_context", type=int, default=None,
                     help="tokens mode: tokens before the chunk the random-weight models' token decoder also reads")
    gen.add_argument("--token_head_rank", type=int, default=None,
                     help="the random-weight models' token decoder head: Linear(w, r) then Linear(r, V) (0: one Linear)")
    gen.add_argument(
        "--parallel_depth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"also time depth_mode='parallel' at C={HEADLINE_C} (default: on with --depth_output codes)",
    )
    gen.add_argument(
        "--compile_shapes",
        type=_names,
        default=None,
        help="shapes where the baseline also runs static cache + torch.compile ('' for none; default: none; --grid: "
        "tiny)",
    )
    gen.add_argument(
        "--givt_heads",
        type=_names,
        default=[],
        help=f"comma-separated continuous heads (gaussian, energy): also time GIVT models at C={HEADLINE_C}, "
        "over a Gaussian VAE of the RQ model's per-chunk path (default: none)",
    )


def _add_measurement_arguments(gen) -> None:
    """How each run is measured, trained models in place of random weights, and the context / batch sweep."""
    gen.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (median reported)")
    gen.add_argument(
        "--no_memory",
        dest="memory",
        action="store_false",
        help="skip the extra profiled run per measurement that gives peak memory",
    )
    gen.add_argument(
        "--model", default=None, help="a trained RQ LM (or GIVT) folder: measured at the tiny shape's place"
    )
    gen.add_argument("--baseline", default=None, help="the trained baseline folder to go with --model")
    gen.add_argument(
        "--evaluation_json",
        default=None,
        help="`rqlm evaluate --output_json` of --model: its perplexity bound is printed beside it",
    )
    gen.add_argument(
        "--plot",
        default=None,
        help="also sweep context length and batch size at the last shape and save a PNG here",
    )
    gen.add_argument("--sweep_contexts", type=_ints, default=[64, 256, 512, 1024, 2048])
    gen.add_argument("--sweep_batches", type=_ints, default=[1, 2, 4, 8, 16, 32])
    gen.add_argument("--sweep_new_tokens", type=int, default=64)


def _add_drafting_arguments(parser: argparse.ArgumentParser) -> None:
    drafting = parser.add_argument_group(
        "--drafting (also: --model RQ_DIR[,RQ_DIR..], --prompt_length, --new_tokens, --compression_factors, --quick)"
    )
    drafting.add_argument("--target", default=None, help="the trained causal LM folder that verifies the drafts of --model")
    drafting.add_argument("--target_shape", default="small", help="random-weight target: a preset (without --target)")
    drafting.add_argument(
        "--drafter_shape", default="tiny", help="random-weight drafters' spatial stack: a preset, one per C (without --model)"
    )
    drafting.add_argument(
        "--draft_tokens", type=_ints, default=None,
        help="tokens drafted per verification step, comma-separated for one row each (default C)",
    )
    drafting.add_argument("--prompts", type=int, default=4, help="prompts, run one after the other at batch 1")


def _add_vae_arguments(parser: argparse.ArgumentParser) -> None:
    vae = parser.add_argument_group("--vae and --quantizers")
    vae.add_argument(
        "--backbone",
        default="tiny",
        help=f"a preset ({', '.join(PRESETS)}) or a pretrained Qwen3 (its config only)",
    )
    vae.add_argument(
        "--vocab_size",
        type=int,
        default=8192,
        help="vocabulary of a preset backbone (default: the embedded tokenizer's)",
    )
    vae.add_argument("--batch_size", type=int, default=8, help="B, blocks per batch (quantizers: rows)")
    vae.add_argument(
        "--block_size",
        type=int,
        default=256,
        help="T: tokens per block, a multiple of C (quantizers: N vectors per row)",
    )
    vae.add_argument("--compression_factor", type=int, default=4, help="C, tokens per latent position")
    vae.add_argument("--num_quantizers", type=int, default=4, help="D, residual depth")
    vae.add_argument("--codebook_size", type=int, default=1024, help="K, codes per codebook")
    vae.add_argument("--quantizer_type", default="residual_vq", help="the RQ-VAE's quantizer family")
    vae.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")


def main(args: argparse.Namespace) -> int:
    import torch

    from rqlm.benchmarks.speed import resolve_device

    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.quantizers or args.vae:
        result, table = _model_or_quantizer_bench(args, device)
        print(table)
        _write_json(args.output_json, result)
        return 0
    if args.drafting:
        result, table = _drafting_bench(args, device)
        print(table)
        _write_json(args.output_json, result)
        print(result["summary"])
        return 0
    result, text, summary = _generation_bench(args, device)
    print(text)
    _write_json(args.output_json, result)
    if args.plot:
        print(f"wrote {args.plot}")
    print("\n".join(summary))
    return 0


def _write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")


def _model_or_quantizer_bench(args, device):
    from rqlm.benchmarks.speed import DTYPES

    if args.warmup < 0 or args.batch_size < 1 or args.block_size < 1:
        raise ValueError("--batch_size and --block_size must be >= 1 and --warmup >= 0")
    if args.quantizers:
        from rqlm.benchmarks.quantizers import benchmark_quantizers, format_quantizer_table

        result = benchmark_quantizers(
            args.batch_size, args.block_size, device, args.repeats, args.warmup, DTYPES[args.dtype]
        )
        return result, format_quantizer_table(result)
    from rqlm.benchmarks.speed import benchmark_models, format_model_table

    result = benchmark_models(
        backbone=args.backbone,
        vocab_size=args.vocab_size,
        batch_size=args.batch_size,
        block_size=args.block_size,
        compression_factor=args.compression_factor,
        num_quantizers=args.num_quantizers,
        codebook_size=args.codebook_size,
        quantizer_type=args.quantizer_type,
        dtype=args.dtype,
        device=device,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    return result, format_model_table(result)


GRID = {"shapes": ["qwen3-0.6b", "tiny"], "compression_factors": [HEADLINE_C, 2, 8], "compile_shapes": ["tiny"]}
HEADLINE = {"shapes": ["qwen3-0.6b"], "compression_factors": [HEADLINE_C], "compile_shapes": []}


def resolve_grid(args: argparse.Namespace) -> None:
    """Plain `rqlm bench` measures the headline (the Qwen3-0.6B shape, C=4); `--grid` the whole grid. A shape, C or
    compile list given on the command line (or in --config) wins over both."""
    for name, value in (GRID if args.grid else HEADLINE).items():
        if getattr(args, name) is None:
            setattr(args, name, list(value))


def _generation_bench(args, device) -> tuple[dict, str, list[str]]:
    """Every shape's runs (and the sweep) -> (JSON result, tables, summary lines); a progress bar on stderr."""
    from tqdm import tqdm

    from rqlm.benchmarks import generation_speed as gs
    from rqlm.benchmarks import generation_tables as tables

    _check_generation_args(args)
    variants = _generation_variants(args)
    trained = _load_trained(args) if args.model else None
    result = {"setup": _generation_setup(args, device), "shapes": []}
    plans = [_shape_plan(args, shape, variants, trained, device) for shape in args.shapes]
    runs = sum(
        gs.planned_runs(p["variants"], p["batch_sizes"], p["ways"], p["other_batch_sizes"]) for p in plans
    )
    with tqdm(total=runs, unit="run", file=sys.stderr) as progress:
        for plan in plans:
            _say(f"measuring {plan['shape']}{' (trained models)' if plan['models'] else ''} ...")
            result["shapes"].append(gs.benchmark_shape(**plan, log=_say, progress=progress))
            if plan["models"] and args.evaluation_json:
                result["shapes"][-1]["evaluation"] = _read_evaluation(args.evaluation_json)
    if args.plot:
        result["sweep"] = _generation_sweep(args, device, result)
    result["setup"]["load_average_after"] = os.getloadavg()[0]
    headline = result["shapes"][0]
    summary = tables.summary_lines(headline, headline["shape"], HEADLINE_C)
    result["summary"] = summary
    return result, tables.format_tables(result), summary


def _say(text: str) -> None:
    """A line to stdout, the progress bar on stderr cleared before and drawn again after."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def _check_generation_args(args) -> None:
    """The headline or grid (and `--quick`'s sizes) filled in, then a one-line error for a bad value."""
    from rqlm.benchmarks.generation_models import shape_config

    resolve_grid(args)
    if args.quick:
        args.shapes, args.prompt_length, args.new_tokens, args.large_new_tokens = ["test"], 16, 8, 8
        args.compression_factors, args.compile_shapes = [HEADLINE_C], []
        args.sweep_contexts, args.sweep_batches, args.sweep_new_tokens = [16, 32], [1, 2], 8
    for shape in args.shapes:
        shape_config(shape)  # one-line error for an unknown shape, before any model is built
    if args.prompt_length < 1 or args.new_tokens < 1 or args.large_new_tokens < 1:
        raise ValueError("--prompt_length, --new_tokens and --large_new_tokens must be >= 1")
    for name in ("batch_sizes", "compression_factors", "sweep_contexts", "sweep_batches"):
        values = getattr(args, name)
        if not values or min(values) < 1:
            raise ValueError(f"--{name} must be comma-separated integers >= 1, got {values}")
    if (args.model is None) != (args.baseline is None):
        raise ValueError("--model and --baseline go together: pass both trained folders, or neither")
    if HEADLINE_C not in args.compression_factors:
        args.compression_factors = [HEADLINE_C, *args.compression_factors]
    if args.parallel_depth and args.depth_output == "tokens":
        raise ValueError("--parallel_depth is a codes-mode depth; drop it with --depth_output tokens")


def _generation_variants(args) -> list:
    """The latent LMs to measure, the headline's C first: one per C, the parallel depth, then the GIVT heads."""
    from rqlm.benchmarks.generation_models import Variant
    from rqlm.modeling.configuration_givt import HEADS

    depth = {k: v for k in ("depth_hidden_size", "depth_num_layers", "token_decoder_context", "token_head_rank")
             if (v := getattr(args, k)) is not None}
    variants = [
        Variant(c, depth_output=args.depth_output, depth=depth)
        for c in sorted(args.compression_factors, key=lambda c: c != HEADLINE_C)
    ]
    if args.parallel_depth is not False and args.depth_output == "codes":
        variants.append(Variant(HEADLINE_C, "parallel", depth=depth))
    unknown = sorted(set(args.givt_heads) - set(HEADS))
    if unknown:
        raise ValueError(f"--givt_heads: unknown head(s) {unknown}; choose from {', '.join(HEADS)}")
    return variants + [Variant(HEADLINE_C, None, head) for head in args.givt_heads]


def _generation_setup(args, device) -> dict:
    """The JSON's `setup`: machine, threads, dtype, sizes and the load before the runs."""
    import torch

    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "dtype": args.dtype,
        "prompt_length": args.prompt_length,
        "batch_sizes": args.batch_sizes,
        "repeats": args.repeats,
        "load_average_before": os.getloadavg()[0],
        "cpu_kernels": args.cpu_kernels,
    }


def _shape_plan(args, shape: str, variants: list, trained, device) -> dict:
    """`benchmark_shape`'s arguments at one shape: the trained models replace the random ones at `tiny`; the
    Qwen3-0.6B shape makes the long runs, without memory, and its other variants only at the first batch size."""
    from rqlm.benchmarks.generation_speed import BASELINE_WAYS

    large = shape == "qwen3-0.6b"
    replace = trained is not None and shape == "tiny"
    return {
        "shape": shape,
        "variants": variants if not replace else [trained_variant(trained[0])],
        "batch_sizes": args.batch_sizes,
        "prompt_length": args.prompt_length,
        "new_tokens": args.large_new_tokens if large else args.new_tokens,
        "ways": [*BASELINE_WAYS[:2], *(BASELINE_WAYS[2:] if shape in args.compile_shapes else [])],
        "dtype": args.dtype,
        "device": device,
        "repeats": args.repeats,
        "memory": args.memory and not large,
        "other_batch_sizes": args.batch_sizes[:1] if large else None,
        "models": trained if replace else None,
        "kernels": args.cpu_kernels,
    }


def _generation_sweep(args, device, result: dict) -> dict:
    """Speed against context length and batch size at the last shape, with the faster uncompiled baseline; plotted."""
    from rqlm.benchmarks.generation_sweep import plot_sweep, sweep
    from rqlm.benchmarks.generation_tables import best_baseline

    shape = args.shapes[-1]
    print(f"sweeping context length and batch size at {shape} ...", flush=True)
    # compiled graphs are specialised to every prompt length and batch: the sweep takes the faster uncompiled way
    uncompiled = [r for r in result["shapes"][-1]["rows"] if r["way"] != "static+compile"]
    fastest = best_baseline(uncompiled, shape, args.batch_sizes[0])["way"]
    points = sweep(
        shape=shape,
        contexts=args.sweep_contexts,
        batch_sizes=args.sweep_batches,
        new_tokens=args.sweep_new_tokens,
        baseline_way=fastest,
        dtype=args.dtype,
        device=device,
        kernels=args.cpu_kernels,
    )
    plot_sweep(points, args.plot)
    return points


def trained_variant(model):
    """The `Variant` of a trained latent LM: its C, and its head for a GIVT model."""
    from rqlm.benchmarks.generation_models import Variant

    if model.config.model_type == "givt":
        return Variant(model.compression_factor, None, model.config.head)
    return Variant(model.compression_factor, depth_output=model.config.depth_output)


def _load_trained(args):
    """(latent LM, baseline) from the trained folders; a one-line error for a missing or mismatched pair."""
    from transformers import AutoModelForCausalLM

    from rqlm.loading import LATENT_LM_TYPES, read_config

    for name in ("model", "baseline"):
        if not Path(getattr(args, name)).is_dir():
            raise FileNotFoundError(
                f"--{name} {getattr(args, name)!r} is not a folder; pass a trained model folder"
            )
    config = read_config(args.model, "--model", LATENT_LM_TYPES)
    model = AutoModelForCausalLM.from_pretrained(args.model, config=config)
    baseline = AutoModelForCausalLM.from_pretrained(args.baseline)
    if baseline.config.model_type != "qwen3":
        raise ValueError(
            f"--baseline {args.baseline!r} holds a {baseline.config.model_type!r} model, not a Qwen3"
        )
    vocab = model.config.vae_config.backbone_config.vocab_size
    if baseline.config.vocab_size != vocab:
        raise ValueError(
            f"--baseline has vocab {baseline.config.vocab_size}, the RQ model {vocab}; train both on one tokenizer"
        )
    return model, baseline


def _read_evaluation(path: str) -> dict:
    """perplexity_bound and baseline_perplexity from `rqlm evaluate --output_json`."""
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"--evaluation_json {path!r} not found; write it with `rqlm evaluate --output_json`"
        ) from None
    missing = [k for k in ("perplexity_bound", "baseline_perplexity") if k not in values]
    if missing:
        raise ValueError(
            f"--evaluation_json {path!r} lacks {missing}; is it `rqlm evaluate --output_json` output?"
        )
    return {k: values[k] for k in ("perplexity_bound", "baseline_perplexity")}


def _drafting_bench(args, device) -> tuple[dict, str]:
    """Target alone, RQ alone, target verified-with-RQ for each drafter -> (JSON result with its summary, table)."""
    import torch

    from rqlm.benchmarks import generation_models as gm
    from rqlm.benchmarks.speed import DTYPES
    from rqlm.drafting import speed as ds

    if args.compression_factors is None:  # random-weight drafters: one per C
        args.compression_factors = [HEADLINE_C, 2, 8]
    if args.quick:
        args.target_shape = args.drafter_shape = "test"
        args.prompt_length, args.new_tokens, args.compression_factors, args.prompts = 16, 8, [HEADLINE_C], 2
    if args.prompt_length < 1 or args.new_tokens < 1 or args.prompts < 1:
        raise ValueError("--prompt_length, --new_tokens and --prompts must be >= 1")
    if isinstance(args.draft_tokens, int):  # one value from a --config file
        args.draft_tokens = [args.draft_tokens]
    if args.draft_tokens is not None and (not args.draft_tokens or min(args.draft_tokens) < 1):
        raise ValueError(f"--draft_tokens must be comma-separated integers >= 1, got {args.draft_tokens}")
    if (args.model is None) != (args.target is None):
        raise ValueError("--drafting takes --target and --model together (trained folders), or neither (random weights)")
    dtype = DTYPES[args.dtype]
    if args.target:
        target, drafters, prompts = _load_drafting_models(args, device)
    else:
        for shape in (args.target_shape, args.drafter_shape):
            gm.shape_config(shape)  # one-line error for an unknown shape, before any model is built
        target = gm.build_baseline(gm.shape_config(args.target_shape, args.vocab_size))
        drafters = [
            ds.Drafter(f"RQ {args.drafter_shape} C={c} (random)", gm.build_rq_model(gm.shape_config(args.drafter_shape, args.vocab_size), c))
            for c in args.compression_factors
        ]
        rows = gm.prompts(args.prompts, args.prompt_length, args.vocab_size, torch.device("cpu"))
        prompts = [row[None] for row in rows]
    target = target.to(device, dtype).eval()
    for drafter in drafters:
        drafter.model.to(device, dtype)
    print(f"measuring drafting ({len(drafters)} drafters, {len(prompts)} prompts) ...", flush=True)
    result = ds.benchmark_drafting(
        target, drafters, prompts, args.new_tokens, device, args.draft_tokens, kernels=args.cpu_kernels,
    )
    result["setup"] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "target": args.target or f"{args.target_shape} (random)",
        "load_average": os.getloadavg()[0],
    }
    result["summary"] = ds.summary_line(result)
    return result, ds.format_drafting_table(result)


def _load_drafting_models(args, device):
    """(target, drafters, prompts): trained folders, prompts from the embedded corpus's held-out documents."""
    from transformers import AutoModelForCausalLM

    from rqlm import RQDraftHead, RQTransformerForCausalLM
    from rqlm.drafting.speed import Drafter, held_out_prompts
    from rqlm.loading import DRAFTER_TYPES, load_folder_tokenizer, read_config

    folders = [path.strip() for path in args.model.split(",") if path.strip()]
    for name, path in [("target", args.target)] + [("model", path) for path in folders]:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--{name} {path!r} is not a folder; pass a trained model folder")
    target = AutoModelForCausalLM.from_pretrained(args.target)
    drafters = []
    for path in folders:
        kind = RQDraftHead if read_config(path, "--model", DRAFTER_TYPES).model_type == "rq_draft_head" else RQTransformerForCausalLM
        model = kind.from_pretrained(path)
        drafters.append(Drafter(f"{Path(path).name} (C={model.compression_factor})", model))
    tokenizer = load_folder_tokenizer(args.target, "--target")
    return target, drafters, held_out_prompts(tokenizer, args.prompts, args.prompt_length)
