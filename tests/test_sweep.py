"""`rqlm sweep`: the YAML grid and its checks, training FLOPs against hand counts, and a tiny sweep end to end."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from rqlm import cli
from rqlm.pipeline import fresh_accelerate_state
from rqlm.sweeps.flops import params_per_token, training_flops
from rqlm.sweeps.runner import code_bits, load_sweep_config, plan_sweeps, to_argv

REPO = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
TINY = {"max_steps": 3, "max_minutes": "none", "save_steps": 0, "logging_steps": 1,
        "per_device_train_batch_size": 4, "mixed_precision": "no"}  # fmt: skip


@pytest.fixture(autouse=True)
def clean_accelerate_state():
    fresh_accelerate_state()
    yield
    fresh_accelerate_state()


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def grid(**sweeps) -> dict:
    """A sweep file over the defaults with the given sweeps (name -> {kind, points})."""
    return {"data": {"block_size": 32}, "vae": {"num_quantizers": 2, "codebook_size": 32}, "sweeps": sweeps}


# ----------------------------------------------------------------------------
# (1) the grid: expansion, shared folders, checks before anything trains


def test_points_expand_to_stage_command_lines_and_equal_recipes_share_folders(tmp_path):
    config = load_sweep_config(write_yaml(tmp_path / "s.yaml", grid(
        compression={"kind": "compression", "points": [
            {"name": "C2", "vae": {"compression_factor": 2}}, {"name": "C4", "vae": {"compression_factor": 4}}]},
        pretrained={"kind": "backbone", "points": [
            {"name": "scratch"}, {"name": "pretrained", "lm": {"backbone": "baseline", "freeze_backbone_steps": 5}}]},
        families={"kind": "quantizer", "points": [
            {"name": "rvq", "vae": {"codebook_size": 16}},
            {"name": "fsq", "vae": {"quantizer_type": "fsq", "num_quantizers": 1, "codebook_size": 256,
                                    "quantizer_kwargs": {"levels": [8, 8, 4]}}}]},
    )))  # fmt: skip
    plans = {f"{p.sweep.name}/{p.point.name}": p for p in plan_sweeps(config, config.sweeps, tmp_path / "out")}
    c2, c4, scratch, pretrained = (plans[k] for k in ("compression/C2", "compression/C4", "pretrained/scratch",
                                                      "pretrained/pretrained"))
    # C=4 spelled out and C=4 by default are one VAE and one LM; C=2 is another
    assert c4.vae_dir == scratch.vae_dir == pretrained.vae_dir != c2.vae_dir
    assert c4.lm_dir == scratch.lm_dir != pretrained.lm_dir
    assert c2.vae_argv[:1] == ["train-vae"] and c2.vae_argv[c2.vae_argv.index("--compression_factor") + 1] == "2"
    lm = pretrained.lm_argv
    assert lm[lm.index("--backbone") + 1] == str(tmp_path / "out" / "baseline")
    assert lm[lm.index("--codes") + 1] == str(pretrained.codes_dir)
    assert lm[lm.index("--block_size") + 1] == "32"  # the data flags reach every stage
    assert lm[lm.index("--depth_output") + 1] == "codes"  # the sweeps compare codes-mode LMs (train-lm's default: tokens)
    assert c4.bench_argv is not None and scratch.bench_argv is None  # speed only where the sweep asks for it
    assert plans["families/fsq"].lm_argv is None  # a quantizer sweep trains the VAE only
    assert code_bits("fsq", 1, 256, {"levels": [8, 8, 4]}) == code_bits("residual_vq", 2, 16, {}) == 8


def test_flag_values_become_command_line_switches():
    argv = to_argv("train-vae", {"decoder_sees_previous_tokens": False, "quantizer_kwargs": {"decay": 0.9},
                                 "max_minutes": None, "streaming": True})
    assert argv == ["train-vae", "--no-decoder_sees_previous_tokens", "--quantizer_kwargs", '{"decay": 0.9}',
                    "--max_minutes", "none", "--streaming"]
    assert to_argv("bench", {"batch_sizes": [1, 8], "memory": False, "compile_shapes": []}) == [
        "bench", "--batch_sizes", "1,8", "--no_memory", "--compile_shapes", ""]


def test_bit_budget_counts_levels_for_fsq_and_depth_times_log2_k_otherwise():
    assert code_bits("residual_vq", 8, 256, {}) == code_bits("residual_vq", 4, 65536, {}) == 64
    assert code_bits("vq", 2, 64, {}) == code_bits("simvq", 1, 4096, {}) == 12
    assert code_bits("fsq", 1, 4096, {"levels": [8, 8, 8, 8]}) == 12
    assert code_bits("fsq", 1, 256, {}) == pytest.approx(math.log2(8 * 6 * 5))  # the paper's levels for K=256


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["sweeps"]["s"].update(kind="bogus"), "sweep 's' has unknown kind 'bogus'; choose from"),
        (lambda c: c["sweeps"]["s"]["points"][0].update(vae={"no_such_flag": 1}),
         "sweep 's' point 'a' vae: `rqlm train-vae` has no flag --no_such_flag"),
        (lambda c: c["sweeps"]["s"]["points"][0].update(lm={"depth_num_layers": "two"}),
         "sweep 's' point 'a' lm: `rqlm train-lm`: argument --depth_num_layers: invalid int value: 'two'"),
        (lambda c: c["sweeps"]["s"].update(points=[]), "sweep 's' has an empty grid"),
        (lambda c: c.update(sweeps={}), "names no sweeps"),
        (lambda c: c.update(lm={"output_dir": "x"}), "'lm' ... --output_dir is set by the sweep; remove it"),
        (lambda c: c.update(evaluate={"bogus": 1}), "'evaluate': `rqlm evaluate` has no flag --bogus"),
        (lambda c: c.update(data={"compression_factor": 2}), "compression_factor goes under vae"),
        (lambda c: c.update(optimizer={}), "has unknown keys ['optimizer']"),
        (lambda c: c["sweeps"]["s"].update(kind="codebook", points=[
            {"name": "a", "vae": {"codebook_size": 256, "num_quantizers": 8}},
            {"name": "b", "vae": {"codebook_size": 256, "num_quantizers": 4}}]),
         "sweep 's' compares at one bit budget, but point 'b' has 32.0 bits per position and 'a' 64.0"),
        (lambda c: c["sweeps"]["s"].update(kind="quantizer", points=[{"name": "a", "lm": {"lora_r": 4}}]),
         "a quantizer sweep trains only the VAE; remove its `lm:` flags"),
    ],
    ids=["unknown-kind", "unknown-flag", "bad-value", "empty-grid", "no-sweeps", "managed-flag", "unknown-evaluate-flag",
         "data-has-C", "unknown-section", "unmatched-bits", "lm-flags-in-vae-only-sweep"],
)
def test_bad_sweep_file_is_a_one_line_error_before_anything_trains(tmp_path, capsys, change, message):
    config = grid(s={"kind": "compression", "points": [{"name": "a"}]})
    change(config)
    out = tmp_path / "out"
    assert cli.main(["sweep", str(write_yaml(tmp_path / "bad.yaml", config)), "--output_dir", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rqlm sweep: error:"), lines
    for part in message.split(" ... "):
        assert part in lines[0]
    assert not out.exists()


def test_missing_file_and_unknown_only_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["sweep", str(tmp_path / "none.yaml")]) == 1
    err = capsys.readouterr().err
    assert "sweep file" in err and "not found" in err
    path = write_yaml(tmp_path / "s.yaml", grid(s={"kind": "compute", "points": [{"name": "a"}]}))
    assert cli.main(["sweep", str(path), "--only", "other", "--output_dir", str(tmp_path / "out")]) == 1
    assert "--only 'other'" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["cpu.yaml", "qwen3-0.6b.yaml"])
def test_shipped_sweep_files_load_and_cover_every_kind(name):
    config = load_sweep_config(REPO / "configs" / "sweeps" / name)
    assert {s.kind for s in config.sweeps} == {"compression", "codebook", "quantizer", "backbone", "compute"}
    plans = plan_sweeps(config, config.sweeps, Path("runs/sweep"))
    compression = [p.vae_args.compression_factor for p in plans if p.sweep.kind == "compression"]
    assert sorted(compression) == [2, 4, 8]


# ----------------------------------------------------------------------------
# (2) training FLOPs against hand counts


class Toy(nn.Module):
    """Embedding -> Conv1d (halves T) -> ConvTranspose1d (doubles it) -> Linear, and a frozen Linear 'vae'."""

    def __init__(self, vocab=10, hidden=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.down = nn.Conv1d(hidden, hidden, kernel_size=2, stride=2)
        self.up = nn.ConvTranspose1d(hidden, hidden, kernel_size=2, stride=2)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.vae = nn.Linear(hidden, 3)

    def forward(self, input_ids):
        x = self.embed(input_ids)  # (B, T, H)
        x = self.up(self.down(x.transpose(1, 2))).transpose(1, 2)  # (B, T, H)
        return self.head(x) + self.vae(x).sum()


def test_params_per_token_is_the_hand_count_of_weight_applications():
    ids = torch.zeros(2, 6, dtype=torch.long)
    trained, frozen = params_per_token(Toy(), ids, frozen_prefixes=("vae.",))
    down = (4 * 4 * 2 + 4) / 2  # one application per output position, T / 2 of them
    up = (4 * 4 * 2 + 4) / 2  # one application per input position, T / 2 of them
    head = 4 * 10  # once per token; the embedding lookup costs nothing
    assert trained == down + up + head
    assert frozen == 4 * 3 + 3
    assert training_flops(trained, frozen, tokens=1000) == (6 * (down + up + head) + 2 * 15) * 1000


def test_baseline_flops_are_six_n_per_token_with_n_the_weights_of_layers_and_lm_head():
    config = Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    h, i, q, kv = 16, 24, 2 * 8, 1 * 8
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i  # q, k, v, o projections and the SwiGLU MLP
    by_hand = 2 * per_layer + h * 50  # + the (tied) LM head; embeddings and norms cost nothing
    trained, frozen = params_per_token(Qwen3ForCausalLM(config), torch.zeros(1, 12, dtype=torch.long))
    assert (trained, frozen) == (by_hand, 0)


def test_rq_lm_counts_spatial_once_per_chunk_and_the_vae_encoder_as_frozen():
    from test_rq_transformer import make_lm

    model = make_lm()
    c, d = model.compression_factor, model.num_quantizers
    trained, frozen = params_per_token(model, torch.zeros(1, 4 * c, dtype=torch.long))
    spatial = sum(m.weight.numel() for m in model.spatial.modules() if isinstance(m, nn.Linear))
    vae_linear = sum(m.weight.numel() for m in model.vae.modules() if isinstance(m, nn.Linear))
    assert frozen > 0 and frozen < vae_linear  # the encoder path only: the decoder and LM head do not run
    assert trained >= spatial / c  # spatial layers once per chunk, plus the depth transformer ...
    assert trained < sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vae."))
    depth = sum(m.weight.numel() for m in model.depth.modules() if isinstance(m, nn.Linear))
    heads = sum(m.weight.numel() for m in model.depth_heads)
    in_proj = model.depth_in.weight.numel() + model.depth_in.bias.numel()
    assert trained == pytest.approx((spatial + in_proj + d * depth + heads) / c)  # ... D times per chunk


# ----------------------------------------------------------------------------
# (3) a tiny sweep end to end, and a second run that skips it


@pytest.fixture
def tiny_sweep(tmp_path):
    from rqlm.data.tokenizer import train_tokenizer

    docs = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(24)) + "." for i in range(160)]
    (tmp_path / "corpus.txt").write_text("\n".join(docs) + "\n")
    with warnings.catch_warnings():  # the corpus supports fewer merges than asked
        warnings.simplefilter("ignore", UserWarning)
        train_tokenizer(docs, vocab_size=300, output_dir=tmp_path / "tokenizer")
    config = {
        "data": {"dataset": str(tmp_path / "corpus.txt"), "tokenizer": str(tmp_path / "tokenizer"),
                 "block_size": 32, "max_eval_blocks": 4},
        "baseline": {"backbone": "test", "eval_steps": 0, **TINY},
        "vae": {"backbone": "test", "num_quantizers": 2, "codebook_size": 16, "latent_dim": 8, "eval_steps": 0, **TINY},
        "lm": {"backbone": "test", "depth_hidden_size": 16, "depth_num_attention_heads": 2, "eval_steps": 2,
               "eval_batches": 1, **TINY},
        "evaluate": {"num_prompts": 0, "brier_prefixes": 2, "prompt_tokens": 8},
        "bench": {"prompt_length": 8, "new_tokens": 8, "batch_sizes": [1], "memory": False},
        "sweeps": {"speed": {"kind": "compression", "points": [{"name": "C4"}]},
                   "flops": {"kind": "compute", "points": [{"name": "C4"}]}},
    }  # fmt: skip
    return write_yaml(tmp_path / "tiny.yaml", config)


def test_tiny_sweep_writes_results_and_plots_and_a_second_run_skips_every_stage(tiny_sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["sweep", str(tiny_sweep), "--output_dir", str(out)]) == 0
    first = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    point = results["sweeps"]["speed"]["points"][0]
    for key in ("perplexity_bound", "baseline_perplexity", "recon_accuracy", "speedup_batch1", "training_flops",
                "lm_flops_per_token", "vae_training_flops"):
        assert math.isfinite(point[key]), key
    assert point["training_flops"] == pytest.approx(
        point["vae_training_flops"] + point["lm_flops_per_token"] * point["lm_tokens"])
    assert results["sweeps"]["flops"]["points"][0]["lm_dir"] == point["lm_dir"]  # one LM for both sweeps
    assert results["baseline"]["training_flops"] > 0 and point["curve_flops_bound"]
    for name in ("speed.png", "flops.png"):
        assert (out / name).stat().st_size > 1000
    assert "| C4 |" in (out / "results.md").read_text()
    assert first.count(": skipped (") == 0

    fresh_accelerate_state()
    assert cli.main(["sweep", str(tiny_sweep), "--output_dir", str(out)]) == 0
    second = capsys.readouterr().out
    stages = [line for line in second.splitlines() if line.startswith("== ")]
    assert len(stages) == 6  # baseline, vae, codes, lm, evaluate, bench: each once
    assert all(": skipped (" in line for line in stages), stages
    assert json.loads((out / "results.json").read_text())["sweeps"]["speed"]["points"][0]["perplexity_bound"] == \
        point["perplexity_bound"]
