"""Codebook quantizers (VectorQuantize, ResidualVQ, GroupedResidualVQ, SimVQ, ResidualSimVQ,
RandomProjectionQuantizer) and the registry: keyword matrix, exact decoding, parity with
vector-quantize-pytorch, EMA and dead-code dynamics, fp32 numerics, masks and errors."""

import pytest
import torch

from rqlm.modeling.quantizer_registry import (
    QUANTIZER_CLASSES,
    build_quantizer,
    code_depth,
    codebook_stats,
    codes_to_quantized,
    quantize,
)
from rqlm.quantizers import (
    GroupedResidualVQ,
    RandomProjectionQuantizer,
    ResidualSimVQ,
    ResidualVQ,
    SimVQ,
    VectorQuantize,
)

DIM, CODES, BATCH, LENGTH = 16, 32, 2, 12

VQ_CASES = {
    "ema": {},
    "cosine": {"use_cosine_sim": True},
    "projection": {"codebook_dim": 8},
    "heads_separate": {"heads": 4, "separate_codebook_per_head": True, "codebook_dim": 4},
    "heads_shared": {"heads": 2, "codebook_dim": 8},
    "kmeans_dead_code": {"kmeans_init": True, "kmeans_iters": 2, "threshold_ema_dead_code": 2},
    "learnable": {"learnable_codebook": True, "ema_update": False},
    "orthogonal": {
        "orthogonal_reg_weight": 1.0,
        "orthogonal_reg_active_codes_only": True,
        "orthogonal_reg_max_codes": 8,
    },
    "stochastic": {"stochastic_sample_codes": True, "sample_codebook_temp": 0.5},
    "straight_through": {"rotation_trick": False},
    "no_commitment": {"commitment_weight": 0.0},
    "frozen": {"freeze_codebook": True},
}


def inputs(seed: int = 0, batch: int = BATCH, length: int = LENGTH, dim: int = DIM) -> torch.Tensor:
    return torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed))


def assert_exact_decoding(quantizer, x, decode, *args):
    """Eval mode: forward is deterministic and decoding its indices gives its output bit for bit."""
    quantizer.eval()
    quantized, indices, *_ = quantizer(x, *args)
    again, indices_again, *_ = quantizer(x, *args)
    assert torch.equal(indices, indices_again) and torch.equal(quantized, again)
    assert torch.equal(decode(indices), quantized)


# ----------------------------------------------------------------------------- keyword matrix


