"""RQVAEModel invariants on tiny configs: shapes, chunk causality, exact code round trip,
save/load and remote code, frozen-then-unfrozen backbone, LoRA, bad input, learning."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_qwen3_config

import rqlm  # noqa: F401  (registers the Auto classes)
from rqlm import RQVAEConfig, RQVAEModel

C = 4


def make_model(seed=0, **overrides) -> RQVAEModel:
    torch.manual_seed(seed)
    values = {
        "backbone_config": tiny_qwen3_config(),
        "compression_factor": C,
        "num_quantizers": 2,
        "codebook_size": 16,
        "latent_dim": 16,
        "num_latent_layers": 1,
        "latent_num_attention_heads": 2,
    }
    values.update(overrides)
    return RQVAEModel(RQVAEConfig(**values))


def random_ids(batch=2, length=16, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def test_shapes_and_exact_code_round_trip():
    model = make_model().eval()
    ids = random_ids()
    with torch.no_grad():
        out = model(ids)
        enc = model.encode(ids)
        logits = model.decode(enc.codes)
    assert out.codes.shape == (2, 16 // C, 2)
    assert out.logits.shape == (2, 16, 96)
    assert torch.equal(model.codes_to_quantized(enc.codes), enc.quantized)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-6)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


@pytest.mark.parametrize("sees_previous", [False, True])
def test_chunk_causality(sees_previous):
    model = make_model(decoder_sees_previous_tokens=sees_previous).eval()
    ids = random_ids(length=16)
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 96  # a token in chunk 2
    with torch.no_grad():
        a, b = model.encode(ids), model.encode(changed)
    assert torch.equal(a.codes[:, :2], b.codes[:, :2]), "codes of chunks 0..1 moved when chunk 2 changed"
    assert not torch.equal(a.quantized[:, 2:], b.quantized[:, 2:]) or not torch.equal(a.latents[:, 2], b.latents[:, 2])

    codes = a.codes.clone()
    codes[:, 2] = (codes[:, 2] + 1) % 16
    with torch.no_grad():
        la = model.decode(a.codes, input_ids=ids)
        lb = model.decode(codes, input_ids=ids)
    assert torch.equal(la[:, : 2 * C], lb[:, : 2 * C]), "logits of chunks 0..1 moved when codes of chunk 2 changed"
    assert not torch.allclose(la[:, 2 * C :], lb[:, 2 * C :])

    if sees_previous:  # the tokens of chunk 2 may reach chunks 3.. only
        with torch.no_grad():
            lc = model.decode(a.codes, input_ids=changed)
        assert torch.equal(la[:, : 3 * C], lc[:, : 3 * C])
        assert not torch.allclose(la[:, 3 * C :], lc[:, 3 * C :])


def test_padding_never_enters_loss():
    model = make_model().eval()
    ids = random_ids(length=16)
    mask = torch.ones_like(ids)
    mask[:, 12:] = 0
    noisy = ids.clone()
    noisy[:, 12:] = 5
    with torch.no_grad():
        a = model(ids, attention_mask=mask)
        b = model(noisy, attention_mask=mask)
        c = model(ids[:, :12], attention_mask=mask[:, :12])
    torch.testing.assert_close(a.recon_loss, b.recon_loss)
    torch.testing.assert_close(a.recon_loss, c.recon_loss)


def test_save_and_load_identical(tmp_path):
    model = make_model().eval()
    ids = random_ids()
    model.save_pretrained(tmp_path)
    loaded = RQVAEModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    from transformers import AutoConfig, AutoModel

    assert isinstance(AutoConfig.from_pretrained(tmp_path), RQVAEConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), RQVAEModel)


def test_remote_code_load_without_rqlm(tmp_path):
    model = make_model().eval()
    ids = random_ids()
    model.save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["rqlm"] = None  # rqlm cannot be imported: everything must come from the folder
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(expected["ids"]).logits
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        print("REMOTE_OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]


def _train_steps(model, steps, lr=1e-2):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ids = random_ids(batch=4, length=16)
    for step in range(steps):
        model.on_step_begin(step)
        loss = model(ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_frozen_then_unfrozen_backbone():
    model = make_model(freeze_backbone_steps=3).train()
    layer = model.encoder.layers[0].self_attn.q_proj.weight
    head, conv = model.lm_head.weight, model.downsample.convs[0].weight
    start = {n: t.detach().clone() for n, t in (("layer", layer), ("head", head), ("conv", conv))}
    _train_steps(model, 3)
    assert torch.equal(layer, start["layer"]), "frozen backbone layer moved"
    assert not torch.equal(conv, start["conv"]), "non-backbone weights must train while the backbone is frozen"
    assert not torch.equal(head, start["head"]), "the LM head (per-chunk path) trains while the layers are frozen"
    assert not any(p.requires_grad for p in model.backbone_parameters())
    model.on_step_begin(3)
    assert all(p.requires_grad for p in model.backbone_parameters())


def test_zero_init_layers_start_as_identity():
    model = make_model()
    for stack in (model.encoder, model.decoder):
        for layer in stack.layers:
            assert layer.self_attn.o_proj.weight.abs().sum() == 0 and layer.mlp.down_proj.weight.abs().sum() == 0
    x = torch.randn(2, 8, 32)
    torch.testing.assert_close(model.encoder.layers[0](x, position_embeddings=model.encoder.rotary_emb(x, torch.arange(8)[None])), x)
    plain = make_model(zero_init_residual_branches=False)
    assert plain.encoder.layers[0].self_attn.o_proj.weight.abs().sum() > 0


def test_backbone_trains_after_unfreezing():
    model = make_model(freeze_backbone_steps=2).train()
    layer = model.decoder.layers[1].mlp.down_proj.weight
    start = layer.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ids = random_ids(batch=4, length=16)
    for step in range(4):
        model.on_step_begin(step)
        model(ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1:
            assert torch.equal(layer, start)
    assert not torch.equal(layer, start)


def test_lora_only_adapters_change_in_backbone(tmp_path):
    model = make_model(lora_r=4, lora_alpha=8).train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    _train_steps(model, 3)
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    for name, param in model.named_parameters():
        if id(param) in backbone_ids:
            assert torch.equal(param, base[name]), f"backbone weight {name} changed under LoRA"
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "LoRA adapters did not train"

    model.eval()
    ids = random_ids()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapters")
    reloaded = RQVAEModel.from_pretrained(tmp_path / "adapters").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
    model.merge_lora()
    assert model.config.lora_r == 0 and not any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "merged")
    merged = RQVAEModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_from_backbone_loads_pretrained_layers(tmp_path):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(3)
    qwen = Qwen3ForCausalLM(tiny_qwen3_config(num_hidden_layers=3))
    qwen.save_pretrained(tmp_path)
    model = RQVAEModel.from_backbone(
        str(tmp_path), num_encoder_layers=2, num_decoder_layers=1,
        compression_factor=C, num_quantizers=2, codebook_size=16, latent_dim=16,
    )
    assert len(model.encoder.layers) == 2 and len(model.decoder.layers) == 1
    assert torch.equal(model.embed_tokens.weight, qwen.model.embed_tokens.weight)
    assert torch.equal(model.encoder.layers[1].self_attn.k_proj.weight, qwen.model.layers[1].self_attn.k_proj.weight)
    assert torch.equal(model.decoder.layers[0].mlp.up_proj.weight, qwen.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(model.lm_head.weight, qwen.lm_head.weight)
    with pytest.raises(ValueError, match="exceeds the backbone"):
        RQVAEModel.from_backbone(str(tmp_path), num_encoder_layers=4)


def test_gradient_checkpointing_matches():
    model = make_model().train()
    model.quantizer.eval()  # no codebook update between the two passes (and no straight-through to the encoder)
    ids = random_ids()
    weight = model.decoder.layers[0].self_attn.q_proj.weight

    def loss_and_grad():
        loss = model(ids).recon_loss
        loss.backward()
        grad = weight.grad.clone()
        model.zero_grad(set_to_none=True)
        return loss.detach(), grad

    loss, grad = loss_and_grad()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.decoder.layers)
    loss_ckpt, grad_ckpt = loss_and_grad()
    torch.testing.assert_close(loss, loss_ckpt)
    torch.testing.assert_close(grad, grad_ckpt)


def test_bad_input_one_line_errors(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="not a multiple of compression 4"):
        model(random_ids(length=18))
    with pytest.raises(ValueError, match=r"must lie in \[0, 96\)"):
        model(torch.full((1, 8), 96))
    with pytest.raises(ValueError, match="unknown quantizer 'nope'"):
        make_model(quantizer_type="nope")
    with pytest.raises(ValueError, match="power of two"):
        make_model(compression_factor=3)
    with pytest.raises(ValueError, match="codes must have shape"):
        model.decode(torch.zeros(1, 4, 3, dtype=torch.long))
    model.save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="does not fit this RQVAEModel configuration"):
        RQVAEModel.from_pretrained(tmp_path / "small", latent_dim=32)
    from transformers import Qwen3ForCausalLM

    Qwen3ForCausalLM(tiny_qwen3_config()).save_pretrained(tmp_path / "qwen")
    with pytest.raises(ValueError, match="holds a 'qwen3' checkpoint"):
        RQVAEModel.from_pretrained(tmp_path / "qwen")


def test_learns_to_reconstruct_a_repetitive_corpus():
    torch.manual_seed(0)
    model = make_model(num_quantizers=2, codebook_size=32, freeze_backbone_steps=1000,
                       quantizer_kwargs={"kmeans_init": True, "decay": 0.9, "threshold_ema_dead_code": 1}).train()
    patterns = torch.randint(3, 96, (8, C))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        model.on_step_begin(step)
        chunks = patterns[torch.randint(0, 8, (16, 8))]  # (B, L, C)
        ids = chunks.flatten(1)
        out = model(ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    ids = patterns[torch.randint(0, 8, (16, 8))].flatten(1)
    with torch.no_grad():
        accuracy = model(ids).accuracy.item()
    assert accuracy > 0.99, accuracy
