"""FSQ, ResidualFSQ, LFQ, ResidualLFQ, LatentQuantize: the keyword matrix, exact code round trips,
fp32 under autocast, one-line errors, and parity with vector-quantize-pytorch on the same inputs."""

import pytest
import torch

from rqlm.modeling.finite_scalar_quantization import FSQ
from rqlm.modeling.latent_quantization import LatentQuantize
from rqlm.modeling.lookup_free_quantization import LFQ
from rqlm.modeling.residual_fsq import ResidualFSQ
from rqlm.modeling.residual_lfq import ResidualLFQ

try:  # the parity tests need the reference; every other test runs without it
    import vector_quantize_pytorch as vqp
except ImportError:
    vqp = None
needs_reference = pytest.mark.skipif(
    vqp is None, reason="parity with vector-quantize-pytorch needs it installed (pip install -e '.[dev]')"
)

BATCH, LENGTH = 2, 24

FSQ_CASES = [
    {"levels": [8, 5, 5, 5]},
    {"levels": [8, 5, 5, 5], "dim": 16},
    {"levels": [2, 3, 4], "dim": 6, "preserve_symmetry": True},
    {"levels": [8, 6, 5], "dim": 12, "num_codebooks": 2},
    {"levels": [4, 4, 4], "dim": 8, "bound_hard_clamp": True, "projection_has_bias": False},
    {"levels": [5, 5, 5], "orthogonal_rotation": True},
    {"levels": [7, 5, 4], "dim": 8, "preserve_symmetry": True, "noise_dropout": 0.5},
    {"levels": [8, 5, 5], "dim": 8, "channel_first": True},
]
RFSQ_CASES = [
    {"levels": [8, 5, 5, 5], "num_quantizers": 3},
    {"levels": [8, 5, 5, 5], "num_quantizers": 2, "dim": 16},
    {"levels": [4, 4, 4], "num_quantizers": 3, "dim": 10, "bound_hard_clamp": False,
     "soft_clamp_input_value": 1.5},
    {"levels": [3, 5], "num_quantizers": 4, "dim": 12, "quantize_dropout": True,
     "quantize_dropout_cutoff_index": 1},
    {"levels": [5, 5], "num_quantizers": 4, "dim": 8, "quantize_dropout": True,
     "quantize_dropout_multiple_of": 2},
]
LFQ_CASES = [
    {"dim": 10, "codebook_size": 1024},
    {"dim": 32, "codebook_size": 256, "commitment_loss_weight": 0.25},
    {"dim": 16, "codebook_size": 64, "num_codebooks": 2, "spherical": True, "codebook_scale": 0.5},
    {"dim": 8, "codebook_size": 256, "soft_clamp_input_value": 2.0,
     "experimental_softplus_entropy_loss": True, "diversity_gamma": 2.5},
    {"dim": 12, "codebook_size": 32, "frac_per_sample_entropy": 0.5, "orthogonal_rotation": True,
     "commitment_loss_weight": 1.0},
    {"dim": 12, "codebook_size": 32, "cosine_sim_project_in": True, "projection_has_bias": False},
    {"dim": 12, "codebook_size": 32, "straight_through_activation": torch.nn.Tanh(),
     "entropy_loss_weight": 0.0, "commitment_loss_weight": 0.5},
]
RLFQ_CASES = [
    {"dim": 16, "num_quantizers": 3, "codebook_size": 256},
    {"dim": 8, "num_quantizers": 4, "codebook_size": 256, "commitment_loss_weight": 0.1,
     "soft_clamp_input_value": 4.0},
    {"dim": 32, "num_quantizers": 4, "codebook_size": 64, "quantize_dropout": True,
     "quantize_dropout_cutoff_index": 1},
]
LQ_CASES = [
    {"levels": [5, 4, 3], "dim": 3},
    {"levels": [5, 4, 3, 8], "dim": 16},
    {"levels": 4, "dim": 6, "codebook_dim": 3, "num_codebooks": 2},
    {"levels": [5, 5], "dim": 8, "channel_first": False, "optimize_values": False},
]


def case_id(kwargs: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in kwargs.items()).replace(" ", "")


def make_input(module, channel_first: bool = False, scale: float = 2.0) -> torch.Tensor:
    """(B, N, dim), or (B, dim, N) for channel-first modules."""
    torch.manual_seed(7)
    x = torch.randn(BATCH, LENGTH, module.dim) * scale
    return x.transpose(1, 2).contiguous() if channel_first else x