@pytest.mark.parametrize("case", VQ_CASES)
def test_vector_quantize_matrix(case):
    torch.manual_seed(0)
    kwargs = VQ_CASES[case]
    vq = VectorQuantize(dim=DIM, codebook_size=CODES, **kwargs)
    x = inputs().requires_grad_()
    quantized, indices, loss = vq(x)
    heads = kwargs.get("heads", 1)
    assert quantized.shape == x.shape
    assert indices.shape == ((BATCH, LENGTH, heads) if heads > 1 else (BATCH, LENGTH))
    assert indices.dtype == torch.long and 0 <= int(indices.min()) and int(indices.max()) < CODES
    assert loss.shape == () and torch.isfinite(loss)
    (quantized.square().sum() + loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert_exact_decoding(vq, inputs(1), vq.get_output_from_indices)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_cosine_sim": True, "shared_codebook": True},
        {"codebook_dim": 8, "quantize_dropout": True, "quantize_dropout_cutoff_index": 1},
        {"kmeans_init": True, "threshold_ema_dead_code": 1, "stochastic_sample_codes": True},
        {"learnable_codebook": True, "ema_update": False, "rotation_trick": False},
        {"codebook_size": (8, 16, 32)},
    ],
    ids=[
        "ema",
        "cosine_shared",
        "projection_dropout",
        "kmeans_dead_stochastic",
        "learnable",
        "sizes_per_depth",
    ],
)
def test_residual_vq_matrix(kwargs):
    torch.manual_seed(0)
    kwargs = {"num_quantizers": 3, "codebook_size": CODES, **kwargs}
    rvq = ResidualVQ(dim=DIM, **kwargs)
    x = inputs().requires_grad_()
    quantized, indices, losses, all_codes = rvq(x, return_all_codes=True)
    assert quantized.shape == x.shape and indices.shape == (BATCH, LENGTH, 3)
    assert losses.shape == (3,) and all_codes.shape == (3, BATCH, LENGTH, rvq.codebook_dim)
    (quantized.square().sum() + losses.sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert_exact_decoding(rvq, inputs(1), rvq.get_output_from_indices)


def test_grouped_residual_vq():
    torch.manual_seed(0)
    grvq = GroupedResidualVQ(dim=DIM, groups=2, num_quantizers=2, codebook_size=CODES, quantize_dropout=True)
    x = inputs().requires_grad_()
    quantized, indices, losses = grvq(x)
    assert quantized.shape == x.shape and indices.shape == (2, BATCH, LENGTH, 2) and losses.shape == (2, 2)
    (quantized.sum() + losses.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert_exact_decoding(grvq, inputs(1), grvq.get_output_from_indices)


@pytest.mark.parametrize("rotation_trick", [True, False])
def test_simvq_and_residual_simvq(rotation_trick):
    torch.manual_seed(0)
    simvq = SimVQ(dim=DIM, codebook_size=CODES, rotation_trick=rotation_trick)
    x = inputs().requires_grad_()
    quantized, indices, loss = simvq(x)
    loss.backward(retain_graph=True)
    assert simvq.code_transform.weight.grad.abs().sum() > 0  # the loss trains the linear map
    quantized.sum().backward()
    assert torch.isfinite(x.grad).all() and indices.shape == (BATCH, LENGTH)
    assert_exact_decoding(simvq, inputs(1), simvq.indices_to_codes)

    rsimvq = ResidualSimVQ(dim=DIM, num_quantizers=3, codebook_size=CODES, rotation_trick=rotation_trick)
    quantized, indices, losses = rsimvq(x)
    assert indices.shape == (BATCH, LENGTH, 3) and losses.shape == (3,)
    assert_exact_decoding(rsimvq, inputs(1), rsimvq.get_output_from_indices)


def test_random_projection_quantizer_is_frozen():
    torch.manual_seed(0)
    rpq = RandomProjectionQuantizer(dim=DIM, codebook_size=CODES, codebook_dim=4, num_codebooks=2)
    before = {k: v.clone() for k, v in rpq.state_dict().items()}
    rpq.train()
    indices = rpq(inputs())
    assert indices.shape == (BATCH, LENGTH, 2)
    assert all(torch.equal(before[k], v) for k, v in rpq.state_dict().items())
    assert torch.equal(indices, rpq(inputs()))


def test_channel_first_single_vectors_and_spatial_input():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=DIM, codebook_size=CODES, channel_last=False).eval()
    x = inputs().transpose(1, 2)  # (B, dim, N)
    quantized, indices, _ = vq(x)
    assert quantized.shape == x.shape and indices.shape == (BATCH, LENGTH)
    assert torch.equal(vq.get_output_from_indices(indices), quantized)

    vq = VectorQuantize(dim=DIM, codebook_size=CODES).eval()
    single = inputs()[:, 0]  # (B, dim)
    quantized, indices, _ = vq(single)
    assert quantized.shape == single.shape and indices.shape == (BATCH,)
    assert torch.equal(vq.get_output_from_indices(indices), quantized)
    grid = torch.randn(BATCH, 3, 4, DIM)
    quantized, indices, _ = vq(grid)
    assert quantized.shape == grid.shape and indices.shape == (BATCH, 3, 4)


FMAP_CASES = {
    "vq_image": (VectorQuantize, {"dim": DIM, "codebook_size": CODES}, "accept_image_fmap", (3, 4)),
    "vq_video_heads": (
        VectorQuantize,
        {"dim": DIM, "codebook_size": CODES, "heads": 2, "separate_codebook_per_head": True, "codebook_dim": 4},
        "accept_3d_fmap",
        (2, 3, 4),
    ),
    "rvq_image": (ResidualVQ, {"dim": DIM, "codebook_size": CODES, "num_quantizers": 3}, "accept_image_fmap", (3, 4)),
    "rvq_video_projection": (
        ResidualVQ,
        {"dim": DIM, "codebook_size": CODES, "num_quantizers": 2, "codebook_dim": 8},
        "accept_3d_fmap",
        (2, 3, 4),
    ),
    "grouped_image": (
        GroupedResidualVQ,
        {"dim": DIM, "codebook_size": CODES, "num_quantizers": 2, "groups": 2},
        "accept_image_fmap",
        (3, 5),
    ),
}


@pytest.mark.parametrize("case", FMAP_CASES.values(), ids=FMAP_CASES.keys())
def test_feature_maps_equal_channel_last_input(case):
    """A (B, dim, *spatial) feature map quantizes exactly as its channel-last (B, *spatial, dim) view."""
    cls, kwargs, flag, spatial = case
    torch.manual_seed(0)
    fmap = cls(**kwargs, **{flag: True})
    twin = cls(**kwargs)
    twin.load_state_dict(fmap.state_dict())
    x = torch.randn(BATCH, DIM, *spatial)
    for training in (True, False):  # training: the same EMA step; eval: exact decoding
        fmap.train(training), twin.train(training)
        quantized, indices, loss = fmap(x)
        twin_quantized, twin_indices, twin_loss = twin(x.movedim(1, -1))
        assert quantized.shape == x.shape
        assert torch.equal(quantized, twin_quantized.movedim(-1, 1))
        assert torch.equal(indices, twin_indices) and torch.equal(loss, twin_loss)
        position_axis = 1 if cls is GroupedResidualVQ else 0  # grouped indices are (G, B, *spatial, Q)
        assert indices.shape[position_axis + 1 : position_axis + 1 + len(spatial)] == spatial
        for key, value in twin.state_dict().items():
            assert torch.equal(fmap.state_dict()[key], value), key
    assert torch.equal(fmap.get_output_from_indices(indices), quantized)
    with pytest.raises(ValueError, match="expected a feature map"):
        fmap(torch.randn(BATCH, DIM, *spatial, 2))


def test_quantize_dropout_decodes_fewer_depths():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=DIM, num_quantizers=4, codebook_size=CODES, quantize_dropout=True)
    seen = {int((rvq(inputs(s))[1][0, 0] >= 0).sum()) for s in range(12)}
    assert len(seen) > 1 and min(seen) >= 1  # random depths, the first always kept
    _, indices, losses = rvq(inputs(), rand_quantize_dropout_fixed_seed=3)
    kept = int((indices[0, 0] >= 0).sum())
    assert (indices[..., kept:] == -1).all() and (losses[kept:] == 0).all()
    rvq.eval()
    _, indices, _ = rvq(inputs())
    codes = rvq.get_codes_from_indices(indices)
    assert torch.equal(rvq.get_output_from_indices(indices[..., :2]), codes[0] + codes[1])
    with pytest.raises(ValueError, match="quantize_dropout"):
        ResidualVQ(dim=DIM, num_quantizers=4, codebook_size=CODES).get_output_from_indices(indices[..., :2])


