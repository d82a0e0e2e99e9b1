"""`rqlm demo`: the whole pipeline on the embedded default corpus.

It builds (or reuses) the embedded corpus and its tokenizer and prints their statistics,
trains the RQ-VAE with the CPU defaults of `rqlm train-vae` for `--minutes`, and shows
held-out text beside its reconstruction with `rqlm inspect` (an HTML report is written
next to the model). The RQ-Transformer steps join here as they land.
"""

from __future__ import annotations

import argparse
import json
import time

from rqlm.data import build_embedded_corpus, corpus_statistics, load_tokenizer
from rqlm.data.tokenizer import DEFAULT_VOCAB_SIZE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE, help="tokenizer entries, specials included"
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="rebuild the cached corpus instead of reusing it"
    )
    parser.add_argument("--minutes", type=float, default=3.0, help="wall-clock budget of the RQ-VAE training")
    parser.add_argument("--output_dir", default="runs/demo-vae", help="where the trained RQ-VAE is saved")
    parser.add_argument("--data_only", action="store_true", help="stop after the corpus and tokenizer")


def main(args: argparse.Namespace) -> int:
    """Build (or reuse) the embedded corpus and tokenizer; print their size and compression."""
    start = time.perf_counter()
    corpus = build_embedded_corpus(rebuild=args.rebuild)
    corpus_seconds = time.perf_counter() - start
    tokenizer = load_tokenizer(None, vocab_size=args.vocab_size)
    tokenizer_seconds = time.perf_counter() - start - corpus_seconds
    print_corpus_statistics(corpus_statistics(corpus, tokenizer))
    print(
        f"tokenizer: byte-level BPE, vocab size {len(tokenizer)}, eos {tokenizer.eos_token!r} "
        f"(id {tokenizer.eos_token_id}), at {tokenizer.name_or_path}"
    )
    print(
        f"time: corpus {corpus_seconds:.1f} s, tokenizer {tokenizer_seconds:.1f} s "
        "(cached after the first run; --rebuild to redo the corpus)"
    )
    if args.data_only:
        return 0
    from rqlm.cli import main as rqlm_main

    print(f"\ntraining the RQ-VAE for {args.minutes:g} minutes (rqlm train-vae --max_minutes {args.minutes:g})")
    start = time.perf_counter()
    status = rqlm_main(["train-vae", "--max_minutes", str(args.minutes), "--output_dir", args.output_dir,
                        "--tokenizer", str(tokenizer.name_or_path)])
    if status:
        return status
    train_seconds = time.perf_counter() - start
    print(f"\nheld-out reconstruction (rqlm inspect {args.output_dir})")
    status = rqlm_main(["inspect", args.output_dir, "--num_examples", "2", "--max_batches", str(INSPECT_BATCHES)])
    if status:
        return status
    print("\n" + demo_summary(args.output_dir, train_seconds))
    return 0


INSPECT_BATCHES = 8


def demo_summary(output_dir: str, train_seconds: float) -> str:
    """The demo's figure with the conditions it depends on, read from the run's metrics.jsonl and inspect.json."""
    from pathlib import Path

    from rqlm.evaluation.plots import read_metrics

    accuracy = json.loads((Path(output_dir) / "inspect.json").read_text())["accuracy"]
    trained = [r for r in read_metrics(output_dir) if "tokens_seen" in r]
    speeds = sorted(r["tokens_per_second"] for r in trained if "tokens_per_second" in r)
    speed = f" at {speeds[len(speeds) // 2]:,.0f} training tokens/s" if speeds else ""
    steps, tokens = (trained[-1]["step"], trained[-1]["tokens_seen"]) if trained else (0, 0)
    return (
        f"demo: {accuracy:.1%} of held-out tokens reconstructed (rqlm inspect, {INSPECT_BATCHES} batches) after "
        f"{steps:,} steps and {tokens:,} tokens in {train_seconds / 60:.1f} minutes{speed} on this machine; "
        "a slower or busier machine trains fewer steps in the same budget and reaches less"
    )


def print_corpus_statistics(stats: dict) -> None:
    """One line per split: documents, characters, tokens, characters per token."""
    print("embedded corpus (CPython docs topics and stdlib docstrings):")
    for split, s in stats.items():
        print(
            f"  {split:<10} {s['documents']:>6,} documents {s['characters']:>11,} characters "
            f"{s['tokens']:>9,} tokens {s['chars_per_token']:6.2f} chars/token"
        )
