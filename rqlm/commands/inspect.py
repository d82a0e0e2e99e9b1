"""`rqlm inspect`: held-out text beside its RQ-VAE reconstruction, with the figures that explain it.

Prints a few held-out blocks with every token the model got wrong marked (red in a terminal,
`<mark>` in the HTML file), then the reconstruction accuracy per position inside a chunk and the
per-depth codebook usage perplexity and dead codes over the held-out split.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

from rqlm.reporting.marking import marked_text

RED, GREEN, RESET = "\033[41m", "\033[32m", "\033[0m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rqlm.data.arguments import add_data_arguments

    parser.add_argument("checkpoint", help="a folder saved by `rqlm train-vae` (model + tokenizer)")
    add_data_arguments(parser)
    # C is the checkpoint's; the flag may only repeat it. 128 is train-vae's block size.
    parser.set_defaults(block_size=128, compression_factor=None)
    parser._option_string_actions["--compression_factor"].help = "C; read from the checkpoint (a different value is an error)"
    parser._option_string_actions["--tokenizer"].help = "tokenizer folder or hub name (default: the checkpoint's)"
    parser._option_string_actions["--block_size"].help = "tokens per held-out block, a multiple of C (default: 128)"
    parser.add_argument("--num_examples", type=int, default=3, help="held-out blocks shown as text (0: none)")
    parser.add_argument("--batch_size", type=int, default=16, help="held-out blocks per batch")
    parser.add_argument("--max_batches", type=int, default=None,
                        help="held-out batches for the figures (default: the whole held-out split)")
    parser.add_argument("--output", default=None, help="HTML report path (default: CHECKPOINT/inspect.html)")
    parser.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                        help="terminal colours (default: when stdout is a terminal)")


def load_config(path: str):
    """The RQVAEConfig of a saved folder, read before any weights so bad flags fail fast."""
    from transformers import AutoConfig

    import rqlm  # noqa: F401  (registers rq_vae with AutoConfig)

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path!r} holds no saved model (config.json missing); pass a `rqlm train-vae` output")
    config = AutoConfig.from_pretrained(folder)
    if config.model_type != "rq_vae":
        raise ValueError(f"{path!r} holds a {config.model_type!r} checkpoint, not an RQ-VAE ('rq_vae'); "
                         "pass a `rqlm train-vae` output")
    return config


def check_arguments(args: argparse.Namespace, config) -> None:
    """One-line errors for flags that are out of range or contradict the checkpoint (its C, its vocabulary)."""
    from rqlm.data.arguments import adopt_compression_factor

    adopt_compression_factor(args, config.compression_factor, "the checkpoint's",
                             "omit the flag (C is read from the checkpoint)")
    if args.num_examples < 0:
        raise ValueError(f"--num_examples must be >= 0, got {args.num_examples}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.max_eval_blocks is not None and args.max_eval_blocks < 1:
        raise ValueError(f"--max_eval_blocks must be at least 1 (or omitted for all), got {args.max_eval_blocks}")
    if args.max_batches is not None and args.max_batches < 1:
        raise ValueError(f"--max_batches must be at least 1 (or omitted for the whole held-out split), "
                         f"got {args.max_batches}")


def main(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from rqlm import RQVAEModel
    from rqlm.data.loading import get_lm_datasets
    from rqlm.data.tokenizer import load_tokenizer
    from rqlm.evaluation.reconstruction import evaluate_reconstruction

    config = load_config(args.checkpoint)
    check_arguments(args, config)
    c = config.compression_factor
    tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
    if len(tokenizer) > config.backbone_config.vocab_size:
        raise ValueError(f"tokenizer {args.tokenizer!r} has {len(tokenizer)} entries, more than the checkpoint's "
                         f"vocab_size {config.backbone_config.vocab_size}; omit --tokenizer to use the checkpoint's")
    _, eval_blocks = get_lm_datasets(args.dataset, tokenizer, block_size=args.block_size, compression_factor=c,
                                     text_column=args.text_column, streaming=args.streaming,
                                     max_eval_blocks=args.max_eval_blocks)
    model = RQVAEModel.from_pretrained(args.checkpoint).eval()
    color = sys.stdout.isatty() if args.color is None else args.color
    html_parts = [f"<h1>RQ-VAE reconstruction: {html.escape(args.checkpoint)}</h1>"]
    examples = eval_blocks[: args.num_examples]["input_ids"] if args.num_examples > 0 else torch.zeros(0, c)
    with torch.no_grad():
        reconstructed = model(examples.long()).logits.argmax(-1) if len(examples) else examples
    for i, (original, recon) in enumerate(zip(examples.tolist(), reconstructed.tolist())):
        hits = sum(a == b for a, b in zip(original, recon))
        print(f"--- held-out block {i}: {hits}/{len(original)} tokens reconstructed ---")
        print(marked_text(tokenizer, original, recon, "ansi") if color else
              tokenizer.decode(recon) + f"\n[{len(original) - hits} tokens differ]")
        html_parts.append(f"<h2>block {i}: {hits}/{len(original)}</h2><pre>{marked_text(tokenizer, original, recon, 'html')}</pre>")

    loader = DataLoader(eval_blocks, batch_size=args.batch_size)
    metrics = evaluate_reconstruction(model, loader, max_batches=args.max_batches)
    print(f"\nheld-out reconstruction accuracy: {metrics['accuracy']:.2%}")
    print("accuracy by position in chunk: " + "  ".join(f"{metrics[f'accuracy_pos{p}']:.2%}" for p in range(c)))
    depth = sum(1 for k in metrics if k.startswith("usage_perplexity_d"))
    for d in range(depth):
        print(f"depth {d}: usage perplexity {metrics[f'usage_perplexity_d{d}']:.1f} / {model.quantizer_size}, "
              f"dead codes {metrics[f'dead_fraction_d{d}']:.1%}")
    if "codes_replaced" in metrics:
        print(f"codes replaced by dead-code expiry during training: {int(metrics['codes_replaced'])}")
    else:  # a Gaussian VAE: no codebook, the latent's robustness instead
        noise = "  ".join(f"{k[len('accuracy_'):]} {v:.2%}" for k, v in metrics.items()
                          if k.startswith(("accuracy_sampled", "accuracy_noise")))
        print(f"KL to N(0, I) {metrics['kl']:.2f} nats per latent; accuracy decoding a perturbed latent: {noise}")
    html_parts.append(f"<h2>figures</h2><pre>{html.escape(json.dumps(metrics, indent=1))}</pre>")
    output = Path(args.output or Path(args.checkpoint) / "inspect.html")
    output.write_text("<meta charset=utf-8><style>mark{background:#f99}</style>" + "\n".join(html_parts))
    (output.with_suffix(".json")).write_text(json.dumps(metrics, indent=1))
    print(f"report written to {output}")
    return 0
