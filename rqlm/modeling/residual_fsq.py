"""Residual FSQ: a stack of symmetric FSQ layers, each quantizing what the previous ones left over.

Depth q works at scale levels ** -q, so every layer refines the previous one's grid by its own
level count. Keywords, scales and return values follow vector-quantize-pytorch's `ResidualFSQ`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .finite_scalar_quantization import FSQ
from .quantize_dropout import check_dropout_arguments, sample_dropout_index
from .quantizer_utils import check_reference_keywords, exists, fp32_region, module_device


class ResidualFSQ(nn.Module):
    """Quantize (B, N, dim) vectors with `num_quantizers` FSQ depths -> (quantized, indices (B, N, Q)).

    Inputs are soft-clamped into the grid's range (tanh, 1 + 1 / (L - 1) per channel) before the first
    depth; pass `bound_hard_clamp=False` and your own `soft_clamp_input_value` (or None) to change that.
    Extra keywords go to every FSQ layer.
    """

    PASSES_KEYWORDS_TO: ClassVar[type] = FSQ

    def __init__(
        self,
        *,
        levels: list[int],
        num_quantizers: int,
        dim: int | None = None,
        is_channel_first: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: float | list[float] | torch.Tensor | None = None,
        bound_hard_clamp: bool = True,
        **fsq_kwargs,
    ):
        super().__init__()
        fsq_kwargs = check_reference_keywords(ResidualFSQ, fsq_kwargs)
        levels = [int(level) for level in levels]
        if min(levels, default=0) < 2:
            raise ValueError(f"ResidualFSQ levels must all be >= 2, got {levels}")
        check_dropout_arguments(num_quantizers, quantize_dropout_cutoff_index, quantize_dropout_multiple_of)
        if bound_hard_clamp and exists(soft_clamp_input_value):
            raise ValueError("soft_clamp_input_value is set from the levels when bound_hard_clamp=True")

        codebook_dim = len(levels)
        self.levels = levels
        self.dim = dim if exists(dim) else codebook_dim
        self.codebook_dim = codebook_dim
        self.num_quantizers = num_quantizers
        self.is_channel_first = is_channel_first
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of

        self.has_projections = self.dim != codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, codebook_dim)
            self.project_out = nn.Linear(codebook_dim, self.dim)
        else:
            self.project_in = self.project_out = nn.Identity()

        self.layers = nn.ModuleList(
            FSQ(levels=levels, dim=codebook_dim, preserve_symmetry=True, bound_hard_clamp=bound_hard_clamp,
                **fsq_kwargs)
            for _ in range(num_quantizers)
        )
        if any(layer.has_projections for layer in self.layers):
            raise ValueError("ResidualFSQ layers cannot project (num_codebooks must be 1); set dim= instead")
        self.codebook_size = self.layers[0].codebook_size

        # kept as numbers, made tensors per device in _constants: a tensor built here would be a meta
        # tensor under from_pretrained's empty-weights init, and no state dict restores it
        if torch.is_tensor(soft_clamp_input_value):
            soft_clamp_input_value = soft_clamp_input_value.tolist()
        self.bound_hard_clamp = bound_hard_clamp
        self.soft_clamp_input_value = soft_clamp_input_value
        self._constants_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 (scales (Q, d), soft-clamp value (d,) or None) on `device`, whatever the module's dtype."""
        constants = self._constants_cache.get(device)
        if constants is None:
            levels = torch.tensor(self.levels, device=device)
            scales = torch.stack([levels.float() ** -depth for depth in range(self.num_quantizers)])
            if self.bound_hard_clamp:
                clamp = 1 + 1 / (levels - 1)
            elif exists(self.soft_clamp_input_value):
                clamp = torch.tensor(self.soft_clamp_input_value, device=device)
            else:
                clamp = None
            constants = self._constants_cache[device] = (scales, clamp)
        return constants

    @property
    def scales(self) -> torch.Tensor:
        """Per-depth scale of the grid, (Q, d)."""
        return self._constants(module_device(self))[0]

    @property
    def codebooks(self) -> torch.Tensor:
        """Every depth's unscaled implicit codebook, (Q, codebook_size, d), built even if not materialized."""
        return torch.stack([layer.grid_codes() for layer in self.layers])

    def forward(
        self,
        x: torch.Tensor,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ):
        """x (B, N, dim) (or (B, dim, ...) if is_channel_first) -> (quantized like x, indices (B, N, Q)[,
        all_codes (Q, B, N, d)]). Depths dropped by quantize_dropout get index -1."""
        if self.is_channel_first:
            x = x.movedim(1, -1)  # (B, ..., dim)
        if x.shape[-1] != self.dim:
            raise ValueError(f"ResidualFSQ expected feature dimension {self.dim}, got shape {tuple(x.shape)}")
        lead_shape = x.shape[:-1]
        x = self.project_in(x.reshape(-1, self.dim))  # (B*N, d)
        scales, clamp = self._constants(x.device)
        if exists(clamp):
            x = (x / clamp).tanh() * clamp

        last_depth = self.num_quantizers - 1
        if self.training and self.quantize_dropout and torch.is_grad_enabled():
            last_depth = sample_dropout_index(
                self.num_quantizers, self.quantize_dropout_cutoff_index, self.quantize_dropout_multiple_of,
                x.device, rand_quantize_dropout_fixed_seed,
            )

        quantized_out, all_indices = self._quantize_residuals(x, scales, last_depth)
        quantized_out = self.project_out(quantized_out).unflatten(0, lead_shape)  # (B, N, dim)
        all_indices = all_indices.unflatten(0, lead_shape)  # (B, N, Q)
        all_codes = self._codes_from_indices(all_indices) if return_all_codes else None

        if self.is_channel_first:
            quantized_out = quantized_out.movedim(-1, 1)
            all_indices = all_indices.movedim(-1, 1)
        if not return_all_codes:
            return quantized_out, all_indices
        return quantized_out, all_indices, all_codes

    def _quantize_residuals(self, x: torch.Tensor, scales: torch.Tensor, last_depth: int):
        """(B, N, d) -> (sum of per-depth codes (B, N, d), indices (B, N, Q)); fp32 for any autocast."""
        quantized_out, residual, all_indices = 0.0, x, []
        with fp32_region(x.device.type):
            for depth, (layer, scale) in enumerate(zip(self.layers, scales)):
                if depth > last_depth:
                    all_indices.append(torch.full_like(all_indices[0], -1))
                    continue
                quantized, indices = layer(residual / scale)
                quantized = quantized * scale
                residual = residual - quantized.detach()
                quantized_out = quantized_out + quantized
                all_indices.append(indices)
        return quantized_out, torch.stack(all_indices, dim=-1)

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, N, Q') with Q' <= Q (-1 = dropped; (B, Q', ...) if is_channel_first) -> scaled codes
        per depth (Q, B, N, d)."""
        if self.is_channel_first:
            indices = indices.movedim(1, -1)  # (B, ..., Q')
        return self._codes_from_indices(indices)

    def _codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        num_given = indices.shape[-1]
        if num_given > self.num_quantizers:
            raise ValueError(f"got indices for {num_given} depths, ResidualFSQ has {self.num_quantizers}")
        if num_given < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError("indices for fewer depths than num_quantizers need quantize_dropout=True")
            indices = nn.functional.pad(indices, (0, self.num_quantizers - num_given), value=-1)
        dropped = (indices == -1)[..., None]  # (B, N, Q, 1)
        layer = self.layers[0]
        level_index = layer.indices_to_level_indices(indices.clamp(min=0))  # (B, N, Q, d)
        codes = layer._level_indices_to_codes(level_index)
        codes = codes * self._constants(codes.device)[0]
        return codes.masked_fill(dropped, 0.0).movedim(-2, 0)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, N, Q') -> quantized (B, N, dim), equal to the forward's output in eval mode."""
        codes = self.get_codes_from_indices(indices)  # (Q, B, ..., d)
        summed = 0.0
        for depth_codes in codes:  # the forward's summation order, so the result is exact
            summed = summed + depth_codes
        # the forward's matmul shape, so the projection rounds the same way
        out = self.project_out(summed.flatten(0, -2)).unflatten(0, summed.shape[:-1])
        return out.movedim(-1, 1) if self.is_channel_first else out
