"""SimVQ (arXiv:2411.02038): a frozen random codebook seen through a learned linear map, and its residual stack.

Keywords and return values follow vector-quantize-pytorch's `SimVQ` / `ResidualSimVQ`. Because every
code moves with the shared linear map, no code is left behind and no EMA or dead-code expiry is needed.
Distances and losses are computed in fp32; in eval mode the output is exactly `indices_to_codes(indices)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .quantize_dropout import check_dropout_arguments, sample_dropout_index
from .quantizer_utils import (
    check_reference_keywords,
    default,
    exists,
    fp32_region,
    masked_mean,
    rotate_to,
    straight_through,
)
from .vector_quantize import nearest_codes


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


class SimVQ(nn.Module):
    """Quantize (B, N, dim) to the nearest row of codebook = code_transform(frozen_codebook) (K, dim).

    forward(x, mask=None) -> quantized like x, indices (B, N), loss (). The loss is
    |sg(x) - q|^2 + input_to_quantize_commit_loss_weight |x - sg(q)|^2, times commitment_weight; it trains
    the linear map. With `mask`, padded positions are left out of the loss and get index -1 and output 0.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_transform: nn.Module | None = None,
        init_fn: Callable[[torch.Tensor], torch.Tensor] = identity,
        channel_first: bool = False,
        rotation_trick: bool = True,
        input_to_quantize_commit_loss_weight: float = 0.25,
        commitment_weight: float = 1.0,
        frozen_codebook_dim: int | None = None,
        **reference_only,
    ):
        super().__init__()
        check_reference_keywords(SimVQ, reference_only)
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        frozen_codebook_dim = default(frozen_codebook_dim, dim)
        self.dim = dim
        self.codebook_size = codebook_size
        self.channel_first = channel_first
        self.rotation_trick = rotation_trick
        self.input_to_quantize_commit_loss_weight = input_to_quantize_commit_loss_weight
        self.commitment_weight = commitment_weight
        codebook = init_fn(torch.randn(codebook_size, frozen_codebook_dim) * frozen_codebook_dim**-0.5)
        self.register_buffer("frozen_codebook", codebook)
        self.code_transform = default(codebook_transform, nn.Linear(frozen_codebook_dim, dim, bias=False))

    @property
    def codebook(self) -> torch.Tensor:
        """The implicit codebook (K, dim) in fp32."""
        with fp32_region(self.frozen_codebook.device.type):
            return self.code_transform(self.frozen_codebook.float()).float()

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, ...) -> codes (B, ..., dim) (channel-first if channel_first); -1 gives 0."""
        codes = F.embedding(indices.clamp(min=0), self.codebook).masked_fill((indices < 0).unsqueeze(-1), 0.0)
        return codes.movedim(-1, 1) if self.channel_first else codes

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, dim) [(B, dim, N) if channel_first] -> quantized like x, indices (B, N), loss ()."""
        if self.channel_first:
            x = x.movedim(1, -1)
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected input with dim {self.dim}, got last dimension {x.shape[-1]}")
        with fp32_region(x.device.type):
            quantized, indices, loss = self._quantize(x.float(), mask)
        quantized = quantized.to(x.dtype)
        if exists(mask):
            quantized = quantized.masked_fill(~mask.bool().unsqueeze(-1), 0.0)
            indices = indices.masked_fill(~mask.bool(), -1)
        return (quantized.movedim(-1, 1) if self.channel_first else quantized), indices, loss

    def _quantize(
        self, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 x (..., dim) -> codes (..., dim), indices (...), loss ()."""
        codebook = self.codebook  # (K, dim)
        flat = x.reshape(1, -1, self.dim)
        indices = nearest_codes(flat.detach(), codebook.detach().unsqueeze(0), use_cosine_sim=False)
        indices = indices.reshape(x.shape[:-1])
        quantized = F.embedding(indices, codebook)
        valid = mask.bool() if exists(mask) else None
        loss = (
            masked_mean((x.detach() - quantized).pow(2), valid)
            + masked_mean((x - quantized.detach()).pow(2), valid) * self.input_to_quantize_commit_loss_weight
        ) * self.commitment_weight
        if self.training and x.requires_grad:
            quantized = rotate_to(x, quantized) if self.rotation_trick else straight_through(x, quantized)
        return quantized, indices, loss


class ResidualSimVQ(nn.Module):
    """Q SimVQ layers in sequence, each quantizing what the previous ones left over.

    forward(x (B, N, dim), mask=None) -> quantized (B, N, dim), indices (B, N, Q), losses (Q,).
    `quantize_dropout` works as in ResidualVQ.
    """

    PASSES_KEYWORDS_TO: ClassVar[type] = SimVQ

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        channel_first: bool = False,
        rotation_trick: bool = True,
        **sim_vq_kwargs,
    ):
        super().__init__()
        sim_vq_kwargs = check_reference_keywords(ResidualSimVQ, sim_vq_kwargs)
        if heads != 1:
            raise ValueError(f"ResidualSimVQ takes heads=1 only, got {heads}")
        check_dropout_arguments(num_quantizers, quantize_dropout_cutoff_index, quantize_dropout_multiple_of)
        self.dim = dim
        self.num_quantizers = num_quantizers
        self.channel_first = channel_first
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.layers = nn.ModuleList(
            SimVQ(dim=dim, codebook_size=codebook_size, rotation_trick=rotation_trick, **sim_vq_kwargs)
            for _ in range(num_quantizers)
        )

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebooks(self) -> torch.Tensor:
        """(Q, K, dim)."""
        return torch.stack([layer.codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, ..., q <= Q) -> codes (Q, B, ..., dim); -1 and missing depths give 0."""
        depth = indices.shape[-1]
        if depth > self.num_quantizers or (depth < self.num_quantizers and not self.quantize_dropout):
            raise ValueError(
                f"got indices for {depth} of {self.num_quantizers} depths; fewer depths need quantize_dropout=True"
            )
        pad = indices.new_full((*indices.shape[:-1], self.num_quantizers - depth), -1)
        indices = torch.cat([indices, pad], dim=-1)
        return torch.stack([layer.indices_to_codes(indices[..., i]) for i, layer in enumerate(self.layers)])

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, ..., q) -> quantized (B, ..., dim) (channel-first if channel_first), equal to forward's in eval."""
        codes = self.get_codes_from_indices(indices)
        out = codes[0]
        for depth_codes in codes[1:]:  # forward's order of addition, so the sums match bit for bit
            out = out + depth_codes
        return out.movedim(-1, 1) if self.channel_first else out

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """x (B, N, dim) -> quantized (B, N, dim), indices (B, N, Q), losses (Q,)[, codes (Q, B, N, dim)]."""
        if self.channel_first:
            x = x.movedim(1, -1)
        last_depth = self.num_quantizers - 1
        if self.training and self.quantize_dropout:
            last_depth = sample_dropout_index(
                self.num_quantizers,
                self.quantize_dropout_cutoff_index,
                self.quantize_dropout_multiple_of,
                x.device,
                rand_quantize_dropout_fixed_seed,
            )
        residual, quantized_out = x, None
        all_indices, all_losses = [], []
        for layer in self.layers[: last_depth + 1]:
            quantized, indices, loss = layer(residual, mask=mask)
            residual = residual - quantized.detach()
            quantized_out = quantized if quantized_out is None else quantized_out + quantized
            all_indices.append(indices)
            all_losses.append(loss)
        dropped = self.num_quantizers - len(all_indices)
        all_indices += [torch.full_like(all_indices[0], -1)] * dropped
        all_losses += [torch.zeros_like(all_losses[0])] * dropped
        indices, losses = torch.stack(all_indices, dim=-1), torch.stack(all_losses)
        out = (quantized_out.movedim(-1, 1) if self.channel_first else quantized_out, indices, losses)
        return out + (self.get_codes_from_indices(indices),) if return_all_codes else out
