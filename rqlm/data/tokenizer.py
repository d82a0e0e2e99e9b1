"""Byte-level BPE tokenizers: train one with `tokenizers`, or load any with `AutoTokenizer`.

The trained tokenizer is lossless: bytes -> GPT-2 byte alphabet -> BPE, no normalizer,
no prefix space, no clean-up on decode, so `decode(encode(x)) == x` for any string.
Pre-tokenization uses Qwen's split pattern, so it segments text like the real backbone's
tokenizer does. Special tokens: `<|bos|>`, `<|endoftext|>` (eos, put between packed
documents) and `<|pad|>`; none is added by `encode`, packing adds eos itself.

This module is also the `rqlm train-tokenizer` command (`add_arguments`, `main`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .arguments import DATASET_HELP
from .corpus import (
    CORPUS_VERSION,
    PYTHON_VERSION,
    build_embedded_corpus,
    corpus_statistics,
    default_cache_dir,
)
from .loading import held_out_rule, load_text_dataset, looks_like_local_path

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DEFAULT_VOCAB_SIZE = 8192
BASE_VOCAB_SIZE = 256 + 3  # the byte alphabet and the special tokens, before any merge
# Qwen2/Qwen3's pre-tokenizer split: contractions, letter runs, single digits, punctuation, newlines, spaces.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def padding_id(tokenizer) -> int | None:
    """The tokenizer's pad token id, else its EOS id: what batches are padded with."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, output_dir: str | os.PathLike | None = None
) -> PreTrainedTokenizerFast:
    """Train a lossless byte-level BPE of `vocab_size` entries (specials included) on `texts`.

    With `output_dir`, the tokenizer is saved there with `save_pretrained`.
    """
    if vocab_size < BASE_VOCAB_SIZE:
        raise ValueError(
            f"vocab size {vocab_size} is too small; pass at least 259 (256 bytes + 3 special tokens)"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    if backend.get_vocab_size() < vocab_size:
        warnings.warn(
            f"the corpus only supports {backend.get_vocab_size() - BASE_VOCAB_SIZE} merges: the tokenizer has "
            f"{backend.get_vocab_size()} entries, not the {vocab_size} asked; give more text or a smaller vocab size",
            stacklevel=2,
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def embedded_tokenizer_dir(
    vocab_size: int = DEFAULT_VOCAB_SIZE, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Where the tokenizer trained on the embedded corpus's train split is cached."""
    name = (
        f"tokenizer-embedded-v{CORPUS_VERSION}-py{PYTHON_VERSION}-{vocab_size}"  # docstrings vary by Python
    )
    return Path(cache_dir or default_cache_dir()) / name


def load_tokenizer(
    name_or_path: str | os.PathLike | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerBase:
    """A tokenizer with an eos token: None -> the embedded-corpus BPE (trained once, cached);
    a local folder -> `AutoTokenizer.from_pretrained(folder)`; otherwise a hub name."""
    if name_or_path is None:
        folder = embedded_tokenizer_dir(vocab_size)
        if not (folder / "tokenizer.json").exists():
            _train_into(folder, build_embedded_corpus()["train"]["text"], vocab_size)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    elif Path(name_or_path).expanduser().is_dir():
        tokenizer = AutoTokenizer.from_pretrained(Path(name_or_path).expanduser())
    elif looks_like_local_path(name_or_path):
        raise FileNotFoundError(
            f"tokenizer folder '{name_or_path}' does not exist; "
            "pass a folder saved with save_pretrained, a hub name, or nothing for the embedded one"
        )
    else:
        tokenizer = _from_hub(str(name_or_path))
    return _with_eos(tokenizer, name_or_path)


def _train_into(folder: Path, texts: Iterable[str], vocab_size: int) -> None:
    """Train into a temporary sibling folder, then rename it into place (safe under concurrent builds)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.")
    train_tokenizer(texts, vocab_size, tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first; its tokenizer is identical
        shutil.rmtree(tmp, ignore_errors=True)


def _from_hub(name: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(name)` with a one-line error when it cannot be found."""
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FileNotFoundError(
            f"tokenizer {name!r} was found neither locally nor on the hub ({reason}); "
            "check the name and your network, or omit it for the embedded tokenizer"
        ) from None


def _with_eos(tokenizer: PreTrainedTokenizerBase, name) -> PreTrainedTokenizerBase:
    """Check the tokenizer can separate packed documents: it needs an eos token id."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name!r} has no eos token; packing needs one to separate documents")
    return tokenizer


# ----------------------------------------------------------------------------
# `rqlm train-tokenizer`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=None, help=DATASET_HELP)
    parser.add_argument("--text_column", default="text", help="column holding the documents")
    parser.add_argument(
        "--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE, help="entries, specials included"
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where to save the tokenizer (default: the cache dir for the embedded corpus, "
        "else ./tokenizer-VOCAB_SIZE)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="load this hub name or folder with AutoTokenizer instead of training",
    )


def main(args: argparse.Namespace) -> int:
    """Train (or load) a tokenizer, save it, and print its compression on the validation split."""
    start = time.perf_counter()
    dataset = load_text_dataset(args.dataset, text_column=args.text_column)
    output_dir = args.output_dir
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
    elif args.dataset is None and output_dir is None:  # trained once into the cache, then reused
        tokenizer = load_tokenizer(None, vocab_size=args.vocab_size)
    else:
        output_dir = output_dir or f"tokenizer-{args.vocab_size}"
        with warnings.catch_warnings(record=True) as caught:  # shown as one line each, not a source excerpt
            warnings.simplefilter("always")
            tokenizer = train_tokenizer(dataset["train"][args.text_column], args.vocab_size)
        for warning in caught:
            print(f"rqlm train-tokenizer: warning: {warning.message}", file=sys.stderr)
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    seconds = time.perf_counter() - start
    stats = corpus_statistics(dataset, tokenizer, text_column=args.text_column)["validation"]
    print(
        f"tokenizer: vocab size {len(tokenizer)}, eos {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}), "
        f"saved at {output_dir or tokenizer.name_or_path}"
    )
    print(
        f"held out ({held_out_rule(args.dataset)}): {stats['documents']} documents, "
        f"{stats['characters']:,} characters, {stats['tokens']:,} tokens, "
        f"{stats['chars_per_token']:.2f} chars/token ({seconds:.1f} s)"
    )
    return 0
