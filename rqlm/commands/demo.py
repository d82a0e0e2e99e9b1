"""`rqlm demo`: the whole pipeline on the embedded default corpus.

For now it builds the embedded corpus and its tokenizer and prints their statistics;
the training, evaluation and generation steps join here as they land.
"""

from __future__ import annotations

import argparse
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
    return 0


def print_corpus_statistics(stats: dict) -> None:
    """One line per split: documents, characters, tokens, characters per token."""
    print("embedded corpus (CPython docs topics and stdlib docstrings):")
    for split, s in stats.items():
        print(
            f"  {split:<10} {s['documents']:>6,} documents {s['characters']:>11,} characters "
            f"{s['tokens']:>9,} tokens {s['chars_per_token']:6.2f} chars/token"
        )
