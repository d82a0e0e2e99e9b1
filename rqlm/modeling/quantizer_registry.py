"""Every quantizer by name, one builder from the RQ-VAE's (D, K, d), and one calling convention for all.

`build_quantizer(quantizer_type, dim=d, num_quantizers=D, codebook_size=K, **kwargs)` maps the RQ-VAE's
sizes onto each class's own keywords. `quantize(quantizer, x, mask)` and `codes_to_quantized(quantizer,
codes)` hide the families' different return conventions: latents (B, L, d) -> quantized (B, L, d),
codes (B, L, code_depth(quantizer)) int64 and one scalar loss, and back from codes exactly (eval mode).

Code layout per family (last dimension of `codes`):
  residual families (rvq, residual_simvq, residual_fsq, residual_lfq): one code per depth, D of them;
  vq: one per head (D heads with separate codebooks when D > 1, product quantization);
  grouped_residual_vq: G groups x D / G depths, group-major (code g * D / G + q);
  random_projection, fsq, lfq, latent_quantize: one per codebook (num_codebooks = D);
  simvq: one (D must be 1).
Padded positions (mask False) get codes -1 and quantized 0 in every family, and decode back to 0;
FSQ, ResidualFSQ and LatentQuantize take no mask, so their losses (if any) include padded positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .finite_scalar_quantization import FSQ
from .latent_quantization import LatentQuantize
from .lookup_free_quantization import LFQ
from .quantizer_utils import codebook_usage, exists
from .random_projection_quantizer import RandomProjectionQuantizer
from .residual_fsq import ResidualFSQ
from .residual_lfq import ResidualLFQ
from .residual_vq import GroupedResidualVQ, ResidualVQ
from .sim_vq import ResidualSimVQ, SimVQ
from .vector_quantize import VectorQuantize

# FSQ levels recommended for a target codebook size (FSQ paper, arXiv:2309.15505, table 1)
FSQ_LEVELS = {
    2**8: [8, 6, 5],
    2**10: [8, 5, 5, 5],
    2**12: [7, 5, 5, 5, 5],
    2**14: [8, 8, 8, 6, 5],
    2**16: [8, 8, 8, 5, 5, 5],
}


# ----------------------------------------------------------------------------- builders (D, K, d) -> module


def _levels(name: str, codebook_size: int, kwargs: dict) -> list[int]:
    """FSQ-style levels: kwargs['levels'], else the paper's choice for codebook_size; at most K codes."""
    levels = kwargs.pop("levels", None) or FSQ_LEVELS.get(codebook_size)
    if levels is None:
        raise ValueError(
            f"quantizer {name!r} needs levels=[...] in quantizer_kwargs for codebook_size {codebook_size} "
            f"(defaults exist for {sorted(FSQ_LEVELS)})"
        )
    if math.prod(levels) > codebook_size:
        raise ValueError(
            f"levels {levels} give {math.prod(levels)} codes, more than codebook_size {codebook_size}"
        )
    return list(levels)


def _single_code(name: str, num_quantizers: int) -> None:
    if num_quantizers != 1:
        raise ValueError(
            f"quantizer {name!r} gives one code per position; set num_quantizers=1 (got {num_quantizers})"
        )


def _build_residual(cls: type) -> Callable[..., nn.Module]:
    """Builder for a residual family whose keywords are dim, num_quantizers and codebook_size."""

    def build(dim: int, num_quantizers: int, codebook_size: int, **kwargs) -> nn.Module:
        return cls(dim=dim, num_quantizers=num_quantizers, codebook_size=codebook_size, **kwargs)

    return build