def pair(reference_cls, our_cls, kwargs: dict):
    """The reference and our module with identical weights (ours loads the reference's state dict)."""
    torch.manual_seed(0)
    reference = reference_cls(**kwargs)
    ours = our_cls(**kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def assert_one_line_error(excinfo) -> None:
    assert "\n" not in str(excinfo.value)


# ----------------------------------------------------------------------------- FSQ


@pytest.mark.parametrize("kwargs", FSQ_CASES, ids=case_id)
def test_fsq_forward_backward_and_exact_codes(kwargs):
    fsq = FSQ(**kwargs)
    x = make_input(fsq, channel_first=fsq.channel_first).requires_grad_()
    out, indices = fsq(x)
    assert out.shape == x.shape
    expected = (BATCH, LENGTH, fsq.num_codebooks) if fsq.keep_num_codebooks_dim else (BATCH, LENGTH)
    assert indices.shape == expected and indices.dtype == torch.long
    assert 0 <= indices.min() and indices.max() < fsq.codebook_size
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    fsq.eval()
    with torch.no_grad():
        out, indices = fsq(x)
        assert torch.equal(fsq.indices_to_codes(indices), out)
        assert torch.equal(fsq(x)[0], out)  # eval is deterministic
    assert fsq.codebook_size == torch.tensor(fsq.levels).prod().item() and fsq.num_quantizers == 1


@needs_reference
@pytest.mark.parametrize("kwargs", FSQ_CASES, ids=case_id)
def test_fsq_matches_reference(kwargs):
    reference, ours = pair(vqp.FSQ, FSQ, kwargs)
    x = make_input(ours, channel_first=ours.channel_first)
    for training in (True, False):
        reference.train(training), ours.train(training)
        torch.manual_seed(3)
        ref_out, ref_indices = reference(x)
        torch.manual_seed(3)
        out, indices = ours(x)
        assert torch.equal(out, ref_out)
        assert torch.equal(indices, ref_indices.long())
    assert torch.equal(ours.indices_to_codes(indices), reference.indices_to_codes(ref_indices))
    codes = ours.implicit_codebook
    assert torch.equal(codes, reference.implicit_codebook)
    assert torch.equal(ours.codes_to_indices(codes), torch.arange(ours.codebook_size))


def test_fsq_without_materialized_codebook():
    """materialize_codebook=False: no implicit codebook (None, as in the reference), the same codes and
    indices, and a grid of 8 ** 12 codes, too large to list, quantizes and decodes exactly."""
    listed, unlisted = FSQ(levels=[8, 5, 5, 5]), FSQ(levels=[8, 5, 5, 5], materialize_codebook=False)
    assert listed.implicit_codebook.shape == (1000, 4) and unlisted.implicit_codebook is None
    x = make_input(listed)
    out, indices = unlisted(x)
    assert all(torch.equal(a, b) for a, b in zip((out, indices), listed(x)))
    assert torch.equal(unlisted.indices_to_codes(indices), out)
    huge = FSQ(levels=[8] * 12, materialize_codebook=False)
    assert huge.implicit_codebook is None and huge.codebook_size == 8**12
    out, indices = huge(torch.randn(BATCH, LENGTH, 12))
    assert int(indices.max()) > 2**31 and torch.equal(huge.indices_to_codes(indices), out)
    residual = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=2, materialize_codebook=False)
    assert all(layer.implicit_codebook is None for layer in residual.layers)
    assert torch.equal(residual.codebooks, ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=2).codebooks)


@needs_reference
def test_fsq_without_materialized_codebook_matches_reference():
    kwargs = {"levels": [8] * 12, "materialize_codebook": False}
    reference, ours = pair(vqp.FSQ, FSQ, kwargs)
    assert reference.implicit_codebook is None and ours.implicit_codebook is None
    x = torch.randn(BATCH, LENGTH, 12)
    (out, indices), (ref_out, ref_indices) = ours(x), reference(x)
    assert torch.equal(out, ref_out) and torch.equal(indices, ref_indices)
    kwargs = {"levels": [8, 5, 5], "num_quantizers": 2, "materialize_codebook": False}
    reference, ours = pair(vqp.ResidualFSQ, ResidualFSQ, kwargs)
    assert torch.equal(ours.codebooks, reference.codebooks)


