"""`rqlm bench`: speed and memory of the RQ-VAE against the plain Qwen3 baseline, in one run.

Default: training tokens/s and peak memory of RQVAEModel vs Qwen3ForCausalLM on the same backbone
preset, tokens, dtype and threads, plus RQ-VAE encode and decode tokens/s (see
rqlm/evaluation/speed.py). `--quantizers`: rqlm's quantizers against vector-quantize-pytorch (see
rqlm/evaluation/quantizer_bench.py). Prints a markdown table; `--output` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rqlm.presets import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantizers", action="store_true",
                        help="the quantizers against vector-quantize-pytorch instead of the models")
    parser.add_argument("--backbone", default="tiny",
                        help=f"a preset ({', '.join(PRESETS)}) or a pretrained Qwen3 (its config only)")
    parser.add_argument("--vocab_size", type=int, default=8192,
                        help="vocabulary of a preset backbone (default: the embedded tokenizer's)")
    parser.add_argument("--batch_size", type=int, default=8, help="B, blocks per batch (quantizers: rows)")
    parser.add_argument("--block_size", type=int, default=256,
                        help="T: tokens per block, a multiple of C (quantizers: N vectors per row)")
    parser.add_argument("--compression_factor", type=int, default=4, help="C, tokens per latent position")
    parser.add_argument("--num_quantizers", type=int, default=4, help="D, residual depth")
    parser.add_argument("--codebook_size", type=int, default=1024, help="K, codes per codebook")
    parser.add_argument("--quantizer_type", default="residual_vq", help="the RQ-VAE's quantizer family")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="autocast dtype of both sides")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--output", default=None, help="also write the table as JSON to this file")


def main(args: argparse.Namespace) -> int:
    import torch

    from rqlm.evaluation.speed import DTYPES, resolve_device

    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or args.block_size < 1:
        raise ValueError("--repeats, --batch_size and --block_size must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.quantizers:
        from rqlm.evaluation.quantizer_bench import benchmark_quantizers, format_quantizer_table

        result = benchmark_quantizers(
            args.batch_size, args.block_size, device, args.repeats, args.warmup, DTYPES[args.dtype]
        )
        table = format_quantizer_table(result)
    else:
        from rqlm.evaluation.speed import benchmark_models, format_model_table

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
        table = format_model_table(result)
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0