def test_state_dict_round_trip():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=CODES, kmeans_init=True)
    rvq(inputs())
    copy = ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=CODES, kmeans_init=True)
    copy.load_state_dict(rvq.state_dict())
    rvq.eval()
    copy.eval()
    assert all(torch.equal(a, b) for a, b in zip(rvq(inputs(1)), copy(inputs(1))))


@pytest.mark.parametrize("name", ["vq", "rvq", "grouped_rvq", "random_projection", "simvq", "residual_simvq"])
def test_every_buffer_is_saved(name):
    """from_pretrained builds on the meta device and fills only saved tensors: no buffer may be left out."""
    quantizer = build_quantizer(
        name, dim=DIM, num_quantizers=1 if name == "simvq" else 2, codebook_size=CODES
    )
    assert set(dict(quantizer.named_buffers())) <= set(quantizer.state_dict())


def test_shared_codebook_is_one_module_saved_once():
    torch.manual_seed(0)
    rvq = ResidualVQ(
        dim=DIM, num_quantizers=3, codebook_size=CODES, shared_codebook=True, threshold_ema_dead_code=1
    )
    rvq(inputs())
    assert all(layer._codebook is rvq.layers[0]._codebook for layer in rvq.layers)
    assert [k for k in rvq.state_dict() if k.endswith("embed")] == ["layers.0._codebook.embed"]
    copy = ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=CODES, shared_codebook=True)
    copy.load_state_dict(rvq.state_dict())
    assert all(torch.equal(layer.codebook, rvq.layers[0].codebook) for layer in copy.layers)


# ----------------------------------------------------------------------------- parity with the reference


# The EMA rule rqlm follows is the reference's since 1.34 (the version pinned in pyproject's dev extra):
# statistics start at zero and code = (embed_avg + eps * code) / (cluster_size + eps), so a code that gets
# no vector stays where it is. Up to 1.31 both libraries Laplace-smoothed the counts, which pulled unused
# codes to the origin. The dead-code ratios (dead_code_threshold_ratio, reset_cluster_size_ratio) follow
# the reference too; threshold_ema_dead_code and reset_cluster_size keep their meaning up to 1.31 (EMA
# counts), which the reference now converts into ratios (see rqlm.modeling.vector_quantize).
SEPARATE_HEADS = {"heads": 2, "separate_codebook_per_head": True, "codebook_dim": 4}
PARITY_CASES = [
    ("VectorQuantize", {"dim": DIM, "codebook_size": CODES}),
    ("VectorQuantize", {"dim": DIM, "codebook_size": CODES, **SEPARATE_HEADS}),
    ("ResidualVQ", {"dim": DIM, "num_quantizers": 3, "codebook_size": CODES}),
    ("ResidualVQ", {"dim": DIM, "num_quantizers": 3, "codebook_size": CODES, "codebook_dim": 8}),
]
PARITY_IDS = ["vq", "vq_heads", "rvq", "rvq_projection"]


