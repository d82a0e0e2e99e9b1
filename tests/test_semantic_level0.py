"""The semantic level 0: the RQ-VAE's first residual level distilled toward a frozen causal LM's hidden states.

Covers: weight 0 leaves the loss as without it; `semantic_loss` equals an explicit 1 - cosine over real positions;
padding never enters it; its gradient reaches the encoder and the level-0 codebook, not the teacher nor level 1;
the teacher's targets are its per-chunk mean last-layer hidden states; save/load keeps `semantic_proj` and never
the teacher; `rqlm train-vae --semantic_teacher` runs end to end offline and logs `semantic_loss`; bad flags and
teachers fail in one line.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_qwen3_config
from safetensors.torch import load_file
from test_rq_vae import make_model, random_ids
from test_rq_vae_training import vae_flags
from test_trainer import clean_accelerate_state, text_corpus  # noqa: F401  (fixtures)

from rqlm import RQVAEModel, cli
from rqlm.trainer.semantic_teacher import SemanticTeacher

C, S = 4, 16  # tokens per chunk, teacher width
LEARNABLE = {"learnable_codebook": True, "ema_update": False, "commitment_weight": 0.25}


def padded_batch():
    """ids (3, 16), mask with a left-padded row (2 padding chunks) and a right-padded one (1 padding chunk)."""
    ids = random_ids(batch=3, length=16)
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    mask[2, 12:] = 0
    return ids, mask


def random_targets(batch=3, length=16 // C, seed=2):
    return torch.randn(batch, length, S, generator=torch.Generator().manual_seed(seed))


def tiny_teacher(vocab_size: int = 96, seed: int = 3):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=vocab_size, hidden_size=S, head_dim=8)).eval()


# ----------------------------------------------------------------------------- the loss


def test_zero_weight_leaves_the_loss_unchanged():
    plain = make_model(zero_init_residual_branches=False)
    semantic = make_model(zero_init_residual_branches=False, semantic_dim=S, semantic_weight=0.0)
    missing, unexpected = semantic.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == {"semantic_proj.weight", "semantic_proj.bias"} and not unexpected
    ids, mask = padded_batch()
    torch.manual_seed(0)  # training mode: kmeans init samples from the batch
    a = plain(ids, attention_mask=mask)
    torch.manual_seed(0)
    b = semantic(ids, attention_mask=mask, semantic_targets=random_targets())
    assert torch.equal(a.loss, b.loss)
    assert a.semantic_loss is None and b.semantic_loss > 0


def explicit_semantic_loss(model, ids, mask, targets):
    """1 - cosine(W c + b, target) over the latent positions holding a real token, c the level-0 code's vector."""
    encoded = model.encode(ids, mask)
    codebook = model.quantizer.layers[0].codebook  # (K, d)
    distances, valid = [], model.latent_mask(mask)
    for b, row in enumerate(encoded.codes):
        for pos, codes in enumerate(row):
            if valid[b, pos]:
                projected = model.semantic_proj.weight @ codebook[codes[0]] + model.semantic_proj.bias
                distances.append(1 - F.cosine_similarity(projected, targets[b, pos], dim=0))
    return torch.stack(distances).mean()


def test_semantic_loss_is_one_minus_cosine_over_real_positions():
    model = make_model(zero_init_residual_branches=False, semantic_dim=S, semantic_weight=0.5).eval()
    ids, mask = padded_batch()
    targets = random_targets()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, semantic_targets=targets)
        plain = model(ids, attention_mask=mask)
        expected = explicit_semantic_loss(model, ids, mask, targets)
    torch.testing.assert_close(out.semantic_loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * expected, rtol=1e-5, atol=1e-6)