def _build_vq(dim: int, num_quantizers: int, codebook_size: int, **kwargs) -> nn.Module:
    if num_quantizers > 1:
        kwargs.setdefault("heads", num_quantizers)
        kwargs.setdefault("separate_codebook_per_head", True)
        kwargs.setdefault("codebook_dim", max(1, dim // num_quantizers))
    if kwargs.get("heads", 1) != num_quantizers:
        raise ValueError(
            f"quantizer 'vq' gives one code per head; heads={kwargs['heads']} must equal num_quantizers"
        )
    return VectorQuantize(dim=dim, codebook_size=codebook_size, **kwargs)


def _build_grouped_rvq(
    dim: int, num_quantizers: int, codebook_size: int, groups: int = 2, **kwargs
) -> nn.Module:
    if num_quantizers % groups or dim % groups:
        raise ValueError(
            f"grouped_residual_vq splits num_quantizers={num_quantizers} and dim={dim} over groups={groups}; "
            "choose groups dividing both"
        )
    return GroupedResidualVQ(
        dim=dim, groups=groups, num_quantizers=num_quantizers // groups, codebook_size=codebook_size, **kwargs
    )


def _build_random_projection(dim: int, num_quantizers: int, codebook_size: int, **kwargs) -> nn.Module:
    codebook_dim = kwargs.pop("codebook_dim", dim // num_quantizers)
    if codebook_dim * num_quantizers != dim:
        raise ValueError(
            f"random_projection gives num_quantizers * codebook_dim channels; {num_quantizers} x {codebook_dim} != dim {dim}"
        )
    return RandomProjectionQuantizer(
        dim=dim,
        num_codebooks=num_quantizers,
        codebook_dim=codebook_dim,
        codebook_size=codebook_size,
        **kwargs,
    )


def _build_simvq(dim: int, num_quantizers: int, codebook_size: int, **kwargs) -> nn.Module:
    _single_code("simvq", num_quantizers)
    return SimVQ(dim=dim, codebook_size=codebook_size, **kwargs)


def _build_latent_quantize(dim: int, num_quantizers: int, codebook_size: int, **kwargs) -> nn.Module:
    levels = _levels("latent_quantize", codebook_size, kwargs)
    kwargs.setdefault("channel_first", False)  # the RQ-VAE's latents are (B, L, d)
    return LatentQuantize(levels=levels, dim=dim, num_codebooks=num_quantizers, **kwargs)


def _build_lfq(dim: int, num_quantizers: int, codebook_size: int, **kwargs) -> nn.Module:
    return LFQ(dim=dim, codebook_size=codebook_size, num_codebooks=num_quantizers, **kwargs)


def _build_fsq(dim: int, num_quantizers: int, codebook_size: int, **kwargs) -> nn.Module:
    levels = _levels("fsq", codebook_size, kwargs)
    return FSQ(levels=levels, dim=dim, num_codebooks=num_quantizers, **kwargs)


def _build_residual_fsq(dim: int, num_quantizers: int, codebook_size: int, **kwargs) -> nn.Module:
    levels = _levels("residual_fsq", codebook_size, kwargs)
    return ResidualFSQ(levels=levels, dim=dim, num_quantizers=num_quantizers, **kwargs)


# ----------------------------------------------------------------------------- adapters: one calling convention


@dataclass(frozen=True)
class Family:
    """How to build, run and decode one quantizer class with the uniform convention."""

    cls: type
    build: Callable[..., nn.Module]
    forward: Callable  # (quantizer, x, mask) -> (quantized, codes (B, L[, D]), loss or losses or None)
    decode: Callable  # (quantizer, codes (B, L, D) >= 0) -> quantized (B, L, d)
    depth: Callable[[nn.Module], int]
    residual: bool = False  # decodes -1 at depths that quantize dropout left out


def _squeeze_single(codes: torch.Tensor, keep: bool) -> torch.Tensor:
    return codes if keep else codes[..., 0]


def _grouped_codes(indices: torch.Tensor) -> torch.Tensor:
    """(G, B, L, Q) -> (B, L, G * Q), group-major."""
    return indices.permute(1, 2, 0, 3).flatten(-2)


def _grouped_indices(quantizer: GroupedResidualVQ, codes: torch.Tensor) -> torch.Tensor:
    """(B, L, G * Q) -> (G, B, L, Q)."""
    return codes.unflatten(-1, (quantizer.groups, -1)).permute(2, 0, 1, 3)


def _families() -> dict[str, Family]:
    """Canonical name -> Family."""
    return {
        "vq": Family(
            VectorQuantize,
            _build_vq,
            lambda m, x, mask: m(x, mask=mask),
            lambda m, c: m.get_output_from_indices(_squeeze_single(c, m.heads > 1)),
            lambda m: m.heads,
        ),
        "residual_vq": Family(
            ResidualVQ,
            _build_residual(ResidualVQ),
            lambda m, x, mask: m(x, mask=mask),
            lambda m, c: m.get_output_from_indices(c),
            lambda m: m.num_quantizers,
            residual=True,
        ),
        "grouped_residual_vq": Family(
            GroupedResidualVQ,
            _build_grouped_rvq,
            lambda m, x, mask: _grouped_forward(m, x, mask),
            lambda m, c: m.get_output_from_indices(_grouped_indices(m, c)),
            lambda m: m.groups * m.num_quantizers,
            residual=True,
        ),
        "random_projection": Family(
            RandomProjectionQuantizer,
            _build_random_projection,
            lambda m, x, mask: _random_projection_forward(m, x, mask),
            lambda m, c: m.get_codes_from_indices(_squeeze_single(c, m.num_codebooks > 1)),
            lambda m: m.num_codebooks,
        ),
        "simvq": Family(
            SimVQ,
            _build_simvq,
            lambda m, x, mask: m(x, mask=mask),
            lambda m, c: m.indices_to_codes(c[..., 0]),
            lambda m: 1,
        ),
        "residual_simvq": Family(
            ResidualSimVQ,
            _build_residual(ResidualSimVQ),
            lambda m, x, mask: m(x, mask=mask),
            lambda m, c: m.get_output_from_indices(c),
            lambda m: m.num_quantizers,
            residual=True,
        ),
        "fsq": Family(
            FSQ,
            _build_fsq,
            lambda m, x, mask: (*m(x), None),
            lambda m, c: m.indices_to_codes(_squeeze_single(c, m.keep_num_codebooks_dim)),
            lambda m: m.num_codebooks,
        ),
        "residual_fsq": Family(
            ResidualFSQ,
            _build_residual_fsq,
            lambda m, x, mask: (*m(x), None),
            lambda m, c: m.get_output_from_indices(c),
            lambda m: m.num_quantizers,
            residual=True,
        ),
        "lfq": Family(
            LFQ,
            _build_lfq,
            lambda m, x, mask: tuple(m(x, mask=mask)),
            lambda m, c: m.indices_to_codes(_squeeze_single(c, m.keep_num_codebooks_dim)),
            lambda m: m.num_codebooks,
        ),
        "residual_lfq": Family(
            ResidualLFQ,
            _build_residual(ResidualLFQ),
            lambda m, x, mask: m(x, mask=mask),
            lambda m, c: m.get_output_from_indices(c),
            lambda m: m.num_quantizers,
            residual=True,
        ),
        "latent_quantize": Family(
            LatentQuantize,
            _build_latent_quantize,
            lambda m, x, mask: _channel_last(m, m(_channel_first(m, x))),
            lambda m, c: _channel_last(m, m.indices_to_codes(_squeeze_single(c, m.keep_num_codebooks_dim))),
            lambda m: m.num_codebooks,
        ),
    }


def _channel_first(quantizer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, L, d) -> the layout a channel_first quantizer takes."""
    return x.movedim(-1, 1) if quantizer.channel_first else x


def _channel_last(quantizer: nn.Module, out):
    """A channel_first quantizer's (quantized (B, d, L), ...) or quantized -> channel-last."""
    if not quantizer.channel_first:
        return out
    if torch.is_tensor(out):
        return out.movedim(1, -1)
    return (out[0].movedim(1, -1), *out[1:])


def _grouped_forward(quantizer: GroupedResidualVQ, x: torch.Tensor, mask: torch.Tensor | None):
    quantized, indices, losses = quantizer(x, mask=mask)
    return quantized, _grouped_codes(indices), losses


def _random_projection_forward(
    quantizer: RandomProjectionQuantizer, x: torch.Tensor, mask: torch.Tensor | None
):
    indices = quantizer(x, mask=mask)
    return quantizer.get_codes_from_indices(indices), indices, None


FAMILIES = _families()
ALIASES = {
    "rvq": "residual_vq",
    "grouped_rvq": "grouped_residual_vq",
    "random_projection_quantizer": "random_projection",
}
QUANTIZER_CLASSES: dict[str, type] = {
    **{name: family.cls for name, family in FAMILIES.items()},
    **{alias: FAMILIES[name].cls for alias, name in ALIASES.items()},
    **{family.cls.__name__: family.cls for family in FAMILIES.values()},
}


def _family_of(quantizer: nn.Module) -> Family:
    for family in FAMILIES.values():
        if type(quantizer) is family.cls:
            return family
    for family in FAMILIES.values():
        if isinstance(quantizer, family.cls):
            return family
    raise TypeError(f"{type(quantizer).__name__} is not a registered quantizer")


# ----------------------------------------------------------------------------- public API


def build_quantizer(
    quantizer_type: str, dim: int, num_quantizers: int, codebook_size: int, **kwargs
) -> nn.Module:
    """The quantizer `quantizer_type` for latents of width dim (d), depth num_quantizers (D), codebook K."""
    name = ALIASES.get(quantizer_type, quantizer_type)
    family = FAMILIES.get(name) or next((f for f in FAMILIES.values() if f.cls.__name__ == name), None)
    if family is None:
        raise ValueError(
            f"unknown quantizer {quantizer_type!r}; choose from {', '.join(sorted(QUANTIZER_CLASSES))}"
        )
    if num_quantizers < 1 or codebook_size < 1:
        raise ValueError(
            f"num_quantizers and codebook_size must be >= 1, got {num_quantizers} and {codebook_size}"
        )
    return family.build(dim=dim, num_quantizers=num_quantizers, codebook_size=codebook_size, **kwargs)


def code_depth(quantizer: nn.Module) -> int:
    """Codes per position, the last dimension of `quantize`'s codes."""
    return _family_of(quantizer).depth(quantizer)


def quantize(
    quantizer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.LongTensor, torch.Tensor]:
    """Latents x (B, L, d) -> quantized (B, L, d), codes (B, L, code_depth) int64, loss () (sum of the family's losses)."""
    quantized, codes, loss = _family_of(quantizer).forward(quantizer, x, mask)
    codes = codes.long()
    codes = codes if codes.dim() == x.dim() else codes.unsqueeze(-1)  # (B, L, D)
    loss = x.new_zeros((), dtype=torch.float32) if loss is None else loss.sum()
    if exists(mask):
        mask = mask.bool()
        quantized = quantized.masked_fill(~mask.unsqueeze(-1), 0.0)
        codes = codes.masked_fill(~mask.unsqueeze(-1), -1)
    return quantized, codes, loss


def codes_to_quantized(quantizer: nn.Module, codes: torch.LongTensor) -> torch.Tensor:
    """Codes (B, L, code_depth) -> quantized (B, L, d), equal to `quantize`'s in eval mode; all -1 gives 0."""
    family = _family_of(quantizer)
    depth = family.depth(quantizer)
    if codes.shape[-1] != depth:
        raise ValueError(
            f"codes must have last dimension {depth} for {type(quantizer).__name__}, got {codes.shape[-1]}"
        )
    padding = (codes < 0).all(-1, keepdim=True)
    quantized = family.decode(quantizer, codes if family.residual else codes.clamp(min=0))
    return quantized.masked_fill(padding, 0.0)


def codebook_stats(quantizer: nn.Module, codes: torch.LongTensor) -> dict[str, list[float] | int]:
    """Usage of codes (B, L, D): per-code-slot perplexity (1..K) and dead fraction, and codes replaced so far."""
    stats = codebook_usage(codes, _codebook_size(quantizer))
    replaced = getattr(quantizer, "codes_replaced", None)
    stats["codes_replaced"] = int(replaced.sum()) if exists(replaced) else 0
    return stats


def _codebook_size(quantizer: nn.Module) -> int:
    size = getattr(quantizer, "codebook_size", None)
    if exists(size):
        return int(size)
    return int(math.prod(quantizer.levels))
