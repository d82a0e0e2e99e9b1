"""`rqlm bench` runs end to end on tiny sizes and one repeat: every row is there with positive numbers.
Only the plumbing is tested; the figures themselves depend on the machine."""

import json
import re
import time

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
    assert cli.main(["bench", "--vae", *TINY, *flags]) == 0, capsys.readouterr().err
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
    assert cli.main(["bench", "--vae", "--backbone", "test", *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- generation (the default mode)
SUMMARY = re.compile(r"speedup batch (\d+) C=4: (\d+\.\d\d)x \(RQ ([\d.]+) tok/s, baseline ([\d.]+) tok/s\)")


def test_generation_bench_quick(tmp_path, capsys):
    from rqlm.benchmarks import generation_tables as tables

    output, plot = tmp_path / "generation.json", tmp_path / "generation.png"
    flags = ["--quick", "--threads", "1", "--no_memory", "--output_json", str(output), "--plot", str(plot),
             "--depth_output", "codes"]
    assert cli.main(["bench", *flags]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(output.read_text())

    # last: one summary line per batch size, exactly in the documented form, with the JSON's figures
    summary = [SUMMARY.fullmatch(line) for line in out[-2:]]
    assert all(summary), out[-2:]
    shape = result["shapes"][0]
    for match, batch in zip(summary, (1, 8)):
        rq, base = match.group(3), match.group(4)
        assert int(match.group(1)) == batch
        rows = [r for r in shape["rows"] if r["batch_size"] == batch]
        rq_row = next(r for r in rows if r["model"] == "RQ C=4")
        fastest = max(r["tokens_per_second"] for r in rows if r["way"])
        assert rq == tables.rate(rq_row["tokens_per_second"]) and base == tables.rate(fastest)
        assert float(match.group(2)) == pytest.approx(rq_row["tokens_per_second"] / fastest, abs=0.006)
    assert result["summary"] == out[-2:]

    # the speed table: every model at both batch sizes, each with the requested 8 new tokens
    names = ["Qwen3 baseline (default)", "Qwen3 baseline (static)", "RQ C=4", "RQ C=4 parallel-depth"]
    speed_rows = [
        line.split("|")[2:5] for line in out if line.startswith("| test |") and line.count("|") == 12
    ]
    assert sorted((name.strip(), int(batch), int(new)) for name, batch, new in speed_rows) == sorted(
        (name, batch, 8) for name in names for batch in (1, 8)
    )
    # the RQ split of the step time: five shares per RQ row
    split = [line for line in out if line.startswith("| test | RQ") and line.count("%") == 5]
    assert len(split) == 4, out
    for row in shape["rows"]:
        assert row["new_tokens"] == 8 and row["tokens_per_second"] > 0
        if row["model"].startswith("RQ"):
            assert set(row["parts_ms"]) == {"spatial", "depth", "decoder", "sampling", "other"}
    assert plot.stat().st_size > 0 and len(result["sweep"]["points"]) == 4
    assert result["setup"]["cpu_kernels"]  # both sides under rqlm.kernels.cpu_kernels unless --no_cpu_kernels


def test_generation_bench_quick_tokens_mode(tmp_path, capsys):
    output = tmp_path / "generation.json"
    flags = ["--quick", "--threads", "1", "--no_memory", "--depth_output", "tokens", "--depth_num_layers", "2",
             "--output_json", str(output)]  # fmt: skip
    assert cli.main(["bench", *flags]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert all(SUMMARY.fullmatch(line) for line in out[-2:]), out[-2:]
    rows = json.loads(output.read_text())["shapes"][0]["rows"]
    # the progress bar, on stderr only: one tick per measured (model, batch) run, the last one named
    assert len(rows) == 6 and "6/6" in captured.err, captured.err  # 2 baseline ways + RQ, at batch 1 and 8
    assert "test RQ C=4 tokens num_layers=2 batch 8" in captured.err, captured.err
    assert "6/6" not in captured.out and "run/s" not in captured.out
    rq = [r for r in rows if r["model"].startswith("RQ")]
    assert {r["model"] for r in rq} == {"RQ C=4 tokens num_layers=2"} and len(rq) == 2  # no parallel-depth row
    assert all(r["depth_output"] == "tokens" and r["new_tokens"] == 8 and r["tokens_per_second"] > 0 for r in rq)


def test_part_timers_split_the_steps_and_leave_the_model_as_it_was(small_layers_prepacked):
    from rqlm.benchmarks import generation_models as gm
    from rqlm.benchmarks import generation_parts as parts
    from rqlm.benchmarks import generation_speed as gs

    model = gm.build_rq_model(gm.shape_config("test", vocab_size=64), compression_factor=4)
    prompt = gm.prompts(2, 8, 64, torch.device("cpu"))
    generate = gs.rq_generate(model, new_tokens=10)
    plain = generate(prompt)
    head = model.vae.lm_head
    reordered = []  # generate's prepacked LM head calls (2 rows x C): the timers must not keep it from them
    watch = head.register_forward_pre_hook(lambda m, args: reordered.append("forward" in vars(m)))
    with parts.part_timers(model, torch.device("cpu")) as times:
        start = time.perf_counter()
        timed = generate(prompt)
        wall = time.perf_counter() - start
    watch.remove()
    torch.testing.assert_close(timed, plain)
    assert reordered and all(reordered) == torch.backends.mkldnn.is_available()
    assert times.steps == 3  # ceil(10 / C=4) spatial positions, each one _sample_codes call
    assert min(times.parts.values()) > 0, times.parts
    # no call is counted twice: the parts fit in the time after the prefill
    assert sum(times.parts.values()) <= wall - (times.first_step_at - start), (times.parts, wall)
    wrapped = [("spatial_forward", model), ("codes_to_quantized", model.vae), ("forward", model.vae.lm_head)]
    assert not [name for name, owner in wrapped if name in owner.__dict__]
    assert not model.vae.lm_head._forward_hooks and not model.vae.lm_head._forward_pre_hooks


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("kernels", [True, False])
def test_the_baseline_runs_its_batch_rows_prepacked_like_the_rq_model(kernels, small_layers_prepacked):
    from rqlm.benchmarks import generation_models as gm
    from rqlm.benchmarks import generation_speed as gs

    baseline = gm.build_baseline(gm.shape_config("test", vocab_size=64)).eval()
    layer = baseline.model.layers[0].mlp.up_proj
    calls = []  # (rows, reordered) of each call
    watch = layer.register_forward_pre_hook(lambda m, args: calls.append((args[0].numel() // m.in_features, "forward" in vars(m))))
    for batch in (1, 4):
        gs.baseline_generate(baseline, 3, "default", kernels=kernels)(gm.prompts(batch, 6, 64, torch.device("cpu")))
    watch.remove()
    assert {rows for rows, _ in calls} == {1, 4, 6, 24}  # prefill and steps at batch 1 and 4
    assert all(reordered == kernels for _, reordered in calls)  # the 1-3 row calls then go to F.linear
    assert "forward" not in vars(layer)


def test_kv_cache_bytes_match_the_baseline_cache():
    from rqlm.benchmarks import generation_models as gm

    config = gm.shape_config("test", vocab_size=64)
    baseline = gm.build_baseline(config)
    prompt = gm.prompts(3, 8, 64, torch.device("cpu"))
    out = baseline.generate(
        prompt,
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        return_dict_in_generate=True,
    )
    cache = out.past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == gm.baseline_cache_bytes(config, 8, 5, 3, torch.float32)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--shapes", "huge"], "unknown shape 'huge'"),
        (["--model", "somewhere"], "--model and --baseline go together"),
        (["--batch_sizes", "1,0"], "integers >= 1"),
    ],
)
def test_generation_bad_input_is_one_line_error(capsys, flags, message):
    code = cli.main(["bench", *flags])
    assert code != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) <= 2, err


def test_peak_memory_measures_an_allocation_and_keeps_the_profilers_native_lines_out_of_stderr(capfd):
    """torch's CPU profiler prints `USDT: ... profiler_start` lines from C++ to file descriptor 2; `peak_bytes`
    silences them (they filled every bench output) and still counts the step's allocation."""
    import sys

    import torch

    from rqlm.benchmarks.speed import peak_bytes

    peak = peak_bytes(lambda: torch.ones(1024, 1024), torch.device("cpu"))
    print("after", file=sys.stderr)
    err = capfd.readouterr().err
    assert peak >= 4 * 1024 * 1024 and "USDT" not in err and "after" in err


def test_plain_bench_measures_the_headline_and_grid_the_whole_grid():
    """`rqlm bench` alone: the tokens mode at the Qwen3-0.6B shape, C=4, batch 1 and 8, no compile (minutes on 2 cores);
    `--grid`: both shapes, C = 4, 2, 8, the tiny baseline compiled; a flag on the command line wins over both."""
    import argparse

    from rqlm.commands.bench import add_arguments, resolve_grid

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    plain = parser.parse_args([])
    resolve_grid(plain)
    assert (plain.shapes, plain.compression_factors, plain.compile_shapes) == (["qwen3-0.6b"], [4], [])
    assert plain.depth_output == "tokens" and plain.batch_sizes == [1, 8] and plain.large_new_tokens == 32
    grid = parser.parse_args(["--grid"])
    resolve_grid(grid)
    assert (grid.shapes, grid.compression_factors, grid.compile_shapes) == (["qwen3-0.6b", "tiny"], [4, 2, 8], ["tiny"])
    chosen = parser.parse_args(["--grid", "--shapes", "tiny"])
    resolve_grid(chosen)
    assert chosen.shapes == ["tiny"] and chosen.compression_factors == [4, 2, 8]
