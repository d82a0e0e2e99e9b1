"""`rqlm plan`: memory per GPU to train the VAE, the latent LM and the baseline around a Qwen3, offline.

    rqlm plan --backbone Qwen/Qwen3-8B --gpus 1 8 64 --block_size 2048

Models are built from configs written in code (Qwen3-0.6B, 1.7B, 4B, 8B) on the meta device, so the
parameter counts are exact and nothing is downloaded; see rqlm/benchmarks/memory_plan.py for the accounting.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rqlm.benchmarks.memory_plan import QWEN3_CONFIGS

    parser.add_argument("--backbone", default="Qwen/Qwen3-8B",
                        help=f"a released Qwen3: {', '.join(QWEN3_CONFIGS)} (default: %(default)s)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64], help="GPU counts to plan (default: 1 8 64)")
    parser.add_argument("--block_size", type=int, default=2048, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--per_device_train_batch_size", type=int, default=1,
                        help="sequences per GPU per micro-batch (default: %(default)s)")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank of the LoRA rows (default: %(default)s)")
    parser.add_argument("--num_encoder_layers", type=int, default=2,
                        help="the VAE's encoder layers taken from the backbone (default: %(default)s)")
    parser.add_argument("--num_decoder_layers", type=int, default=2,
                        help="the VAE's decoder layers taken from the backbone (default: %(default)s)")
    parser.add_argument("--gpu_memory_gb", type=float, default=80.0,
                        help="memory of one GPU, for the 'fits' column (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")


def main(args: argparse.Namespace) -> int:
    from rqlm.benchmarks.memory_plan import memory_plan, plan_table

    plan = memory_plan(
        args.backbone,
        gpu_counts=tuple(args.gpus),
        block_size=args.block_size,
        per_device_train_batch_size=args.per_device_train_batch_size,
        lora_r=args.lora_r,
        vae_fields={"num_encoder_layers": args.num_encoder_layers, "num_decoder_layers": args.num_decoder_layers},
    )
    print(plan_table(plan, args.gpu_memory_gb))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**asdict(plan), "gpu_memory_gb": args.gpu_memory_gb}, f, indent=1)
    return 0
