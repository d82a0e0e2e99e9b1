"""`rqlm demo` and its stages (rqlm/pipeline.py): CPU, offline, the embedded corpus.

Covers: `rqlm demo --quick` end to end in a fresh folder (checkpoints, report.md whose numbers parse and
are finite and match metrics.json, the plots as PNGs with their axes labelled and the tables' figures drawn, both
LMs built on the baseline; the headline table's row per model: the tokens mode with its exact perplexity and the
codes mode with its bound, each with its own stages' figures; the continuous latents' columns, GIVT's Gaussian
and energy heads, with their own stages' figures); a second run skips
every stage and retrains nothing; a killed training stage (a checkpoint, no final model) resumes from its
checkpoint; run_stage's skip / force / resume / failure rules with a stand-in command; one-line errors.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
from conftest import run_demo

from rqlm import cli, pipeline
from rqlm.reporting.report import (
    BASELINE,
    GIVT,
    GIVT_ENERGY,
    NOT_APPLICABLE,
    RQ_CODES,
    RQ_MODEL,
    number,
    percent,
    ratio_cell,
)

RQ_STAGES = ("tokenizer", "baseline", "vae", "codes", "lm", "evaluation", "reconstruction", "benchmark", "lm-codes",
             "lm-codes-evaluation", "lm-codes-benchmark")
CONTINUOUS_STAGES = ("gaussian-vae", "gaussian-reconstruction", "givt", "givt-evaluation", "givt-benchmark",
                     "givt-energy", "givt-energy-evaluation", "givt-energy-benchmark")  # fmt: skip
STAGES = RQ_STAGES + CONTINUOUS_STAGES  # --quick has them all
FOLDERS = {stage: stage.replace("-", "_") for stage in STAGES}  # stage -> its folder in the output
WEIGHTS = ("baseline/model.safetensors", "vae/model.safetensors", "lm/model.safetensors",
           "codes/dataset_dict.json", "evaluation/evaluation.json", "reconstruction/inspect.json",
           "benchmark/bench.json", "lm_codes/model.safetensors", "lm_codes_evaluation/evaluation.json",
           "lm_codes_benchmark/bench.json")  # fmt: skip
CONTINUOUS_FILES = ("gaussian_vae/model.safetensors", "givt/model.safetensors", "givt_energy/model.safetensors",
                    "gaussian_reconstruction/inspect.json", "givt_evaluation/evaluation.json",
                    "givt_energy_evaluation/evaluation.json", "givt_benchmark/bench.json",
                    "givt_energy_benchmark/bench.json")  # fmt: skip
PLOTS = ("training_curves.png", "codebook_usage.png", "position_accuracy.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


COLUMNS = ("Qwen3 baseline", "RQ-Transformer (tokens mode)", "RQ-Transformer (codes mode)", "GIVT (Gaussian head)",
           "GIVT (energy head)")  # of --quick: the table's columns, the headline table's rows
TOKENS, CODES, GIVT_COLUMN, ENERGY_COLUMN = 1, 2, 3, 4  # the latent LMs' columns (0: the baseline)
HEADLINE = ("held-out perplexity", "/ baseline", "judged perplexity", "distinct-2", "distinct-3", "repeated 3-grams",
            "speedup")  # the headline table's columns (their labels start so)


def table(report: str) -> dict[str, tuple[str, ...]]:
    """report.md's tables: row label -> its cells. The table of every figure: label -> (baseline, tokens mode,
    codes mode, GIVT Gaussian, GIVT energy); the headline table: model name -> its cells under HEADLINE."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 2 and cells[0]:
            rows[cells[0]] = tuple(cells[1:])
    return rows


def headline(report: str) -> dict[str, dict[str, str]]:
    """The headline table: model name -> {column (a HEADLINE entry) -> cell}."""
    rows = table(report)
    header = rows["model"]
    assert [any(h.startswith(c) for h in header) for c in HEADLINE] == [True] * len(HEADLINE), header
    columns = [next(c for c in HEADLINE if h.startswith(c)) for h in header]
    return {name: dict(zip(columns, cells)) for name, cells in rows.items() if name in COLUMNS}


def row(rows: dict, start: str) -> tuple[str, ...]:
    """The cells of the one row whose label starts with `start`."""
    (label,) = [label for label in rows if label.startswith(start)]
    return rows[label]


