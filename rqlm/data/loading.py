"""Text datasets in, packed token blocks out.

`load_text_dataset` gives a `DatasetDict` (or `IterableDatasetDict` when streaming)
with splits "train" and "validation" from the embedded corpus, local files or the hub.
Where no validation split exists, documents are held out by a seeded hash of their text
(see `corpus.split_score`), so the split is fixed, order-independent and never shares a
document with training. `tokenize_and_pack` turns documents into blocks of exactly
`block_size` token ids, each document followed by eos, nothing lost but the final remainder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from datasets import (
    Dataset,
    DatasetDict,
    IterableDataset,
    IterableDatasetDict,
    load_dataset,
)

from .corpus import (
    SPLIT_SEED,
    VALIDATION_FRACTION,
    build_embedded_corpus,
    is_validation_document,
    split_score,
)

# file extension -> `datasets` builder
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# A .txt file holds one document per paragraph (blocks of lines separated by a blank line).
TEXT_SAMPLE_BY = "paragraph"
VALIDATION_SPLIT_NAMES = ("validation", "valid", "dev")
TOKENIZE_BATCH_SIZE = 1000


def looks_like_local_path(name: str | os.PathLike) -> bool:
    """Whether a name means a local file or folder rather than a hub id like `org/name`."""
    name = str(name)
    return (
        os.path.exists(name)
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or Path(name).suffix.lower() in BUILDERS
    )


def load_text_dataset(
    name_or_path: str | os.PathLike | None = None,
    text_column: str = "text",
    streaming: bool = False,
    validation_fraction: float = VALIDATION_FRACTION,
    seed: int = SPLIT_SEED,
    config_name: str | None = None,
) -> DatasetDict | IterableDatasetDict:
    """Splits "train" and "validation" of documents in `text_column`.

    None -> the embedded corpus; a .txt/.json/.jsonl/.parquet file or a folder of them
    -> their documents, hash-split; otherwise a hub dataset name (with `config_name`),
    whose "validation" split is used where it has one.
    """
    if name_or_path is None:
        dataset = build_embedded_corpus()
        if streaming:
            dataset = IterableDatasetDict({split: ds.to_iterable_dataset() for split, ds in dataset.items()})
        _check_text_column(dataset["train"], text_column, "the embedded corpus")
        return dataset
    if looks_like_local_path(name_or_path):
        builder, files = _local_files(Path(name_or_path).expanduser())
        kwargs = {"sample_by": TEXT_SAMPLE_BY} if builder == "text" else {}
        splits = load_dataset(
            builder, data_files={"train": [str(f) for f in files]}, streaming=streaming, **kwargs
        )
        if builder == "text":  # paragraphs keep the newlines around their separating blank lines
            splits = splits.map(_strip_newlines, input_columns="text", batched=True)
    else:
        splits = _load_hub_dataset(str(name_or_path), config_name, streaming)
    where = f"{str(name_or_path)!r}"
    train_name = "train" if "train" in splits else next(iter(splits))
    train = splits[train_name]
    _check_text_column(train, text_column, where)
    train = train.filter(_has_text, input_columns=text_column, batched=True)
    validation_name = next((name for name in VALIDATION_SPLIT_NAMES if name in splits), None)
    if validation_name is not None:
        validation = splits[validation_name].filter(_has_text, input_columns=text_column, batched=True)
        return type(splits)({"train": train, "validation": validation})
    if isinstance(train, Dataset):
        if len(train) == 0:
            raise ValueError(
                f"dataset {where} holds no text in column {text_column!r}; check the files' contents"
            )
        return _hold_out(train, text_column, validation_fraction, seed)

    def held_out(texts: list[str]) -> list[bool]:
        return [is_validation_document(t, validation_fraction, seed) for t in texts]

    def kept(texts: list[str]) -> list[bool]:
        return [not flag for flag in held_out(texts)]

    return IterableDatasetDict(
        {
            "train": train.filter(kept, input_columns=text_column, batched=True),
            "validation": train.filter(held_out, input_columns=text_column, batched=True),
        }
    )


def _local_files(path: Path) -> tuple[str, list[Path]]:
    """The builder and the sorted, non-empty data files of a local file or folder."""
    if not path.exists():
        raise FileNotFoundError(
            f"dataset path '{path}' does not exist; pass an existing file or folder, a hub name, "
            "or no --dataset for the embedded corpus"
        )
    supported = ", ".join(sorted(BUILDERS))
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in BUILDERS)
        if not files:
            raise FileNotFoundError(f"folder '{path}' holds no {supported} files")
    else:
        if path.suffix.lower() not in BUILDERS:
            raise ValueError(
                f"file '{path}' has an unsupported extension {path.suffix!r}; use one of {supported}"
            )
        files = [path]
    builders = {BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise ValueError(f"folder '{path}' mixes file types {sorted(builders)}; keep one type per folder")
    empty = [str(f) for f in files if f.stat().st_size == 0]
    if empty:
        raise ValueError(
            f"dataset file '{empty[0]}' is empty"
            + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
            + "; remove it or fill it with text"
        )
    return builders.pop(), files


def _load_hub_dataset(
    name: str, config_name: str | None, streaming: bool
) -> DatasetDict | IterableDatasetDict:
    """`load_dataset(name)` with a one-line error when it cannot be reached."""
    try:
        return load_dataset(name, config_name, streaming=streaming)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FileNotFoundError(
            f"dataset {name!r} is neither a local path nor reachable on the hub ({reason}); "
            "check the name and your network, or omit it for the embedded corpus"
        ) from None


def _check_text_column(dataset: Dataset | IterableDataset, text_column: str, where: str) -> None:
    """Raise a one-line error naming the available columns when `text_column` is missing."""
    columns = dataset.column_names
    if columns is None:  # a stream with unknown features: look at its first row
        columns = list(next(iter(dataset), {}))
    if text_column not in columns:
        raise ValueError(
            f"dataset {where} has no column {text_column!r}; available columns: {columns}; pass --text_column"
        )


def _strip_newlines(texts: list[str]) -> dict:
    """Remove line breaks at both ends of each paragraph."""
    return {"text": [t.strip("\r\n") for t in texts]}


def _has_text(texts: list) -> list[bool]:
    """Keep documents that are strings with something other than whitespace."""
    return [isinstance(t, str) and bool(t.strip()) for t in texts]


def _hold_out(dataset: Dataset, text_column: str, validation_fraction: float, seed: int) -> DatasetDict:
    """Split documents by their hash score; at least one document is held out when there are two."""
    scores = np.array([split_score(t, seed) for t in dataset[text_column]])
    held = scores < validation_fraction
    if not held.any() and len(scores) > 1:
        held[scores.argmin()] = True
    return DatasetDict(
        {
            "train": dataset.select(np.flatnonzero(~held)),
            "validation": dataset.select(np.flatnonzero(held)),
        }
    )


# ----------------------------------------------------------------------------
# Tokenization and packing


def check_block_size(block_size: int, compression_factor: int) -> None:
    """Blocks must split into whole latent positions: block_size a positive multiple of C."""
    if compression_factor < 1:
        raise ValueError(f"compression {compression_factor} must be a positive integer")
    if block_size < compression_factor:
        raise ValueError(
            f"block size {block_size} is smaller than compression {compression_factor}; "
            f"pass a positive multiple of {compression_factor}"
        )
    if block_size % compression_factor:
        lower = block_size // compression_factor * compression_factor
        raise ValueError(
            f"block size {block_size} is not a multiple of compression {compression_factor}; "
            f"pass {lower} or {lower + compression_factor}"
        )


def tokenize_and_pack(
    dataset: Dataset | IterableDataset,
    tokenizer,
    block_size: int,
    compression_factor: int = 1,
    text_column: str = "text",
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Documents -> column "input_ids" of blocks (block_size,) int64: every document's tokens
    followed by eos, concatenated in order, cut into blocks; only the final remainder is dropped."""
    check_block_size(block_size, compression_factor)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; packing needs one to separate documents")

    def tokenize(texts: list[str]) -> dict:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    map_kwargs = {"num_proc": num_proc} if isinstance(dataset, Dataset) else {}
    tokenized = dataset.map(
        tokenize,
        input_columns=text_column,
        batched=True,
        batch_size=TOKENIZE_BATCH_SIZE,
        remove_columns=dataset.column_names,
        **map_kwargs,
    )
    if isinstance(dataset, IterableDataset):
        return IterableDataset.from_generator(
            _pack_stream, gen_kwargs={"tokenized": tokenized, "block_size": block_size}
        )
    # `map` wrote a fresh table in row order (no indices mapping): flatten it in pyarrow, then reshape.
    column = tokenized.data.column("input_ids")
    stream = column.combine_chunks().flatten().to_numpy().astype(np.int64)
    num_blocks = len(stream) // block_size
    return Dataset.from_dict({"input_ids": stream[: num_blocks * block_size].reshape(num_blocks, block_size)})


