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


@pytest.mark.parametrize("compression", [2, 4, 8])
def test_down_and_upsampling_equal_their_convolutions(compression):
    """Downsample / Upsample run their Conv1d / ConvTranspose1d as GEMMs: same result and gradients as the convs."""
    from rqlm.modeling.layers import Downsample, Upsample

    torch.manual_seed(0)
    down, up = Downsample(12, compression), Upsample(12, compression)
    for m in (down, up):  # non-zero biases, so a dropped or misplaced bias shows
        for conv in m.convs:
            torch.nn.init.normal_(conv.bias)
    x = torch.randn(3, 4 * compression, 12, requires_grad=True)

    def by_convs(module, h, transpose):
        h = h.transpose(1, 2)
        for i, conv in enumerate(module.convs):
            h = (torch.nn.functional.conv_transpose1d if transpose else torch.nn.functional.conv1d)(h, conv.weight, conv.bias, stride=2)
            h = module.act(h) if i < len(module.convs) - 1 else h
        return h.transpose(1, 2)

    latent = down(x)
    assert latent.shape == (3, 4, 12)
    torch.testing.assert_close(latent, by_convs(down, x, False), rtol=0, atol=1e-5)
    torch.testing.assert_close(up(latent), by_convs(up, latent, True), rtol=0, atol=1e-5)
    up(latent).square().sum().backward()
    grads = [c.weight.grad.clone() for c in down.convs + up.convs] + [x.grad.clone()]
    for p in [*down.parameters(), *up.parameters(), x]:
        p.grad = None
    by_convs(up, by_convs(down, x, False), True).square().sum().backward()
    for got, want in zip(grads, [c.weight.grad for c in down.convs + up.convs] + [x.grad]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=f"multiple of {compression}"):
        down(x[:, :-1])


@pytest.mark.parametrize("sees_previous", [False, True])
def test_chunk_causality(sees_previous):
    # non-identity layers everywhere (encoder, latent, decoder), so every causal mask is exercised
    model = make_model(decoder_sees_previous_tokens=sees_previous, zero_init_residual_branches=False).eval()
    ids = random_ids(length=16)
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 96  # a token in chunk 2
    with torch.no_grad():
        a, b = model.encode(ids), model.encode(changed)
    assert torch.equal(a.latents[:, :2], b.latents[:, :2]), "latents of chunks 0..1 moved when chunk 2 changed"
    assert torch.equal(a.codes[:, :2], b.codes[:, :2])
    assert not torch.allclose(a.latents[:, 2:], b.latents[:, 2:])

    codes = a.codes.clone()
    codes[:, 2] = (codes[:, 2] + 1) % 16
    with torch.no_grad():
        la = model.decode(a.codes, input_ids=ids)
        lb = model.decode(codes, input_ids=ids)
    assert torch.equal(la[:, : 2 * C], lb[:, : 2 * C]), "logits of chunks 0..1 moved when codes of chunk 2 changed"
    assert not torch.allclose(la[:, 2 * C :], lb[:, 2 * C :])

    if sees_previous:  # the tokens of chunk 2 may reach chunks 3.. only, and all of chunk 3
        with torch.no_grad():
            lc = model.decode(a.codes, input_ids=changed)
        assert torch.equal(la[:, : 3 * C], lc[:, : 3 * C])
        assert not torch.allclose(la[:, 3 * C], lc[:, 3 * C]), "chunk 3's first position misses chunk 2's tokens"


