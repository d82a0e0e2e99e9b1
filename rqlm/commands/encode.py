"""`rqlm encode`: compute a trained RQ-VAE's codes of a text dataset once, for every latent-LM run.

    [data flags] -> blocks of block_size tokens (the VAE folder's tokenizer, its C)
    -> VAE.encode, batched -> DIR: a `datasets` DatasetDict (save_to_disk), splits train / validation,
       columns "input_ids" (T,) and "codes" (L, D) int16

`rqlm train-lm --vae VAE_DIR --codes DIR` then trains on them; codes made by another VAE or
tokenizer are refused there (the dataset info records the VAE's config and weights hashes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rqlm.data.arguments import add_vae_arguments
from rqlm.loading import load_vae, resolve_compression_factor, vae_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rqlm.data.arguments import add_data_arguments

    add_data_arguments(parser)
    parser.set_defaults(block_size=128, compression_factor=None)  # C: the VAE's
    add_vae_arguments(parser)
    parser.add_argument("--output_dir", required=True, help="folder to write the code dataset to")


def main(args: argparse.Namespace) -> int:
    import torch
    from datasets import DatasetDict

    from rqlm.data.arguments import load_blocks
    from rqlm.data.codes import codes_provenance, encode_blocks, save_codes

    if args.encode_batch_size < 1:
        raise ValueError(f"--encode_batch_size must be at least 1, got {args.encode_batch_size}")
    if args.streaming:
        raise ValueError("encode writes the whole dataset to disk; --streaming is not supported")
    vae = load_vae(args.vae)
    resolve_compression_factor(args, vae)
    tokenizer = vae_tokenizer(args)
    _, train_blocks, eval_blocks = load_blocks(args, default_tokenizer=args.vae)
    if torch.cuda.is_available():
        vae.cuda()
    splits = DatasetDict(
        train=encode_blocks(vae, train_blocks, args.encode_batch_size, desc="encode train"),
        validation=encode_blocks(vae, eval_blocks, args.encode_batch_size, desc="encode held-out"),
    )
    output_dir = Path(args.output_dir)
    save_codes(splits, output_dir, codes_provenance(vae.cpu(), tokenizer, args.vae))
    d = vae.config.num_quantizers
    print(f"wrote {output_dir}: train {len(splits['train']):,} / held-out {len(splits['validation']):,} blocks of "
          f"{args.block_size} tokens -> {args.block_size // vae.compression_factor} x {d} codes; "
          f"train with `rqlm train-lm --vae {args.vae} --codes {output_dir}`")
    return 0
