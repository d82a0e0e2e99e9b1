"""The perplexity bound against an exact enumeration on a one-chunk toy, and `rqlm evaluate` end to end."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from test_generate_cli import save_baseline, save_rq_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from rqlm import RQTransformerForCausalLM, RQVAEConfig, RQVAEModel
from rqlm.cli import main
from rqlm.data.loading import get_lm_datasets
from rqlm.data.tokenizer import load_tokenizer
from rqlm.evaluation.bound import bound_terms
from rqlm.evaluation.perplexity import block_nll, continuation_mask, continuation_nll

# ----------------------------------------------------------------- the one-chunk toy
TOY_VOCAB, TOY_C, TOY_D, TOY_K = 6, 2, 2, 4  # 36 texts of one chunk, 16 code sequences


def toy_backbone(**overrides) -> Qwen3Config:
    values = {
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 8, "vocab_size": TOY_VOCAB, "eos_token_id": 1, "pad_token_id": 0, "max_position_embeddings": 8,
    }
    return Qwen3Config(**{**values, **overrides})


def toy_lm(layers: int, **vae_overrides) -> RQTransformerForCausalLM:
    torch.manual_seed(0)
    vae = RQVAEModel(RQVAEConfig(
        backbone_config=toy_backbone(), compression_factor=TOY_C, num_quantizers=TOY_D, codebook_size=TOY_K,
        latent_dim=4, num_encoder_layers=layers, num_decoder_layers=layers, num_latent_layers=0,
        zero_init_residual_branches=False, **vae_overrides,
    )).eval()
    torch.manual_seed(1)
    model = RQTransformerForCausalLM.from_vae(
        vae, backbone_config=toy_backbone(), depth_hidden_size=8, depth_num_attention_heads=2,
        spatial_input="quantized",  # the seed's weights give a tight case (the check below)
    ).eval()
    with torch.no_grad():  # sharper distributions than the init's near-uniform ones
        for head in model.depth_heads:
            head.weight.mul_(30)
        model.vae.lm_head.weight.mul_(10)
    return model


@pytest.mark.parametrize(("layers", "vae_overrides"), [(0, {}), (1, {"decoder_sees_previous_tokens": True})])
def test_bound_is_never_below_the_exact_nll_of_a_one_chunk_toy(layers, vae_overrides):
    model = toy_lm(layers, **vae_overrides)
    texts = torch.tensor(list(itertools.product(range(TOY_VOCAB), repeat=TOY_C)))  # (36, C)
    all_codes = torch.tensor(list(itertools.product(range(TOY_K), repeat=TOY_D)))[:, None]  # (16, 1, D)
    with torch.no_grad():
        # log p(z): the depth logits of position 0, predicted from the start vector
        log_pz = model(codes=all_codes).logits.log_softmax(-1)[:, 0]  # (16, D, K)
        log_pz = log_pz.gather(-1, all_codes[:, 0, :, None]).squeeze(-1).sum(-1).double()  # (16,)
        # log p(x | z): the product over the chunk's C tokens of the decoder's softmax
        decoder_tokens = texts[:1].expand(len(all_codes), -1) if vae_overrides else None  # unseen by chunk 0
        log_px_z = model.vae.decode(all_codes, input_ids=decoder_tokens).log_softmax(-1).double()  # (16, C, V)
        log_px_z = log_px_z[:, torch.arange(TOY_C)[None], texts].sum(-1)  # (16 codes, 36 texts)
        exact = -torch.logsumexp(log_pz[:, None] + log_px_z, dim=0)  # (36,)
        encoded = model.encode(texts)[:, 0]  # (36, D)
    assert torch.isclose(torch.logsumexp(-exact, 0), torch.zeros((), dtype=torch.float64), atol=1e-6)  # sums to 1
    index = {tuple(z.tolist()): i for i, z in enumerate(all_codes[:, 0])}
    rows = torch.tensor([index[tuple(z.tolist())] for z in encoded])
    expected = -log_pz[rows] - log_px_z[rows, torch.arange(len(texts))]  # -log p(z_enc) - log p(x | z_enc)
    for i, text in enumerate(texts):
        terms = bound_terms(model, text[None])
        bound = terms["nll_codes"] + terms["nll_recon"]
        assert terms["num_tokens"] == TOY_C
        torch.testing.assert_close(terms["nll_codes_depth"].sum(), terms["nll_codes"])
        torch.testing.assert_close(bound, expected[i], atol=1e-4, rtol=1e-5)
        assert bound >= exact[i] - 1e-6, (text.tolist(), float(bound), float(exact[i]))
    assert (expected - exact).min() < 1.0  # a tight case exists: the check is not vacuous


# ----------------------------------------------------------------- the baseline's and the judge's figures
def test_block_nll_scores_every_token_after_the_separator():
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(toy_backbone(vocab_size=12)).eval()
    blocks = torch.randint(0, 12, (3, 6))
    scored = block_nll(model, blocks, separator_id=1)
    with_separator = torch.cat([torch.full((3, 1), 1), blocks], dim=1)
    labels = torch.cat([torch.full((3, 1), -100), blocks], dim=1)  # HF shifts: every block token is a target
    with torch.no_grad():
        mean = model(input_ids=with_separator, labels=labels).loss
    assert scored["num_tokens"] == blocks.numel()
    torch.testing.assert_close(scored["nll"].float() / blocks.numel(), mean)


def test_continuations_are_scored_up_to_their_first_eos():
    eos = 1
    continuations = torch.tensor([[5, 6, 7, 8], [5, eos, 2, 2], [eos, eos, 2, 2]])
    assert continuation_mask(continuations, eos).tolist() == [
        [True] * 4, [True, True, False, False], [True, False, False, False]
    ]
    torch.manual_seed(0)
    judge = Qwen3ForCausalLM(toy_backbone(vocab_size=12)).eval()
    prompts = torch.randint(2, 12, (3, 5))
    scored = continuation_nll(judge, prompts, continuations, eos)
    labels = torch.cat([torch.full_like(prompts, -100), continuations.masked_fill(~continuation_mask(continuations, eos), -100)], 1)
    with torch.no_grad():
        mean = judge(input_ids=torch.cat([prompts, continuations], 1), labels=labels).loss
    assert scored["num_tokens"] == 4 + 2 + 1
    torch.testing.assert_close(scored["nll"].float() / 7, mean)


# ----------------------------------------------------------------- rqlm evaluate
@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("evaluate")
    rq = save_rq_model(root / "rq", tokenizer, seed=0, num_decoder_layers=1, num_encoder_layers=1,
                       decoder_sees_previous_tokens=True)
    base = save_baseline(root / "base", tokenizer, seed=1)
    return root, rq, base


def test_a_reloaded_model_gives_the_same_bound_terms(folders):
    """The VAE's rotary frequencies are in no checkpoint: loading must compute them, not leave empty memory."""
    from transformers import AutoModelForCausalLM

    root, rq, _ = folders
    loaded = AutoModelForCausalLM.from_pretrained(root / "rq").eval()
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    for name, value in bound_terms(rq, ids).items():
        torch.testing.assert_close(bound_terms(loaded, ids)[name], value)


