"""Continuous latents on tiny configs: the Gaussian VAE, GIVT's Gaussian head, CALM's energy head, generate()."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, Normal
from transformers import GenerationConfig

from rqlm import GIVTConfig, GIVTForCausalLM, RQTransformerForCausalLM, RQVAEConfig, RQVAEModel
from rqlm.modeling.continuous_heads import EnergyHead, GaussianMixtureHead, energy_score, gaussian_mixture_nll
from rqlm.modeling.gaussian_posterior import gaussian_kl_to_standard
from tests.test_rq_transformer import VOCAB, C, backbone, left_pad, prompts

D_LATENT = 8


def make_gaussian_vae(layers: int = 0, **overrides) -> RQVAEModel:
    config = RQVAEConfig(
        backbone_config=backbone(), compression_factor=C, latent_dim=D_LATENT, quantizer_type="gaussian",
        num_encoder_layers=layers, num_decoder_layers=layers, num_latent_layers=layers,
        latent_num_attention_heads=2, zero_init_residual_branches=False, **overrides,
    )
    torch.manual_seed(0)
    return RQVAEModel(config).eval()


def make_givt(vae: RQVAEModel | None = None, **overrides) -> GIVTForCausalLM:
    torch.manual_seed(1)
    kwargs = {"energy_head_size": 16}
    return GIVTForCausalLM.from_vae(vae or make_gaussian_vae(), backbone_config=backbone(), **{**kwargs, **overrides}).eval()


def random_ids(batch=2, length=16, seed=0):
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------- the Gaussian VAE
@pytest.mark.parametrize("sees_previous", [False, True])
def test_continuous_vae_chunk_causality(sees_previous):
    vae = make_gaussian_vae(layers=1, decoder_sees_previous_tokens=sees_previous)
    ids = random_ids()
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % VOCAB  # a token of chunk 2
    with torch.no_grad():
        a, b = vae.encode(ids), vae.encode(changed)
    for name in ("posterior_mean", "posterior_logvar"):
        assert torch.equal(getattr(a, name)[:, :2], getattr(b, name)[:, :2]), f"{name} of chunks 0..1 moved"
        assert not torch.allclose(getattr(a, name)[:, 2:], getattr(b, name)[:, 2:])
    latents = a.quantized.clone()
    latents[:, 2] += 1.0
    with torch.no_grad():
        la, lb = vae.decode(a.quantized, input_ids=ids), vae.decode(latents, input_ids=ids)
    assert torch.equal(la[:, : 2 * C], lb[:, : 2 * C]), "logits of chunks 0..1 moved when latent 2 changed"
    assert not torch.allclose(la[:, 2 * C :], lb[:, 2 * C :])


def test_continuous_vae_samples_in_training_and_reads_the_mean_in_eval():
    vae = make_gaussian_vae(layers=1)
    ids = random_ids()
    with torch.no_grad():
        evaluated = vae.encode(ids)
        assert torch.equal(evaluated.quantized, evaluated.posterior_mean)
        assert torch.equal(vae(ids).logits, vae.decode(evaluated.posterior_mean))
        vae.train()
        trained = vae.encode(ids)
    assert not torch.allclose(trained.quantized, trained.posterior_mean)
    std = (trained.quantized - trained.posterior_mean) / torch.exp(0.5 * trained.posterior_logvar)
    assert abs(std.std().item() - 1.0) < 0.3, "the sample is not mean + std * N(0, 1)"
    assert vae(ids).codes is None


def test_kl_is_clamped_per_dimension_and_weighted():
    vae = make_gaussian_vae(kl_weight=0.01, kl_clamp=0.3)
    ids = random_ids()
    with torch.no_grad():
        vae.quantizer.to_mean.bias.fill_(0.0)
        vae.quantizer.to_mean.bias[0] = 3.0  # one dimension far from the prior, the rest below the clamp
        encoded = vae.encode(ids)
    kl = gaussian_kl_to_standard(encoded.posterior_mean, encoded.posterior_logvar)  # (B, L, d)
    expected = 0.01 * kl.clamp(min=0.3).sum(-1).mean()
    torch.testing.assert_close(encoded.quantizer_loss, expected)
    torch.testing.assert_close(encoded.kl, kl.sum(-1).mean())
    assert encoded.quantizer_loss > 0.01 * kl.sum(-1).mean(), "no dimension was lifted to the clamp"


def test_token_masking_and_latent_dropout_act_in_training_only():
    ids = random_ids()
    plain, robust = make_gaussian_vae(layers=1), make_gaussian_vae(layers=1, token_mask_prob=0.5, latent_dropout=0.5)
    robust.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(robust(ids).logits, plain(ids).logits, rtol=0, atol=0)
        robust.train(), plain.train()
        torch.manual_seed(3)
        masked = robust.encode(ids).posterior_mean
        torch.manual_seed(3)
        unmasked = plain.encode(ids).posterior_mean
    assert not torch.allclose(masked, unmasked), "token masking changed nothing in training"
    assert (robust.latent_dropout(torch.ones(1000)) == 0).any()


def test_reconstruction_figures_of_a_gaussian_vae():
    from rqlm.evaluation.reconstruction import evaluate_reconstruction

    vae = make_gaussian_vae(layers=1)
    batches = [{"input_ids": random_ids(seed=s)} for s in range(2)]
    metrics = evaluate_reconstruction(vae, batches)
    assert {"accuracy", "recon_loss", "kl", "accuracy_sampled", "accuracy_noise0.1", "accuracy_noise0.5"} <= set(metrics)
    assert not any(k.startswith("usage_perplexity") for k in metrics)


# ----------------------------------------------------------------- the heads
def test_gaussian_nll_matches_closed_form():
    z, mean, log_scale = torch.randn(5, 3), torch.randn(5, 1, 3), torch.randn(5, 1, 3) * 0.5
    nll = gaussian_mixture_nll(z, torch.zeros(5, 1), mean, log_scale)
    closed = 0.5 * math.log(2 * math.pi) * 3 + log_scale[:, 0].sum(-1) + 0.5 * ((z - mean[:, 0]) / log_scale[:, 0].exp()).square().sum(-1)
    torch.testing.assert_close(nll, closed)
    # a k-component mixture against torch.distributions
    logits, means, log_scales = torch.randn(5, 4), torch.randn(5, 4, 3), torch.randn(5, 4, 3) * 0.5
    reference = MixtureSameFamily(Categorical(logits=logits), torch.distributions.Independent(Normal(means, log_scales.exp()), 1))
    torch.testing.assert_close(gaussian_mixture_nll(z, logits, means, log_scales), -reference.log_prob(z))


def test_mixture_reduces_to_one_gaussian():
    torch.manual_seed(0)
    single = GaussianMixtureHead(6, 3, num_mixtures=1)
    double = GaussianMixtureHead(6, 3, num_mixtures=2)
    h, z = torch.randn(4, 6), torch.randn(4, 3)
    _, mean, log_scale = single.parameters_of(h)
    with torch.no_grad():  # two identical components: the mixture is the single Gaussian whatever their weights
        w, b = single.proj.weight, single.proj.bias
        params_w, params_b = w[1:].reshape(2, 3, 6), b[1:].reshape(2, 3)
        double.proj.weight.copy_(torch.cat([torch.randn(2, 6), params_w.repeat(2, 1, 1).reshape(12, 6)]))
        double.proj.bias.copy_(torch.cat([torch.randn(2), params_b.repeat(2, 1).reshape(12)]))
    expected = -Normal(mean[:, 0], log_scale[:, 0].exp()).log_prob(z).sum(-1)
    torch.testing.assert_close(single.nll(h, z), expected)
    torch.testing.assert_close(double.nll(h, z), expected)


@pytest.mark.parametrize("num_mixtures", [1, 3])
def test_temperature_to_zero_returns_the_mean(num_mixtures):
    torch.manual_seed(0)
    head = GaussianMixtureHead(6, 3, num_mixtures=num_mixtures)
    h = torch.randn(4, 6)
    logits, mean, _ = head.parameters_of(h)
    likeliest = mean[torch.arange(4), logits.argmax(-1)]
    assert torch.equal(head.sample(h, 0.0), likeliest)
    torch.testing.assert_close(head.sample(h, 1e-10), likeliest, rtol=0, atol=1e-3)
    assert not torch.allclose(head.sample(h, 1.0), likeliest, atol=1e-3)


def test_energy_score_is_minimised_by_the_true_distribution():
    torch.manual_seed(0)
    targets = torch.randn(40000, 1)  # y ~ N(0, 1)
    scores = {}
    for mean, std in [(0.0, 1.0), (0.0, 0.5), (0.0, 2.0), (0.5, 1.0), (0.0, 0.0)]:
        samples = mean + std * torch.randn(8, 40000, 1)
        scores[(mean, std)] = energy_score(samples, targets).mean().item()
    best = min(scores, key=scores.get)
    assert best == (0.0, 1.0), scores
    # the closed form at the truth: E|X - Y| - E|X - X'| / 2 = 2 / sqrt(pi) - 1 / sqrt(pi)
    assert abs(scores[(0.0, 1.0)] - 1 / math.sqrt(math.pi)) < 0.01


def test_energy_head_at_zero_temperature_is_deterministic():
    head = EnergyHead(6, 3, head_size=8)
    h = torch.randn(4, 6)
    assert torch.equal(head.sample(h, 0.0), head.sample(h, 0.0))
    assert not torch.equal(head.sample(h, 1.0), head.sample(h, 1.0))


# ----------------------------------------------------------------- the latent LM
VAE_KINDS = {"per-chunk": {}, "layers+previous-tokens": {"layers": 1, "decoder_sees_previous_tokens": True}}
HEADS = {"gaussian": {"head": "gaussian", "num_mixtures": 2}, "energy": {"head": "energy"}}


@pytest.fixture(params=[(v, h) for v in VAE_KINDS for h in HEADS], ids=lambda p: f"{p[0]}-{p[1]}", scope="module")
def givt(request):
    vae_kind, head = request.param
    return make_givt(make_gaussian_vae(**VAE_KINDS[vae_kind]), **HEADS[head])


def test_spatial_position_sees_only_earlier_latents(givt):
    latents = torch.randn(2, 5, D_LATENT)
    changed = latents.clone()
    changed[:, 2] += 1.0
    with torch.no_grad():
        a, b = givt(latents=latents).hidden_states, givt(latents=changed).hidden_states
    assert torch.equal(a[:, :3], b[:, :3]), "position <= 2 saw latent 2"
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_cached_generation_equals_uncached(givt):
    ids, mask = left_pad(prompts([5, 9]))
    cached = givt.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
    uncached = givt.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, use_cache=False)
    assert cached.shape == (2, 9 + 14)
    assert torch.equal(cached, uncached)


def test_batched_generation_equals_one_by_one(givt):
    rows = prompts([3, 13, 6])  # 1, 4 and 2 chunks: row 0 sits behind 3 chunks of padding
    ids, mask = left_pad(rows)
    batched = givt.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    for i, row in enumerate(rows):
        alone = givt.generate(row[None], max_new_tokens=10, do_sample=False, eos_token_id=None)
        assert torch.equal(alone[0, len(row):], batched[i, ids.shape[1]:]), f"row {i} differs in a batch"


def test_sampling_at_tiny_temperature_equals_mean_decoding():
    model = make_givt(make_gaussian_vae(), head="gaussian")
    ids = prompts([8])[0][None]
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    torch.manual_seed(0)
    cold = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=1e-12, eos_token_id=None)
    torch.manual_seed(0)
    hot = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=50.0, eos_token_id=None)
    assert torch.equal(greedy, cold)
    assert not torch.equal(greedy, hot)


def test_streamer_and_latents_out(givt):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.ended = True

    ids = prompts([6])[0][None]
    streamer = Collect()
    out = givt.generate(ids, max_new_tokens=9, do_sample=False, eos_token_id=None, streamer=streamer,
                        return_dict_in_generate=True)
    assert streamer.ended and torch.equal(torch.cat(streamer.chunks, dim=1)[0], out.sequences[0])
    assert out.codes.shape == (1, 3, D_LATENT) and out.codes.is_floating_point()


def test_training_steps_lower_the_loss():
    # targets: the posterior means (an untrained VAE's posterior has unit variance, a floor no head goes below)
    model = make_givt(make_gaussian_vae(), head="gaussian", sample_posterior=False).train()
    vae_before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    ids = random_ids(batch=4, length=32)
    losses = []
    for _ in range(30):
        loss = model(ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(torch.equal(v, model.vae.state_dict()[k]) for k, v in vae_before.items()), "the VAE trained"
    assert not model.vae.training


def test_save_and_load_identical(givt, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    givt.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GIVTForCausalLM) and isinstance(AutoConfig.from_pretrained(tmp_path), GIVTConfig)
    assert not any(p.requires_grad for p in loaded.vae.parameters())
    latents = torch.randn(2, 4, D_LATENT)
    with torch.no_grad():  # the energy score draws generator noise: the same seed for both
        torch.manual_seed(0)
        expected = givt(latents=latents).loss
        torch.manual_seed(0)
        torch.testing.assert_close(loaded(latents=latents).loss, expected, rtol=0, atol=0)
    ids = prompts([7])[0][None]
    assert torch.equal(loaded.generate(ids, max_new_tokens=8, do_sample=False),
                       givt.generate(ids, max_new_tokens=8, do_sample=False))


def test_remote_code_load_without_rqlm(tmp_path):
    model = make_givt(make_gaussian_vae(layers=1), head="gaussian")
    model.save_pretrained(tmp_path / "ckpt")
    ids = prompts([6])[0][None]
    torch.save({"ids": ids, "out": model.generate(ids, max_new_tokens=8, do_sample=False)}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["rqlm"] = None  # rqlm cannot be imported: everything must come from the folder
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        out = model.generate(expected["ids"], max_new_tokens=8, do_sample=False)
        assert torch.equal(out, expected["out"]), (out, expected["out"])
        print("REMOTE_OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]


def test_one_line_errors_across_the_two_latent_kinds():
    from tests.test_rq_transformer import make_vae

    with pytest.raises(ValueError, match="quantizer_type gaussian"):
        GIVTForCausalLM.from_vae(make_vae(), backbone_config=backbone())
    with pytest.raises(ValueError, match="GIVTForCausalLM"):
        RQTransformerForCausalLM.from_vae(make_gaussian_vae(), backbone_config=backbone())
    model = make_givt(head="gaussian")
    with pytest.raises(ValueError, match="no depths"):
        model.generate(prompts([4])[0][None], max_new_tokens=4, depth_temperature=0.5)
    assert GIVTConfig().vae_config.is_continuous  # the default config builds (a Gaussian VAE inside)
    with pytest.raises(ValueError, match="head must be one of"):
        make_givt(head="flow")
    with pytest.raises(ValueError, match="float latents"):
        make_gaussian_vae().decode(torch.zeros(1, 2, D_LATENT, dtype=torch.long))


# ----------------------------------------------------------------- generate's settings
# fields the loop applies to code logits, modes neither latent LM implements, a field of a later transformers release
REFUSED = [
    {"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.1}, {"typical_p": 0.5}, {"epsilon_cutoff": 0.01}, {"eta_cutoff": 0.01},
    {"output_scores": True, "return_dict_in_generate": True}, {"output_logits": True, "return_dict_in_generate": True},
    {"num_beams": 2}, {"guidance_scale": 1.5}, {"penalty_alpha": 0.6}, {"top_h": 0.5}, {"low_memory": True},
    {"cache_implementation": "static"}, {"prompt_lookup_num_tokens": 3}, {"a_later_release_field": 0.3},
]


@pytest.mark.parametrize("way", ["keyword", "generation_config", "model_default"])
@pytest.mark.parametrize("settings", REFUSED, ids=lambda settings: next(iter(settings)))
def test_generate_refuses_in_one_line_each_setting_it_does_not_implement(settings, way):
    model, prompt = make_givt(head="gaussian"), prompts([6])[0][None]
    if way == "keyword":
        call = lambda: model.generate(prompt, max_new_tokens=4, **settings)
    elif way == "generation_config":
        call = lambda: model.generate(prompt, generation_config=GenerationConfig(max_new_tokens=4, **settings))
    else:  # a checkpoint's generation_config.json
        for name, value in settings.items():
            setattr(model.generation_config, name, value)
        call = lambda: model.generate(prompt, max_new_tokens=4)
    with pytest.raises(ValueError) as error:
        call()
    assert "\n" not in str(error.value) and next(iter(settings)) in str(error.value), str(error.value)


def _sampled(model, prompt, **settings):
    torch.manual_seed(0)
    return model.generate(prompt, max_new_tokens=12, do_sample=True, eos_token_id=None, **settings)


# each implemented setting (given t, the greedy run's first new token) and what it does to the 12 greedy new tokens
# after the 8 prompt tokens: ids, base: the run with it and without it
IMPLEMENTED = {
    "do_sample+temperature": (
        lambda t: {"do_sample": True, "temperature": 50.0}, lambda ids, base, **_: not torch.equal(ids, base),
    ),
    "top_k=0,top_p=1 (no filter)": (
        lambda t: {"do_sample": True, "top_k": 0, "top_p": 1.0},
        lambda ids, model, prompt, **_: torch.equal(ids, _sampled(model, prompt)),
    ),
    "repetition_penalty": (lambda t: {"repetition_penalty": 100.0}, lambda ids, base, **_: not torch.equal(ids, base)),
    "no_repeat_ngram_size": (
        lambda t: {"no_repeat_ngram_size": 1},
        lambda ids, prompt, **_: len(set(ids[0, 8:].tolist()) - set(prompt[0].tolist())) == 12,
    ),
    "bad_words_ids": (lambda t: {"bad_words_ids": [[t]]}, lambda ids, t, **_: t not in ids[0, 8:].tolist()),
    "suppress_tokens": (lambda t: {"suppress_tokens": [t]}, lambda ids, t, **_: t not in ids[0, 8:].tolist()),
    "eos_token_id": (lambda t: {"eos_token_id": t}, lambda ids, **_: ids.shape[1] == 8 + 1),
    "min_new_tokens": (  # t as EOS ends the greedy run at once, but not before 6 new tokens
        lambda t: {"eos_token_id": t, "min_new_tokens": 6},
        lambda ids, t, **_: ids.shape[1] >= 8 + 6 and t not in ids[0, 8:14].tolist(),
    ),
    "max_length": (lambda t: {"max_length": 8 + 5, "max_new_tokens": None}, lambda ids, **_: ids.shape[1] == 8 + 5),
    "num_return_sequences": (  # sampling at a tiny temperature takes the head's mean: two greedy rows
        lambda t: {"num_return_sequences": 2, "do_sample": True, "temperature": 1e-12},
        lambda ids, base, **_: torch.equal(ids, base.repeat(2, 1)),
    ),
    "decoder_do_sample": (  # the VAE decoder samples each chunk's tokens; the latents are the greedy run's
        lambda t: {"decoder_do_sample": True, "decoder_temperature": 5.0, "return_dict_in_generate": True},
        lambda ids, base, model, prompt, **_: not torch.equal(ids.sequences, base) and torch.equal(
            ids.codes, model.generate(prompt, max_new_tokens=12, eos_token_id=None, return_dict_in_generate=True).codes
        ),
    ),
}


@pytest.mark.parametrize("name", list(IMPLEMENTED))
def test_generate_settings_it_implements_still_act(name):
    settings, acts = IMPLEMENTED[name]
    model, prompt = make_givt(head="gaussian"), prompts([8])[0][None]
    base = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)  # (1, 8 + 12)
    t = int(base[0, 8])
    torch.manual_seed(0)
    ids = model.generate(prompt, **{"max_new_tokens": 12, "do_sample": False, "eos_token_id": None, **settings(t)})
    assert acts(ids, base=base, model=model, prompt=prompt, t=t), (name, ids)


# ----------------------------------------------------------------- the ELBO bound
def test_gaussian_kl_matches_torch():
    from rqlm.evaluation.elbo_bound import gaussian_kl

    mq, lq, mp, sp = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3) * 0.5
    reference = torch.distributions.kl_divergence(Normal(mq, (0.5 * lq).exp()), Normal(mp, sp.exp()))
    torch.testing.assert_close(gaussian_kl(mq, lq, mp, sp), reference)


def _importance_sampled_nll(model, ids, num_samples):
    """-log p(x) by importance sampling with q as proposal (IWAE): tighter than the ELBO, -> -log p(x) as S grows."""
    import torch.nn.functional as F

    from rqlm.modeling.gaussian_posterior import gaussian_log_density

    mean, logvar, _ = model.posterior(ids)
    log_weights = []
    for _ in range(num_samples):
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        log_prior = -model.head.nll(model.spatial_forward(model.spatial_inputs(z)), z).sum()
        log_q = gaussian_log_density(z, mean, logvar).sum()
        log_recon = -F.cross_entropy(model.vae.decode(z)[0], ids[0], reduction="sum")
        log_weights.append(log_recon + log_prior - log_q)
    return -(torch.logsumexp(torch.stack(log_weights), 0) - math.log(num_samples))


@torch.no_grad()
def test_elbo_bound_lies_above_the_importance_sampled_nll_and_closed_form_matches_monte_carlo():
    from rqlm.evaluation.elbo_bound import elbo_terms

    vae = make_gaussian_vae()
    with torch.no_grad():  # a narrow posterior, so that the model's p(x) is not flat
        vae.quantizer.to_logvar.bias.fill_(-3.0)
    single = make_givt(vae, head="gaussian", num_mixtures=1)
    double = make_givt(vae, head="gaussian", num_mixtures=2)
    double.load_state_dict({k: v for k, v in single.state_dict().items() if not k.startswith("head.")}, strict=False)
    w, b = single.head.proj.weight, single.head.proj.bias  # two copies of the single Gaussian: the same density
    double.head.proj.weight.copy_(torch.cat([torch.zeros(2, w.shape[1]), w[1:].repeat(2, 1)]))
    double.head.proj.bias.copy_(torch.cat([torch.zeros(2), b[1:].repeat(2)]))
    ids = random_ids(batch=1, length=2 * C)
    torch.manual_seed(0)
    closed = elbo_terms(single, ids, num_samples=60)
    torch.manual_seed(1)
    sampled = elbo_terms(double, ids, num_samples=60)
    torch.testing.assert_close(sampled["nll_codes"], closed["nll_codes"], rtol=0.05, atol=0.3)
    torch.testing.assert_close(sampled["nll_recon"], closed["nll_recon"], rtol=0.05, atol=0.3)
    bound = float(closed["nll_codes"] + closed["nll_recon"])
    torch.manual_seed(2)
    assert _importance_sampled_nll(single, ids, 60) < bound, "the ELBO bound lies below -log p(x)"


# ----------------------------------------------------------------- rqlm evaluate / train-givt / bench
def save_givt(folder, tokenizer, head: str) -> GIVTForCausalLM:
    """A random tiny GIVT (C=4, d=8) over a random Gaussian VAE, saved with the tokenizer into `folder`."""
    from test_generate_cli import tiny_backbone

    torch.manual_seed(0)
    vae = RQVAEModel(RQVAEConfig(
        backbone_config=tiny_backbone(tokenizer), compression_factor=C, latent_dim=D_LATENT, quantizer_type="gaussian",
        num_encoder_layers=0, num_decoder_layers=0, num_latent_layers=0, zero_init_residual_branches=False,
    )).eval()
    model = GIVTForCausalLM.from_vae(vae, backbone_config=tiny_backbone(tokenizer, max_position_embeddings=64),
                                     head=head, energy_head_size=16).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def cli_folders(tmp_path_factory):
    from test_generate_cli import save_baseline

    from rqlm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    root = tmp_path_factory.mktemp("givt_cli")
    for head in HEADS:
        save_givt(root / head, tokenizer, head)
    save_baseline(root / "base", tokenizer, seed=1)
    return root, tokenizer


@pytest.mark.parametrize("head", list(HEADS))
def test_evaluate_reports_givt_beside_the_baseline(cli_folders, head, capsys):
    import json

    from rqlm.cli import main

    root, _ = cli_folders
    output = root / f"{head}.json"
    argv = ["evaluate", "--model", str(root / head), "--baseline", str(root / "base"), "--block_size", "32",
            "--max_eval_blocks", "2", "--batch_size", "2", "--num_prompts", "2", "--prompt_tokens", "8",
            "--new_tokens", "8", "--brier_prefixes", "4", "--output_json", str(output)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    figures = json.loads(output.read_text())
    assert 0 <= figures["brier_lm"] <= 100 and 0 <= figures["baseline_brier_lm"] <= 100
    assert "GIVT model" in out and figures["num_tokens"] == 64
    if head == "gaussian":
        assert "GIVT ELBO perplexity bound" in out
        nats = figures["nll_codes_per_token"] + figures["nll_recon_per_token"]
        assert figures["perplexity_bound"] == pytest.approx(math.exp(nats), rel=1e-6)
    else:
        assert "perplexity_bound" not in figures and "likelihood-free" in out


def test_bench_times_givt_rows_beside_the_baseline_and_the_rq_model(tmp_path, capsys):
    import json

    from rqlm.cli import main

    output = tmp_path / "bench.json"
    flags = ["bench", "--quick", "--threads", "1", "--no_memory", "--no-parallel_depth", "--batch_sizes", "1,2",
             "--givt_heads", "gaussian,energy", "--output_json", str(output)]
    assert main(flags) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    result = json.loads(output.read_text())
    rows = result["shapes"][0]["rows"]
    for name in ("GIVT C=4 gaussian", "GIVT C=4 energy"):
        mine = [r for r in rows if r["model"] == name]
        assert sorted(r["batch_size"] for r in mine) == [1, 2] and all(r["tokens_per_second"] > 0 for r in mine)
        assert all(r["parts_ms"]["depth"] == 0 and r["parts_ms"]["spatial"] > 0 for r in mine)
        assert f"| test | {name} | 1 | 8 |" in out
        assert any(line.startswith(f"speedup batch 2 {name}: ") for line in result["summary"])
    assert main(["bench", "--quick", "--givt_heads", "flow"]) == 1
    assert "unknown head(s) ['flow']" in capsys.readouterr().err


def test_train_vae_inspect_and_train_givt_from_the_command_line(tmp_path, capsys):
    """`train-vae --quantizer_type gaussian` -> `inspect` -> `train-givt` (both heads) -> `generate`; train-lm refuses."""
    import json

    from test_cli import inspect_flags, one_line_error, vae_flags

    from rqlm.cli import main
    from rqlm.data.tokenizer import train_tokenizer
    from rqlm.pipeline import fresh_accelerate_state

    corpus = tmp_path / "corpus"  # short repetitive documents and a 300-token BPE, as test_trainer's corpus
    corpus.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    docs = [" ".join(words[(i + j) % len(words)] for j in range(24)) + "." for i in range(240)]
    (corpus / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_tokenizer(docs, vocab_size=300, output_dir=corpus / "tokenizer")
    vae_dir = tmp_path / "vae"
    fresh_accelerate_state()
    flags = [str(a) for a in vae_flags(corpus, vae_dir, "--quantizer_type", "gaussian", "--token_mask_prob", "0.15",
                                       "--latent_dropout", "0.15", "--eval_steps", "2")]
    assert main(flags) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "Gaussian d=16" in out and "eval_accuracy_noise0.5" in out
    assert RQVAEConfig.from_pretrained(vae_dir).to_dict()["quantizer_kwargs"] == {}

    assert main([str(a) for a in inspect_flags(vae_dir, corpus, "--max_batches", "1")]) == 0
    assert "KL to N(0, I)" in capsys.readouterr().out

    for head in HEADS:
        fresh_accelerate_state()
        givt_dir = tmp_path / f"givt_{head}"
        argv = ["train-givt", "--vae", vae_dir, "--dataset", corpus / "docs.jsonl", "--backbone", "test", "--head", head,
                "--energy_head_size", "16", "--block_size", "32", "--max_steps", "2", "--max_minutes", "none",
                "--per_device_train_batch_size", "4", "--warmup_steps", "1", "--eval_steps", "2", "--eval_batches", "1",
                "--save_steps", "0", "--mixed_precision", "no", "--output_dir", givt_dir]
        assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert "GIVT:" in out and ("eval_perplexity_bound" in out) == (head == "gaussian")
        assert main(["generate", "alpha beta", "--model", str(givt_dir), "--max_new_tokens", "8"]) == 0
        assert "new tokens in" in capsys.readouterr().out
    fresh_accelerate_state()
    error = one_line_error(capsys, ["train-lm", "--vae", vae_dir, "--dataset", corpus / "docs.jsonl", "--backbone", "test",
                                    "--max_minutes", "none", "--output_dir", tmp_path / "lm"])
    assert "holds a Gaussian VAE" in error and "train-givt" in error
    fresh_accelerate_state()
    error = one_line_error(capsys, ["train-givt", "--vae", tmp_path / "nowhere", "--output_dir", tmp_path / "x"])
    assert "not found" in error
