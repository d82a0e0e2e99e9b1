"""`rqlm bench` runs end to end on tiny sizes and one repeat: every row is there with positive numbers.
Only the plumbing is tested; the figures themselves depend on the machine."""

import json
import re

import pytest
import torch

from rqlm import cli

TINY = ["--batch_size", "2", "--block_size", "16", "--repeats", "1", "--warmup", "0", "--threads", "1"]


def table_rows(text: str) -> dict[str, list[float]]:
    """Markdown table rows of the output -> {first cell: the numbers of the other cells}."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 1 and not cells[1].startswith("-"):
            numbers = [re.fullmatch(r"([\d,.]+)x?", c) for c in cells[1:]]
            if all(numbers):
                rows[cells[0]] = [float(m.group(1).replace(",", "")) for m in numbers]
    return rows


def test_model_bench_table_and_json(tmp_path, capsys):
    output = tmp_path / "bench.json"
    flags = ["--backbone", "test", "--num_quantizers", "2", "--codebook_size", "16", "--output", str(output)]
    assert cli.main(["bench", *TINY, *flags]) == 0, capsys.readouterr().err
    rows = table_rows(capsys.readouterr().out)
    expected = [
        "train step tokens/s",
        "train step peak MB",
        "eval encode tokens/s (baseline: forward)",
        "eval decode tokens/s (baseline: forward)",
    ]
    assert list(rows) == expected
    assert all(len(values) == 3 and min(values) > 0 for values in rows.values()), rows
    result = json.loads(output.read_text())
    assert [r["metric"] for r in result["rows"]] == expected
    assert result["setup"]["backbone"] == "test" and result["setup"]["threads"] == 1
    for r in result["rows"]:
        assert r["ratio"] == pytest.approx(r["ours"] / r["baseline"])


def test_quantizer_bench_table(capsys):
    pytest.importorskip("vector_quantize_pytorch")
    assert cli.main(["bench", "--quantizers", *TINY]) == 0, capsys.readouterr().err
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 6 and any(name.startswith("ResidualVQ") for name in rows)
    # ms, ms and speedup are positive; FSQ's peak memory may round to 0.0 MB
    assert all(len(values) == 5 and min(values[:3]) > 0 and min(values) >= 0 for values in rows.values()), (
        rows
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--block_size", "18"], "not a multiple of compression 4"),
        pytest.param(
            ["--device", "cuda"],
            "torch sees no GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
    ],
)
def test_bad_input_is_one_line_error(capsys, flags, message):
    assert cli.main(["bench", "--backbone", "test", *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
