"""Text datasets in, packed token blocks out.

`load_text_dataset` gives a `DatasetDict` (or `IterableDatasetDict` when streaming)
with splits "train" and "validation" from the embedded corpus, local files or the hub.

Local files: a folder may mix .txt, .json/.jsonl and .parquet files; each type is loaded
on its own and they are concatenated on the text column. A .txt file holds one document
per line, unless it has blank lines: then one document per paragraph (lines separated by
a blank line). Text files must be UTF-8: a file that is not gives a one-line error naming
the file and the byte offset (nothing is replaced silently).

Where no validation split exists, text is held out by a seeded hash of its text (see
`corpus.split_score`), so the split is fixed, order-independent and never shares text with
training. The unit held out is a piece: documents longer than `PIECE_CHARS` are cut at
whitespace into pieces, so even a single long document gives a held-out split; pieces of
a document left on the same side are joined back, so training text stays whole elsewhere.
A piece is held out when its score is below the validation fraction (5%); when that holds
fewer than `MIN_HELD_OUT_CHARS` characters, the lowest-scoring pieces are added until it
does, but never more than `MAX_HELD_OUT_SHARE` of the text (streams use the plain rule).
`tokenize_and_pack` turns documents into blocks of exactly `block_size` token ids, each
document followed by eos, nothing lost but the final remainder.
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
    Value,
    concatenate_datasets,
    load_dataset,
)

from .corpus import (
    SPLIT_SEED,
    VALIDATION_FRACTION,
    build_embedded_corpus,
    split_score,
)

# file extension -> `datasets` builder
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# builders whose files are read as text, and so are checked to be UTF-8 first
TEXT_BUILDERS = {"text", "json"}
VALIDATION_SPLIT_NAMES = ("validation", "valid", "dev")
TOKENIZE_BATCH_SIZE = 1000
# Held-out rule for data without a validation split (see the module docstring).
PIECE_CHARS = 2000  # documents longer than this are hashed piece by piece
MIN_HELD_OUT_CHARS = 2000  # about 500 tokens of English: a few blocks to evaluate on
MAX_HELD_OUT_SHARE = 0.1  # the top-up never holds out more than this share of the characters


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
    -> their documents, hash-split by pieces; otherwise a hub dataset name (with
    `config_name`), whose "validation" split is used where it has one.
    """
    if name_or_path is None:
        dataset = build_embedded_corpus()
        if streaming:
            dataset = IterableDatasetDict({split: ds.to_iterable_dataset() for split, ds in dataset.items()})
        _check_text_column(dataset["train"], text_column, "the embedded corpus")
        return dataset
    where = f"{str(name_or_path)!r}"
    if looks_like_local_path(name_or_path):
        train = _load_local_files(Path(name_or_path).expanduser(), text_column, streaming)
    else:
        splits = _load_hub_dataset(str(name_or_path), config_name, streaming)
        train = splits["train" if "train" in splits else next(iter(splits))]
        _check_text_column(train, text_column, where)
        validation_name = next((name for name in VALIDATION_SPLIT_NAMES if name in splits), None)
        if validation_name is not None:
            return type(splits)(
                {
                    "train": train.filter(_has_text, input_columns=text_column, batched=True),
                    "validation": splits[validation_name].filter(
                        _has_text, input_columns=text_column, batched=True
                    ),
                }
            )
        train = train.select_columns([text_column])
    train = train.filter(_has_text, input_columns=text_column, batched=True)
    if isinstance(train, IterableDataset):
        return _hold_out_stream(train, text_column, validation_fraction, seed)
    if len(train) == 0:
        raise ValueError(
            f"dataset {where} holds no text in column {text_column!r}; check the files' contents"
        )
    return _hold_out(train[text_column], text_column, validation_fraction, seed)


def held_out_rule(name_or_path: str | os.PathLike | None) -> str:
    """How `load_text_dataset(name_or_path)` chooses its held-out text, in words for the statistics."""
    hashed = (
        f"{VALIDATION_FRACTION:.0%} of the text by a seeded hash of pieces of up to {PIECE_CHARS:,} characters, "
        f"topped up to {MIN_HELD_OUT_CHARS:,} characters but at most {MAX_HELD_OUT_SHARE:.0%} of the text"
    )
    if name_or_path is None:
        return (
            f"the embedded corpus's validation split, {VALIDATION_FRACTION:.0%} of documents by a seeded hash"
        )
    if looks_like_local_path(name_or_path):
        return hashed
    return f"the dataset's validation split, or else {hashed}"