def reference_pair(name: str, **kwargs):
    """(ours, reference) with the reference's weights loaded into ours."""
    ref = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    reference = getattr(ref, name)(**kwargs)
    ours = QUANTIZER_CLASSES[name](**kwargs)
    ours.load_state_dict(reference.state_dict())
    return ours, reference


@pytest.mark.parametrize("use_cosine_sim", [False, True], ids=["euclidean", "cosine"])
@pytest.mark.parametrize("name,kwargs", PARITY_CASES, ids=PARITY_IDS)
def test_parity_with_reference(name, kwargs, use_cosine_sim):
    """Same indices, outputs, losses, gradients and EMA step as the reference, with gradients flowing.

    Within rounding: the reference's rotation-trick output is the rotated input, equal to the code up to
    rounding, and that rounding reaches the residuals of later depths (rqlm returns the code exactly).
    The EMA rule itself is compared bit for bit in `test_ema_step_equals_the_reference_bit_for_bit`.
    """
    ours, reference = reference_pair(name, use_cosine_sim=use_cosine_sim, **kwargs)
    x = inputs(2, length=40)
    for training in (False, True):  # eval first: training moves the EMA codebooks
        ours.train(training), reference.train(training)
        x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        q_ours, i_ours, l_ours = ours(x_ours)
        q_ref, i_ref, l_ref = reference(x_ref)
        assert torch.equal(i_ours, i_ref)
        torch.testing.assert_close(q_ours, q_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l_ours, l_ref.to(l_ours.dtype), rtol=1e-5, atol=1e-6)
        if training:  # same rotation-trick gradients and the same EMA step
            (q_ours.square().sum() + l_ours.sum()).backward()
            (q_ref.square().sum() + l_ref.sum()).backward()
            torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
            for key, value in reference.state_dict().items():
                torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("use_cosine_sim", [False, True], ids=["euclidean", "cosine"])
@pytest.mark.parametrize("name,kwargs", PARITY_CASES, ids=PARITY_IDS)
def test_ema_step_equals_the_reference_bit_for_bit(name, kwargs, use_cosine_sim):
    """rqlm's EMA update is the reference's rule: three training steps leave every buffer bitwise equal."""
    ours, reference = reference_pair(name, use_cosine_sim=use_cosine_sim, **kwargs)
    ours.train(), reference.train()
    for step in range(3):
        x = inputs(10 + step, length=40)
        with torch.no_grad():  # no rotation trick: each depth gets the same residual bit for bit
            q_ours, i_ours, l_ours = ours(x)
            q_ref, i_ref, l_ref = reference(x)
        assert torch.equal(i_ours, i_ref) and torch.equal(q_ours, q_ref) and torch.equal(l_ours, l_ref)
        for key, value in reference.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), f"step {step}: {key}"


def test_simvq_and_random_projection_parity_with_reference():
    ours, reference = reference_pair("SimVQ", dim=DIM, codebook_size=CODES)
    ours.eval(), reference.eval()
    x = inputs(3)
    q_ours, i_ours, l_ours = ours(x)
    q_ref, i_ref, l_ref = reference(x)
    assert torch.equal(i_ours, i_ref)
    torch.testing.assert_close(q_ours, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_ours, l_ref)

    ours, reference = reference_pair(
        "RandomProjectionQuantizer", dim=DIM, codebook_size=CODES, codebook_dim=8
    )
    assert torch.equal(ours(x), reference(x))


# ----------------------------------------------------------------------------- training dynamics


def gaussian_mixture(centers: torch.Tensor, num: int, generator: torch.Generator, std: float = 0.05):
    labels = torch.randint(0, len(centers), (num,), generator=generator)
    return centers[labels] + std * torch.randn(num, centers.shape[1], generator=generator)


def test_ema_fits_gaussian_mixture_clusters():
    generator = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(8, 4, generator=generator)
    vq = VectorQuantize(dim=4, codebook_size=8, decay=0.8)
    vq.codebook = centers + 0.4 * torch.randn(8, 4, generator=generator)  # right clusters, wrong places
    start_error = (vq.codebook - centers).norm(dim=-1).max()
    for _ in range(30):
        vq(gaussian_mixture(centers, 512, generator).unsqueeze(0))
    assert (vq.codebook - centers).norm(dim=-1).max() < 0.05 < start_error
    vq.eval()
    _, indices, _ = vq(gaussian_mixture(centers, 2048, generator).unsqueeze(0))
    assert codebook_usage_perplexity(indices, 8) > 7.5