def numbers(cell: str) -> list[float]:
    """Every number written in a table cell ('1,234', '5.08M', '81.8%', 'd0 12')."""
    return [float(n.replace(",", "")) for n in re.findall(r"-?\d[\d,]*\.?\d*(?:e[+-]?\d+)?", cell)]


# ----------------------------------------------------------------------------
# (1) end to end


def test_quick_demo_writes_checkpoints_report_metrics_and_plots(demo):
    for name in ("tokenizer/tokenizer.json", *WEIGHTS, *CONTINUOUS_FILES):
        assert (demo / name).is_file(), name
    report = (demo / "report.md").read_text()
    assert "| | " + " | ".join(COLUMNS) + " |" in report
    rows = table(report)
    required = {  # row label starts with -> the columns (0: the baseline) that have the figure
        "bits per token": (0, TOKENS, CODES), "BrierLM": (0, TOKENS, CODES),
        "reconstruction accuracy of the VAE": (CODES,), "codebook usage perplexity per depth": (CODES,),
        "tokens/s, batch 1": (0, TOKENS, CODES), "tokens/s, batch 8": (0, TOKENS, CODES),
        "speedup over the baseline, batch 1": (TOKENS, CODES), "time to first token, batch 1": (0, TOKENS, CODES),
        "time to first token, batch 8": (0, TOKENS, CODES), "peak memory, batch 1": (0, TOKENS, CODES),
        "peak memory, batch 8": (0, TOKENS, CODES), "parameters": (0, TOKENS, CODES),
    }  # fmt: skip
    for start, columns in required.items():
        cells = row(rows, start)
        if start == "BrierLM" and cells[TOKENS] == "n/a":  # before `rqlm evaluate` has BrierLM
            continue
        assert [bool(numbers(cells[i])) for i in range(3)] == [i in columns for i in range(3)], (start, cells)
    for label, cells in rows.items():
        for value in numbers(" ".join(cells)):
            assert math.isfinite(value), (label, cells)

    metrics = json.loads((demo / "metrics.json").read_text())
    for model in (RQ_MODEL, RQ_CODES, BASELINE):
        for key in ("perplexity", "perplexity_kind", "bits_per_token", "brier_lm", "judged_perplexity", "distinct_2",
                    "distinct_3", "repeated_3gram_rate", "tokens_per_second_batch1", "tokens_per_second_batch8",
                    "time_to_first_token_ms_batch1", "peak_memory_mb_batch8", "parameters"):
            assert key in metrics[model], (model, key)
    for key in ("reconstruction_accuracy", "reconstruction_accuracy_by_position", "usage_perplexity_by_depth"):
        assert key in metrics[RQ_CODES] and key not in metrics[RQ_MODEL], key  # the tokens mode reads no codes
    assert len(metrics[RQ_CODES]["usage_perplexity_by_depth"]) == metrics["conditions"]["num_quantizers"]
    assert len(metrics[RQ_CODES]["reconstruction_accuracy_by_position"]) == metrics["conditions"]["compression_factor"]
    assert {"machine", "budget_minutes", "training", "stage_seconds"} <= set(metrics["conditions"])
    assert set(metrics["conditions"]["stage_seconds"]) == set(STAGES)

    for name in PLOTS:
        data = (demo / "plots" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name
        assert f"plots/{name}" in report
    assert "## Sample continuations" in report and "Greedy decoding" in report and "<mark" in report
    for column in COLUMNS:
        assert f"**{column}:**" in report  # every model continues the same prompts


def test_headline_table_has_a_row_per_model_with_its_own_stages_figures(demo):
    """The tokens mode (exact perplexity) and the codes mode (its bound) each beside the baseline, every cell the
    figure its own `rqlm evaluate` and `rqlm bench` wrote."""
    rows = headline((demo / "report.md").read_text())
    assert list(rows) == list(COLUMNS)
    evaluations = {model: json.loads((demo / folder / "evaluation.json").read_text())
                   for model, folder in ((RQ_MODEL, "evaluation"), (RQ_CODES, "lm_codes_evaluation"))}
    benches = {model: json.loads((demo / folder / "bench.json").read_text())
               for model, folder in ((RQ_MODEL, "benchmark"), (RQ_CODES, "lm_codes_benchmark"))}
    tokens, codes = evaluations[RQ_MODEL], evaluations[RQ_CODES]
    assert "perplexity" in tokens and "perplexity" not in codes  # exact against a bound, as `rqlm evaluate` says
    assert rows[COLUMNS[TOKENS]]["held-out perplexity"] == f"{number(tokens['perplexity'])} (exact)"
    assert rows[COLUMNS[CODES]]["held-out perplexity"] == f"{number(codes['perplexity_bound'])} (bound)"
    assert rows[COLUMNS[0]]["held-out perplexity"] == f"{number(tokens['baseline_perplexity'])} (exact)"
    assert tokens["baseline_perplexity"] == codes["baseline_perplexity"]  # the same held-out tokens
    metrics = json.loads((demo / "metrics.json").read_text())
    for model, column in ((RQ_MODEL, TOKENS), (RQ_CODES, CODES)):
        evaluation, cells, figures = evaluations[model], rows[COLUMNS[column]], metrics[model]
        assert cells["/ baseline"] == ratio_cell(evaluation["ratio"])
        assert figures["perplexity"] == evaluation["perplexity_bound"] and figures["perplexity_ratio"] == evaluation["ratio"]
        assert cells["judged perplexity"] == number(evaluation["judged_perplexity_rq_samples"])
        assert cells["distinct-2"] == number(evaluation["distinct_2_rq_samples"])
        assert cells["distinct-3"] == number(evaluation["distinct_3_rq_samples"])
        assert cells["repeated 3-grams"] == percent(evaluation["repeated_3gram_rate_rq_samples"])
        speedups = []
        for batch in (1, 8):
            shape_rows = benches[model]["shapes"][0]["rows"]
            (measured,) = [r for r in shape_rows if r["way"] is None and r["batch_size"] == batch]
            assert measured["depth_output"] == ("tokens" if model == RQ_MODEL else "codes")
            assert figures[f"tokens_per_second_batch{batch}"] == measured["tokens_per_second"] > 0
            speedups.append(ratio_cell(figures[f"speedup_batch{batch}"]))
        assert cells["speedup"] == " / ".join(speedups)
    assert rows[COLUMNS[ENERGY_COLUMN]]["held-out perplexity"] == NOT_APPLICABLE  # likelihood-free


def test_plots_label_their_axes_keep_their_titles_and_draw_the_tables_figures(demo, tmp_path, monkeypatch):
    """Every plot: a y label on each panel, titles inside the figure; the training curves' star at the end of each
    held-out curve is written as the tables write the figure (the baseline's, both modes' and GIVT's perplexity)."""
    from rqlm.reporting import report_plots
    from rqlm.reporting.report import write_plots

    figures = {}

    def save(fig, path):
        fig.tight_layout()
        fig.canvas.draw()
        figures[path.name] = (fig, fig.get_window_extent())
        return path

    monkeypatch.setattr(report_plots, "_save", save)
    metrics = json.loads((demo / "metrics.json").read_text())
    run = tmp_path / "run"
    for folder in ("baseline", "vae", "lm", "lm_codes", "gaussian_vae", "givt", "givt_energy"):
        (run / folder).mkdir(parents=True)
        shutil.copy(demo / folder / "metrics.jsonl", run / folder / "metrics.jsonl")
    write_plots(run, metrics)
    assert set(figures) == set(PLOTS)
    for name, (fig, bounds) in figures.items():
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            assert ax.get_ylabel(), (name, ax.get_title())
            title = ax.title.get_window_extent()
            assert title.x0 >= bounds.x0 and title.x1 <= bounds.x1 and title.y1 <= bounds.y1, (name, ax.get_title())
    written = {t.get_text() for ax in figures["training_curves.png"][0].axes for t in ax.texts}
    rows = headline((demo / "report.md").read_text())
    for column in (0, TOKENS, CODES, GIVT_COLUMN):
        assert rows[COLUMNS[column]]["held-out perplexity"].split(" (")[0] in written, column


def test_both_lms_are_built_on_the_baseline_frozen_then_unfrozen_the_tokens_mode_first(demo):
    for folder, mode in (("lm", "tokens"), ("lm_codes", "codes")):  # "lm": train-lm's default, the tokens mode
        config = json.loads((demo / folder / "config.json").read_text())
        assert config["depth_output"] == mode and config["freeze_backbone_steps"] > 0
        assert f"spatial backbone: {demo / 'baseline'}" in (demo / folder / "README.md").read_text()
        records = [json.loads(line) for line in (demo / folder / "metrics.jsonl").read_text().splitlines()]
        backbone_lrs = [r["lr_backbone"] for r in records if "lr_backbone" in r]
        assert backbone_lrs[0] == 0 and backbone_lrs[-1] > 0  # frozen at first, trained at the end
    assert json.loads((demo / "lm" / "config.json").read_text())["spatial_input"] == "token_embeddings"


def test_quick_demo_has_the_givt_columns_with_their_own_stages_figures(demo):
    """The GIVT columns show metrics.json's numbers, which are their own stages' (not the RQ model's): the
    Gaussian head's ELBO bound, BrierLM and tokens/s for both heads, the Gaussian VAE's reconstruction."""
    rows = table((demo / "report.md").read_text())
    metrics = json.loads((demo / "metrics.json").read_text())
    inspect = json.loads((demo / "gaussian_reconstruction" / "inspect.json").read_text())
    for column, model in ((GIVT_COLUMN, GIVT), (ENERGY_COLUMN, GIVT_ENERGY)):
        evaluation = json.loads((demo / f"{model}_evaluation" / "evaluation.json").read_text())
        bench = json.loads((demo / f"{model}_benchmark" / "bench.json").read_text())
        figures = metrics[model]
        for batch in (1, 8):
            (measured,) = [r for r in bench["shapes"][0]["rows"] if r["way"] is None and r["batch_size"] == batch]
            assert measured["head"] == ("gaussian" if model == GIVT else "energy")
            assert figures[f"tokens_per_second_batch{batch}"] == measured["tokens_per_second"] > 0
            assert row(rows, f"tokens/s, batch {batch}")[column] == number(measured["tokens_per_second"])
            assert math.isfinite(figures[f"speedup_batch{batch}"]) and figures[f"speedup_batch{batch}"] > 0
            assert row(rows, f"speedup over the baseline, batch {batch}")[column] == \
                f"{figures[f'speedup_batch{batch}']:.2f}×"
        assert figures["brier_lm"] == evaluation["brier_lm"] and math.isfinite(figures["brier_lm"])
        assert row(rows, "BrierLM")[column].startswith(number(evaluation["brier_lm"]))
        assert figures["reconstruction_accuracy"] == inspect["accuracy"]
        assert row(rows, "reconstruction accuracy of the VAE")[column] == percent(inspect["accuracy"])
        assert row(rows, "codebook usage")[column] == NOT_APPLICABLE  # no codebook
        assert numbers(row(rows, "parameters")[column])
        assert f"spatial backbone: {demo / 'baseline'}" in (demo / model / "README.md").read_text()
    # the Gaussian head has the ELBO bound; the likelihood-free energy head has none
    bound = json.loads((demo / "givt_evaluation" / "evaluation.json").read_text())["perplexity_bound"]
    assert metrics[GIVT]["perplexity"] == bound and math.isfinite(bound) and bound > 1
    assert rows[COLUMNS[GIVT_COLUMN]][0] == f"{number(bound)} (bound)"  # the headline table's row
    assert metrics[GIVT_ENERGY]["perplexity"] is None and rows[COLUMNS[ENERGY_COLUMN]][0] == NOT_APPLICABLE
    assert row(rows, "reconstruction accuracy, decoding a posterior sample")[GIVT_COLUMN] == \
        percent(inspect["accuracy_sampled"])
    assert {"gaussian_vae", GIVT, GIVT_ENERGY} <= set(metrics["conditions"]["training"])
    assert metrics["conditions"]["training"][GIVT]["steps"] == 8
    report = (demo / "report.md").read_text()
    assert "**GIVT (Gaussian head):**" in report and "**GIVT (energy head):**" in report  # sample continuations


def test_report_without_continuous_latents_has_the_baseline_and_both_rq_modes(demo, tmp_path):
    """The default demo (no --continuous): the baseline and the RQ model's two modes only."""
    from rqlm.reporting.report import write_report

    run = tmp_path / "run"
    shutil.copytree(demo, run)
    write_report(run, stage_seconds={}, budgets={}, block_size=128, quick=True, continuous=False)
    report = (run / "report.md").read_text()
    assert ("| | Qwen3 baseline | RQ-Transformer (tokens mode) | RQ-Transformer (codes mode) |\n|---|---:|---:|---:|\n"
            in report and "GIVT" not in report)
    rows = table(report)
    assert all(len(cells) == 3 for name, cells in rows.items() if name not in (*COLUMNS, "model"))
    assert list(headline(report)) == list(COLUMNS[:3])
    metrics = json.loads((run / "metrics.json").read_text())
    assert GIVT not in metrics and GIVT_ENERGY not in metrics and set(metrics["conditions"]["training"]) == {
        "baseline", "vae", "lm", "lm_codes"}


def test_continuous_stages_only_with_the_flag_or_quick():
    import argparse

    from rqlm.commands import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    for flags, expected in (([], RQ_STAGES), (["--continuous"], STAGES), (["--quick"], STAGES)):
        args = parser.parse_args(flags)
        names = [name for name, *_ in demo.stages(args, demo.QUICK if args.quick else demo.Settings())]
        assert tuple(names) == expected, flags
    args = parser.parse_args(["--continuous", "--givt_minutes", "1.5"])
    (givt,) = [argv for name, _, argv, _ in demo.stages(args, demo.Settings()) if name == "givt"]
    assert givt[givt.index("--max_minutes") + 1] == 1.5 and givt[givt.index("--head") + 1] == "gaussian"
    assert givt[givt.index("--backbone") + 1] == demo.Path("runs/demo/baseline")


# ----------------------------------------------------------------------------
# (2) a second run reuses the finished stages


def test_second_run_skips_every_stage_and_retrains_nothing(demo, capsys):
    before = {name: (demo / name).stat().st_mtime_ns for name in (*WEIGHTS, *CONTINUOUS_FILES)}
    capsys.readouterr()
    assert run_demo(demo) == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert f"== {stage}: skipped" in out, stage
        assert re.search(rf"^{stage}\s+[\d.]+\s+skipped\s", out, re.MULTILINE), stage  # the summary table
    assert re.search(r"^report\s+[\d.]+\s+ran\s", out, re.MULTILINE)
    assert {name: (demo / name).stat().st_mtime_ns for name in (*WEIGHTS, *CONTINUOUS_FILES)} == before
    # the report of the rerun still gives each stage's seconds from the run that did the work
    seconds = json.loads((demo / "metrics.json").read_text())["conditions"]["stage_seconds"]
    assert set(seconds) == set(STAGES) and seconds["lm"] > 0


# ----------------------------------------------------------------------------
# (3) a killed training stage resumes


def test_killed_lm_stage_resumes_from_its_checkpoint(demo, tmp_path, capsys):
    """The LM stage as a kill leaves it: checkpoint step-4, no final weights or model card; the later stages'
    outputs, left from an earlier run, are stale and must be redone."""
    run = tmp_path / "run"
    for stage in STAGES:
        shutil.copytree(demo / FOLDERS[stage], run / FOLDERS[stage])
    shutil.rmtree(run / "lm" / "checkpoints" / "step-8")
    for name in ("README.md", "model.safetensors", "config.json"):
        (run / "lm" / name).unlink()
    # a mark in the checkpoint's history: a resumed run continues that history, a fresh one starts its own
    state_file = run / "lm" / "checkpoints" / "step-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["history"][0]["resumed_mark"] = 1
    state_file.write_text(json.dumps(state))
    capsys.readouterr()

    assert run_demo(run) == 0
    out = capsys.readouterr().out
    for stage in ("tokenizer", "baseline", "vae", "codes"):
        assert f"== {stage}: skipped" in out, stage
    assert "== lm: resuming the unfinished run" in out and "resumed from step 4 of 8" in out
    records = [json.loads(line) for line in (run / "lm" / "metrics.jsonl").read_text().splitlines()]
    assert records[0].get("resumed_mark") == 1 and records[-1]["step"] == 8
    for stage in (*RQ_STAGES[RQ_STAGES.index("lm") + 1:], *CONTINUOUS_STAGES):  # after the LM: redone
        assert f"== {stage}: rqlm" in out, stage
    assert (run / "lm" / "model.safetensors").is_file() and (run / "report.md").is_file()


# ----------------------------------------------------------------------------
# (4) run_stage's rules, with a stand-in for `rqlm` (no training)


@pytest.fixture
def fake_rqlm(monkeypatch):
    """Replace rqlm.cli.main: record each argv, write a final file into --output_dir, return `status[0]`."""
    calls, status = [], [0]

    def main(argv):
        calls.append(list(argv))
        out = argv[argv.index("--output_dir") + 1]
        (pipeline.Path(out) / pipeline.TRAINED).write_text("done")
        return status[0]

    monkeypatch.setattr(cli, "main", main)
    return calls, status


def demo_args(output_dir):
    """`rqlm demo --quick --output_dir DIR` parsed, to call the command's main past the (stand-in) cli.main."""
    import argparse

    from rqlm.commands import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return demo.main, parser.parse_args(["--quick", "--output_dir", str(output_dir)])


def test_run_stage_runs_skips_forces_and_logs(fake_rqlm, tmp_path):
    calls, _ = fake_rqlm
    out, log = tmp_path / "baseline", pipeline.StageLog()
    argv = ["train-baseline", "--output_dir", out]
    assert pipeline.run_stage("baseline", out, argv, done_file=pipeline.TRAINED, log=log) is True
    assert pipeline.run_stage("baseline", out, argv, done_file=pipeline.TRAINED, log=log) is False
    assert len(calls) == 1
    (out / "stale.txt").write_text("from an earlier run")
    assert pipeline.run_stage("baseline", out, argv, done_file=pipeline.TRAINED, force=True, log=log) is True
    assert len(calls) == 2 and not (out / "stale.txt").exists()  # force starts from an empty folder
    assert [(r.name, r.ran) for r in log.records] == [("baseline", True), ("baseline", False), ("baseline", True)]
    assert "skipped" in log.summary() and log.summary().splitlines()[-1].startswith("total")


def test_run_stage_resumes_only_a_training_command_with_a_checkpoint(fake_rqlm, tmp_path):
    calls, _ = fake_rqlm
    for command in ("train-lm", "train-givt", "encode"):
        out = tmp_path / command
        (out / "checkpoints" / "step-2").mkdir(parents=True)
        pipeline.run_stage(command, out, [command, "--output_dir", out], done_file=pipeline.TRAINED)
    assert calls[0][-2:] == ["--resume_from_checkpoint", "latest"]
    assert calls[1][-2:] == ["--resume_from_checkpoint", "latest"]  # the GIVT stages resume too
    assert "--resume_from_checkpoint" not in calls[2]
    fresh = tmp_path / "fresh"
    pipeline.run_stage("lm", fresh, ["train-lm", "--output_dir", fresh], done_file=pipeline.TRAINED)
    assert "--resume_from_checkpoint" not in calls[3]


def test_run_stage_failure_is_one_line_naming_the_stage(fake_rqlm, tmp_path):
    calls, status = fake_rqlm
    status[0] = 1
    with pytest.raises(RuntimeError) as excinfo:
        pipeline.run_stage("vae", tmp_path / "vae", ["train-vae", "--output_dir", tmp_path / "vae"])
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith("stage vae failed") and "resume" in message
    # through `rqlm demo`: the CLI's one-line error (exit 1), and the later stages never start
    main, args = demo_args(tmp_path / "demo")
    with pytest.raises(cli.CLIError, match="^stage tokenizer failed"):
        main(args)
    assert [argv[0] for argv in calls] == ["train-vae", "train-tokenizer"]


def test_an_interrupted_stage_stops_the_demo(fake_rqlm, tmp_path, capsys):
    calls, status = fake_rqlm
    status[0] = pipeline.INTERRUPTED  # what `rqlm train-*` returns after saving on Ctrl-C
    main, args = demo_args(tmp_path / "demo")
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert len(calls) == 1 and "stage tokenizer interrupted" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# (5) flags


def test_help_states_the_budgets(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "at most 15 minutes on a 2-core CPU" in text and "--quick" in text and "--lm_minutes" in text


def test_a_non_positive_budget_is_one_line(capsys, tmp_path):
    assert cli.main(["demo", "--lm_minutes", "0", "--output_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lm_minutes must be > 0" in err


def test_data_only_stops_after_the_tokenizer_with_corpus_statistics(tmp_path, capsys):
    assert run_demo(tmp_path / "run", "--data_only", "--vocab_size", 512) == 0
    out = capsys.readouterr().out
    assert "validation" in out and "chars/token" in out and "documents" in out
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file() and not (tmp_path / "run" / "baseline").exists()