def _pack_stream(tokenized: IterableDataset, block_size: int):
    """Yield {"input_ids": block} from a stream of tokenized documents, carrying the remainder over."""
    buffer: list[int] = []
    for example in tokenized:
        buffer.extend(example["input_ids"])
        while len(buffer) >= block_size:
            yield {"input_ids": buffer[:block_size]}
            del buffer[:block_size]


def get_lm_datasets(
    dataset: str | os.PathLike | DatasetDict | IterableDatasetDict | None = None,
    tokenizer=None,
    block_size: int = 256,
    compression_factor: int = 4,
    text_column: str = "text",
    streaming: bool = False,
    max_eval_blocks: int | None = None,
) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset]:
    """(train blocks, eval blocks) in torch format, each row "input_ids" (block_size,).

    `dataset` and `tokenizer` are objects or names for `load_text_dataset` / `load_tokenizer`.
    """
    from .tokenizer import load_tokenizer  # imported here: the tokenizer module imports this one

    check_block_size(block_size, compression_factor)
    if not isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        dataset = load_text_dataset(dataset, text_column=text_column, streaming=streaming)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    train, evaluation = (
        tokenize_and_pack(dataset[split], tokenizer, block_size, compression_factor, text_column)
        for split in ("train", "validation")
    )
    if max_eval_blocks is not None:
        evaluation = (
            evaluation.take(max_eval_blocks)
            if isinstance(evaluation, IterableDataset)
            else evaluation.select(range(min(max_eval_blocks, len(evaluation))))
        )
    return train.with_format("torch"), evaluation.with_format("torch")