def codebook_usage_perplexity(indices: torch.Tensor, size: int) -> float:
    from rqlm.modeling.quantizer_utils import codebook_usage

    return codebook_usage(indices.reshape(-1), size)["perplexity"][0]


def test_ema_step_moves_used_codes_to_their_mean_and_leaves_unused_codes_alone():
    """From zero statistics, one step puts each used code at the mean of its vectors; unused codes stay.

    The Laplace-smoothed rule of the reference up to 1.31 fails the second half: after enough steps
    without a vector, a code's sums and count vanish together and it collapsed toward the origin.
    """
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=8, decay=0.5)
    vq.codebook = torch.arange(8.0).repeat_interleave(4).view(8, 4)  # code k = (k, k, k, k)
    x = torch.tensor([[0.1, 0.2, 0.0, -0.1], [-0.1, 0.0, 0.1, 0.3], [3.2, 2.9, 3.0, 3.1]])
    vq(x.unsqueeze(0))
    torch.testing.assert_close(vq.codebook[0], x[:2].mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vq.codebook[3], x[2], rtol=1e-5, atol=1e-5)
    unused = [1, 2, 4, 5, 6, 7]
    for _ in range(60):  # 0.5 ** 60: the unused codes' statistics are long gone
        vq(x.unsqueeze(0))
    start = torch.arange(8.0)[unused, None].expand(-1, 4)
    torch.testing.assert_close(vq.codebook[unused], start, rtol=1e-6, atol=0)


DEAD_CODE_CASES = {
    "none": {},
    "absolute": {"threshold_ema_dead_code": 1},
    "ratio": {"dead_code_threshold_ratio": 0.1},
}


@pytest.mark.parametrize("case", DEAD_CODE_CASES, ids=DEAD_CODE_CASES.keys())
def test_dead_code_expiry_revives_unused_codes(case):
    generator = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(8, 4, generator=generator)
    vq = VectorQuantize(dim=4, codebook_size=8, **DEAD_CODE_CASES[case])
    far_away = torch.full((8, 4), 100.0)
    far_away[0] = 0.0  # a bad init: code 0 is nearest to everything
    vq.codebook = far_away
    for _ in range(30):
        vq(gaussian_mixture(centers, 512, generator).unsqueeze(0))
    vq.eval()
    _, indices, _ = vq(gaussian_mixture(centers, 2048, generator).unsqueeze(0))
    perplexity = codebook_usage_perplexity(indices, 8)
    if DEAD_CODE_CASES[case]:
        assert perplexity > 6 and int(vq.codes_replaced) >= 7
    else:
        assert perplexity == pytest.approx(1.0) and int(vq.codes_replaced) == 0


def dead_code_pair(**kwargs):
    """(ours, reference) VectorQuantize, 8 codes of dim 2 at distinct EMA counts 8 + k (code k at (k, 0))."""
    codes = torch.stack([torch.arange(8.0), torch.zeros(8)], dim=-1)
    counts = 8.0 + torch.arange(8.0)
    ours, reference = reference_pair("VectorQuantize", dim=2, codebook_size=8, **kwargs)
    for quantizer in (ours, reference):
        quantizer._codebook.embed.copy_(codes.unsqueeze(0))
        quantizer._codebook.cluster_size.copy_(counts.unsqueeze(0))
        quantizer._codebook.embed_avg.copy_((codes * counts[:, None]).unsqueeze(0))
    return ours, reference


def replaced_codes(quantizer) -> set[int]:
    """Codes 0-6 no longer on the (k, 0) grid of `dead_code_pair` (code 7 gets every vector and moves)."""
    return set(torch.nonzero(quantizer.codebook[:7, 1] != 0).flatten().tolist())


@pytest.mark.parametrize("num_vectors", [40, 3], ids=["enough_vectors", "fewer_vectors_than_dead_codes"])
def test_dead_code_ratios_match_the_reference(num_vectors):
    """dead_code_threshold_ratio expires codes below that share of the mean EMA count, and
    reset_cluster_size_ratio sets a replaced code's count to its share of the mean, as in the reference;
    with fewer vectors than dead codes, the least used are replaced first."""
    ours, reference = dead_code_pair(dead_code_threshold_ratio=0.99, reset_cluster_size_ratio=0.25)
    x = torch.stack([torch.full((num_vectors,), 7.0), 1 + torch.rand(num_vectors)], dim=-1)  # nearest code 7
    ours(x.unsqueeze(0)), reference(x.unsqueeze(0))
    # after the step: counts 0.8 * (8 + k) for k < 7 and 0.8 * 15 + 0.2 * num_vectors for code 7
    counts = 0.8 * (8.0 + torch.arange(8.0))
    counts[7] += 0.2 * num_vectors
    dead = torch.nonzero(counts < 0.99 * counts.mean()).flatten().tolist()
    expected = set(dead[:num_vectors])  # counts rise with k: the least used are the first dead ones
    assert replaced_codes(ours) == replaced_codes(reference) == expected and len(dead) > 3
    reset = 0.25 * counts.mean()
    torch.testing.assert_close(ours._codebook.cluster_size, reference._codebook.cluster_size, rtol=0, atol=0)
    torch.testing.assert_close(ours._codebook.cluster_size[0, sorted(expected)], reset.expand(len(expected)))
    kept = [k for k in range(8) if k not in expected]
    assert torch.equal(ours.codebook[kept], reference.codebook[kept])
    assert all((ours.codebook[k] == x).all(-1).any() for k in expected)  # replaced by vectors of the batch
    replaced = sorted(expected)
    torch.testing.assert_close(ours._codebook.embed_avg[0, replaced], ours.codebook[replaced] * reset)
    assert int(ours.codes_replaced) == len(expected)