def _load_local_files(path: Path, text_column: str, streaming: bool) -> Dataset | IterableDataset:
    """The documents of a local file or folder in one column `text_column`, every file type loaded
    with its own builder (.txt by line, or by paragraph when it has blank lines) and concatenated."""
    groups: dict[tuple[str, str | None], list[str]] = {}  # (builder, .txt sample_by) -> files
    for file in _local_files(path):
        builder = BUILDERS[file.suffix.lower()]
        paragraphs = check_utf8(file) if builder in TEXT_BUILDERS else False
        sample_by = ("paragraph" if paragraphs else "line") if builder == "text" else None
        groups.setdefault((builder, sample_by), []).append(str(file))
    parts = []
    for (builder, sample_by), files in groups.items():
        kwargs = {"sample_by": sample_by} if sample_by else {}
        part = load_dataset(builder, data_files={"train": files}, streaming=streaming, **kwargs)["train"]
        if sample_by == "paragraph":  # paragraphs keep the newlines around their separating blank lines
            part = part.map(_strip_newlines, input_columns="text", batched=True)
        if builder == "text" and text_column != "text":
            part = part.rename_column("text", text_column)
        where = f"'{files[0]}'" + (f" (and {len(files) - 1} more {builder} files)" if len(files) > 1 else "")
        _check_text_column(part, text_column, where)
        part = part.select_columns([text_column])
        if part.features is not None and part.features[text_column] == Value("large_string"):
            part = _as_strings(part, text_column)  # parquet's large strings, so it concatenates with json's
        parts.append(part)
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _as_strings(part: Dataset | IterableDataset, text_column: str) -> Dataset | IterableDataset:
    """The column as arrow `string` (a stream's arrow tables are not cast, so it re-infers them)."""
    if isinstance(part, Dataset):
        return part.cast_column(text_column, Value("string"))
    return part.map(lambda texts: {text_column: texts}, input_columns=text_column, batched=True)


def check_utf8(path: Path) -> bool:
    """Raise a one-line error at the first byte of `path` that is not UTF-8; return whether the
    file has a blank line between lines of text (a .txt file is then read by paragraph)."""
    offset, seen_text, blank_before, paragraphs = 0, False, False, False
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"file '{path}' is not UTF-8: byte 0x{line[e.start]:02x} at offset {offset + e.start:,} "
                    f"(line {number}); convert it, e.g. `iconv -f latin1 -t utf-8 IN > OUT`"
                ) from None
            offset += len(line)
            if line.rstrip(b"\r\n"):
                paragraphs |= seen_text and blank_before
                seen_text, blank_before = True, False
            else:
                blank_before = True
    return paragraphs


def _local_files(path: Path) -> list[Path]:
    """The sorted, non-empty data files of a local file or folder."""
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
    empty = [str(f) for f in files if f.stat().st_size == 0]
    if empty:
        raise ValueError(
            f"dataset file '{empty[0]}' is empty"
            + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
            + "; remove it or fill it with text"
        )
    return files


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