def test_fsq_computes_in_fp32_under_bf16_autocast():
    fsq = FSQ(levels=[8, 5, 5, 5], dim=16).eval()
    grid_only = FSQ(levels=[8, 5, 5, 5]).eval()
    x = make_input(fsq)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = fsq.project_in(x)
        out, indices = fsq(x)
    assert z.dtype == torch.bfloat16
    assert torch.equal(indices, grid_only(z.float())[1])  # quantized from the fp32 cast of the bf16 latents

    # a bf16 tensor outside autocast is upcast too, and the codes come back in bf16
    low = x[..., :4].bfloat16()
    out, indices = grid_only(low)
    assert out.dtype == torch.bfloat16 and torch.equal(indices, grid_only(low.float())[1])


# ----------------------------------------------------------------------------- ResidualFSQ


@pytest.mark.parametrize("kwargs", RFSQ_CASES, ids=case_id)
def test_residual_fsq_forward_backward_and_exact_codes(kwargs):
    rfsq = ResidualFSQ(**kwargs)
    x = make_input(rfsq).requires_grad_()
    out, indices, all_codes = rfsq(x, return_all_codes=True)
    assert out.shape == x.shape and indices.shape == (BATCH, LENGTH, rfsq.num_quantizers)
    assert all_codes.shape == (rfsq.num_quantizers, BATCH, LENGTH, len(rfsq.levels))
    assert indices.max() < rfsq.codebook_size and indices.min() >= -1
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():  # the train-mode output (dropped depths included) decodes exactly too
        assert torch.equal(rfsq.get_output_from_indices(indices), out)

    rfsq.eval()
    with torch.no_grad():
        out, indices = rfsq(x)
        assert (indices >= 0).all()
        assert torch.equal(rfsq.get_output_from_indices(indices), out)
        assert torch.equal(rfsq(x)[0], out)


@needs_reference
@pytest.mark.parametrize("kwargs", RFSQ_CASES, ids=case_id)
def test_residual_fsq_matches_reference(kwargs):
    reference, ours = pair(vqp.ResidualFSQ, ResidualFSQ, kwargs)
    x = make_input(ours)
    for training in (True, False):
        reference.train(training), ours.train(training)
        ref = reference(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=5)
        got = ours(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=5)
        assert torch.equal(got[0], ref[0])
        assert torch.equal(got[1], ref[1].long())
        assert torch.equal(got[2], ref[2])
    assert torch.equal(ours.scales, reference.scales)


def test_residual_fsq_channel_first_round_trip():
    rfsq = ResidualFSQ(levels=[8, 5, 5], num_quantizers=2, dim=8, is_channel_first=True).eval()
    x = torch.randn(BATCH, 8, 4, 5)
    out, indices = rfsq(x)
    assert out.shape == x.shape and indices.shape == (BATCH, 2, 4, 5)
    assert torch.equal(rfsq.get_output_from_indices(indices), out)


def test_residual_fsq_decodes_coarse_indices_with_dropout():
    rfsq = ResidualFSQ(levels=[5, 5], num_quantizers=3, dim=4, quantize_dropout=True).eval()
    _, indices = rfsq(make_input(rfsq))
    coarse = rfsq.get_output_from_indices(indices[..., :1])
    padded = indices.clone()
    padded[..., 1:] = -1
    assert torch.equal(coarse, rfsq.get_output_from_indices(padded))


# ----------------------------------------------------------------------------- LFQ


@pytest.mark.parametrize("kwargs", LFQ_CASES, ids=case_id)
def test_lfq_forward_backward_and_exact_codes(kwargs):
    lfq = LFQ(**kwargs)
    x = make_input(lfq).requires_grad_()
    out, indices, aux_loss = lfq(x)
    assert out.shape == x.shape and aux_loss.shape == ()
    expected = (BATCH, LENGTH, lfq.num_codebooks) if lfq.keep_num_codebooks_dim else (BATCH, LENGTH)
    assert indices.shape == expected and 0 <= indices.min() and indices.max() < lfq.codebook_size
    (out.square().sum() + aux_loss).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    lfq.eval()
    with torch.no_grad():
        out, indices, aux_loss = lfq(x)
        assert aux_loss.item() == 0.0
        assert torch.equal(lfq.indices_to_codes(indices), out)
        assert torch.equal(lfq(x)[0], out)
    assert lfq.num_quantizers == 1


