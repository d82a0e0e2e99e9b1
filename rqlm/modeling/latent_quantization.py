"""Latent quantization (arXiv:2305.18378): every latent channel snaps to the nearest of a few learned values.

Like FSQ the codebook is the grid of all value combinations (`codebook_size = prod(levels)`), but the
values of each channel are parameters, pulled toward the latents by the quantization loss while the
commitment loss pulls the latents toward them. Keywords follow vector-quantize-pytorch's `LatentQuantize`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .quantizer_utils import check_reference_keywords, default, exists, fp32_region


def initial_values(level: int) -> torch.Tensor:
    """`level` evenly spaced values in [-0.5, 0.5] with 0 among them (even levels drop the top end)."""
    if level % 2 == 1:
        return torch.linspace(-0.5, 0.5, level)
    return torch.arange(level) / level - 0.5


class LatentQuantize(nn.Module):
    """Quantize vectors channel by channel onto learned values -> (quantized, indices, loss).

    Inputs are channel-first (B, dim, ...) like the reference's; pass channel_first=False for (B, N, dim).
    loss = commitment_loss_weight * |z - sg(zq)|^2 + quantization_loss_weight * |sg(z) - zq|^2 (means),
    measured in the codebook space (after project_in).
    """

    def __init__(
        self,
        levels: list[int] | int,
        dim: int,
        commitment_loss_weight: float = 0.1,
        quantization_loss_weight: float = 0.1,
        num_codebooks: int = 1,
        codebook_dim: int = -1,
        keep_num_codebooks_dim: bool | None = None,
        optimize_values: bool = True,
        in_place_codebook_optimizer=None,
        channel_first: bool = True,
        **reference_only,
    ):
        super().__init__()
        check_reference_keywords(LatentQuantize, reference_only)
        if exists(in_place_codebook_optimizer):
            raise ValueError("in_place_codebook_optimizer is unsupported; quantization_loss trains values")
        levels = _expand_levels(levels, codebook_dim)
        keep_num_codebooks_dim = default(keep_num_codebooks_dim, num_codebooks > 1)
        if num_codebooks < 1:
            raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("num_codebooks > 1 needs keep_num_codebooks_dim=True")

        self.levels = levels
        self.dim = dim
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.codebook_size = math.prod(levels)
        self.num_quantizers = 1
        self.commitment_loss_weight = commitment_loss_weight
        self.quantization_loss_weight = quantization_loss_weight
        self.optimize_values = optimize_values
        self.channel_first = channel_first

        self.has_projections = dim != self.effective_codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(dim, self.effective_codebook_dim)
            self.project_out = nn.Linear(self.effective_codebook_dim, dim)
        else:
            self.project_in = self.project_out = nn.Identity()

        self.values_per_latent = nn.ParameterList(
            nn.Parameter(initial_values(level), requires_grad=optimize_values) for level in levels
        )
        # the mixed-radix constants come from `levels` per device (_radix), not from buffers, which
        # from_pretrained would leave uninitialised
        self._radix_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _radix(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(basis (d,), levels (d,)) int64 on `device`: index = sum(level_index * basis)."""
        radix = self._radix_cache.get(device)
        if radix is None:
            basis = torch.cumprod(torch.tensor([1] + self.levels[:-1], device=device), dim=0)
            radix = self._radix_cache[device] = (basis, torch.tensor(self.levels, device=device))
        return radix

    def _value_table(self) -> torch.Tensor:
        """Values of every channel, (d, max level), padded with +inf (never the nearest)."""
        return pad_sequence(list(self.values_per_latent), batch_first=True, padding_value=math.inf)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., d) -> (nearest values (..., d), differentiable in the values; level indices (..., d))."""
        table = self._value_table()  # (d, Lmax)
        level_index = (z[..., None] - table).abs().argmin(dim=-1)  # (..., d)
        channel = torch.arange(self.codebook_dim, device=z.device)
        return table[channel, level_index], level_index

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, dim, ...) (or (B, N, dim) if not channel_first) -> (quantized like z, indices (B, ...[, C]),
        loss scalar; zero outside training)."""
        if self.channel_first:
            z = z.movedim(1, -1)  # (B, ..., dim)
        if z.shape[-1] != self.dim:
            where = "axis 1, channel_first=True" if self.channel_first else "last axis"
            shape = tuple(z.shape)
            raise ValueError(f"LatentQuantize expected feature dimension {self.dim} ({where}), got {shape}")
        z = self.project_in(z).unflatten(-1, (self.num_codebooks, self.codebook_dim))  # (..., c, d)

        orig_dtype = z.dtype
        with fp32_region(z.device.type):
            if z.dtype not in (torch.float32, torch.float64):
                z = z.float()
            zq, level_index = self.quantize(z)  # (..., c, d)
            indices = (level_index * self._radix(z.device)[0]).sum(dim=-1)  # (..., c)
            out = z + (zq - z).detach() if self.training else zq
            loss = self._loss(z, zq)
        out = self.project_out(out.to(orig_dtype).flatten(-2))  # (..., dim)

        if self.channel_first:
            out = out.movedim(-1, 1)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return out, indices, loss

    def _loss(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """Commitment (moves the latents) plus quantization (moves the values) loss, fp32 scalar."""
        loss = z.new_zeros(())
        if not self.training:
            return loss
        if self.commitment_loss_weight != 0:
            loss = loss + self.commitment_loss_weight * F.mse_loss(z, zq.detach())
        if self.quantization_loss_weight != 0:
            loss = loss + self.quantization_loss_weight * F.mse_loss(zq, z.detach())
        return loss

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Flat indices (...) -> per-channel level indices (..., d)."""
        basis, levels = self._radix(indices.device)
        return (indices[..., None] // basis) % levels

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Indices (B, N[, C]) -> quantized (B, dim, N) if channel_first else (B, N, dim); exact in eval."""
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]  # (..., 1)
        channel = torch.arange(self.codebook_dim, device=indices.device)
        codes = self._value_table()[channel, self.indices_to_level_indices(indices)]  # (..., c, d)
        codes = codes.flatten(-2)  # (..., c * d)
        if project_out:
            codes = self.project_out(codes)
        return codes.movedim(-1, 1) if self.channel_first else codes


def _expand_levels(levels: list[int] | int, codebook_dim: int) -> list[int]:
    if isinstance(levels, int):
        if codebook_dim < 1:
            raise ValueError("an int `levels` needs codebook_dim >= 1 (the number of channels)")
        levels = [levels] * codebook_dim
    levels = [int(level) for level in levels]
    if len(levels) == 0:
        raise ValueError("LatentQuantize needs at least one level")
    if codebook_dim > 0 and codebook_dim != len(levels):
        raise ValueError(f"codebook_dim {codebook_dim} does not match len(levels) {len(levels)}")
    if min(levels) < 2:
        raise ValueError(f"LatentQuantize levels must all be >= 2, got {levels}")
    return levels
