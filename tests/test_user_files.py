"""A new user's own text files through every command that takes --dataset. CPU, offline, seconds each.

The files are written here: a .txt of one sentence per line (no blank lines), one long
paragraph, a few lines too small for a batch, a folder mixing .txt/.jsonl/.parquet, and a
file that is not UTF-8. Models use the `test` preset, 32-token blocks and two steps.
"""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rqlm import cli
from rqlm.data import load_text_dataset, train_tokenizer
from rqlm.data.corpus import split_score

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "and",
    "ran",
    "to",
    "house",
    "big",
    "small",
    "red",
    "blue",
    "quickly",
    "slowly",
    "under",
    "over",
]
NUM_LINES = 400
LONG_DOCUMENT_WORDS = 6000
TINY_RUN = [
    "--backbone", "test", "--block_size", "32", "--per_device_train_batch_size", "2", "--max_steps", "2",
    "--eval_steps", "0", "--save_steps", "0", "--max_minutes", "none", "--eval_batches", "1",
]  # fmt: skip
TINY_VAE = ["--num_quantizers", "2", "--codebook_size", "16", "--latent_dim", "16"]


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + "."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> path of each kind of user file."""
    folder = tmp_path_factory.mktemp("user_files")
    rng = random.Random(0)
    lines = [f"{i}: {sentence(rng)}" for i in range(NUM_LINES)]
    (folder / "lines.txt").write_text("\n".join(lines) + "\n")
    (folder / "long.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(LONG_DOCUMENT_WORDS)) + ".")
    (folder / "few.txt").write_text("one short line\nanother short line\na third line\n")
    (folder / "latin1.txt").write_bytes(b"first line\nun caf" + b"\xe9 au lait\n")
    mixed = folder / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("\n".join(lines[:150]) + "\n")
    (mixed / "b.jsonl").write_text(
        "".join(json.dumps({"text": line, "id": i}) + "\n" for i, line in enumerate(lines[150:300]))
    )
    # pandas and polars write large strings, which json's strings do not concatenate with as they are
    pq.write_table(pa.table({"text": pa.array(lines[300:], pa.large_string())}), mixed / "c.parquet")
    return {path.stem: path for path in [*folder.glob("*.txt"), mixed]} | {"lines_list": lines}


@pytest.fixture(scope="module")
def tokenizer_dir(files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(files["lines_list"], vocab_size=300, output_dir=folder)
    return folder


@pytest.fixture(scope="module")
def vae_checkpoint(files, tokenizer_dir, tmp_path_factory):
    """A two-step RQ-VAE trained on the line file, for `inspect`."""
    run = tmp_path_factory.mktemp("vae")
    argv = [
        "train-vae",
        "--dataset",
        str(files["lines"]),
        "--tokenizer",
        str(tokenizer_dir),
        "--output_dir",
        str(run),
    ]
    assert cli.main(argv + TINY_RUN + TINY_VAE) == 0
    return run


def texts(split) -> list[str]:
    return [row["text"] for row in split]


def command(name: str, dataset, tokenizer_dir, tmp_path, checkpoint=None) -> list[str]:
    """argv of `name` on `dataset`, with the test tokenizer and a tiny model where it trains."""
    if name == "train-tokenizer":
        return [name, "--dataset", str(dataset), "--vocab_size", "300", "--output_dir", str(tmp_path / "tok")]
    if name == "inspect":
        return [name, str(checkpoint), "--dataset", str(dataset), "--block_size", "32", "--num_examples", "1"]
    return [
        name,
        "--dataset",
        str(dataset),
        "--tokenizer",
        str(tokenizer_dir),
        "--output_dir",
        str(tmp_path / "run"),
        *TINY_RUN,
        *(TINY_VAE if name == "train-vae" else []),
    ]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rqlm ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------
# Loading


def test_line_file_is_one_document_per_line(files):
    splits = load_text_dataset(files["lines"])
    train, validation = texts(splits["train"]), texts(splits["validation"])
    assert sorted(train + validation) == sorted(files["lines_list"])
    assert validation and set(train).isdisjoint(validation)


def test_split_is_order_independent(files, tmp_path):
    shuffled = list(files["lines_list"])
    random.Random(1).shuffle(shuffled)
    (tmp_path / "shuffled.txt").write_text("\n".join(shuffled) + "\n")
    validation = texts(load_text_dataset(tmp_path / "shuffled.txt")["validation"])
    assert sorted(validation) == sorted(texts(load_text_dataset(files["lines"])["validation"]))


def test_repeated_lines_never_straddle_the_split(files, tmp_path):
    lines = [line for line in files["lines_list"] if split_score(line) > 0.05][
        :8
    ]  # held out only by the top-up
    (tmp_path / "repeated.txt").write_text("\n".join(lines * 30) + "\n")
    splits = load_text_dataset(tmp_path / "repeated.txt")
    train, validation = texts(splits["train"]), texts(splits["validation"])
    assert len(train + validation) == 240 and validation and set(train).isdisjoint(validation)


@pytest.mark.parametrize("streaming", [False, True])
def test_single_long_document_holds_out_pieces(files, streaming):
    document = files["long"].read_text()
    assert "\n" not in document and len(document) > 20_000
    splits = load_text_dataset(files["long"], streaming=streaming)
    train, validation = texts(splits["train"]), texts(splits["validation"])
    assert validation and train
    assert all(part in document for part in train + validation)
    assert sum(map(len, train + validation)) == len(document)  # every character on exactly one side


@pytest.mark.parametrize("streaming", [False, True])
def test_mixed_folder_concatenates_every_type(files, streaming):
    splits = load_text_dataset(files["mixed"], streaming=streaming)
    train, validation = texts(splits["train"]), texts(splits["validation"])
    assert sorted(train + validation) == sorted(files["lines_list"])
    assert validation and set(train).isdisjoint(validation)


def test_non_utf8_file_names_file_and_offset(files):
    with pytest.raises(ValueError) as excinfo:
        load_text_dataset(files["latin1"])
    message = str(excinfo.value)
    assert "\n" not in message and "latin1.txt" in message and "not UTF-8" in message
    assert "offset 17" in message and "0xe9" in message


# ----------------------------------------------------------------------------
# Every command on every file


@pytest.mark.parametrize("kind", ["lines", "long", "mixed"])
@pytest.mark.parametrize("name", ["train-tokenizer", "train-vae", "train-baseline", "inspect"])
def test_commands_run_on_user_files(name, kind, files, tokenizer_dir, vae_checkpoint, tmp_path, capsys):
    code = cli.main(command(name, files[kind], tokenizer_dir, tmp_path, vae_checkpoint))
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    if name == "train-tokenizer":
        held_out = next(line for line in out.splitlines() if line.startswith("held out"))
        assert " 0 documents" not in held_out
    elif name == "inspect":
        assert "held-out reconstruction accuracy" in out
    else:
        data = next(line for line in out.splitlines() if line.startswith("data:"))
        held_out_blocks = int(data.split("held out")[1].split("): ")[1].split(" blocks")[0].replace(",", ""))
        assert held_out_blocks > 0, data


@pytest.mark.parametrize("name", ["train-vae", "train-baseline", "inspect"])
def test_too_small_file_says_how_much_is_needed(name, files, tokenizer_dir, vae_checkpoint, tmp_path, capsys):
    assert cli.main(command(name, files["few"], tokenizer_dir, tmp_path, vae_checkpoint)) == 1
    message = one_line_error(capsys)
    assert "too small" in message and "blocks of 32" in message
    assert (
        "a batch needs 2 (64 tokens)" if name != "inspect" else "evaluation needs 1 (32 tokens)"
    ) in message


@pytest.mark.parametrize("name", ["train-tokenizer", "train-vae", "train-baseline", "inspect"])
def test_non_utf8_file_is_a_one_line_error(name, files, tokenizer_dir, vae_checkpoint, tmp_path, capsys):
    assert cli.main(command(name, files["latin1"], tokenizer_dir, tmp_path, vae_checkpoint)) == 1
    message = one_line_error(capsys)
    assert "latin1.txt" in message and "not UTF-8" in message


# ----------------------------------------------------------------------------
# Flags a small corpus cannot honour


def test_vocab_size_the_corpus_cannot_fill_is_stated(files, tmp_path, capsys):
    argv = [
        "train-tokenizer",
        "--dataset",
        str(files["few"]),
        "--vocab_size",
        "512",
        "--output_dir",
        str(tmp_path),
    ]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    warning = next(line for line in err.splitlines() if "warning" in line)
    size = int(out.split("vocab size ")[1].split(",")[0])
    assert size < 512 and f"only supports {size - 259} merges" in warning and f"has {size} entries" in warning


@pytest.mark.parametrize("compression", ["3", "6", "0"])
def test_compression_factor_is_checked_before_block_size(compression, files, tokenizer_dir, tmp_path, capsys):
    argv = command("train-vae", files["lines"], tokenizer_dir, tmp_path) + [
        "--compression_factor",
        compression,
    ]
    assert cli.main(argv) == 1
    message = one_line_error(capsys)
    assert (
        f"compression factor {compression} must be a power of two" in message and "block size" not in message
    )
