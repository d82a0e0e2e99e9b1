"""The perplexity bound against an exact enumeration on a two-chunk toy, and `rqlm evaluate` end to end."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from test_generate_cli import save_baseline, save_rq_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from rqlm import RQTransformerForCausalLM, RQVAEConfig, RQVAEModel
from rqlm.cli import main
from rqlm.data.loading import get_lm_datasets
from rqlm.data.tokenizer import load_tokenizer
from rqlm.evaluation.bound import bound_terms, perplexity_bound
from rqlm.evaluation.perplexity import block_nll, continuation_nll, until_first_eos

# ----------------------------------------------------------------- the two-chunk toy
# 6^4 = 1,296 texts of two chunks, 16 codes a position, 256 code sequences: p(x) = sum_z p(z) p(x | z) is
# enumerable. Two chunks, so that the spatial model's second position is scored: a spatial input that leaks
# the position it predicts gives a p(z) that no longer sums to 1 (one chunk reads the start vector only).
TOY_VOCAB, TOY_C, TOY_D, TOY_K, TOY_T = 6, 2, 2, 4, 4
TOY_PAD = 0


def toy_backbone(**overrides) -> Qwen3Config:
    values = {
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 8, "vocab_size": TOY_VOCAB, "eos_token_id": 1, "pad_token_id": TOY_PAD, "max_position_embeddings": 8,
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
        model.vae.lm_head.weight.mul_(30)
        model.vae.to_latent.weight.mul_(20)  # latents spread over the codebooks: the texts get 65-81 code sequences
        model.latent_proj.weight.mul_(10)  # the second position's prediction depends on the first's codes
    return model


def every_code_sequence(positions: int) -> torch.LongTensor:
    """(K^(D * positions), positions, D): every code sequence of the toy."""
    per_position = torch.cartesian_prod(*[torch.arange(TOY_K)] * TOY_D)  # (K^D, D)
    return per_position[torch.cartesian_prod(*[torch.arange(len(per_position))] * positions)]


@torch.no_grad()
def enumerate_toy(model, texts: torch.LongTensor):
    """log p(z) (Z,), log p(x | z) (Z, N) for texts (N, T) and every code sequence z (Z, L, D)."""
    all_codes = every_code_sequence(TOY_T // TOY_C)  # (256, 2, D)
    log_pz = model(codes=all_codes).logits.log_softmax(-1).double()  # (Z, L, D, K)
    log_pz = log_pz.gather(-1, all_codes[..., None])[..., 0].sum((1, 2))  # (Z,)
    vae, positions = model.vae, torch.arange(TOY_T)
    if not vae.config.decoder_sees_previous_tokens:
        log_dec = vae.decode(all_codes).log_softmax(-1).double()  # (Z, T, V)
        return all_codes, log_pz, log_dec[:, positions[None], texts].sum(-1)  # (Z, N)
    # the decoder also reads the previous chunk's tokens: decode every z after every first chunk
    firsts = torch.cartesian_prod(*[torch.arange(TOY_VOCAB)] * TOY_C)  # (V^C, C)
    reads = torch.cat([firsts, torch.zeros_like(firsts)], 1)  # the last chunk's own tokens reach no logits
    z, f = len(all_codes), len(firsts)
    log_dec = vae.decode(all_codes.repeat_interleave(f, 0), input_ids=reads.repeat(z, 1)).log_softmax(-1).double()
    log_dec = log_dec.view(z, f, TOY_T, TOY_VOCAB)
    first_index = (texts[:, :TOY_C] * torch.tensor([TOY_VOCAB ** (TOY_C - 1 - i) for i in range(TOY_C)])).sum(-1)
    return all_codes, log_pz, log_dec[:, first_index[:, None], positions[None], texts].sum(-1)  # (Z, N)


TOY_KINDS = [(0, {}), (1, {"decoder_sees_previous_tokens": True})]


@pytest.mark.parametrize(("layers", "vae_overrides"), TOY_KINDS)
def test_bound_is_never_below_the_exact_nll_of_a_two_chunk_toy(layers, vae_overrides):
    model = toy_lm(layers, **vae_overrides)
    texts = torch.cartesian_prod(*[torch.arange(TOY_VOCAB)] * TOY_T)  # (1296, T)
    all_codes, log_pz, log_px_z = enumerate_toy(model, texts)
    exact = -torch.logsumexp(log_pz[:, None] + log_px_z, dim=0)  # (N,) -log p(x)
    torch.testing.assert_close(torch.logsumexp(log_pz, 0), torch.zeros((), dtype=torch.float64))  # p(z) sums to 1
    torch.testing.assert_close(torch.logsumexp(-exact, 0), torch.zeros((), dtype=torch.float64))  # so does p(x)
    index = {tuple(z.flatten().tolist()): i for i, z in enumerate(all_codes)}
    rows = torch.tensor([index[tuple(z.flatten().tolist())] for z in model.encode(texts)])
    expected = -log_pz[rows] - log_px_z[rows, torch.arange(len(texts))]  # -log p(z_enc) - log p(x | z_enc)
    assert len(set(rows.tolist())) > 50 and (expected - exact).min() < 1.5  # many z, a tight case: not vacuous
    terms = bound_terms(model, texts)  # the batch's sums
    torch.testing.assert_close(terms["nll_codes"] + terms["nll_recon"], expected.sum(), rtol=1e-5, atol=1e-3)
    assert math.log(perplexity_bound(terms)) == pytest.approx(float(expected.sum()) / texts.numel(), rel=1e-5)
    torch.testing.assert_close(terms["nll_codes_depth"].sum(), terms["nll_codes"])
    assert terms["num_tokens"] == texts.numel() and terms["num_codes_depth"].tolist() == [len(texts) * 2] * TOY_D
    sample = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))[:24].tolist()
    for i in [int((expected - exact).argmin()), *sample]:  # text by text: the tightest, and some others
        one = bound_terms(model, texts[i][None])
        torch.testing.assert_close(one["nll_codes"] + one["nll_recon"], expected[i], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(("layers", "vae_overrides"), TOY_KINDS)
def test_sampling_codes_and_decoder_tokens_draws_the_next_chunk_from_the_bounded_model(layers, vae_overrides):
    """generate(do_sample=True, top_k=0, decoder_do_sample=True) after a one-chunk prompt x1 draws x2 from
    sum_z2 p(z2 | z1) p_dec(x2 | z1, z2, x1), z1 the prompt's codes: the model the bound is about. The default
    decoder argmax is another sampler."""
    model = toy_lm(layers, **vae_overrides)
    texts = torch.cartesian_prod(*[torch.arange(TOY_VOCAB)] * TOY_T)  # (1296, T), x1 major
    all_codes, log_pz, log_px_z = enumerate_toy(model, texts)
    prompt = torch.tensor([[3, 4]])
    z1 = model.encode(prompt)[0, 0]  # (D,)
    same_first_codes = (all_codes[:, 0] == z1).all(-1)  # (Z,): the sequences (z1, z2)
    follow = (texts[:, :TOY_C] == prompt).all(-1)  # (N,): the texts (x1, x2)
    log_z2 = log_pz[same_first_codes].log_softmax(0)  # p(z2 | z1)
    log_x2 = log_px_z[same_first_codes][:, follow].log_softmax(1)  # p(x2 | z1, z2, x1): x1's factor cancels
    exact = torch.logsumexp(log_z2[:, None] + log_x2, 0).exp()  # (V^C,)
    samples = 20_000
    for decoder_do_sample, close in ((True, True), (False, False)):
        torch.manual_seed(0)
        out = model.generate(prompt, max_new_tokens=TOY_C, do_sample=True, top_k=0, eos_token_id=None,
                             decoder_do_sample=decoder_do_sample, num_return_sequences=samples)[:, TOY_C:]
        counts = torch.bincount(out[:, 0] * TOY_VOCAB + out[:, 1], minlength=TOY_VOCAB**TOY_C).double()
        distance = 0.5 * (counts / samples - exact).abs().sum()  # total variation
        assert (distance < 0.03) == close, (decoder_do_sample, float(distance))


@pytest.mark.parametrize(("layers", "vae_overrides"), TOY_KINDS)
def test_left_padding_leaves_every_bound_term_unchanged(layers, vae_overrides):
    """Rows left-padded by 0, 1 and 2 whole chunks (and one by a part of a chunk) score what they score alone."""
    model = toy_lm(layers, **vae_overrides)
    texts = torch.randint(0, TOY_VOCAB, (6, TOY_T), generator=torch.Generator().manual_seed(3))
    alone = bound_terms(model, texts)
    for pads in ([0, 2, 4, 0, 2, 4], [4] * 6):
        width = TOY_T + max(pads)
        ids = torch.full((len(texts), width), TOY_PAD)
        mask = torch.zeros_like(ids)
        for row, pad in enumerate(pads):
            ids[row, width - TOY_T :] = texts[row]
            mask[row, width - TOY_T :] = 1
        padded = bound_terms(model, ids, attention_mask=mask)
        for name, value in alone.items():
            torch.testing.assert_close(padded[name], value, rtol=1e-5, atol=1e-4, msg=f"{name}, padding {pads}")
    ragged = bound_terms(model, torch.cat([torch.full((1, 1), TOY_PAD), texts[:1, 1:]], 1),
                         attention_mask=torch.tensor([[0] + [1] * (TOY_T - 1)]))
    assert ragged["num_tokens"] == TOY_T - 1  # a part-chunk of padding: its chunk is real, the pad is not scored


def test_left_padding_leaves_the_elbo_terms_unchanged():
    """GIVT's ELBO reads its latents through the same masked spatial pass (a near-point posterior: z = its mean)."""
    from test_givt import make_gaussian_vae, make_givt

    from rqlm.evaluation.elbo_bound import elbo_terms

    vae = make_gaussian_vae(layers=1)
    with torch.no_grad():
        vae.quantizer.to_logvar.bias.fill_(-30.0)  # std e^-15: the drawn z is the mean, padded or not
    model = make_givt(vae, head="gaussian", num_mixtures=1)
    ids = torch.randint(2, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([torch.zeros(2, 8, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)], 1)
    mask[1, :8] = 1  # row 1 is not padded
    padded[1, :8] = torch.randint(2, 50, (8,), generator=torch.Generator().manual_seed(1))
    alone = [elbo_terms(model, ids[:1]), elbo_terms(model, padded[1:])]
    together = elbo_terms(model, padded, attention_mask=mask)
    for name in ("nll_codes", "nll_recon", "num_tokens", "num_latents"):
        torch.testing.assert_close(together[name], alone[0][name] + alone[1][name], rtol=1e-5, atol=1e-4, msg=name)


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


def test_diversity_counts_distinct_and_repeated_ngrams():
    from rqlm.evaluation.perplexity import diversity

    figures = diversity([[1, 2, 1, 2, 1, 2], [3, 4, 5]])
    # 2-grams: (1,2) x3, (2,1) x2, (3,4), (4,5) -> 4 unique of 7; 3-grams: (1,2,1) x2, (2,1,2) x2, (3,4,5) -> 3 of 5
    assert figures["distinct_2"] == pytest.approx(4 / 7) and figures["distinct_3"] == pytest.approx(3 / 5)
    assert figures["repeated_3gram_rate"] == pytest.approx(2 / 5)  # the second (1,2,1) and (2,1,2)
    assert diversity([[7]]) == {"distinct_2": 0.0, "distinct_3": 0.0, "repeated_3gram_rate": 0.0}


def test_continuations_are_scored_up_to_their_first_eos():
    eos = 1
    continuations = torch.tensor([[5, 6, 7, 8], [5, eos, 2, 2], [eos, eos, 2, 2]])
    assert until_first_eos(continuations, eos).tolist() == [
        [True] * 4, [True, True, False, False], [True, False, False, False]
    ]
    assert until_first_eos(continuations, torch.tensor([eos, 6])).tolist() == [  # several EOS ids (drafting's)
        [True, True, False, False], [True, True, False, False], [True, False, False, False]
    ]
    assert until_first_eos(continuations, None).all()
    torch.manual_seed(0)
    judge = Qwen3ForCausalLM(toy_backbone(vocab_size=12)).eval()
    prompts = torch.randint(2, 12, (3, 5))
    scored = continuation_nll(judge, prompts, continuations, eos)
    labels = torch.cat([torch.full_like(prompts, -100), continuations.masked_fill(~until_first_eos(continuations, eos), -100)], 1)
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
    # the model card's data line, as train-lm writes it: evaluate reads the block size from it
    (root / "rq" / "README.md").write_text("## Data\n\n- dataset: embedded corpus; block size 32 tokens\n")
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
        assert 0 < figures[f"distinct_2_{who}_samples"] <= 1 and 0 <= figures[f"repeated_3gram_rate_{who}_samples"] < 1
        assert 1 < figures[f"judged_perplexity_{who}_samples"] < float("inf")
        assert 1 <= figures[f"judged_mean_length_{who}_samples"] <= 12
    # seeded: a second run gives the same judged figures
    assert main(argv) == 0
    again = json.loads(output.read_text())
    assert again["judged_perplexity_rq_samples"] == figures["judged_perplexity_rq_samples"]


def test_evaluate_scores_a_tokens_mode_model_exactly_beside_the_baseline(folders, tokenizer, tmp_path, capsys):
    from rqlm import RQTransformerForCausalLM

    root, rq, _ = folders
    torch.manual_seed(2)
    model = RQTransformerForCausalLM.from_vae(rq.vae, backbone_config=rq.config.backbone_config, depth_output="tokens",
                                              depth_hidden_size=16, depth_num_attention_heads=2).eval()
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    output = tmp_path / "figures.json"
    argv = ["evaluate", "--model", str(tmp_path / "lm"), "--baseline", str(root / "base"), *EVAL_FLAGS,
            "--output_json", str(output)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "RQ perplexity (tokens mode, exact)" in out and "rq samples" in out
    figures = json.loads(output.read_text())
    _, blocks = get_lm_datasets(None, tokenizer, block_size=32, compression_factor=4, max_eval_blocks=3)
    ids = blocks[:]["input_ids"].long()
    with torch.no_grad():  # every token of the blocks, read after one separator, as the baseline reads them
        with_separator = torch.cat([torch.full((len(ids), 1), tokenizer.eos_token_id), ids], 1)
        labels = torch.cat([torch.full((len(ids), 1), -100), ids], 1)
        nats = float(model(input_ids=with_separator, labels=labels).loss)
    assert figures["perplexity"] == pytest.approx(math.exp(nats), rel=1e-4)
    assert figures["perplexity_bound"] == figures["perplexity"]
    assert figures["ratio"] == pytest.approx(figures["perplexity"] / figures["baseline_perplexity"])


def test_evaluate_reads_the_block_size_the_model_was_trained_on(folders, tmp_path, capsys):
    root, _, _ = folders
    quick = ["--baseline", str(root / "base"), "--max_eval_blocks", "3", "--num_prompts", "0", "--brier_prefixes", "0",
             "--output_json", str(tmp_path / "figures.json")]
    assert main(["evaluate", "--model", str(root / "rq"), *quick]) == 0  # its README.md says 32
    assert "3 blocks of 32 tokens" in capsys.readouterr().out
    assert json.loads((tmp_path / "figures.json").read_text())["num_tokens"] == 3 * 32
    assert main(["evaluate", "--model", str(root / "rq"), "--block_size", "16", *quick]) == 0  # the flag wins
    assert json.loads((tmp_path / "figures.json").read_text())["num_tokens"] == 3 * 16
    capsys.readouterr()
    shutil.copytree(root / "rq", tmp_path / "no_card", ignore=shutil.ignore_patterns("README.md"))
    assert main(["evaluate", "--model", str(tmp_path / "no_card"), *quick]) == 1
    err = capsys.readouterr().err
    assert "pass --block_size" in err and err.count("\n") == 1


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
    model, baseline = ["--model", str(root / "rq"), "--block_size", "128"], ["--baseline", str(root / "base")]
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
