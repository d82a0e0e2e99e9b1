"""Residual LFQ: a stack of LFQ layers, each quantizing what the previous ones left over.

Depth q uses codes of magnitude 2 ** -q (and halves `soft_clamp_input_value` each depth).
Keywords and return values follow vector-quantize-pytorch's `ResidualLFQ`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from .lookup_free_quantization import LFQ
from .quantize_dropout import check_dropout_arguments, sample_dropout_index
from .quantizer_utils import check_reference_keywords, exists, fp32_region


class ResidualLFQ(nn.Module):
    """Quantize (B, N, dim) vectors with `num_quantizers` LFQ depths of `codebook_size` codes each
    -> (quantized, indices (B, N, Q), aux losses (Q,)). Extra keywords go to every LFQ layer."""

    PASSES_KEYWORDS_TO: ClassVar[type] = LFQ

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: float | None = None,
        **lfq_kwargs,
    ):
        super().__init__()
        lfq_kwargs = check_reference_keywords(ResidualLFQ, lfq_kwargs)
        if codebook_size < 2 or not math.log2(codebook_size).is_integer():
            raise ValueError(f"ResidualLFQ codebook_size must be a power of 2 >= 2, got {codebook_size}")
        check_dropout_arguments(num_quantizers, quantize_dropout_cutoff_index, quantize_dropout_multiple_of)

        codebook_dim = int(math.log2(codebook_size))
        self.dim = dim
        self.codebook_dim = codebook_dim
        self.codebook_size = codebook_size
        self.num_quantizers = num_quantizers
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of

        self.has_projections = dim != codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(dim, codebook_dim)
            self.project_out = nn.Linear(codebook_dim, dim)
        else:
            self.project_in = self.project_out = nn.Identity()

        self.layers = nn.ModuleList()
        for depth in range(num_quantizers):
            self.layers.append(LFQ(dim=codebook_dim, codebook_scale=2**-depth,
                                   soft_clamp_input_value=soft_clamp_input_value, **lfq_kwargs))
            if exists(soft_clamp_input_value):
                soft_clamp_input_value *= 0.5
        if any(layer.has_projections for layer in self.layers):
            raise ValueError("ResidualLFQ layers cannot project (num_codebooks must be 1); set dim= instead")

    @property
    def codebooks(self) -> torch.Tensor:
        """Every depth's codes, (Q, codebook_size, d)."""
        return torch.stack([layer.codebook for layer in self.layers])

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ):
        """x (B, N, dim), mask (B, N) bool -> (quantized (B, N, dim), indices (B, N, Q), losses (Q,)[,
        all_codes (Q, B, N, d)]). Depths dropped by quantize_dropout get index -1 and loss 0."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"ResidualLFQ expected feature dimension {self.dim}, got shape {tuple(x.shape)}")
        lead_shape = x.shape[:-1]
        x = self.project_in(x.reshape(-1, self.dim))  # (B*N, d)
        mask = mask.reshape(-1) if exists(mask) else None

        last_depth = self.num_quantizers - 1
        if self.training and self.quantize_dropout and torch.is_grad_enabled():
            last_depth = sample_dropout_index(
                self.num_quantizers, self.quantize_dropout_cutoff_index, self.quantize_dropout_multiple_of,
                x.device, rand_quantize_dropout_fixed_seed,
            )

        quantized_out, all_indices, all_losses = self._quantize_residuals(x, mask, last_depth)
        quantized_out = self.project_out(quantized_out).unflatten(0, lead_shape)  # (B, N, dim)
        all_indices = all_indices.unflatten(0, lead_shape)  # (B, N, Q)
        if not return_all_codes:
            return quantized_out, all_indices, all_losses
        return quantized_out, all_indices, all_losses, self.get_codes_from_indices(all_indices)

    def _quantize_residuals(self, x: torch.Tensor, mask: torch.Tensor | None, last_depth: int):
        """(M, d) -> (sum of per-depth codes (M, d), indices (M, Q), losses (Q,)); fp32 for any autocast."""
        quantized_out, residual, all_indices, all_losses = 0.0, x, [], []
        with fp32_region(x.device.type):
            for depth, layer in enumerate(self.layers):
                if depth > last_depth:
                    all_indices.append(torch.full_like(all_indices[0], -1))
                    all_losses.append(torch.zeros_like(all_losses[0]))
                    continue
                quantized, indices, loss = layer(residual, mask=mask)
                residual = residual - quantized.detach()
                quantized_out = quantized_out + quantized
                all_indices.append(indices)
                all_losses.append(loss)
        return quantized_out, torch.stack(all_indices, dim=-1), torch.stack(all_losses, dim=-1)

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, N, Q') with Q' <= Q (-1 = dropped) -> codes per depth (Q, B, N, d)."""
        num_given = indices.shape[-1]
        if num_given > self.num_quantizers:
            raise ValueError(f"got indices for {num_given} depths, ResidualLFQ has {self.num_quantizers}")
        if num_given < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError("indices for fewer depths than num_quantizers need quantize_dropout=True")
            indices = nn.functional.pad(indices, (0, self.num_quantizers - num_given), value=-1)
        flat = indices.reshape(-1, self.num_quantizers)  # (M, Q)
        codes = torch.stack([
            layer.indices_to_codes(idx, project_out=False).masked_fill(idx[:, None] == -1, 0.0)
            for layer, idx in zip(self.layers, flat.unbind(dim=-1))
        ])  # (Q, M, d)
        return codes.unflatten(1, indices.shape[:-1])

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, N, Q') -> quantized (B, N, dim), equal to the forward's output in eval mode."""
        codes = self.get_codes_from_indices(indices)  # (Q, B, N, d)
        summed = 0.0
        for depth_codes in codes:  # the forward's summation order, so the result is exact
            summed = summed + depth_codes
        # the forward's matmul shape, so the projection rounds the same way
        return self.project_out(summed.flatten(0, -2)).unflatten(0, summed.shape[:-1])
