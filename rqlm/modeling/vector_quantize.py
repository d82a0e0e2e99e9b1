"""Vector quantization with EMA or learnable codebooks (VQ-VAE, arXiv:1711.00937), computed in fp32.

Keywords and return values follow vector-quantize-pytorch's `VectorQuantize`: `forward(x, mask=None)`
returns `(quantized, indices, loss)` and `get_output_from_indices(indices)` gives `quantized` back
exactly in eval mode. The state dict uses the reference's buffer names (`_codebook.embed`,
`_codebook.embed_avg`, `_codebook.cluster_size`, `_codebook.initted`), so its checkpoints load.

Inside, h codebooks of K codes live in one (h, K, d) tensor and every input is laid out as
(h, M, d): h = heads with `separate_codebook_per_head`, else 1 (heads then share one codebook and
their vectors are stacked along M). Under data parallelism (`sync_codebook`), the EMA statistics and
kmeans sums are all-reduced and replacement codes are broadcast, so every rank holds the same codebook.

The codebooks themselves (EMA statistics, kmeans init, dead-code expiry) live in codebook.py.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .codebook import Codebook, nearest_codes  # noqa: F401  (residual_vq and sim_vq import nearest_codes from here)
from .quantizer_utils import (
    check_reference_keywords,
    default,
    exists,
    fp32_region,
    l2norm,
    masked_mean,
    rotate_to,
    straight_through,
)


def orthogonal_loss(codebooks: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity between codes (h, n, d), minus its floor 1/n (arXiv:2112.00384)."""
    h, n = codebooks.shape[:2]
    normed = l2norm(codebooks)
    cosine = torch.bmm(normed, normed.transpose(1, 2))
    return cosine.pow(2).sum() / (h * n * n) - 1 / n


