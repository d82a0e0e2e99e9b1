"""Data flags shared by every training command, and the one call that turns them into blocks."""

from __future__ import annotations

import argparse

DATASET_HELP = (
    "hub name, or a local .txt/.json/.jsonl/.parquet file or a folder of them, types mixed (default: the "
    "embedded corpus); a .txt file holds one document per line, or per paragraph when it has blank lines; "
    "files must be UTF-8"
)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--dataset, --text_column, --tokenizer, --block_size, --compression_factor, --streaming, --max_eval_blocks."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=None, help=DATASET_HELP)
    data.add_argument("--text_column", default="text", help="column holding the documents")
    data.add_argument("--tokenizer", default=None,
                      help="tokenizer folder or hub name (default: the backbone's, or the embedded BPE for a preset)")
    data.add_argument("--block_size", type=int, default=256, help="tokens per training block (a multiple of C)")
    data.add_argument("--compression_factor", type=int, default=4,
                      help="C, tokens per latent position; blocks are cut the same for every model")
    data.add_argument("--streaming", action="store_true", help="stream a hub dataset instead of downloading it")
    data.add_argument("--max_eval_blocks", type=int, default=None, help="cap on held-out blocks (default: all)")


def load_blocks(args: argparse.Namespace, default_tokenizer: str | None = None):
    """Parsed data flags -> (tokenizer, train_blocks, eval_blocks), blocks of `block_size` token ids.

    Prints what was trained on and what was held out. A training split smaller than one batch of
    `--per_device_train_batch_size` blocks is a one-line error saying how much text is needed.
    """
    from rqlm.data.loading import check_block_size, get_lm_datasets, held_out_rule
    from rqlm.data.tokenizer import load_tokenizer

    check_block_size(args.block_size, args.compression_factor)
    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer)
    train_blocks, eval_blocks = get_lm_datasets(
        args.dataset,
        tokenizer,
        block_size=args.block_size,
        compression_factor=args.compression_factor,
        text_column=args.text_column,
        streaming=args.streaming,
        max_eval_blocks=args.max_eval_blocks,
        min_train_blocks=getattr(args, "per_device_train_batch_size", 1),
    )
    where = args.dataset or "the embedded corpus"
    if args.streaming:
        print(f"data: {where}, streamed; held out: {held_out_rule(args.dataset)}")
    else:
        print(f"data: {where}: train {_size(train_blocks, args.block_size)}; "
              f"held out ({held_out_rule(args.dataset)}): {_size(eval_blocks, args.block_size)}")
    return tokenizer, train_blocks, eval_blocks


def _size(blocks, block_size: int) -> str:
    """'12 blocks of 32 (384 tokens)'."""
    return f"{len(blocks):,} blocks of {block_size} ({len(blocks) * block_size:,} tokens)"


def adopt_compression_factor(args: argparse.Namespace, compression_factor: int, source: str, hint: str) -> None:
    """C comes from a trained model (`source`, e.g. "the VAE's"): fill `args.compression_factor`, refuse a
    different one in one line (`hint` says what to do), and check `args.block_size` against it."""
    from rqlm.data.loading import check_block_size

    c = compression_factor
    if args.compression_factor is not None and args.compression_factor != c:
        raise ValueError(f"--compression_factor {args.compression_factor} differs from {source} C={c}; {hint}")
    args.compression_factor = c
    check_block_size(args.block_size, c)


def add_data_over_vae_arguments(parser: argparse.ArgumentParser) -> None:
    """The data flags, with C (and the tokenizer) taken from --vae, and the VAE's flags (train-lm, train-draft-head)."""
    from rqlm.data.arguments import add_data_arguments

    add_data_arguments(parser)
    parser.set_defaults(block_size=128, compression_factor=None)  # C: the VAE's
    add_vae_arguments(parser)


def add_vae_arguments(parser: argparse.ArgumentParser) -> None:
    """--vae VAE_DIR and --encode_batch_size (shared with `rqlm encode`)."""
    group = parser.add_argument_group("vae")
    group.add_argument("--vae", default=None, help="folder of a trained RQ-VAE (`rqlm train-vae --output_dir`); required")
    group.add_argument("--encode_batch_size", type=int, default=64, help="blocks per VAE forward when encoding")