def test_padding_never_enters_the_semantic_loss():
    model = make_model(zero_init_residual_branches=False, semantic_dim=S, semantic_weight=1.0).eval()
    ids, mask = padded_batch()
    targets = random_targets()
    noisy_targets = targets.clone()
    noisy_targets[1, :2] = 100 * torch.randn(2, S)  # the padding chunks of the left-padded row
    noisy_targets[2, 3] = -100 * torch.randn(S)  # the padding chunk of the right-padded row
    rows = [(ids[0], targets[0]), (ids[1, 8:], targets[1, 2:]), (ids[2, :12], targets[2, :3])]
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, semantic_targets=targets).semantic_loss
        noised = model(ids.masked_fill(mask == 0, 5), attention_mask=mask, semantic_targets=noisy_targets)
        alone = [model(row[None], semantic_targets=target[None]).semantic_loss for row, target in rows]
    torch.testing.assert_close(batched, noised.semantic_loss, rtol=0, atol=0)
    positions = torch.tensor([len(target) for _, target in rows], dtype=torch.float32)
    per_position = (torch.stack(alone) * positions).sum() / positions.sum()
    torch.testing.assert_close(batched, per_position, rtol=1e-5, atol=1e-6)


def test_gradient_reaches_encoder_and_level0_codebook_not_teacher():
    model = make_model(quantizer_kwargs=LEARNABLE, semantic_dim=S, semantic_weight=1.0).train()
    teacher = SemanticTeacher(tiny_teacher(), compression_factor=C)
    ids, mask = padded_batch()
    targets = teacher(ids, mask)
    assert not targets.requires_grad
    model(ids, attention_mask=mask, semantic_targets=targets).semantic_loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in ("embed_tokens.weight", "to_latent.weight", "quantizer.layers.0._codebook.embed",
                 "semantic_proj.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, f"no semantic gradient reaches {name}"
    level1 = grads["quantizer.layers.1._codebook.embed"]
    assert level1 is None or level1.abs().sum() == 0, "the semantic loss reached the level-1 codebook"
    assert grads["lm_head.weight"] is None or grads["lm_head.weight"].abs().sum() == 0
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())


