"""Joint rate-distortion: the RQ-VAE pays the rate a frozen code prior assigns to its soft code assignments.

Covers: a uniform prior costs D log K / C nats per token whatever the latents, with no gradient; the rate is the
soft assignments' expected code NLL, level by level on the residuals the hard codes leave; padding never enters
it; a gradient step on the rate moves a latent toward the code the prior favours; `rqlm train-vae --init_from VAE
--rate_prior LM` starts from the VAE, logs `rate_loss` and saves no prior; bad flags fail in one line.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_rq_vae import make_model, random_ids
from test_rq_vae_training import vae_flags
from test_trainer import clean_accelerate_state, text_corpus  # noqa: F401  (fixtures)

from rqlm import RQVAEModel, cli

C, D, K = 4, 2, 16


def encoded_batch(model, mask=None):
    ids = random_ids(batch=3, length=16)
    return model.encode(ids, mask)


def explicit_rate(model, encoded, log_prior, temperature=1.0):
    """Position by position, level by level, with plain loops."""
    quantizer = model.quantizer
    z = quantizer.project_in(encoded.latents).float()
    books = [layer.get_codes_from_indices(torch.arange(K)).float() for layer in quantizer.layers]
    total, count = 0.0, 0
    for b in range(z.shape[0]):
        for pos in range(z.shape[1]):
            if encoded.latent_mask is not None and not encoded.latent_mask[b, pos]:
                continue
            r, nats = z[b, pos], 0.0
            for d in range(D):
                q = F.softmax(-((r[None] - books[d]) ** 2).sum(-1) / temperature, dim=-1)
                nats += float(-(q * log_prior[b, pos, d]).sum().detach())
                r = r - books[d][encoded.codes[b, pos, d]]
            total, count = total + nats, count + 1
    return total / count / C


def test_a_uniform_prior_costs_d_log_k_per_chunk_and_gives_no_gradient():
    model = make_model(rate_weight=1.0)
    encoded = encoded_batch(model)
    uniform = torch.full((*encoded.codes.shape, K), -math.log(K))
    rate = model.rate_loss(encoded, uniform)
    assert rate.item() == pytest.approx(D * math.log(K) / C, rel=1e-5)
    (grad,) = torch.autograd.grad(rate, encoded.latents, allow_unused=True)
    assert grad is None or grad.abs().max() < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_the_rate_is_the_soft_assignments_expected_code_nll_level_by_level(temperature):
    model = make_model(rate_weight=1.0, rate_temperature=temperature)
    encoded = encoded_batch(model)
    log_prior = torch.randn(*encoded.codes.shape, K, generator=torch.Generator().manual_seed(4)).log_softmax(-1)
    assert model.rate_loss(encoded, log_prior).item() == pytest.approx(
        explicit_rate(model, encoded, log_prior, temperature), rel=1e-5
    )


def test_padding_never_enters_the_rate():
    model = make_model(rate_weight=1.0)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, :8] = 0  # two chunks of left padding
    encoded = encoded_batch(model, mask)
    log_prior = torch.randn(*encoded.codes.shape, K, generator=torch.Generator().manual_seed(5)).log_softmax(-1)
    base = model.rate_loss(encoded, log_prior)
    changed = log_prior.clone()
    changed[1, :2] = torch.randn(2, D, K).log_softmax(-1)  # the padding chunks' prior
    assert model.rate_loss(encoded, changed).item() == pytest.approx(base.item(), rel=1e-6)
    assert base.item() == pytest.approx(explicit_rate(model, encoded, log_prior), rel=1e-5)


def test_a_step_on_the_rate_moves_the_latent_toward_the_code_the_prior_favours():
    # a temperature near the squared distances between latents and codes (about 10-40 here): soft enough to move
    model = make_model(rate_weight=1.0, rate_temperature=30.0)
    encoded = encoded_batch(model)
    favoured = 3
    log_prior = torch.full((*encoded.codes.shape, K), -20.0)
    log_prior[..., 0, favoured] = 0.0  # level 0: all mass on code 3; deeper levels: uniform
    log_prior[..., 1, :] = -math.log(K)
    code = model.quantizer.layers[0].get_codes_from_indices(torch.tensor([favoured]))[0].detach()
    z = model.quantizer.project_in(encoded.latents)
    (grad,) = torch.autograd.grad(model.rate_loss(encoded, log_prior), encoded.latents)
    moved = model.quantizer.project_in(encoded.latents - 0.05 * grad)
    before, after = (z - code).norm(dim=-1), (moved - code).norm(dim=-1)
    assert (after < before).float().mean() > 0.9


def test_bad_priors_fail_in_one_line():
    model = make_model(rate_weight=1.0)
    encoded = encoded_batch(model)
    with pytest.raises(ValueError, match="must have shape"):
        model.rate_loss(encoded, torch.zeros(3, 4, D, K + 1))
    with pytest.raises(ValueError, match="needs quantizer_type 'residual_vq'"):
        make_model(quantizer_type="fsq", rate_weight=1.0)
    with pytest.raises(ValueError, match="rate_temperature must be > 0"):
        make_model(rate_temperature=0.0)


# ----------------------------------------------------------------------------- rqlm train-vae --rate_prior
@pytest.fixture(scope="module")
def vae_and_prior(text_corpus, tmp_path_factory):  # noqa: F811
    """A VAE trained 3 steps on the corpus, and a codes-mode latent LM trained 2 steps on its codes."""
    folder = tmp_path_factory.mktemp("rate")
    vae, lm = folder / "vae", folder / "lm"
    assert cli.main(["train-vae", *vae_flags(text_corpus, vae, max_steps=3)]) == 0
    flags = ["--dataset", str(text_corpus / "docs.jsonl"), "--tokenizer", str(text_corpus / "tokenizer"), "--vae", str(vae),
             "--backbone", "test", "--block_size", "32", "--depth_output", "codes", "--max_steps", "2",
             "--max_minutes", "none", "--per_device_train_batch_size", "4", "--eval_steps", "2", "--eval_batches", "1",
             "--save_steps", "2", "--logging_steps", "1", "--output_dir", str(lm)]
    assert cli.main(["train-lm", *flags]) == 0
    return vae, lm


def test_train_vae_with_a_rate_prior_starts_from_the_vae_logs_the_rate_and_saves_no_prior(
    text_corpus, vae_and_prior, tmp_path  # noqa: F811
):
    vae, lm = vae_and_prior
    out = tmp_path / "out"
    flags = vae_flags(text_corpus, out, max_steps=2, init_from=vae, rate_prior=lm, rate_weight=0.5,
                      freeze_backbone_steps=0)
    assert cli.main(["train-vae", *flags]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["rate_loss"] for r in records if "rate_loss" in r]
    assert len(rates) == 2 and all(0 < v < D * math.log(256) for v in rates)
    weights, start = load_file(out / "model.safetensors"), load_file(vae / "model.safetensors")
    assert set(weights) == set(start), "the checkpoint holds more than the VAE (the prior?)"
    loaded = RQVAEModel.from_pretrained(out)
    assert loaded.config.rate_weight == 0.5
    # started from the VAE: two small steps leave the embeddings close to it
    start_gap = (weights["embed_tokens.weight"] - start["embed_tokens.weight"]).norm()
    assert start_gap < 0.5 * start["embed_tokens.weight"].norm()


def test_rate_flags_fail_in_one_line(text_corpus, vae_and_prior, tmp_path, capsys):  # noqa: F811
    vae, _ = vae_and_prior
    cases = {
        "--rate_weight needs --rate_prior": {"rate_weight": 1},
        "is not a folder": {"rate_prior": tmp_path / "missing"},
        "--init_from": {"init_from": tmp_path / "missing"},
        "not 'rq_transformer'": {"rate_prior": vae},
    }
    for message, overrides in cases.items():
        rc = cli.main(["train-vae", *vae_flags(text_corpus, tmp_path / "out", max_steps=1, **overrides)])
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if line.startswith("rqlm train-vae: error:")]
        assert rc == 1 and errors == err[-1:] and message in errors[0], err