@pytest.mark.parametrize("reset_cluster_size,reset", [(None, 7.5), (2.0, 2.0)])
def test_absolute_dead_code_threshold_keeps_its_meaning(reset_cluster_size, reset):
    """threshold_ema_dead_code and reset_cluster_size are EMA counts in rqlm, as in the reference up to
    1.31. The reference now reads them as the ratios T / codebook_size of the mean count, a different
    rule: here it replaces codes 0-3 where rqlm replaces the codes below count 7.5 (0 and 1). A replaced
    code restarts at count reset_cluster_size, by default the threshold."""
    ours, reference = dead_code_pair(threshold_ema_dead_code=7.5, reset_cluster_size=reset_cluster_size)
    x = torch.stack([torch.full((40,), 7.0), 1 + torch.rand(40)], dim=-1)
    ours(x.unsqueeze(0)), reference(x.unsqueeze(0))
    counts = 0.8 * (8.0 + torch.arange(8.0))
    counts[7] += 0.2 * 40
    assert replaced_codes(ours) == set(torch.nonzero(counts < 7.5).flatten().tolist()) == {0, 1}
    converted = torch.nonzero(counts < 7.5 / 8 * counts.mean()).flatten().tolist()
    assert replaced_codes(reference) == set(converted) == {0, 1, 2, 3}
    assert torch.equal(ours._codebook.cluster_size[0, :2], torch.full((2,), reset))


def test_kmeans_init_fits_clusters_at_first_step():
    generator = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(4, 4, generator=generator)
    vq = VectorQuantize(dim=4, codebook_size=8, kmeans_init=True, kmeans_iters=10)
    vq(gaussian_mixture(centers, 256, generator).unsqueeze(0))
    distance = torch.cdist(vq.codebook, centers).min(dim=0).values  # every cluster has a code
    assert bool(vq._codebook.initted) and distance.max() < 0.5


def test_kmeans_init_seeds_the_ema_statistics():
    """Kmeans init leaves its clusters' counts and sums (unlike the reference, which leaves zeros): codes
    with 2 or more vectors in the first batch survive threshold_ema_dead_code=2, where counts started
    from zero would be 0.2 * count after the first step and expire every code with fewer than 10."""
    generator = torch.Generator().manual_seed(0)
    centers = 10 * torch.randn(4, 4, generator=generator)
    x = gaussian_mixture(centers, 32, generator).unsqueeze(0)
    vq = VectorQuantize(dim=4, codebook_size=4, kmeans_init=True, threshold_ema_dead_code=2)
    _, indices, _ = vq(x)
    counts = torch.bincount(indices.flatten(), minlength=4).float()
    assert 2 <= counts.min() < 10 and int(vq.codes_replaced) == 0
    torch.testing.assert_close(vq._codebook.cluster_size[0], counts)


# ----------------------------------------------------------------------------- masks and numerics


def test_mask_keeps_padding_out_of_codebook_and_loss():
    torch.manual_seed(0)
    x = inputs()
    mask = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    mask[1, 5:] = False
    padded = x.clone()
    padded[~mask] = 1e4  # garbage in padding must not matter
    masked = VectorQuantize(dim=DIM, codebook_size=CODES)
    plain = VectorQuantize(dim=DIM, codebook_size=CODES)
    plain.load_state_dict(masked.state_dict())
    quantized, indices, loss = masked(padded, mask=mask)
    _, _, plain_loss = plain(x[mask].unsqueeze(0))
    torch.testing.assert_close(loss, plain_loss)
    torch.testing.assert_close(masked.codebook, plain.codebook)
    assert (indices[~mask] == -1).all() and (quantized[~mask] == 0).all()


