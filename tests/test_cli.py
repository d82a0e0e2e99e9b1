"""`rqlm` as a new user meets it: bad input gives one line, not a traceback; flags that contradict a
checkpoint are refused; printed summaries state their conditions; training plots read well.

Every command runs through `rqlm.cli.main` on a tiny test-preset model and a corpus the test writes.
"""

import itertools
import re

import pytest
import torch
from conftest import tiny_qwen3_config
from test_trainer import clean_accelerate_state, text_corpus  # noqa: F401  (fixtures)

from rqlm import RQVAEConfig, RQVAEModel, cli
from rqlm.reporting.plots import plot_training_curves, training_title

C = 4


PROGRESS_BAR = re.compile(r"\d+%\||\d+ examples \[|/s\]$")  # tqdm lines of datasets / transformers


def one_line_error(capsys, argv: list[str]) -> str:
    """Run `rqlm ARGV`, expect exit status 1 and one line on stderr besides progress bars; return that line."""
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 1, f"exit status {rc}, stderr: {err[-2000:]}"
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(lines) == 1 and lines[0].startswith(f"rqlm {argv[0]}: error: "), f"expected one line:\n{err[-3000:]}"
    return lines[0]


@pytest.fixture(scope="module")
def vae_dir(text_corpus, tmp_path_factory):  # noqa: F811
    """A saved C=4 RQ-VAE (untrained, test-sized) with the corpus tokenizer, as `rqlm train-vae` leaves it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_corpus / "tokenizer")
    torch.manual_seed(0)
    config = RQVAEConfig(
        backbone_config=tiny_qwen3_config(vocab_size=len(tokenizer)),
        compression_factor=C,
        num_quantizers=2,
        codebook_size=16,
        latent_dim=16,
        num_encoder_layers=0,
        num_decoder_layers=0,
    )
    folder = tmp_path_factory.mktemp("vae")
    RQVAEModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def inspect_flags(vae_dir, text_corpus, *extra) -> list[str]:  # noqa: F811
    return ["inspect", vae_dir, "--dataset", text_corpus / "docs.jsonl", "--block_size", "32",
            "--num_examples", "0", "--output", vae_dir / "report.html", *extra]  # fmt: skip


def vae_flags(text_corpus, output_dir, *extra) -> list[str]:  # noqa: F811
    """`rqlm train-vae` on the test preset: a 2-step run in about a second."""
    return ["train-vae", "--dataset", text_corpus / "docs.jsonl", "--tokenizer", text_corpus / "tokenizer",
            "--backbone", "test", "--block_size", "32", "--latent_dim", "16", "--num_quantizers", "2",
            "--codebook_size", "16", "--per_device_train_batch_size", "4", "--warmup_steps", "1",
            "--max_steps", "2", "--eval_steps", "0", "--eval_batches", "1", "--save_steps", "0",
            "--mixed_precision", "no", "--output_dir", output_dir, *extra]  # fmt: skip


def baseline_flags(text_corpus, output_dir, *extra) -> list[str]:  # noqa: F811
    return ["train-baseline", "--dataset", text_corpus / "docs.jsonl", "--tokenizer", text_corpus / "tokenizer",
            "--backbone", "test", "--block_size", "32", "--per_device_train_batch_size", "4",
            "--max_steps", "2", "--eval_steps", "0", "--eval_batches", "1", "--save_steps", "0",
            "--mixed_precision", "no", "--output_dir", output_dir, *extra]  # fmt: skip


# ----------------------------------------------------------------------------
# (1) a config file that is not valid YAML


def test_broken_yaml_config_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("max_steps: 3\nlearning_rate: [1e-3\nseed: 1\n")
    err = one_line_error(capsys, ["train-vae", "--config", config])
    assert "broken.yaml" in err and "not valid YAML" in err and "line 3" in err, err


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "not found"),
        ("- 1\n- 2\n", "must hold a mapping of option: value"),
        ("max_steps: 3\nlearning_rat: 1.0e-3\n", "has unknown options ['learning_rat']"),
    ],
    ids=["missing", "not-a-mapping", "unknown-option"],
)
def test_bad_config_file_is_one_line(tmp_path, capsys, text, message):
    config = tmp_path / "run.yaml"
    if text is not None:
        config.write_text(text)
    err = one_line_error(capsys, ["train-vae", "--config", config])
    assert "run.yaml" in err and message in err, err


def test_command_line_flags_win_over_the_config_file_over_the_commands_defaults(tmp_path):
    from rqlm.commands import train_vae
    from rqlm.trainer.arguments import training_arguments_from_namespace

    config = tmp_path / "run.yaml"
    # YAML 1.1 reads 1e-3 and none as strings: argparse types them as it types the command line
    config.write_text("learning_rate: 1e-3\nmax_steps: 7\nmax_minutes: 3\neval_batches: none\nsave_total_limit: null\n"
                      "block_size: 64\n")  # fmt: skip
    argv = ["--config", str(config), "--learning_rate", "5e-4", "--max_minutes", "none", "--block_size", "32"]
    args = cli.parse_command("train-vae", train_vae, argv)
    training = training_arguments_from_namespace(args)
    # the command line over the file, for a training flag, an Optional one cleared with 'none', a data flag
    assert training.learning_rate == 5e-4 and training.max_minutes is None and args.block_size == 32
    # the file over the command's defaults (train-vae: max_steps 2400, eval_batches 10)
    assert training.max_steps == 7 and training.eval_batches is None and training.save_total_limit is None
    # train-vae's own defaults where neither sets a flag (TrainingArguments: runs/model, 100 warmup steps)
    assert training.output_dir == "runs/vae" and training.warmup_steps == 50


# ----------------------------------------------------------------------------
# (6) training plots: whole legend labels, a title that says what was trained, one evaluation readable


def short_run_history(steps: int = 12) -> list[dict]:
    """Training losses every step; one evaluation, at the last step (a run with --eval_steps 0)."""
    history = [{"step": s, "loss": 5.0 / s, "recon_loss": 4.9 / s, "quantizer_loss": 0.1 / s} for s in range(1, steps + 1)]
    history.append({"step": steps, "eval_accuracy": 0.42, "eval_accuracy_pos0": 0.6, "eval_accuracy_pos1": 0.3,
                    "eval_usage_perplexity_d0": 9.5, "eval_usage_perplexity_d1": 12.25})  # fmt: skip
    return history


def test_training_plot_labels_title_and_single_evaluation(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its texts
    config = RQVAEConfig(backbone_config=tiny_qwen3_config(), compression_factor=C, num_quantizers=2,
                         codebook_size=16, latent_dim=16)  # fmt: skip
    title = training_title(config)
    path = plot_training_curves(short_run_history(), tmp_path / "curves.png", title=title)
    assert path.is_file() and path.stat().st_size > 10_000
    (fig,) = figures
    assert fig._suptitle.get_text() == title
    assert title.startswith("RQ-VAE: C=4, D=2, K=16, d=16") and tmp_path.name not in title
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    legends = {name: [t.get_text() for t in ax.get_legend().get_texts()] for name, ax in axes.items() if ax.get_legend()}
    assert legends["training loss"] == ["loss", "recon_loss", "quantizer_loss"]
    assert legends["eval_accuracy_pos*"] == ["position 0", "position 1"]
    assert legends["eval_usage_perplexity_d*"] == ["depth 0", "depth 1"]
    # the only evaluation (step 12) shows its value beside a marker, on an axis spanning the whole run
    accuracy = axes["eval_accuracy"]
    assert [t.get_text() for t in accuracy.texts] == ["0.42"]
    assert accuracy.get_xlim()[0] <= 0 and accuracy.get_xlim()[1] >= 12
    assert [t.get_text() for t in axes["eval_usage_perplexity_d*"].texts] == ["9.5", "12.25"]


def test_training_title_of_the_baseline():
    assert training_title(tiny_qwen3_config(vocab_size=300)) == (
        "Qwen3 causal LM (baseline): 2 layers, hidden 32, vocab 300"
    )


# ----------------------------------------------------------------------------
# (2, 3, 5) inspect: flags out of range, or contradicting the checkpoint


def test_inspect_reads_c_from_the_checkpoint(vae_dir, text_corpus, capsys):  # noqa: F811
    assert cli.main([str(a) for a in inspect_flags(vae_dir, text_corpus, "--max_batches", "1")]) == 0
    out = capsys.readouterr().out
    assert "held-out reconstruction accuracy" in out
    assert len(out.split("accuracy by position in chunk:")[1].splitlines()[0].split()) == C


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_batches", "0"], "--max_batches must be at least 1"),
        (["--max_batches", "-1"], "--max_batches must be at least 1"),
        (["--batch_size", "0"], "--batch_size must be at least 1"),
        (["--num_examples", "-1"], "--num_examples must be >= 0"),
        (["--compression_factor", "8", "--block_size", "64"], "--compression_factor 8 differs from the checkpoint's C=4"),
        (["--block_size", "30"], "block size 30 is not a multiple of compression 4"),
        (["--block_size", "4096"], "make 0 blocks of 4096"),
        (["--max_eval_blocks", "0"], "--max_eval_blocks"),
    ],
    ids=["max_batches=0", "max_batches<0", "batch_size=0", "num_examples<0", "compression_factor", "block_size",
         "no_held_out_block", "max_eval_blocks=0"],
)  # fmt: skip
def test_inspect_bad_flags_are_one_line(vae_dir, text_corpus, capsys, flags, message):  # noqa: F811
    err = one_line_error(capsys, inspect_flags(vae_dir, text_corpus, *flags))
    assert message in err, err


def test_inspect_refuses_a_baseline_checkpoint(tmp_path, vae_dir, text_corpus, capsys):  # noqa: F811
    from transformers import Qwen3ForCausalLM

    Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=300)).save_pretrained(tmp_path)
    err = one_line_error(capsys, inspect_flags(tmp_path, text_corpus))
    assert "holds a 'qwen3' checkpoint, not an RQ-VAE" in err, err


def test_reconstruction_figures_need_a_batch(vae_dir):
    from rqlm.evaluation.reconstruction import evaluate_reconstruction

    model = RQVAEModel.from_pretrained(vae_dir)
    batch = {"input_ids": torch.randint(3, 100, (2, 16))}
    with pytest.raises(ValueError, match="max_batches must be at least 1"):
        evaluate_reconstruction(model, [batch], max_batches=0)
    with pytest.raises(ValueError, match="yielded no batch"):
        evaluate_reconstruction(model, [])
    assert evaluate_reconstruction(model, [batch, batch], max_batches=1)["codes_replaced"] >= 0


# ----------------------------------------------------------------------------
# (4, 5) train-vae and train-baseline: a backbone that is not a Qwen3, flags out of range


@pytest.mark.parametrize("command", ["train-baseline", "train-vae"])
def test_an_rq_vae_folder_is_not_a_backbone(command, vae_dir, text_corpus, tmp_path, capsys):  # noqa: F811
    flags = (baseline_flags if command == "train-baseline" else vae_flags)(text_corpus, tmp_path / "out")
    err = one_line_error(capsys, [*flags, "--backbone", vae_dir])
    assert f"backbone '{vae_dir}' holds a model of type 'rq_vae', not a Qwen3 causal LM" in err, err
    assert not (tmp_path / "out").exists(), "it trained anyway"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--backbone", "no-such-org/no-such-model"], "is neither a preset (test, tiny, small, base) nor a loadable model"),
        (["--quantizer_kwargs", '{"bogus_kw": 1}'], "bogus_kw"),
        (["--latent_dim", "0"], "latent_dim must be >= 1"),
        (["--compression_factor", "3", "--block_size", "30"], "power of two"),
        (["--max_steps", "0"], "--max_steps must be at least 1"),
    ],
    ids=["backbone", "quantizer_kwargs", "latent_dim", "compression_factor", "max_steps"],
)
def test_train_vae_bad_flags_are_one_line(text_corpus, tmp_path, capsys, flags, message):  # noqa: F811
    err = one_line_error(capsys, vae_flags(text_corpus, tmp_path / "out", *flags))
    assert message in err, err


# ----------------------------------------------------------------------------
# (7) summaries state the conditions a figure depends on


def test_train_vae_summary_states_steps_time_and_speed(text_corpus, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert cli.main([str(a) for a in vae_flags(text_corpus, out, "--max_steps", "3", "--logging_steps", "1")]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = next(line for line in lines if line.startswith("held-out reconstruction accuracy"))
    assert re.search(r"accuracy \d+\.\d% after 3 steps \(of --max_steps 3\), 384 tokens, \d+ s wall clock, "
                     r"[\d,]+ training tokens/s on this machine$", summary), summary  # fmt: skip



# ----------------------------------------------------------------------------
# --help: every option says what it does


@pytest.mark.parametrize("command", ["train-vae", "train-baseline", "inspect"])
def test_every_option_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    # an option alone on its line, without its help indented on the next one
    bare = [line.split()[0] for line, following in itertools.pairwise(lines)
            if re.fullmatch(r"  --\w+( [A-Z_]+)?", line) and not following.startswith(" " * 10)]
    assert not bare, f"options without help in `rqlm {command} --help`: {bare}"


def help_entries(text: str) -> dict[str, str]:
    """`--flag` -> its help, joined onto one line, from argparse's --help output."""
    entries, flag = {}, None
    for line in text.splitlines():
        match = re.match(r"  (--\w+)( [A-Z0-9_]+| \{[^}]*\})?", line)
        if match:
            flag = match.group(1)
            entries[flag] = line[match.end():]
        elif flag and line.startswith(" " * 10):
            entries[flag] += " " + line
        else:
            flag = None
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


@pytest.mark.parametrize(
    "command, defaults",
    [
        ("train-vae", {"output_dir": "runs/vae", "learning_rate": "0.002", "max_steps": "2400", "eval_batches": "10"}),
        ("train-lm", {"output_dir": "runs/lm", "learning_rate": "0.001", "max_steps": "100000", "max_minutes": "10"}),
        ("train-baseline", {"output_dir": "runs/baseline", "max_steps": "2000", "max_minutes": "None"}),
    ],
)
def test_help_lists_every_training_flag_with_the_commands_default(command, defaults, capsys, monkeypatch):
    import dataclasses

    from rqlm.trainer.arguments import TrainingArguments

    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    entries = help_entries(capsys.readouterr().out)
    for field in dataclasses.fields(TrainingArguments):
        entry = entries.get(f"--{field.name}")
        assert entry is not None, f"`rqlm {command} --help` lacks --{field.name}"
        assert entry.startswith(field.metadata["help"].split()[0]) and "(default: " in entry, entry
    for name, value in defaults.items():
        assert entries[f"--{name}"].endswith(f"(default: {value})"), entries[f"--{name}"]