def test_decoder_is_block_causal():
    """Every position of chunk l sees every position of chunks <= l, under sdpa and eager alike."""
    model = make_model(zero_init_residual_branches=False).eval()
    hidden = torch.randn(2, 16, 32)
    moved = hidden.clone()
    moved[:, 2 * C + C - 1] += 1.0  # the last position of chunk 2
    with torch.no_grad():
        a, b = model.decoder(hidden), model.decoder(moved)
        model.config.backbone_config._attn_implementation_internal = "eager"
        eager = model.decoder(hidden)
    assert torch.equal(a[:, : 2 * C], b[:, : 2 * C]), "chunks 0..1 see chunk 2"
    assert not torch.allclose(a[:, 2 * C], b[:, 2 * C]), "chunk 2's first position misses its chunk's last"
    torch.testing.assert_close(eager, a)
    causal = make_model(zero_init_residual_branches=False, decoder_block_causal=False).eval()
    with torch.no_grad():
        a, b = causal.decoder(hidden), causal.decoder(moved)
    assert torch.equal(a[:, : 3 * C - 1], b[:, : 3 * C - 1])


def test_padding_never_enters_loss():
    # left padding, right padding and a full row in one batch; padding is chunk-aligned (T a multiple of C)
    model = make_model(zero_init_residual_branches=False).eval()
    ids = random_ids(batch=3, length=16)
    mask = torch.ones_like(ids)
    mask[1, :8] = 0  # left-padded: 8 real tokens
    mask[2, 12:] = 0  # right-padded: 12 real tokens
    noisy = ids.masked_fill(mask == 0, 5)
    rows = [ids[0], ids[1, 8:], ids[2, :12]]
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        noised = model(noisy, attention_mask=mask)
        alone = [model(row[None]) for row in rows]
    torch.testing.assert_close(batched.recon_loss, noised.recon_loss)
    real = [batched.logits[0], batched.logits[1, 8:], batched.logits[2, :12]]
    for row_logits, single in zip(real, alone, strict=True):
        torch.testing.assert_close(row_logits, single.logits[0], rtol=1e-5, atol=1e-5)
    per_token = sum(out.recon_loss * row.numel() for out, row in zip(alone, rows, strict=True)) / mask.sum()
    torch.testing.assert_close(batched.recon_loss, per_token, rtol=1e-5, atol=1e-5)
    assert (batched.codes[1, :2] == -1).all() and (batched.codes[2, 3:] == -1).all()


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


def _train_steps(model, steps, lr=1e-2, start=0):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ids = random_ids(batch=4, length=16)
    for step in range(start, start + steps):
        model.on_step_begin(step)
        loss = model(ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


# the per-chunk path's ends: they train under freezing and under LoRA alike
ALWAYS_TRAINED = ("embed_tokens.weight", "encoder.norm.weight", "decoder.norm.weight", "lm_head.weight",
                  "downsample.convs.0.weight", "upsample.convs.0.weight")


def assert_ends_train(model, before):
    params = dict(model.named_parameters())
    for name in ALWAYS_TRAINED:
        assert params[name].requires_grad, f"{name} is frozen"
        assert not torch.equal(params[name], before[name]), f"{name} did not change in training"


def test_frozen_then_unfrozen_backbone():
    # non-zero residual branches: every layer weight gets a gradient once it is trainable
    model = make_model(freeze_backbone_steps=3, zero_init_residual_branches=False).train()
    before = snapshot(model)
    layer_names = [n for n, p in model.named_parameters() if any(p is q for q in model.backbone_parameters())]
    assert layer_names and not any(p.requires_grad for p in model.backbone_parameters()), "frozen from the start"
    _train_steps(model, 3)
    after = snapshot(model)
    for name in layer_names:
        assert torch.equal(after[name], before[name]), f"frozen backbone weight {name} moved"
    assert_ends_train(model, before)

    _train_steps(model, 1, start=3)
    assert all(p.requires_grad for p in model.backbone_parameters())
    params = dict(model.named_parameters())
    for name in ("encoder.layers.0.self_attn.q_proj.weight", "decoder.layers.1.mlp.down_proj.weight"):
        assert not torch.equal(params[name], after[name]), f"{name} did not train after unfreezing"


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


def without_lora(model: RQVAEModel, **overrides) -> RQVAEModel:
    """A model without adapters holding `model`'s base weights."""
    plain = make_model(**{**overrides, "lora_r": 0})
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(state)
    return plain.eval()


def test_lora_starts_equal_to_its_base_model():
    overrides = {"lora_r": 4, "lora_alpha": 8, "zero_init_residual_branches": False}
    model = make_model(**overrides).eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_b and all(p.abs().sum() == 0 for p in lora_b), "lora_B must start at zero, as peft starts it"
    assert all(p.abs().sum() > 0 for p in lora_a)
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, without_lora(model, **overrides)(ids).logits, rtol=0, atol=0)