def split_into_pieces(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """Cut a document after whitespace into pieces of at most `max_chars` (longer only when a
    piece holds no whitespace in its second half); the pieces concatenate back to `text`."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        window = text[start + max_chars // 2 : start + max_chars]
        cut = window.rfind("\n")
        if cut < 0:
            cut = max(window.rfind(" "), window.rfind("\t"))
        end = start + max_chars // 2 + cut + 1 if cut >= 0 else start + max_chars
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def _held_out_runs(pieces: list[str], held: list[bool]) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts) of one document: consecutive pieces on one side joined back."""
    sides: tuple[list[str], list[str]] = ([], [])
    previous = None
    for piece, is_held in zip(pieces, held):
        side = sides[is_held]
        if is_held == previous:
            side[-1] += piece
        else:
            side.append(piece)
        previous = is_held
    return sides


def _hold_out(texts: list[str], text_column: str, validation_fraction: float, seed: int) -> DatasetDict:
    """Hold out pieces by their hash score (topped up to `MIN_HELD_OUT_CHARS`, see the module
    docstring); at least one piece is held out when there are two, and copies of a text stay together."""
    documents = [split_into_pieces(text) for text in texts]
    scores = np.array([split_score(piece, seed) for pieces in documents for piece in pieces])
    lengths = np.array([len(piece) for pieces in documents for piece in pieces])
    held = scores < validation_fraction
    target = min(MIN_HELD_OUT_CHARS, MAX_HELD_OUT_SHARE * lengths.sum())
    if lengths[held].sum() < target or (not held.any() and len(scores) > 1):
        order = np.argsort(scores, kind="stable")  # lowest scores first: still order-independent
        count = min(int(np.searchsorted(np.cumsum(lengths[order]), target)) + 1, len(scores) - 1)
        threshold = scores[order[max(count, 1) - 1]]
        held |= scores <= threshold  # copies of a text share its score, so they stay on one side
        if held.all():  # the text is one piece repeated: hold out some copies rather than none
            held[order[count:]] = False
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    start = 0
    for pieces in documents:
        train, validation = _held_out_runs(pieces, held[start : start + len(pieces)].tolist())
        splits["train"] += train
        splits["validation"] += validation
        start += len(pieces)
    return DatasetDict(
        {split: Dataset.from_dict({text_column: split_texts}) for split, split_texts in splits.items()}
    )


def _hold_out_stream(
    train: IterableDataset, text_column: str, validation_fraction: float, seed: int
) -> IterableDatasetDict:
    """The same piece rule on a stream, without the top-up (that needs the whole dataset)."""

    def side(is_validation: bool):
        def pieces_on_side(texts: list[str]) -> dict:
            out = []
            for text in texts:
                pieces = split_into_pieces(text)
                held = [split_score(piece, seed) < validation_fraction for piece in pieces]
                out += _held_out_runs(pieces, held)[is_validation]
            return {text_column: out}

        return train.map(
            pieces_on_side, input_columns=text_column, batched=True, remove_columns=[text_column]
        )

    return IterableDatasetDict({"train": side(False), "validation": side(True)})


# ----------------------------------------------------------------------------
# Tokenization and packing


def check_compression_factor(compression_factor: int) -> None:
    """C must be a power of two >= 1: the model downsamples by log2(C) stride-2 stages."""
    if compression_factor < 1 or compression_factor & (compression_factor - 1):
        lower = 1 << max(compression_factor, 1).bit_length() - 1
        options = f"pass {lower} or {2 * lower}" if compression_factor > 1 else "pass 1, 2, 4, 8, ..."
        raise ValueError(f"compression factor {compression_factor} must be a power of two >= 1; {options}")


def check_block_size(block_size: int, compression_factor: int) -> None:
    """Blocks must split into whole latent positions: C a power of two, block_size a positive multiple of C."""
    check_compression_factor(compression_factor)
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
    if len(tokenized) == 0:  # no documents: no column either
        return Dataset.from_dict({"input_ids": np.zeros((0, block_size), dtype=np.int64)})
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
    min_train_blocks: int = 0,
) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset]:
    """(train blocks, eval blocks) in torch format, each row "input_ids" (block_size,).

    `dataset` and `tokenizer` are objects or names for `load_text_dataset` / `load_tokenizer`.
    Unless streaming, fewer than `min_train_blocks` training blocks, or no held-out block at
    all, is a one-line error saying how much text the split holds and how much it needs.
    """
    from .tokenizer import load_tokenizer  # imported here: the tokenizer module imports this one

    check_block_size(block_size, compression_factor)
    where = f"dataset {str(dataset)!r}" if isinstance(dataset, (str, os.PathLike)) else "the dataset"
    where = "the embedded corpus" if dataset is None else where
    if not isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        dataset = load_text_dataset(dataset, text_column=text_column, streaming=streaming)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    train, evaluation = (
        tokenize_and_pack(dataset[split], tokenizer, block_size, compression_factor, text_column)
        for split in ("train", "validation")
    )
    if isinstance(train, Dataset):
        for split, blocks, needed, what in (
            ("train", train, min_train_blocks, "a batch needs"),
            ("validation", evaluation, 1, "evaluation needs"),
        ):
            if len(blocks) < needed:
                tokens = _count_tokens(dataset[split][text_column], tokenizer)
                raise ValueError(
                    f"{where} is too small: its {split} split's {tokens:,} tokens make {len(blocks)} blocks of "
                    f"{block_size}; {what} {needed} ({needed * block_size:,} tokens); give more text"
                    + (
                        ", or lower --block_size or --per_device_train_batch_size"
                        if split == "train"
                        else " or lower --block_size"
                    )
                )
    if max_eval_blocks is not None:
        evaluation = (
            evaluation.take(max_eval_blocks)
            if isinstance(evaluation, IterableDataset)
            else evaluation.select(range(min(max_eval_blocks, len(evaluation))))
        )
    return train.with_format("torch"), evaluation.with_format("torch")


def _count_tokens(texts: list[str], tokenizer) -> int:
    """Tokens that `tokenize_and_pack` makes of `texts`, eos included."""
    texts = list(texts)
    return (
        sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
    )