@pytest.mark.parametrize("cls", [VectorQuantize, ResidualVQ])
def test_all_masked_batch_has_no_nan(cls):
    torch.manual_seed(0)
    kwargs = {"num_quantizers": 2} if cls is ResidualVQ else {}
    quantizer = cls(dim=DIM, codebook_size=CODES, kmeans_init=True, threshold_ema_dead_code=2, **kwargs)
    x = inputs().requires_grad_()
    mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    quantized, indices, loss = quantizer(x, mask=mask)
    loss.sum().backward()
    assert (quantized == 0).all() and (indices == -1).all() and torch.isfinite(loss).all()
    assert all(torch.isfinite(t).all() for t in quantizer.state_dict().values() if t.is_floating_point())


@pytest.mark.parametrize("cls", [VectorQuantize, ResidualVQ])
def test_zero_vector_under_cosine_similarity(cls):
    torch.manual_seed(0)
    kwargs = {"num_quantizers": 2} if cls is ResidualVQ else {}
    quantizer = cls(dim=DIM, codebook_size=CODES, use_cosine_sim=True, threshold_ema_dead_code=1, **kwargs)
    x = inputs()
    x[0, :3] = 0.0
    x.requires_grad_()
    quantized, _, loss = quantizer(x)
    (quantized.sum() + loss.sum()).backward()
    assert torch.isfinite(quantized).all() and torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(quantizer.layers[0].codebook if kwargs else quantizer.codebook).all()


def test_fp32_codebook_math_under_bf16_autocast():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=DIM, codebook_size=256, codebook_dim=8)
    x = inputs(length=64)
    codebook = vq.codebook.detach().clone()  # before this step's EMA update
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = vq.project_in(x)  # what the codebook sees under autocast
        _, indices, loss = vq(x)
    assert projected.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert vq._codebook.embed.dtype == torch.float32 and vq._codebook.cluster_size.dtype == torch.float32
    flat = projected.reshape(-1, 1, 8)
    fp32 = (flat.float() - codebook).square().sum(-1).argmin(-1).reshape(indices.shape)
    bf16 = (flat - codebook.bfloat16()).square().sum(-1).argmin(-1).reshape(indices.shape)
    assert torch.equal(indices, fp32) and not torch.equal(indices, bf16)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: VectorQuantize(dim=DIM, codebook_size=0), "codebook_size must be >= 1"),
        (
            lambda: VectorQuantize(dim=DIM, codebook_size=CODES, learnable_codebook=True, ema_update=True),
            "ema_update=False",
        ),
        (
            lambda: VectorQuantize(
                dim=DIM, codebook_size=CODES, use_cosine_sim=True, learnable_codebook=True
            ),
            "cosine",
        ),
        (
            lambda: VectorQuantize(
                dim=DIM,
                codebook_size=CODES,
                heads=2,
                separate_codebook_per_head=True,
                orthogonal_reg_active_codes_only=True,
            ),
            "separate_codebook_per_head",
        ),
        (lambda: ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=CODES, heads=2), "heads=1"),
        (
            lambda: ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=(8, 16), shared_codebook=True),
            "shared_codebook",
        ),
        (
            lambda: ResidualVQ(
                dim=DIM, num_quantizers=2, codebook_size=CODES, quantize_dropout_cutoff_index=2
            ),
            "cutoff",
        ),
        (lambda: GroupedResidualVQ(dim=DIM, groups=3, num_quantizers=2, codebook_size=CODES), "groups=3"),
        (
            lambda: build_quantizer("xyz", dim=DIM, num_quantizers=1, codebook_size=CODES),
            "unknown quantizer 'xyz'; choose from",
        ),
        (
            lambda: build_quantizer("simvq", dim=DIM, num_quantizers=4, codebook_size=CODES),
            "num_quantizers=1",
        ),
        (lambda: build_quantizer("fsq", dim=DIM, num_quantizers=1, codebook_size=1000), "levels"),
        (
            lambda: VectorQuantize(
                dim=DIM, codebook_size=CODES, threshold_ema_dead_code=2, dead_code_threshold_ratio=0.1
            ),
            "pass one dead-code threshold",
        ),
        (lambda: VectorQuantize(dim=DIM, codebook_size=CODES, dead_code_threshold_ratio=1.0), r"\[0, 1\)"),
        (
            lambda: VectorQuantize(
                dim=DIM,
                codebook_size=CODES,
                dead_code_threshold_ratio=0.1,
                reset_cluster_size=1,
                reset_cluster_size_ratio=0.1,
            ),
            "not both",
        ),
        (
            lambda: ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=CODES, reset_cluster_size_ratio=0.5),
            "no effect without dead-code expiry",
        ),
    ],
)
def test_bad_arguments_raise_one_line_errors(build, match):
    with pytest.raises(ValueError, match=match) as error:
        build()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("cls", [VectorQuantize, ResidualVQ, GroupedResidualVQ, SimVQ])