class VectorQuantize(nn.Module):
    """Quantize (B, ..., dim) vectors to the nearest of `codebook_size` codes (vector-quantize-pytorch keywords).

    forward(x, mask=None) -> quantized (like x), indices (B, ...) or (B, ..., heads), loss ().
    Input is channel-last (B, N, dim), a batch of single vectors (B, dim), or channel-first:
    (B, dim, N) with `channel_last=False`, an image feature map (B, dim, H, W) with
    `accept_image_fmap=True` (indices (B, H, W[, heads])), a video one (B, dim, T, H, W) with
    `accept_3d_fmap=True`. `mask` (B, ...) marks real positions: padded ones neither
    update the codebook nor enter the loss, and get index -1 and output 0 (or the input itself with
    `return_zeros_for_masked_padding=False`). The loss is 0 in eval mode.
    """

    # the reference's keywords for features rqlm does not have: accepted at these (its) defaults only
    REFERENCE_ONLY_KEYWORDS: ClassVar[dict] = {
        "sync_kmeans": True,
        "layernorm_after_project_in": False,
        "commitment_use_cross_entropy_loss": False,
        "codebook_diversity_loss_weight": 0.0,
        "codebook_diversity_temperature": 100.0,
        "straight_through": False,
        "directional_reparam": False,
        "directional_reparam_variance": 5e-3,
        "sync_affine_param": False,
        "vq_bridge": None,
        "manual_ema_update": False,
        "in_place_codebook_optimizer": None,
        "manual_in_place_optimizer_update": False,
        "affine_param": False,
        "affine_param_batch_decay": 0.99,
        "affine_param_codebook_decay": 0.9,
        "sync_update_v": 0.0,
        "route_gradients_to_input": True,
    }
    REFERENCE_ONLY_FORWARD_KEYWORDS: ClassVar[dict] = {
        "indices": None,
        "lens": None,
        "topk": None,
        "return_loss_breakdown": False,
        "codebook_transform_fn": None,
        "ema_update_weight": None,
        "accum_ema_update": False,
        "ema_update": None,
    }

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        decay: float = 0.8,
        eps: float = 1e-5,
        freeze_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        use_cosine_sim: bool = False,
        threshold_ema_dead_code: float = 0,
        dead_code_threshold_ratio: float = 0.0,
        reset_cluster_size: float | None = None,
        reset_cluster_size_ratio: float | None = None,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        commitment_weight: float = 1.0,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        rotation_trick: bool | None = None,
        sync_codebook: bool | None = None,
        ema_update: bool | None = None,
        learnable_codebook: bool | None = None,
        return_zeros_for_masked_padding: bool = True,
        **reference_only,
    ):
        super().__init__()
        check_reference_keywords(VectorQuantize, reference_only)
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("pass at most one of accept_image_fmap and accept_3d_fmap")
        learnable_codebook = bool(learnable_codebook)
        ema_update = default(ema_update, not learnable_codebook)
        _check_arguments(
            dim,
            codebook_size,
            heads,
            decay,
            kmeans_init,
            kmeans_iters,
            use_cosine_sim,
            learnable_codebook,
            ema_update,
            orthogonal_reg_active_codes_only,
            separate_codebook_per_head,
        )
        _check_dead_code_arguments(
            threshold_ema_dead_code, dead_code_threshold_ratio, reset_cluster_size, reset_cluster_size_ratio
        )
        codebook_dim = default(codebook_dim, dim)
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.heads = heads
        self.separate_codebook_per_head = separate_codebook_per_head
        self.channel_last = channel_last
        self.accept_image_fmap = accept_image_fmap
        self.accept_3d_fmap = accept_3d_fmap
        # spatial dimensions of a channel-first feature map: 2 for images, 3 for video, None for any
        self.fmap_dims = 2 if accept_image_fmap else 3 if accept_3d_fmap else None
        self.use_cosine_sim = use_cosine_sim
        self.kmeans_init = kmeans_init
        self.freeze_codebook = freeze_codebook
        self.commitment_weight = commitment_weight
        self.learnable_codebook = learnable_codebook
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sample_codebook_temp = sample_codebook_temp
        self.rotation_trick = default(rotation_trick, dim > 1)
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding

        self.has_projections = codebook_dim * heads != dim
        self.project_in = nn.Linear(dim, codebook_dim * heads) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim * heads, dim) if self.has_projections else nn.Identity()
        self._codebook = Codebook(
            dim=codebook_dim,
            codebook_size=codebook_size,
            num_codebooks=heads if separate_codebook_per_head else 1,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            decay=decay,
            eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            dead_code_threshold_ratio=dead_code_threshold_ratio,
            reset_cluster_size=reset_cluster_size,
            reset_cluster_size_ratio=reset_cluster_size_ratio,
            learnable_codebook=learnable_codebook or orthogonal_reg_weight > 0,
            ema_update=ema_update,
            use_cosine_sim=use_cosine_sim,
            sync_codebook=sync_codebook,
        )

    # ------------------------------------------------------------------ codebook access
    @property
    def channel_first(self) -> bool:
        """Whether inputs and outputs carry dim on axis 1: channel_last=False or a feature map."""
        return not self.channel_last or exists(self.fmap_dims)

    @property
    def ema_update(self) -> bool:
        return self._codebook.ema_update

    @property
    def codebook(self) -> torch.Tensor:
        """The codes: (K, codebook_dim), or (heads, K, codebook_dim) with separate codebooks per head."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes: torch.Tensor) -> None:
        with torch.no_grad():
            self._codebook.embed.copy_(codes if self.separate_codebook_per_head else codes.unsqueeze(0))

    @property
    def codes_replaced(self) -> torch.Tensor:
        """How many codes dead-code expiry has replaced since construction (a long scalar)."""
        return self._codebook.codes_replaced

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, ...[, heads]) -> codes (B, ..., heads * codebook_dim), channel-first if channel_first; -1 gives 0."""
        per_head = indices if self.heads > 1 else indices.unsqueeze(-1)  # (..., heads)
        padding = per_head < 0
        if self.separate_codebook_per_head:
            codes = self._codebook.lookup(per_head.clamp(min=0).movedim(-1, 0)).movedim(0, -2)
        else:
            codes = self._codebook.lookup(per_head.clamp(min=0).unsqueeze(0))[0]
        codes = codes.masked_fill(padding.unsqueeze(-1), 0.0).flatten(-2)  # (..., heads * codebook_dim)
        return codes.movedim(-1, 1) if self.channel_first else codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, ...[, heads]) -> quantized output, equal to forward's in eval mode."""
        codes = self.get_codes_from_indices(indices)
        codes = codes.movedim(1, -1) if self.channel_first else codes
        out = self.project_out(codes)
        if self.return_zeros_for_masked_padding:
            padding = (indices < 0) if self.heads == 1 else (indices < 0).all(-1)
            out = out.masked_fill(padding.unsqueeze(-1), 0.0)
        return out.movedim(-1, 1) if self.channel_first else out

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        **reference_only,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, dim) -> quantized (B, N, dim), indices (B, N[, heads]), loss (); see the class docstring."""
        check_reference_keywords(VectorQuantize, reference_only, "forward")
        x, mask, spatial = self._as_sequence(x, mask)  # (B, N, dim), (B, N)
        batch, length = x.shape[:2]
        z = self.project_in(x)  # (B, N, heads * codebook_dim)
        valid = self._head_mask(mask)  # (h, M)
        with fp32_region(z.device.type):
            flat = self.to_codebook_space(z)  # (h, M, codebook_dim)
            quantized, indices, loss = self._quantize_flat(
                flat,
                valid,
                temperature=default(sample_codebook_temp, self.sample_codebook_temp),
                freeze_codebook=default(freeze_codebook, self.freeze_codebook),
            )
            quantized = self._merge_heads(quantized, batch, length)  # (B, N, heads * codebook_dim)
            indices = self._merge_heads(indices.unsqueeze(-1), batch, length)  # (B, N, heads)
        quantized = self.project_out(quantized.to(z.dtype))  # (B, N, dim)
        indices = indices if self.heads > 1 else indices[..., 0]
        if exists(mask):
            padding_value = 0.0 if self.return_zeros_for_masked_padding else x
            quantized = torch.where(mask.unsqueeze(-1), quantized, padding_value)
            indices = indices.masked_fill(~(mask if self.heads == 1 else mask.unsqueeze(-1)), -1)
        return self._restore(quantized, spatial), self._restore_indices(indices, spatial), loss

    def _quantize_flat(
        self, flat: torch.Tensor, valid: torch.Tensor | None, temperature: float, freeze_codebook: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codebook-space step: flat (h, M, d) fp32 -> quantized (h, M, d), indices (h, M), loss ()."""
        if self.kmeans_init and not bool(self._codebook.initted):
            self._codebook.init_embed_(flat.detach(), valid)
        sample = self.training and self.stochastic_sample_codes
        indices = self._codebook.nearest(flat.detach(), temperature if sample else 0.0)
        codes = self._codebook.lookup(indices)  # (h, M, d)
        if self.training and not freeze_codebook:
            self._codebook.update_(flat.detach(), indices, valid)
        loss = self._loss(flat, codes, indices, valid, freeze_codebook)
        if self.training and flat.requires_grad:
            codes = rotate_to(flat, codes) if self.rotation_trick else straight_through(flat, codes)
        return codes, indices, loss

    def _loss(
        self,
        flat: torch.Tensor,
        codes: torch.Tensor,
        indices: torch.Tensor,
        valid: torch.Tensor | None,
        freeze: bool,
    ) -> torch.Tensor:
        """Commitment (+ orthogonal regularization) loss in training; 0 in eval."""
        loss = torch.zeros((), device=flat.device, requires_grad=self.training)
        if not self.training:
            return loss
        if self.commitment_weight > 0:
            target = codes if self.learnable_codebook and not freeze else codes.detach()
            commitment = (
                F.mse_loss(flat, target) if valid is None else masked_mean((target - flat).pow(2), valid)
            )
            loss = loss + commitment * self.commitment_weight
        if self.orthogonal_reg_weight > 0:
            loss = loss + self._orthogonal_loss(indices, valid) * self.orthogonal_reg_weight
        return loss

    def _orthogonal_loss(self, indices: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        codebook = self._codebook.embed
        if self.orthogonal_reg_active_codes_only:
            used = indices if valid is None else indices[valid]
            codebook = codebook[:, torch.unique(used)]
        num_codes = codebook.shape[1]
        if exists(self.orthogonal_reg_max_codes) and num_codes > self.orthogonal_reg_max_codes:
            codebook = codebook[
                :, torch.randperm(num_codes, device=codebook.device)[: self.orthogonal_reg_max_codes]
            ]
        return orthogonal_loss(codebook)

    # ------------------------------------------------------------------ layout
    def to_codebook_space(self, z: torch.Tensor) -> torch.Tensor:
        """Projected input (B, N, heads * d) -> fp32 (h, M, d), unit-normalized for cosine similarity."""
        batch, length = z.shape[:2]
        z = z.float()
        if self.separate_codebook_per_head:
            flat = z.reshape(batch * length, self.heads, self.codebook_dim).transpose(0, 1).contiguous()
        else:
            flat = z.reshape(1, batch * length * self.heads, self.codebook_dim)
        return l2norm(flat) if self.use_cosine_sim else flat

    def _head_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Mask (B, N) -> (h, M), matching `to_codebook_space`."""
        if mask is None:
            return None
        per_head = mask.reshape(-1, 1).expand(-1, self.heads)  # (B N, heads)
        return per_head.t() if self.separate_codebook_per_head else per_head.reshape(1, -1)

    def _merge_heads(self, t: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """(h, M, c) -> (B, N, heads * c), the inverse of `to_codebook_space`."""
        if self.separate_codebook_per_head:
            t = t.transpose(0, 1)
        return t.reshape(batch, length, -1)

    def _as_sequence(
        self, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...] | None]:
        """Any accepted input -> (B, N, dim) and mask (B, N); `spatial` remembers the original layout."""
        if x.dim() < 2:
            raise ValueError(f"expected input of shape (batch, ..., {self.dim}), got {tuple(x.shape)}")
        if exists(self.fmap_dims) and x.dim() != self.fmap_dims + 2:
            spatial_names = "height, width" if self.fmap_dims == 2 else "time, height, width"
            raise ValueError(
                f"expected a feature map (batch, {self.dim}, {spatial_names}), got shape {tuple(x.shape)}"
            )
        if x.dim() == 2:
            if exists(mask):
                raise ValueError("mask is not supported for a batch of single vectors (batch, dim)")
            spatial = None
            x = x.unsqueeze(1)
        else:
            if self.channel_first:
                x = x.movedim(1, -1)
            spatial = tuple(x.shape[1:-1])
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        if x.shape[-1] != self.dim:
            layout = "(batch, dim, ...)" if self.channel_first else "(batch, ..., dim)"
            raise ValueError(f"expected input {layout} with dim {self.dim}, got last dimension {x.shape[-1]}")
        if exists(mask):
            if mask.numel() != x.shape[0] * x.shape[1]:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not match input positions {tuple(x.shape[:2])}"
                )
            mask = mask.reshape(x.shape[:2]).bool()
        return x, mask, spatial

    def _restore(self, quantized: torch.Tensor, spatial: tuple[int, ...] | None) -> torch.Tensor:
        if spatial is None:
            return quantized[:, 0]
        quantized = quantized.reshape(quantized.shape[0], *spatial, quantized.shape[-1])
        return quantized.movedim(-1, 1) if self.channel_first else quantized

    def _restore_indices(self, indices: torch.Tensor, spatial: tuple[int, ...] | None) -> torch.Tensor:
        if spatial is None:
            return indices[:, 0]
        return indices.reshape(indices.shape[0], *spatial, *indices.shape[2:])


def _check_arguments(
    dim,
    codebook_size,
    heads,
    decay,
    kmeans_init,
    kmeans_iters,
    use_cosine_sim,
    learnable_codebook,
    ema_update,
    orthogonal_reg_active_codes_only,
    separate_codebook_per_head,
) -> None:
    """One-line errors for bad VectorQuantize keywords, including the combinations the reference rejects."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    if kmeans_init and kmeans_iters < 1:
        raise ValueError(f"kmeans_init=True needs kmeans_iters >= 1, got {kmeans_iters}")
    if use_cosine_sim and learnable_codebook:
        raise ValueError("use_cosine_sim=True does not support learnable_codebook=True; use the EMA codebook")
    if learnable_codebook and ema_update:
        raise ValueError(
            "learnable_codebook=True needs ema_update=False (the EMA would overwrite the learned codes)"
        )
    if orthogonal_reg_active_codes_only and separate_codebook_per_head and heads > 1:
        raise ValueError("orthogonal_reg_active_codes_only does not support separate_codebook_per_head=True")


def _check_dead_code_arguments(threshold, ratio, reset, reset_ratio) -> None:
    """One-line errors for the dead-code keywords: one threshold, one reset count, each used and in range."""
    if threshold < 0:
        raise ValueError(f"threshold_ema_dead_code must be >= 0 (an EMA count), got {threshold}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"dead_code_threshold_ratio must lie in [0, 1) (of the mean EMA count), got {ratio}")
    if threshold > 0 and ratio > 0:
        raise ValueError(
            f"pass one dead-code threshold: threshold_ema_dead_code={threshold} (an EMA count) or "
            f"dead_code_threshold_ratio={ratio} (of the mean EMA count), not both"
        )
    if exists(reset) and exists(reset_ratio):
        raise ValueError("pass reset_cluster_size (an EMA count) or reset_cluster_size_ratio, not both")
    for name, value in (("reset_cluster_size", reset), ("reset_cluster_size_ratio", reset_ratio)):
        if exists(value) and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        if exists(value) and threshold == 0 and ratio == 0:
            raise ValueError(
                f"{name}={value} has no effect without dead-code expiry; "
                "set dead_code_threshold_ratio or threshold_ema_dead_code too"
            )
