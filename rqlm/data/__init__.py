"""Data: the embedded default corpus, byte-level BPE tokenizers, loading and packing text datasets."""

from .corpus import build_embedded_corpus, corpus_statistics
from .loading import check_block_size, get_lm_datasets, load_text_dataset, tokenize_and_pack
from .tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "build_embedded_corpus",
    "check_block_size",
    "corpus_statistics",
    "get_lm_datasets",
    "load_text_dataset",
    "load_tokenizer",
    "tokenize_and_pack",
    "train_tokenizer",
]