def test_targets_are_the_teachers_chunk_mean_last_hidden_states():
    model = tiny_teacher()
    teacher = SemanticTeacher(model, compression_factor=C)
    ids, mask = padded_batch()
    targets = teacher(ids, mask)
    assert targets.shape == (3, 16 // C, S)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    for b in range(3):
        for pos in range(16 // C):
            chunk = slice(pos * C, (pos + 1) * C)
            real = mask[b, chunk].bool()
            expected = hidden[b, chunk][real].mean(0) if real.any() else torch.zeros(S)
            torch.testing.assert_close(targets[b, pos], expected, rtol=1e-5, atol=1e-6)


def test_bad_semantic_inputs_fail_in_one_line():
    ids = random_ids()
    with pytest.raises(ValueError, match="no semantic level 0"):
        make_model()(ids, semantic_targets=torch.zeros(2, 4, S))
    with pytest.raises(ValueError, match=r"semantic_targets must have shape"):
        make_model(semantic_dim=S)(ids, semantic_targets=torch.zeros(2, 4, S + 1))
    with pytest.raises(ValueError, match="needs quantizer_type 'residual_vq'"):
        make_model(semantic_dim=S, quantizer_type="fsq", quantizer_kwargs={"levels": [4, 4]})
    with pytest.raises(ValueError, match="needs semantic_dim > 0"):
        make_model(semantic_weight=1.0)


# ----------------------------------------------------------------------------- checkpoint


def test_checkpoint_keeps_semantic_proj_and_loads_equal(tmp_path):
    model = make_model(semantic_dim=S, semantic_weight=0.5).eval()
    model.save_pretrained(tmp_path)
    loaded = RQVAEModel.from_pretrained(tmp_path).eval()
    assert loaded.config.semantic_dim == S and loaded.config.semantic_weight == 0.5
    torch.testing.assert_close(loaded.semantic_proj.weight, model.semantic_proj.weight, rtol=0, atol=0)
    ids, mask = padded_batch()
    targets = random_targets()
    with torch.no_grad():
        a = model(ids, attention_mask=mask, semantic_targets=targets)
        b = loaded(ids, attention_mask=mask, semantic_targets=targets)
    assert torch.equal(a.semantic_loss, b.semantic_loss) and torch.equal(a.loss, b.loss)


# ----------------------------------------------------------------------------- rqlm train-vae


@pytest.fixture(scope="module")
def teacher_dir(text_corpus, tmp_path_factory):  # noqa: F811
    """A tiny causal LM of the corpus tokenizer, saved like a `rqlm train-baseline` output (model + tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_corpus / "tokenizer")
    folder = tmp_path_factory.mktemp("teacher")
    tiny_teacher(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_train_vae_with_a_teacher_logs_semantic_loss_and_saves_no_teacher(text_corpus, teacher_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    flags = vae_flags(text_corpus, out, max_steps=3, semantic_teacher=teacher_dir, semantic_weight=1,
                      freeze_backbone_steps=0)
    assert cli.main(["train-vae", *flags]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["semantic_loss"] for r in records if "semantic_loss" in r]
    eval_losses = [r["eval_semantic_loss"] for r in records if "eval_semantic_loss" in r]
    assert len(train_losses) == 3 and eval_losses and all(0 <= v <= 2 for v in train_losses + eval_losses)
    weights = load_file(out / "model.safetensors")
    assert "semantic_proj.weight" in weights and weights["semantic_proj.weight"].shape == (S, 16)
    loaded = RQVAEModel.from_pretrained(out)
    assert set(weights) == set(loaded.state_dict()), "the checkpoint holds more than the VAE (the teacher?)"
    assert loaded.config.semantic_dim == S and loaded.config.semantic_weight == 1.0


def test_train_vae_semantic_flags_fail_in_one_line(text_corpus, teacher_dir, tmp_path, capsys):  # noqa: F811
    from rqlm.data.tokenizer import train_tokenizer

    small = tmp_path / "small_vocab"
    tiny_teacher(vocab_size=48).save_pretrained(small)
    other = tmp_path / "other_tokenizer"
    tiny_teacher(vocab_size=400).save_pretrained(other)
    train_tokenizer([f"{i} other words {i * 7} here" for i in range(200)], vocab_size=300, output_dir=other)
    vae = tmp_path / "a_vae"
    make_model().save_pretrained(vae)
    capsys.readouterr()  # the folders' save progress
    cases = {
        "--semantic_weight needs --semantic_teacher": {"semantic_weight": 1},
        "not found": {"semantic_teacher": tmp_path / "missing"},
        "fewer than the tokenizer's": {"semantic_teacher": small},
        "another vocabulary": {"semantic_teacher": other},
        "not a token-level causal LM": {"semantic_teacher": vae},
        "use residual_vq": {"semantic_teacher": teacher_dir, "quantizer_type": "fsq"},
    }
    for message, overrides in cases.items():
        rc = cli.main(["train-vae", *vae_flags(text_corpus, tmp_path / "out", max_steps=1, **overrides)])
        err = capsys.readouterr().err.strip().splitlines()  # data loading's progress bars, then the error
        errors = [line for line in err if line.startswith("rqlm train-vae: error:")]
        assert rc == 1 and errors == err[-1:] and message in errors[0], err


def test_checkpoints_saved_before_the_semantic_fields_still_resume(tmp_path):
    from rqlm.trainer.loop import MODEL_SIGNATURE_NAME, check_model_signature, model_signature

    old = model_signature(make_model())
    for key in ("semantic_dim", "semantic_weight"):  # what a checkpoint saved before these fields holds
        del old["config"][key]
    (tmp_path / MODEL_SIGNATURE_NAME).write_text(json.dumps(old))
    check_model_signature(tmp_path, model_signature(make_model()))  # the fields left off: resumes
    with pytest.raises(ValueError, match="semantic_dim='unset', this run has semantic_dim=16"):
        check_model_signature(tmp_path, model_signature(make_model(semantic_dim=S)))