def test_wrong_last_dimension_is_a_clear_error(cls):
    kwargs = {"num_quantizers": 2} if cls in (ResidualVQ, GroupedResidualVQ) else {}
    quantizer = cls(dim=DIM, codebook_size=CODES, **kwargs)
    with pytest.raises(ValueError, match=f"{DIM}") as error:
        quantizer(torch.randn(BATCH, LENGTH, DIM + 1))
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- registry and adapter

ALL_NAMES = [
    "vq",
    "rvq",
    "residual_vq",
    "grouped_rvq",
    "grouped_residual_vq",
    "random_projection",
    "simvq",
    "residual_simvq",
    "fsq",
    "residual_fsq",
    "lfq",
    "residual_lfq",
    "latent_quantize",
]


def test_every_quantizer_is_registered():
    missing = [name for name in ALL_NAMES if name not in QUANTIZER_CLASSES]
    assert not missing, f"not registered: {missing}"
    assert QUANTIZER_CLASSES["VectorQuantize"] is VectorQuantize and QUANTIZER_CLASSES["rvq"] is ResidualVQ


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if n not in ("residual_vq", "grouped_residual_vq")])
@pytest.mark.parametrize("depth", [1, 4])
def test_adapter_round_trip(name, depth):
    if name == "simvq" and depth > 1 or name == "grouped_rvq" and depth == 1:
        pytest.skip("one code per position / needs depth divisible by groups")
    torch.manual_seed(0)
    quantizer = build_quantizer(name, dim=DIM, num_quantizers=depth, codebook_size=256)
    x = inputs().requires_grad_()
    mask = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    mask[0, 8:] = False
    quantized, codes, loss = quantize(quantizer, x, mask=mask)
    assert quantized.shape == x.shape and codes.shape == (BATCH, LENGTH, depth) and loss.shape == ()
    assert code_depth(quantizer) == depth and codes.dtype == torch.long
    assert (codes[~mask] == -1).all() and (quantized[~mask] == 0).all()
    if quantized.requires_grad:
        (quantized.sum() + loss).backward()
    quantizer.eval()
    quantized, codes, _ = quantize(quantizer, x.detach(), mask=mask)
    assert torch.equal(codes_to_quantized(quantizer, codes), quantized)
    stats = codebook_stats(quantizer, codes)
    assert len(stats["perplexity"]) == depth and all(1 <= p <= 256 for p in stats["perplexity"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"codebook_size": 16, "num_quantizers": 3},
        {"codebook_size": 16, "num_quantizers": 3, "return_zeros_for_masked_padding": False},
        {"codebook_size": (16, 32, 8)},
        {"codebook_size": 16, "num_quantizers": 2, "codebook_dim": 4},  # projections around the loop
        {"codebook_size": 16, "num_quantizers": 3, "kmeans_init": True, "threshold_ema_dead_code": 1},
    ],
)
def test_residual_vq_eval_lookup_loop_equals_the_depths_forwards(kwargs, monkeypatch):
    """In eval, plain depths take `_lookup_loop`; it returns exactly what running each depth's forward returns."""
    from rqlm.modeling.residual_vq import ResidualVQ

    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, **kwargs)
    rvq(torch.randn(2, 40, 8))  # training: kmeans init, EMA updates
    rvq.eval()
    x, mask = torch.randn(3, 7, 8), torch.rand(3, 7) > 0.3
    calls = []
    loop = ResidualVQ._lookup_loop
    monkeypatch.setattr(ResidualVQ, "_lookup_loop", lambda self, *a: calls.append(1) or loop(self, *a))
    fast = rvq(x, mask=mask)
    assert calls
    monkeypatch.setattr(rvq, "_looks_up_only", lambda last_depth: False)
    general = rvq(x, mask=mask)
    assert len(calls) == 1
    for got, want in zip(fast, general):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (fast[1][~mask] == -1).all() and (fast[1][mask] >= 0).all()


def test_residual_vq_lookup_loop_only_for_plain_depths_in_eval():
    from rqlm.modeling.residual_vq import ResidualVQ

    assert ResidualVQ(dim=8, codebook_size=16, num_quantizers=2).eval()._looks_up_only(1)
    assert not ResidualVQ(dim=8, codebook_size=16, num_quantizers=2)._looks_up_only(1)  # training
    cosine = ResidualVQ(dim=8, codebook_size=16, num_quantizers=2, use_cosine_sim=True).eval()
    assert not cosine._looks_up_only(1)
    assert not ResidualVQ(dim=8, codebook_size=16, num_quantizers=2, kmeans_init=True).eval()._looks_up_only(1)
