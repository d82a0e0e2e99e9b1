"""`rqlm encode` and `rqlm train-lm` on a tiny VAE trained here, CPU, offline.

Covers: train-lm lowers held-out code NLL and the perplexity bound (the bound against an exact
enumeration: test_evaluate.py's two-chunk toy); `rqlm encode`'s codes give the same first step as codes encoded inline,
and codes of another VAE are refused; inline codes are cached by the VAE's weights; a real
two-process run ends with identical weights on both ranks and the VAE untouched; a resumed run
reaches the uninterrupted weights; one-line errors for bad input.
"""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
import warnings

import pytest
import torch
from conftest import launch_two_processes
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen3Config

from rqlm import RQTransformerForCausalLM, RQVAEModel, cli
from rqlm.pipeline import fresh_accelerate_state

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


@pytest.fixture(autouse=True)
def clean_accelerate_state(monkeypatch, tmp_path):
    """A clean Accelerate state per run, and inline codes cached in the test's own folder."""
    import rqlm.data.codes

    monkeypatch.setattr(rqlm.data.codes, "default_cache_dir", lambda: tmp_path / "codes_cache")
    fresh_accelerate_state()
    yield
    fresh_accelerate_state()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A repetitive text file, a small BPE trained on it, another BPE, and a tiny RQ-VAE trained for 20 steps."""
    from rqlm.data.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("corpus")
    docs = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(24)) + "." for i in range(240)]
    (folder / "corpus.txt").write_text("\n".join(docs) + "\n")
    with warnings.catch_warnings():  # the corpus supports fewer merges than asked
        warnings.simplefilter("ignore", UserWarning)
        train_tokenizer(docs, vocab_size=300, output_dir=folder / "tokenizer")
        train_tokenizer([d.upper() for d in docs], vocab_size=300, output_dir=folder / "other_tokenizer")
    fresh_accelerate_state()
    rc = cli.main(["train-vae", "--backbone", "test", "--tokenizer", str(folder / "tokenizer"),
                   "--dataset", str(folder / "corpus.txt"), "--block_size", "32", "--num_quantizers", "2",
                   "--codebook_size", "32", "--latent_dim", "8", "--max_steps", "20", "--max_minutes", "none",
                   "--per_device_train_batch_size", "4", "--eval_steps", "0", "--save_steps", "0",
                   "--mixed_precision", "no", "--output_dir", str(folder / "vae")])  # fmt: skip
    fresh_accelerate_state()
    assert rc == 0
    return folder


def lm_flags(corpus, output_dir, **overrides) -> list[str]:
    """`rqlm train-lm` flags for a test-preset spatial transformer over the corpus's VAE (the codes mode unless
    `depth_output="tokens"`: these tests read its code NLL)."""
    values = {
        "vae": corpus / "vae",
        "depth_output": "codes",
        "dataset": corpus / "corpus.txt",
        "backbone": "test",
        "depth_hidden_size": 16,
        "depth_num_attention_heads": 2,
        "block_size": 32,
        "max_steps": 60,
        "max_minutes": "none",
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-2,
        "warmup_steps": 2,
        "eval_steps": 20,
        "eval_batches": 2,
        "save_steps": 0,
        "logging_steps": 1,
        "mixed_precision": "no",
        "output_dir": output_dir,
    }
    values.update(overrides)
    return [item for name, value in values.items() if value is not None for item in (f"--{name}", str(value))]


def records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def error_lines(stderr: str) -> list[str]:
    """stderr without progress bars (loading weights, encoding): what the user reads as the error."""
    return [line for line in stderr.strip().splitlines() if "%|" not in line and line.strip()]


def vae_weights(output_dir) -> dict[str, torch.Tensor]:
    """The VAE's weights inside a train-lm folder, under the VAE folder's own names."""
    return {k.removeprefix("vae."): v for k, v in load_file(output_dir / "model.safetensors").items() if k.startswith("vae.")}


# ----------------------------------------------------------------------------
# (1) learning, and the bound


def test_train_lm_lowers_held_out_code_nll_and_the_bound(corpus, tmp_path, capsys):
    out = tmp_path / "lm"
    rc = cli.main(["train-lm", *lm_flags(corpus, out)])
    assert rc == 0, capsys.readouterr().err
    evals = [r for r in records(out) if "eval_code_nll" in r]
    assert [r["step"] for r in evals] == [20, 40, 60]
    first, last = evals[0], evals[-1]
    assert last["eval_code_nll"] < first["eval_code_nll"] - 0.2, (first, last)
    assert last["eval_perplexity_bound"] < 0.9 * first["eval_perplexity_bound"], (first, last)
    for depth in range(2):
        assert last[f"eval_nll_d{depth}"] < first[f"eval_nll_d{depth}"]
        assert 0 <= last[f"eval_marginal_entropy_d{depth}"] <= math.log(32)
        assert 0 <= last[f"eval_accuracy_d{depth}"] <= 1
    # the bound is its two terms: exp(code NLL per token + reconstruction NLL per token)
    assert last["eval_perplexity_bound"] == pytest.approx(
        math.exp(last["eval_nll_codes_per_token"] + last["eval_nll_recon_per_token"]), rel=1e-6
    )
    assert last["eval_nll_codes_per_token"] == pytest.approx(
        (last["eval_nll_d0"] + last["eval_nll_d1"]) / 4, rel=1e-6  # the held-out blocks are whole: L*D codes / (L*C) tokens
    )
    # text in, text out: the folder loads through the auto class, with the trained VAE inside, untouched
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, RQTransformerForCausalLM)
    saved_vae = load_file(corpus / "vae" / "model.safetensors")
    inside = vae_weights(out)
    assert inside.keys() == saved_vae.keys() and all(torch.equal(inside[k], saved_vae[k]) for k in saved_vae)


def test_train_lm_tokens_mode_lowers_held_out_perplexity_and_saves_a_causal_lm(corpus, tmp_path, capsys):
    out = tmp_path / "lm"
    flags = lm_flags(corpus, out, depth_output="tokens", spatial_input="token_and_code_embeddings", depth_num_layers=2)
    assert cli.main(["train-lm", *flags]) == 0, capsys.readouterr().err
    evals = [r for r in records(out) if "eval_token_nll" in r]
    assert [r["step"] for r in evals] == [20, 40, 60]
    first, last = evals[0], evals[-1]
    assert last["eval_perplexity"] < 0.8 * first["eval_perplexity"], (first, last)
    for r in evals:  # the likelihood is exact: the "bound" is the perplexity itself
        assert r["eval_perplexity_bound"] == r["eval_perplexity"]
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_token_nll"]), rel=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(model, RQTransformerForCausalLM) and model.config.depth_output == "tokens"
    prompt = torch.tensor([[5, 6, 7]])
    assert model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None).shape == (1, 9)


# ----------------------------------------------------------------------------
# (2) codes computed once


def test_encode_output_gives_the_same_first_step_as_inline_codes(corpus, tmp_path, capsys):
    from datasets import load_from_disk

    codes_dir = tmp_path / "codes"
    rc = cli.main(["encode", "--vae", str(corpus / "vae"), "--dataset", str(corpus / "corpus.txt"),
                   "--block_size", "32", "--output_dir", str(codes_dir)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    saved = load_from_disk(str(codes_dir))
    assert set(saved) == {"train", "validation"}
    assert saved["train"].features["codes"].feature.feature.dtype == "int16"  # stored small
    row = saved["train"].with_format("torch")[0]
    assert row["input_ids"].shape == (32,) and row["codes"].shape == (8, 2)
    vae = RQVAEModel.from_pretrained(corpus / "vae").eval()
    with torch.no_grad():
        assert torch.equal(vae.encode(row["input_ids"][None]).codes[0], row["codes"].long())

    first = {}
    for name, extra in (("inline", {}), ("from_codes", {"codes": codes_dir, "dataset": None})):
        out = tmp_path / name
        assert cli.main(["train-lm", *lm_flags(corpus, out, max_steps=2, eval_steps=0, **extra)]) == 0
        first[name] = records(out)[0]
    assert first["inline"]["step"] == first["from_codes"]["step"] == 1
    assert first["from_codes"]["loss"] == pytest.approx(first["inline"]["loss"], abs=1e-6)

    # codes made by another VAE are refused in one line
    other = RQVAEModel.from_pretrained(corpus / "vae")
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    other.save_pretrained(tmp_path / "other_vae")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "other_vae" / name).write_bytes((corpus / "vae" / name).read_bytes())
    capsys.readouterr()
    rc = cli.main(["train-lm", *lm_flags(corpus, tmp_path / "x", vae=tmp_path / "other_vae", codes=codes_dir)])
    err = error_lines(capsys.readouterr().err)
    assert rc == 1 and "made by" in err[0] and "rqlm encode" in err[0] and len(err) == 1, err


def test_inline_codes_are_cached_by_the_vae_weights(corpus, tmp_path):
    from datasets import Dataset

    from rqlm.data.codes import encode_blocks

    vae = RQVAEModel.from_pretrained(corpus / "vae").eval()
    blocks = Dataset.from_dict({"input_ids": torch.randint(2, 200, (10, 32)).tolist()}).with_format("torch")
    cache = tmp_path / "cache"
    first = encode_blocks(vae, blocks, batch_size=4, cache_dir=cache)

    def refuse(*args, **kwargs):
        raise AssertionError("encoded again instead of reading the cache")

    real_encode, vae.encode = vae.encode, refuse
    again = encode_blocks(vae, blocks, batch_size=4, cache_dir=cache)  # same blocks, same VAE: the cache
    assert torch.equal(again[:]["codes"], first[:]["codes"])
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)  # another VAE: another fingerprint, so it must encode
    with pytest.raises(AssertionError, match="encoded again"):
        encode_blocks(vae, blocks, batch_size=4, cache_dir=cache)
    vae.encode = real_encode


# ----------------------------------------------------------------------------
# (3) two processes, and resume

TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import rqlm.trainer.loop
    from rqlm import cli

    trained = []
    real_train = rqlm.trainer.loop.train

    def train(model, *args, **kwargs):  # train-lm imports `train` when it runs, so it gets this one
        trained.append(model)
        return real_train(model, *args, **kwargs)

    rqlm.trainer.loop.train = train
    out, flags = sys.argv[1], sys.argv[2:]
    rank, num_processes = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])  # as the launcher set them
    rc = cli.main(["train-lm", *flags])
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({
            "rc": rc,
            "num_processes": num_processes,
            "digests": {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
                        for k, v in trained[0].state_dict().items()},
        }, f)
    """
)


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def test_accelerate_launch_two_processes_end_with_identical_weights_and_the_vae_untouched(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    launch_two_processes(TWO_PROCESS_SCRIPT, [out, *lm_flags(corpus, out, max_steps=4, eval_steps=2, save_steps=2)], tmp_path)
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["rc"] == 0 and r["num_processes"] == 2 for r in ranks)
    differing = [k for k in ranks[0]["digests"] if ranks[0]["digests"][k] != ranks[1]["digests"].get(k)]
    assert not differing, f"the ranks ended with different {differing}"
    saved, halfway = load_file(out / "model.safetensors"), load_file(out / "checkpoints" / "step-2" / "model.safetensors")
    assert any(not torch.equal(saved[k], halfway[k]) for k in saved if not k.startswith("vae.")), "nothing trained"
    vae = load_file(corpus / "vae" / "model.safetensors")
    assert {k: digest(v) for k, v in vae_weights(out).items()} == {k: digest(v) for k, v in vae.items()}
    assert all(ranks[0]["digests"][f"vae.{k}"] == digest(v) for k, v in vae.items())
    evals = [r for r in records(out) if "eval_code_nll" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[-1]["eval_num_tokens"] == 2 * 2 * 8 * 32  # both ranks' eval batches (2 of 8 blocks of 32 each)


def test_resume_reaches_the_weights_of_an_uninterrupted_run(corpus, tmp_path, capsys):
    common = {"eval_steps": 0, "save_steps": 3, "lr_scheduler": "constant"}
    assert cli.main(["train-lm", *lm_flags(corpus, tmp_path / "straight", max_steps=6, **common)]) == 0
    resumed = tmp_path / "resumed"
    assert cli.main(["train-lm", *lm_flags(corpus, resumed, max_steps=3, **common)]) == 0
    fresh_accelerate_state()
    capsys.readouterr()
    assert cli.main(["train-lm", *lm_flags(corpus, resumed, max_steps=6, resume_from_checkpoint="latest", **common)]) == 0
    assert "resumed from step 3" in capsys.readouterr().out
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    early = load_file(resumed / "checkpoints" / "step-3" / "model.safetensors")
    assert any(not torch.equal(early[k], a[k]) for k in early if not k.startswith("vae."))


# ----------------------------------------------------------------------------
# (4) bad input


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vae": "{tmp}/missing"}, "VAE folder"),
        ({"vae": "{tmp}/qwen"}, "not an RQ-VAE"),
        ({"tokenizer": "{corpus}/other_tokenizer"}, "is not the tokenizer the VAE"),
        ({"block_size": 30}, "not a multiple of compression 4"),
        ({"compression_factor": 2}, "differs from the VAE's C=4"),
        ({"codes": "{tmp}/no_codes"}, "codes folder"),
        ({"vae": None}, "pass --vae VAE_DIR"),
    ],
)
def test_bad_input_is_one_line_error(corpus, tmp_path, capsys, overrides, message):
    Qwen3Config(vocab_size=8).save_pretrained(tmp_path / "qwen")
    overrides = {k: v if v is None else str(v).format(tmp=tmp_path, corpus=corpus) for k, v in overrides.items()}
    rc = cli.main(["train-lm", *lm_flags(corpus, tmp_path / "out", **overrides)])
    err = error_lines(capsys.readouterr().err)
    assert rc == 1 and message in err[0] and len(err) == 1, err


def test_the_loop_hands_precomputed_codes_to_forward():
    from rqlm.trainer.loop import model_inputs

    batch = {"input_ids": torch.ones(2, 8, dtype=torch.long), "codes": torch.ones(2, 2, 3, dtype=torch.int16)}
    codes = model_inputs(batch)["codes"]
    assert codes.dtype == torch.long and torch.equal(codes, batch["codes"].long())


def test_shipped_cpu_recipe_is_the_commands_defaults():
    import argparse
    from pathlib import Path

    from rqlm.commands import train_lm

    def parse(argv):
        parser = argparse.ArgumentParser()
        parser.add_argument("--config")
        train_lm.add_arguments(parser)
        cli._load_yaml_defaults(parser, argv)
        return vars(parser.parse_args(argv))

    recipe = str(Path(__file__).parents[1] / "configs" / "lm_cpu.yaml")
    from_yaml, defaults = parse(["--config", recipe]), parse(["--vae", "runs/vae"])
    assert {k: v for k, v in from_yaml.items() if k != "config"} == {k: v for k, v in defaults.items() if k != "config"}
    assert defaults["depth_output"] == "tokens"  # the measured best mode is the default (docs/results/latent_lm.md)
