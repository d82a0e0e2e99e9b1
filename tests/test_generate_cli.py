"""`rqlm generate` on tiny RQ and Qwen3 models saved with the embedded tokenizer: streaming, speeds, errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from rqlm import RQTransformerForCausalLM, RQVAEConfig, RQVAEModel
from rqlm.cli import main
from rqlm.data.tokenizer import load_tokenizer

C = 4
PROMPT = "def main():\n    return"


def tiny_backbone(tokenizer, **overrides) -> Qwen3Config:
    """A 2-layer h32 Qwen3 config over the tokenizer's vocabulary."""
    values = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 16, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id, "max_position_embeddings": 128,
    }
    return Qwen3Config(**{**values, **overrides})


def save_rq_model(folder, tokenizer, seed: int = 0, **vae_overrides) -> RQTransformerForCausalLM:
    """A random tiny RQ-Transformer (C=4, D=2, K=16) saved with the tokenizer into `folder`."""
    torch.manual_seed(seed)
    values = {
        "backbone_config": tiny_backbone(tokenizer), "compression_factor": C, "num_quantizers": 2, "codebook_size": 16,
        "latent_dim": 8, "num_encoder_layers": 0, "num_decoder_layers": 0, "num_latent_layers": 0,
        "zero_init_residual_branches": False,
    }
    vae_config = RQVAEConfig(**{**values, **vae_overrides})
    model = RQTransformerForCausalLM.from_vae(
        RQVAEModel(vae_config).eval(), backbone_config=tiny_backbone(tokenizer, max_position_embeddings=64),
        depth_hidden_size=16, depth_num_attention_heads=2,
    ).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def save_baseline(folder, tokenizer, seed: int = 0, with_tokenizer: bool = True, **overrides) -> Qwen3ForCausalLM:
    """A random tiny Qwen3ForCausalLM saved (with the tokenizer unless told otherwise) into `folder`."""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_backbone(tokenizer, max_position_embeddings=256, **overrides)).eval()
    model.save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """(rq folder, baseline folder, the two models) saved once for the module."""
    root = tmp_path_factory.mktemp("generate")
    rq = save_rq_model(root / "rq", tokenizer)
    base = save_baseline(root / "base", tokenizer)
    return root / "rq", root / "base", rq, base


def prompt_ids(tokenizer, text=PROMPT):
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def streamed_text(tokenizer, model, max_new_tokens, **kwargs) -> str:
    ids = model.generate(prompt_ids(tokenizer), max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.decode(ids[0], skip_special_tokens=True)


def test_streams_the_rq_models_greedy_continuation(folders, tokenizer, capsys):
    rq_dir, _, rq, _ = folders
    assert main(["generate", PROMPT, "--model", str(rq_dir), "--max_new_tokens", "12"]) == 0
    out = capsys.readouterr().out
    expected = streamed_text(tokenizer, rq, 12, do_sample=False)
    assert expected.startswith(PROMPT)
    assert expected in out  # the prompt and exactly the tokens generate() returns
    assert "rq_transformer" in out
    assert len([line for line in out.splitlines() if "tokens/s" in line]) == 1


def test_baseline_is_streamed_beside_with_both_speeds(folders, tokenizer, capsys):
    rq_dir, base_dir, rq, base = folders
    assert main(["generate", PROMPT, "--model", str(rq_dir), "--baseline", str(base_dir), "--max_new_tokens", "8"]) == 0
    out = capsys.readouterr().out
    rq_text, base_text = streamed_text(tokenizer, rq, 8), streamed_text(tokenizer, base, 8, do_sample=False)
    assert out.index(rq_text) < out.index("--- baseline") < out.index(base_text)
    speeds = [line for line in out.splitlines() if "tokens/s" in line]
    assert [line.split(":")[0] for line in speeds] == ["model", "baseline"]
    assert all(float(line.split("= ")[1].split()[0]) > 0 for line in speeds)


def test_a_qwen3_folder_works_as_the_model(folders, tokenizer, capsys):
    _, base_dir, _, base = folders
    assert main(["generate", PROMPT, "--model", str(base_dir), "--max_new_tokens", "5"]) == 0
    assert streamed_text(tokenizer, base, 5, do_sample=False) in capsys.readouterr().out


def test_seeded_sampling_is_reproducible_and_follows_the_settings(folders, tokenizer, capsys):
    rq_dir, _, rq, _ = folders
    argv = ["generate", PROMPT, "--model", str(rq_dir), "--max_new_tokens", "16", "--do_sample", "--seed", "3"]
    texts = []
    for _ in range(2):
        assert main(argv) == 0
        texts.append(capsys.readouterr().out.split("\n\nmodel:")[0])
    assert texts[0] == texts[1]
    torch.manual_seed(3)
    assert streamed_text(tokenizer, rq, 16, do_sample=True, top_k=0, temperature=1.0) in texts[0]
    # top_k 1 is greedy: the sampling flags reach generate()
    assert main(argv + ["--top_k", "1"]) == 0
    assert streamed_text(tokenizer, rq, 16, do_sample=False) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
        (["--do_sample", "--temperature", "0"], "--temperature must be > 0"),
        (["--do_sample", "--top_p", "1.5"], "--top_p must lie in (0, 1]"),
        (["--max_new_tokens", "300"], "positions of --model; shorten the prompt"),
    ],
)
def test_bad_flags_are_one_line_errors(folders, capsys, extra, message):
    rq_dir, _, _, _ = folders
    assert main(["generate", PROMPT, "--model", str(rq_dir), *extra]) == 1
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_bad_prompts_and_folders_are_one_line_errors(folders, tokenizer, tmp_path, capsys):
    rq_dir, base_dir, _, _ = folders
    long_prompt = " ".join(["word"] * 400)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"model_type": "rq_vae"}))
    save_baseline(tmp_path / "other_vocab", tokenizer, vocab_size=len(tokenizer) + 8, with_tokenizer=False)
    capsys.readouterr()  # the save's progress bar
    cases = [
        (["generate", "", "--model", str(rq_dir)], "the prompt is empty"),
        (["generate", "   ", "--model", str(rq_dir)], "the prompt is empty"),
        (["generate", long_prompt, "--model", str(rq_dir)], "shorten"),
        (["generate", long_prompt, "--model", str(base_dir)], "shorten"),
        (["generate", PROMPT, "--model", str(tmp_path / "missing")], "does not exist"),
        (["generate", PROMPT, "--model", str(tmp_path / "vae")], "'rq_vae' checkpoint"),
        (["generate", PROMPT, "--model", str(rq_dir), "--baseline", str(tmp_path / "missing")], "does not exist"),
        (["generate", PROMPT, "--model", str(rq_dir), "--baseline", str(tmp_path / "other_vocab")],
         f"a vocabulary of {len(tokenizer) + 8} tokens"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        captured = capsys.readouterr()
        assert message in captured.err, (argv, captured.err)
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