def test_lora_from_backbone_starts_equal_to_the_pretrained_model(tmp_path):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(3)
    Qwen3ForCausalLM(tiny_qwen3_config()).save_pretrained(tmp_path)
    kwargs = {"compression_factor": C, "num_quantizers": 2, "codebook_size": 16, "latent_dim": 16}
    model = RQVAEModel.from_backbone(str(tmp_path), lora_r=4, lora_alpha=8, **kwargs).eval()
    plain = RQVAEModel.from_backbone(str(tmp_path), **kwargs).eval()
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    layer_keys = [k for k in state if ".layers." in k and "coder." in k and "latent" not in k]
    assert layer_keys and all(torch.equal(state[k], plain.state_dict()[k]) for k in layer_keys)
    plain.load_state_dict(state)  # the parts from_backbone leaves random (convs, quantizer) agree too
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=0)


def test_lora_trains_adapters_and_the_ends_only(tmp_path):
    model = make_model(lora_r=4, lora_alpha=8, zero_init_residual_branches=False).train()
    assert not any(p.requires_grad for p in model.backbone_parameters())
    assert all(p.requires_grad for p in model.adapter_parameters())
    before = snapshot(model)
    _train_steps(model, 1)
    after = snapshot(model)
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    for name, param in model.named_parameters():
        if id(param) in backbone_ids:
            assert torch.equal(after[name], before[name]), f"backbone weight {name} changed under LoRA"
    assert any(not torch.equal(after[n], before[n]) for n in after if "lora_B" in n), "LoRA adapters did not train"
    assert_ends_train(model, before)

    model.eval()
    ids = random_ids()
    with torch.no_grad():
        expected = model(ids).logits
        assert not torch.allclose(expected, without_lora(model, zero_init_residual_branches=False)(ids).logits)
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