@needs_reference
@pytest.mark.parametrize("kwargs", LFQ_CASES, ids=case_id)
def test_lfq_matches_reference(kwargs):
    reference, ours = pair(vqp.LFQ, LFQ, kwargs)
    x = make_input(ours)
    for training in (True, False):
        reference.train(training), ours.train(training)
        x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(3)
        (ref_out, ref_indices, ref_loss), ref_parts = reference(x_ref, return_loss_breakdown=True)
        torch.manual_seed(3)
        (out, indices, loss), parts = ours(x_ours, return_loss_breakdown=True)
        assert torch.equal(out, ref_out) and torch.equal(indices, ref_indices)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
        for got, want in zip(parts, ref_parts):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        if training:  # our fused softmax-entropy backward gives the same gradients
            (out.square().sum() + loss).backward()
            (ref_out.square().sum() + ref_loss).backward()
            torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(ours.indices_to_codes(indices), reference.indices_to_codes(ref_indices))


def test_lfq_channel_first_image_round_trip():
    lfq = LFQ(dim=6, codebook_size=16).eval()
    x = torch.randn(BATCH, 6, 3, 5)
    out, indices, _ = lfq(x)
    assert out.shape == x.shape and indices.shape == (BATCH, 3, 5)
    assert torch.equal(lfq.indices_to_codes(indices), out)


