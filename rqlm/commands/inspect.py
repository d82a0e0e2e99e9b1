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

RED, GREEN, RESET = "\033[41m", "\033[32m", "\033[0m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rqlm.data.arguments import add_data_arguments

    parser.add_argument("checkpoint", help="a folder saved by `rqlm train-vae` (model + tokenizer)")
    add_data_arguments(parser)
    parser.set_defaults(block_size=128)  # train-vae's default: the positions the model was trained on
    parser.add_argument("--num_examples", type=int, default=3, help="held-out blocks shown as text")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_batches", type=int, default=None, help="held-out batches for the figures")
    parser.add_argument("--output", default=None, help="HTML report path (default: CHECKPOINT/inspect.html)")
    parser.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                        help="terminal colours (default: when stdout is a terminal)")


def marked_text(tokenizer, original: list[int], reconstructed: list[int], style: str) -> str:
    """Reconstructed text with the tokens that differ from the original marked ('ansi' or 'html')."""
    parts = []
    for want, got in zip(original, reconstructed):
        piece = tokenizer.decode([got])
        if style == "html":
            piece = html.escape(piece)
            parts.append(piece if want == got else f"<mark title={html.escape(repr(tokenizer.decode([want])))}>{piece}</mark>")
        else:
            parts.append(piece if want == got else f"{RED}{piece}{RESET}")
    return "".join(parts)


def load_checkpoint(path: str):
    """A saved RQ-VAE folder -> (model in eval mode, tokenizer)."""
    from transformers import AutoTokenizer

    from rqlm import RQVAEModel

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path!r} holds no saved model (config.json missing); pass a `rqlm train-vae` output")
    model = RQVAEModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def main(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from rqlm.data.loading import get_lm_datasets
    from rqlm.evaluation.reconstruction import evaluate_reconstruction

    model, tokenizer = load_checkpoint(args.checkpoint)
    c = model.config.compression_factor
    _, eval_blocks = get_lm_datasets(args.dataset, tokenizer, block_size=args.block_size, compression_factor=c,
                                     text_column=args.text_column, streaming=args.streaming,
                                     max_eval_blocks=args.max_eval_blocks)
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
    print(f"codes replaced by dead-code expiry during training: {int(metrics['codes_replaced'])}")
    html_parts.append(f"<h2>figures</h2><pre>{html.escape(json.dumps(metrics, indent=1))}</pre>")
    output = Path(args.output or Path(args.checkpoint) / "inspect.html")
    output.write_text("<meta charset=utf-8><style>mark{background:#f99}</style>" + "\n".join(html_parts))
    (output.with_suffix(".json")).write_text(json.dumps(metrics, indent=1))
    print(f"report written to {output}")
    return 0