def test_add_lora_freezes_only_the_wrapped_base_weights():
    from rqlm.modeling.layers import Qwen3Stack
    from rqlm.modeling.lora import add_lora, lora_parameters, merge_lora

    stack = Qwen3Stack(tiny_qwen3_config(), 1)
    stack.layers[0].mlp.up_proj.weight.requires_grad_(False)  # the caller's choice survives
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        expected = stack(x)
    add_lora(stack, r=2, target_modules=["q_proj", "down_proj"])
    flags = {n: p.requires_grad for n, p in stack.named_parameters()}
    assert flags["norm.weight"] and flags["layers.0.input_layernorm.weight"] and flags["layers.0.self_attn.k_proj.weight"]
    assert not flags["layers.0.self_attn.q_proj.base_layer.weight"] and not flags["layers.0.mlp.up_proj.weight"]
    assert len(list(lora_parameters(stack))) == 4 and all(p.requires_grad for p in lora_parameters(stack))
    with torch.no_grad():
        torch.testing.assert_close(stack(x), expected, rtol=0, atol=0)
        for p in lora_parameters(stack):
            p.normal_()
        changed = stack(x)
    merge_lora(stack)
    assert not list(lora_parameters(stack)) and isinstance(stack.layers[0].self_attn.q_proj, torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(stack(x), changed, rtol=1e-5, atol=1e-5)


def test_lora_frozen_then_adapters_train():
    model = make_model(lora_r=4, freeze_backbone_steps=2, zero_init_residual_branches=False).train()
    assert not any(p.requires_grad for p in model.adapter_parameters())
    before = snapshot(model)
    _train_steps(model, 2)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)
    assert_ends_train(model, before)
    _train_steps(model, 1, start=2)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_from_backbone_loads_pretrained_layers(tmp_path):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(3)
    qwen = Qwen3ForCausalLM(tiny_qwen3_config(num_hidden_layers=3))
    qwen.save_pretrained(tmp_path)
    kwargs = {"compression_factor": C, "num_quantizers": 2, "codebook_size": 16, "latent_dim": 16}
    model = RQVAEModel.from_backbone(str(tmp_path), num_encoder_layers=2, num_decoder_layers=1, **kwargs)
    assert len(model.encoder.layers) == 2 and len(model.decoder.layers) == 1
    assert torch.equal(model.embed_tokens.weight, qwen.model.embed_tokens.weight)
    assert torch.equal(model.encoder.layers[1].self_attn.k_proj.weight, qwen.model.layers[1].self_attn.k_proj.weight)
    # by default the decoder takes the FIRST layers (measured better than the last ones)
    assert torch.equal(model.decoder.layers[0].mlp.up_proj.weight, qwen.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(model.decoder.norm.weight, qwen.model.norm.weight)
    assert torch.equal(model.lm_head.weight, qwen.lm_head.weight)
    flipped = RQVAEModel.from_backbone(
        str(tmp_path), num_encoder_layers=1, num_decoder_layers=2, encoder_layers="last", decoder_layers="last", **kwargs
    )
    assert torch.equal(flipped.encoder.layers[0].mlp.up_proj.weight, qwen.model.layers[2].mlp.up_proj.weight)
    assert torch.equal(flipped.decoder.layers[1].mlp.up_proj.weight, qwen.model.layers[2].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="exceeds the backbone"):
        RQVAEModel.from_backbone(str(tmp_path), num_encoder_layers=4)
    with pytest.raises(ValueError, match="decoder_layers must be 'first' or 'last'"):
        RQVAEModel.from_backbone(str(tmp_path), decoder_layers="middle")


def test_gradient_checkpointing_matches():
    # non-zero residual branches, so the checked weights get a non-zero gradient
    model = make_model(zero_init_residual_branches=False).train()
    model.quantizer.eval()  # no codebook update between the two passes (and no straight-through to the encoder)
    ids = random_ids()
    weights = [model.decoder.layers[0].self_attn.q_proj.weight, model.decoder.layers[1].mlp.down_proj.weight]

    def loss_and_grads():
        loss = model(ids).loss
        loss.backward()
        grads = [w.grad.clone() for w in weights]
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    loss, grads = loss_and_grads()
    assert all(g.abs().sum() > 0 for g in grads)
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.decoder.layers)
    loss_ckpt, grads_ckpt = loss_and_grads()
    torch.testing.assert_close(loss, loss_ckpt)
    for grad, grad_ckpt in zip(grads, grads_ckpt, strict=True):
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
        model.decode(torch.zeros(1, 4, 3, dtype=torch.long))  # depth 3, the model has 2
    for call in (model, model.encode):
        with pytest.raises(ValueError, match="must be an integer tensor"):
            call(random_ids().float())
        for empty in (torch.zeros(0, 8, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long)):
            with pytest.raises(ValueError, match="input_ids is empty"):
                call(empty)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        model.decode(torch.full((1, 2, 2), 16))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        model.decode(torch.full((1, 2, 2), -2))
    with pytest.raises(ValueError, match="codes must be an integer tensor"):
        model.decode(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="codes are empty"):
        model.decode(torch.zeros(1, 0, 2, dtype=torch.long))
    codes = torch.tensor([[[-1, -1], [3, 15]]])  # -1: a padded position, decoded from a zero latent
    assert model.decode(codes).shape == (1, 2 * C, 96)
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