def test_lfq_mask_keeps_padding_out_of_the_losses():
    lfq = LFQ(dim=8, codebook_size=64, commitment_loss_weight=1.0)
    x = make_input(lfq)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    mask[:, LENGTH // 2:] = False
    perturbed = x.clone()
    perturbed[~mask] = torch.randn_like(perturbed[~mask]) * 10
    loss = lfq(x, mask=mask).entropy_aux_loss
    assert torch.equal(loss, lfq(perturbed, mask=mask).entropy_aux_loss)
    assert not torch.equal(loss, lfq(x).entropy_aux_loss)


def test_lfq_losses_are_fp32_under_bf16_autocast():
    lfq = LFQ(dim=10, codebook_size=1024, commitment_loss_weight=0.25)
    x = make_input(lfq)
    out, indices, loss = lfq(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_amp, indices_amp, loss_amp = lfq(x)
    assert loss_amp.dtype == torch.float32 and torch.equal(loss_amp, loss)
    assert torch.equal(indices_amp, indices) and torch.equal(out_amp, out)


# ----------------------------------------------------------------------------- ResidualLFQ


@pytest.mark.parametrize("kwargs", RLFQ_CASES, ids=case_id)
def test_residual_lfq_forward_backward_and_exact_codes(kwargs):
    torch.manual_seed(0)
    ours = ResidualLFQ(**kwargs)
    x = make_input(ours)
    x_ours = x.clone().requires_grad_()
    quantized, indices, losses, codes = ours(x_ours, return_all_codes=True, rand_quantize_dropout_fixed_seed=5)
    assert quantized.shape == x.shape and losses.shape == (ours.num_quantizers,)
    assert codes.shape[0] == ours.num_quantizers
    (quantized.square().sum() + losses.sum()).backward()
    assert torch.isfinite(x_ours.grad).all() and x_ours.grad.abs().sum() > 0
    ours.eval()
    with torch.no_grad():
        out, indices, _ = ours(x)
        assert torch.equal(ours.get_output_from_indices(indices), out)


@needs_reference
@pytest.mark.parametrize("kwargs", RLFQ_CASES, ids=case_id)
def test_residual_lfq_matches_reference(kwargs):
    reference, ours = pair(vqp.ResidualLFQ, ResidualLFQ, kwargs)
    x = make_input(ours)
    for training in (True, False):
        reference.train(training), ours.train(training)
        x_ours = x.clone().requires_grad_()
        ref = reference(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=5)
        got = ours(x_ours, return_all_codes=True, rand_quantize_dropout_fixed_seed=5)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and torch.equal(got[3], ref[3])
        torch.testing.assert_close(got[2], ref[2], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- LatentQuantize


@pytest.mark.parametrize("kwargs", LQ_CASES, ids=case_id)
def test_latent_quantize_forward_backward_and_exact_codes(kwargs):
    lq = LatentQuantize(**kwargs)
    x = make_input(lq, channel_first=lq.channel_first).requires_grad_()
    out, indices, loss = lq(x)
    assert out.shape == x.shape and loss.shape == ()
    assert 0 <= indices.min() and indices.max() < lq.codebook_size
    (out.square().sum() + loss).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if lq.optimize_values:  # the quantization loss moves the values (the reference's loss cancels out)
        assert all(value.grad.abs().sum() > 0 for value in lq.values_per_latent)

    lq.eval()
    with torch.no_grad():
        out, indices, loss = lq(x)
        assert loss.item() == 0.0
        assert torch.equal(lq.indices_to_codes(indices), out)
        assert torch.equal(lq(x)[0], out)


@needs_reference
@pytest.mark.parametrize("kwargs", LQ_CASES[:3], ids=case_id)
def test_latent_quantize_matches_reference_outputs(kwargs):
    reference, ours = pair(vqp.LatentQuantize, LatentQuantize, kwargs)
    x = make_input(ours, channel_first=True)
    reference.eval(), ours.eval()
    ref_out, ref_indices, _ = reference(x)
    out, indices, _ = ours(x)
    assert torch.equal(out, ref_out) and torch.equal(indices, ref_indices.long())
    if not ours.has_projections:  # same loss value; only the gradients differ
        reference.train(), ours.train()
        torch.testing.assert_close(ours(x)[2], reference(x)[2])


# ----------------------------------------------------------------------------- attributes and errors


def test_every_class_reports_codebook_size_and_depth():
    assert (FSQ(levels=[8, 5]).codebook_size, FSQ(levels=[8, 5]).num_quantizers) == (40, 1)
    assert (ResidualFSQ(levels=[8, 5], num_quantizers=3).codebook_size,
            ResidualFSQ(levels=[8, 5], num_quantizers=3).num_quantizers) == (40, 3)
    lfq = LFQ(dim=4, codebook_size=16)
    assert (lfq.codebook_size, lfq.num_quantizers) == (16, 1)
    rlfq = ResidualLFQ(dim=4, num_quantizers=2, codebook_size=16)
    assert (rlfq.codebook_size, rlfq.num_quantizers) == (16, 2)
    lq = LatentQuantize(levels=[3, 4], dim=2)
    assert (lq.codebook_size, lq.num_quantizers) == (12, 1)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: FSQ(levels=[1, 5]), ">= 2"),
        (lambda: FSQ(levels=[]), "at least one level"),
        (lambda: FSQ(levels=[2, 5]), "preserve_symmetry"),
        (lambda: FSQ(levels=[5, 5], noise_dropout=0.1), "preserve_symmetry"),
        (lambda: FSQ(levels=[5, 5], num_codebooks=2, keep_num_codebooks_dim=False), "keep_num_codebooks_dim"),
        (lambda: ResidualFSQ(levels=[1, 5], num_quantizers=2), ">= 2"),
        (lambda: ResidualFSQ(levels=[5, 5], num_quantizers=2, quantize_dropout_cutoff_index=2), "cutoff"),
        (lambda: ResidualFSQ(levels=[5, 5], num_quantizers=0), "num_quantizers"),
        (lambda: LFQ(dim=8, codebook_size=1000), "power of 2"),
        (lambda: LFQ(), "dim or codebook_size"),
        (lambda: LFQ(dim=8, codebook_size=16, frac_per_sample_entropy=0.0), "frac_per_sample_entropy"),
        (lambda: ResidualLFQ(dim=8, num_quantizers=2, codebook_size=100), "power of 2"),
        (lambda: LatentQuantize(levels=[1, 3], dim=2), ">= 2"),
        (lambda: LatentQuantize(levels=4, dim=2), "codebook_dim"),
        (lambda: LatentQuantize(levels=[3, 3], dim=2, in_place_codebook_optimizer=torch.optim.SGD),
         "unsupported"),
    ],
)
def test_bad_arguments_raise_one_line_errors(build, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        build()
    assert_one_line_error(excinfo)


@pytest.mark.parametrize(
    "module",
    [
        FSQ(levels=[8, 5], dim=6),
        ResidualFSQ(levels=[8, 5], num_quantizers=2, dim=6),
        LFQ(dim=6, codebook_size=16),
        ResidualLFQ(dim=6, num_quantizers=2, codebook_size=16),
        LatentQuantize(levels=[3, 3], dim=6, channel_first=False),
    ],
    ids=lambda module: type(module).__name__,
)
def test_wrong_feature_dimension_raises_one_line_error(module):
    with pytest.raises(ValueError, match="expected feature dimension 6") as excinfo:
        module(torch.randn(BATCH, LENGTH, 5))
    assert_one_line_error(excinfo)


def test_too_many_depths_to_decode_raise():
    rfsq = ResidualFSQ(levels=[5, 5], num_quantizers=2)
    with pytest.raises(ValueError, match="3 depths") as excinfo:
        rfsq.get_output_from_indices(torch.zeros(1, 4, 3, dtype=torch.long))
    assert_one_line_error(excinfo)
    with pytest.raises(ValueError, match="quantize_dropout"):
        rfsq.get_output_from_indices(torch.zeros(1, 4, 1, dtype=torch.long))
