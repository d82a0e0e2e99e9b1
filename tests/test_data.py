"""The data pipeline: embedded corpus, tokenizer, loaders, packing, and their CLI. CPU, offline, seconds."""

from __future__ import annotations

import json
import os

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from rqlm import cli
from rqlm.data import (
    build_embedded_corpus,
    corpus_statistics,
    get_lm_datasets,
    load_text_dataset,
    load_tokenizer,
    tokenize_and_pack,
    train_tokenizer,
)
from rqlm.data.corpus import CORPUS_VERSION, MIN_DOC_CHARS, embedded_corpus_dir

SMALL_VOCAB = 512
NON_ASCII = "naïve café — 日本語 ✓\n\ttabs"
EDGE_CASES = [
    NON_ASCII,
    "",
    " ",
    "\n\n\n",
    "  two leading\n\n\n  trailing  \t",
    "emoji 🐍🚀 and \r\n crlf",
    "x" * 300,
]
DOCUMENTS = [f"Document {i}: {'alpha beta gamma ' * (i % 7 + 1)}ünïcode {i * 37}." for i in range(40)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private RQLM_CACHE for this module, so nothing touches ~/.cache/rqlm."""
    folder = tmp_path_factory.mktemp("rqlm_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RQLM_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def corpus(cache_dir):
    return build_embedded_corpus()


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus["train"]["text"], vocab_size=SMALL_VOCAB, output_dir=folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(DOCUMENTS)))
    return path


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    return message


# ----------------------------------------------------------------------------
# Embedded corpus


def test_corpus_build_is_deterministic_and_cached(corpus, tmp_path):
    rebuilt = build_embedded_corpus(cache_dir=tmp_path, rebuild=True)
    for split in ("train", "validation"):
        assert list(rebuilt[split]["text"]) == list(corpus[split]["text"])
    meta = json.loads((embedded_corpus_dir(tmp_path) / "meta.json").read_text())
    assert meta["corpus"]["version"] == CORPUS_VERSION


def test_corpus_rebuilds_when_the_builder_version_changes(tmp_path):
    build_embedded_corpus(cache_dir=tmp_path)
    meta_path = embedded_corpus_dir(tmp_path) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["corpus"]["version"] = -1
    meta_path.write_text(json.dumps(meta))
    (embedded_corpus_dir(tmp_path) / "validation.jsonl").write_text(json.dumps({"text": "stale"}) + "\n")
    fresh = build_embedded_corpus(cache_dir=tmp_path)
    assert json.loads(meta_path.read_text())["corpus"]["version"] == CORPUS_VERSION
    assert "stale" not in list(fresh["validation"]["text"])


def test_corpus_splits_are_disjoint_clean_and_sized(corpus):
    train, validation = list(corpus["train"]["text"]), list(corpus["validation"]["text"])
    assert set(train).isdisjoint(validation)
    assert len(set(train)) == len(train) and len(set(validation)) == len(validation)
    assert 0.02 <= len(validation) / (len(train) + len(validation)) <= 0.08
    assert all(len(t) >= MIN_DOC_CHARS and t == t.strip() and "\r" not in t for t in train + validation)
    assert any(t.startswith("module json") for t in train + validation)
    stats = corpus_statistics(corpus)
    assert stats["train"]["documents"] == len(train) and stats["train"]["characters"] > 1_000_000


def test_corpus_leaks_no_environment(corpus):
    texts = "\n".join(corpus["train"]["text"]) + "\n".join(corpus["validation"]["text"])
    secrets = [v for v in os.environ.values() if len(v) >= 12 and "/" not in v and " " not in v]
    assert not [v for v in secrets if v in texts]
    assert " at 0x" not in texts


# ----------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trips_held_out_text_exactly(corpus, tokenizer):
    for text in list(corpus["validation"]["text"]) + EDGE_CASES:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer(NON_ASCII)["input_ids"] == tokenizer(NON_ASCII, add_special_tokens=False)["input_ids"]


def test_tokenizer_special_tokens_and_reload(tokenizer, tokenizer_dir):
    assert len(tokenizer) == SMALL_VOCAB
    assert tokenizer.convert_ids_to_tokens(
        [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    ) == ["<|bos|>", "<|endoftext|>", "<|pad|>"]
    assert tokenizer.decode([tokenizer.eos_token_id]) == "<|endoftext|>"
    reloaded = load_tokenizer(tokenizer_dir)
    assert reloaded(NON_ASCII)["input_ids"] == tokenizer(NON_ASCII)["input_ids"]
    assert reloaded.eos_token_id == tokenizer.eos_token_id


def test_default_tokenizer_is_trained_once_and_cached(cache_dir, corpus):
    first = load_tokenizer(None, vocab_size=SMALL_VOCAB)
    assert first.name_or_path.startswith(str(cache_dir))
    again = load_tokenizer(None, vocab_size=SMALL_VOCAB)
    assert again.name_or_path == first.name_or_path
    assert again(NON_ASCII)["input_ids"] == first(NON_ASCII)["input_ids"]


def test_missing_tokenizer_gives_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        load_tokenizer(tmp_path / "missing")
    assert "does not exist" in one_line_error(excinfo)


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 to fail fast")
def test_unreachable_hub_tokenizer_gives_one_line_error():
    with pytest.raises(FileNotFoundError) as excinfo:
        load_tokenizer("rqlm-tests/no-such-tokenizer")
    assert "neither locally nor on the hub" in one_line_error(excinfo)


# ----------------------------------------------------------------------------
# Loading local files


def write_local_files(folder, documents):
    """The same documents as .txt (paragraphs), .json, .jsonl and .parquet files."""
    folder.mkdir()
    (folder / "docs.txt").write_text("\n\n".join(documents) + "\n")
    (folder / "docs.json").write_text(json.dumps([{"text": d} for d in documents]))
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    Dataset.from_dict({"text": documents}).to_parquet(str(folder / "docs.parquet"))
    return folder


@pytest.mark.parametrize("extension", [".txt", ".json", ".jsonl", ".parquet"])
def test_local_file_loads_into_disjoint_splits(tmp_path, extension):
    folder = write_local_files(tmp_path / "data", DOCUMENTS)
    splits = load_text_dataset(folder / f"docs{extension}")
    train, validation = list(splits["train"]["text"]), list(splits["validation"]["text"])
    assert sorted(train + validation) == sorted(DOCUMENTS)
    assert validation and set(train).isdisjoint(validation)
    again = load_text_dataset(folder / f"docs{extension}")
    assert list(again["validation"]["text"]) == validation


def test_folder_of_jsonl_and_streaming(tmp_path, jsonl_file):
    (tmp_path / "more.jsonl").write_text(json.dumps({"content": "one more document", "id": -1}) + "\n")
    splits = load_text_dataset(tmp_path, text_column="content")
    assert sorted(list(splits["train"]["content"]) + list(splits["validation"]["content"])) == sorted(
        DOCUMENTS + ["one more document"]
    )
    streamed = load_text_dataset(jsonl_file, text_column="content", streaming=True)
    train = [row["content"] for row in streamed["train"]]
    validation = [row["content"] for row in streamed["validation"]]
    assert sorted(train + validation) == sorted(DOCUMENTS) and set(train).isdisjoint(validation)


def test_loader_errors_are_one_line(tmp_path, jsonl_file):
    with pytest.raises(FileNotFoundError) as excinfo:
        load_text_dataset(tmp_path / "missing.jsonl")
    assert "does not exist" in one_line_error(excinfo)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError) as excinfo:
        load_text_dataset(tmp_path / "empty.txt")
    assert "is empty" in one_line_error(excinfo)
    with pytest.raises(ValueError) as excinfo:
        load_text_dataset(jsonl_file, text_column="body")
    assert "available columns: ['content', 'id']" in one_line_error(excinfo)
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError) as excinfo:
        load_text_dataset(tmp_path / "table.csv")
    assert "unsupported extension" in one_line_error(excinfo)
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError) as excinfo:
        load_text_dataset(tmp_path / "blank.jsonl")
    assert "no text" in one_line_error(excinfo)


# ----------------------------------------------------------------------------
# Tokenization and packing


def expected_stream(tokenizer, documents):
    """The reference: each document's ids followed by eos, concatenated in order."""
    stream = []
    for document in documents:
        stream += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return stream


@pytest.mark.parametrize("kind", ["dataset", "selected rows", "stream"])
def test_packing_keeps_every_token_once_in_order(tokenizer, kind):
    block_size = 16
    documents = DOCUMENTS
    dataset = Dataset.from_dict({"text": DOCUMENTS, "id": list(range(len(DOCUMENTS)))})
    if kind == "selected rows":  # an indices mapping, as left by the hash split
        dataset = dataset.select(range(len(DOCUMENTS) - 1, 0, -3))
        documents = list(dataset["text"])
    if kind == "stream":
        dataset = dataset.to_iterable_dataset()
    packed = tokenize_and_pack(dataset, tokenizer, block_size, compression_factor=4)
    blocks = [list(row["input_ids"]) for row in packed]
    stream = expected_stream(tokenizer, documents)
    assert len(blocks) == len(stream) // block_size
    assert all(len(block) == block_size for block in blocks)
    assert [t for block in blocks for t in block] == stream[: len(blocks) * block_size]
    assert stream.count(tokenizer.eos_token_id) == len(documents)


@pytest.mark.parametrize(
    "block_size, compression, message",
    [
        (37, 4, "block size 37 is not a multiple of compression 4; pass 36 or 40"),
        (2, 4, "block size 2 is smaller than compression 4"),
        (0, 1, "block size 0 is smaller than compression 1"),
    ],
)
def test_block_size_must_be_a_multiple_of_compression(tokenizer, block_size, compression, message):
    with pytest.raises(ValueError) as excinfo:
        tokenize_and_pack(Dataset.from_dict({"text": DOCUMENTS}), tokenizer, block_size, compression)
    assert message in one_line_error(excinfo)
    with pytest.raises(ValueError, match=message):
        get_lm_datasets(None, tokenizer, block_size=block_size, compression_factor=compression)


def test_lm_datasets_are_torch_blocks(tokenizer, jsonl_file):
    train, evaluation = get_lm_datasets(
        str(jsonl_file),
        tokenizer,
        block_size=8,
        compression_factor=4,
        text_column="content",
        max_eval_blocks=2,
    )
    assert len(train) > 10 and 1 <= len(evaluation) <= 2
    row = train[0]["input_ids"]
    assert row.shape == (8,) and row.dtype.is_floating_point is False


# ----------------------------------------------------------------------------
# Command line


def test_cli_help_lists_the_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("demo", "train-tokenizer", "train-vae", "train-lm", "generate"))


def test_cli_train_tokenizer_on_a_local_file(tmp_path, jsonl_file, capsys):
    output_dir = tmp_path / "tok"
    code = cli.main(
        [
            "train-tokenizer",
            "--dataset",
            str(jsonl_file),
            "--text_column",
            "content",
            "--vocab_size",
            "300",
            "--output_dir",
            str(output_dir),
        ]
    )
    assert code == 0
    assert "chars/token" in capsys.readouterr().out
    loaded = AutoTokenizer.from_pretrained(output_dir)
    assert 259 < len(loaded) <= 300 and loaded.decode(loaded(NON_ASCII)["input_ids"]) == NON_ASCII


def test_cli_reports_a_missing_dataset_in_one_line(tmp_path, capsys):
    code = cli.main(
        ["train-tokenizer", "--dataset", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "does not exist" in err