EVAL_FLAGS = ["--block_size", "32", "--max_eval_blocks", "3", "--batch_size", "2",
              "--num_prompts", "3", "--prompt_tokens", "8", "--new_tokens", "12"]


def test_evaluate_reports_the_bound_and_the_baseline_on_the_same_tokens(folders, tokenizer, capsys):
    root, rq, base = folders
    output = root / "figures.json"
    argv = ["evaluate", "--model", str(root / "rq"), "--baseline", str(root / "base"), *EVAL_FLAGS,
            "--output_json", str(output)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "RQ perplexity bound" in out and "ratio bound / baseline" in out and "rq samples" in out
    figures = json.loads(output.read_text())

    # the same held-out blocks, scored independently: the RQ model's forward, the VAE's recon loss, HF's loss
    _, blocks = get_lm_datasets(None, tokenizer, block_size=32, compression_factor=4, max_eval_blocks=3)
    ids = blocks[:]["input_ids"].long()
    with torch.no_grad():
        out_rq = rq(input_ids=ids)
        nll_codes = float((out_rq.depth_nll * out_rq.num_codes).sum())
        nll_recon = float(rq.vae(ids).recon_loss) * ids.numel()
        with_separator = torch.cat([torch.full((len(ids), 1), tokenizer.eos_token_id), ids], 1)
        labels = torch.cat([torch.full((len(ids), 1), -100), ids], 1)
        baseline_nats = float(base(input_ids=with_separator, labels=labels).loss)
    assert figures["num_tokens"] == ids.numel() == 96
    assert figures["nll_codes_per_token"] == pytest.approx(nll_codes / ids.numel(), rel=1e-4)
    assert figures["nll_recon_per_token"] == pytest.approx(nll_recon / ids.numel(), rel=1e-4)
    assert figures["perplexity_bound"] == pytest.approx(math.exp((nll_codes + nll_recon) / ids.numel()), rel=1e-4)
    assert figures["baseline_perplexity"] == pytest.approx(math.exp(baseline_nats), rel=1e-4)
    assert figures["ratio"] == pytest.approx(figures["perplexity_bound"] / figures["baseline_perplexity"])
    assert figures["bits_per_token"] == pytest.approx(math.log2(figures["perplexity_bound"]))
    for d, nll in enumerate(out_rq.depth_nll.tolist()):
        assert figures[f"nll_codes_depth_{d}"] == pytest.approx(nll, rel=1e-4)
    for who in ("rq", "baseline"):
        assert 1 < figures[f"judged_perplexity_{who}_samples"] < float("inf")
        assert 1 <= figures[f"judged_mean_length_{who}_samples"] <= 12
    # seeded: a second run gives the same judged figures
    assert main(argv) == 0
    again = json.loads(output.read_text())
    assert again["judged_perplexity_rq_samples"] == figures["judged_perplexity_rq_samples"]


def word_level_tokenizer(folder):
    """Another vocabulary: a 4-word word-level tokenizer with an EOS, saved to `folder`."""
    vocab = {"<pad>": 0, "<eos>": 1, "def": 2, "main": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    tok.save_pretrained(folder)
    return tok


def test_evaluate_errors_are_one_line(folders, tokenizer, tmp_path, capsys):
    root, _, _ = folders
    save_baseline(tmp_path / "wider", tokenizer, vocab_size=len(tokenizer) + 8, with_tokenizer=False)
    save_baseline(tmp_path / "other_tokenizer", tokenizer)
    word_level_tokenizer(tmp_path / "other_tokenizer")
    capsys.readouterr()  # the saves' progress bars
    model, baseline = ["--model", str(root / "rq")], ["--baseline", str(root / "base")]
    cases = [
        ([*model, "--baseline", str(tmp_path / "wider")], f"a vocabulary of {len(tokenizer) + 8} tokens"),
        ([*model, "--baseline", str(tmp_path / "other_tokenizer")], "another tokenizer (4 entries"),
        ([*model, "--baseline", str(tmp_path / "missing")], "--baseline folder"),
        (["--model", str(tmp_path / "missing"), *baseline], "--model folder"),
        (["--model", str(root / "base"), *baseline], "holds a 'qwen3' checkpoint; expected 'rq_transformer'"),
        ([*model, "--baseline", str(root / "rq")], "holds a 'rq_transformer' checkpoint; expected 'qwen3'"),
        ([*model, *baseline, "--compression_factor", "2"], "differs from the model's C=4"),
        ([*model, *baseline, "--block_size", "30"], "not a multiple of compression 4"),
        ([*model, *baseline, "--block_size", "256"], "exceeds --baseline's 256 positions"),
        ([*model, *baseline, "--prompt_tokens", "300"], "longer than a held-out block"),
    ]
    for argv, message in cases:
        assert main(["evaluate", *argv]) == 1, argv
        captured = capsys.readouterr()
        assert message in captured.err, (argv, captured.err)
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_evaluate_writes_brier_lm_of_both_models_on_the_same_prefixes(folders, capsys):
    root, _, _ = folders
    output = root / "brier.json"
    argv = ["evaluate", "--model", str(root / "rq"), "--baseline", str(root / "base"), "--block_size", "32",
            "--max_eval_blocks", "3", "--batch_size", "3", "--num_prompts", "0", "--prompt_tokens", "6",
            "--brier_prefixes", "5", "--output_json", str(output)]
    assert main(argv) == 0
    assert "BrierLM on 5 held-out prefixes" in capsys.readouterr().out
    figures = json.loads(output.read_text())
    assert figures["brier_num_prefixes"] == 5  # 3 block starts, then 2 windows 4 tokens in
    for prefix in ("", "baseline_"):
        assert 0 <= figures[f"{prefix}brier_lm"] <= 100
        for n in range(1, 5):  # a per-n mean may be negative (a confidently wrong model); the estimate is in [-1, 1]
            assert -100 <= figures[f"{prefix}brier_{n}"] <= 100 and figures[f"{prefix}brier_{n}_stderr"] >= 0
    assert main([*argv, "--brier_prefixes", "0"]) == 0  # skipped
    assert not any("brier" in name for name in json.loads(output.read_text()))
    assert main([*argv, "--prompt_tokens", "30"]) == 1
    assert "the next 4 tokens of a held-out block (32)" in capsys.readouterr().err


def test_brier_prefixes_are_block_starts_then_windows_further_in():
    from rqlm.commands.evaluate import held_out_windows

    blocks = torch.arange(2 * 16).view(2, 16)  # two blocks of 16 tokens
    windows = held_out_windows(blocks, 5, width=10)  # offsets 0 and 4 fit (the next, 8, would run past 16)
    assert windows[:, 0].tolist() == [0, 16, 4, 20]  # block starts first; only 4 windows exist
    assert torch.equal(windows[2], torch.arange(4, 14))
    assert len(held_out_windows(blocks, 3, width=10)) == 3
