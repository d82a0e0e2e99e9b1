"""Residual vector quantization (SoundStream, arXiv:2107.03312, Algorithm 1) and its grouped variant.

Keywords and return values follow vector-quantize-pytorch's `ResidualVQ` / `GroupedResidualVQ`:
forward returns `(quantized, indices (..., Q), losses (Q,))`, plus all codes with `return_all_codes`.
Every `VectorQuantize` keyword passes through to the Q layers. The whole residual loop runs in fp32.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .quantize_dropout import check_dropout_arguments, sample_dropout_index, sync_seed
from .quantizer_utils import check_reference_keywords, exists, fp32_region
from .vector_quantize import VectorQuantize, nearest_codes


class ResidualVQ(nn.Module):
    """Q vector quantizers in sequence, each quantizing what the previous ones left over.

    forward(x (B, N, dim), mask=None) -> quantized (B, N, dim), indices (B, N, Q), losses (Q,).
    With `accept_image_fmap` (or `accept_3d_fmap`) x and quantized are channel-first feature maps
    (B, dim, H, W) (or (B, dim, T, H, W)) and indices (B, H, W, Q) (or (B, T, H, W, Q)).
    With `shared_codebook` all depths use one codebook, updated once per step from every depth's
    inputs. With `quantize_dropout`, training stops after a random depth in
    [quantize_dropout_cutoff_index, Q) (indices -1 and loss 0 beyond it), so fewer depths decode.
    """

    # the reference's keywords for features rqlm does not have: accepted at these (its) defaults only
    REFERENCE_ONLY_KEYWORDS: ClassVar[dict] = {
        "diveq": False,
        "implicit_neural_codebook": False,
        "mlp_kwargs": {},
        "beam_size": None,
        "eval_beam_size": None,
        "beam_score_quantizer_weights": None,
        "quant_grad_frac": 0.0,
    }
    REFERENCE_ONLY_FORWARD_KEYWORDS: ClassVar[dict] = {"indices": None, "beam_size": None}
    PASSES_KEYWORDS_TO: ClassVar[type] = VectorQuantize

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int | None = None,
        codebook_size: int | tuple[int, ...],
        codebook_dim: int | None = None,
        shared_codebook: bool = False,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        return_zeros_for_masked_padding: bool = True,
        **vq_kwargs,
    ):
        super().__init__()
        vq_kwargs = check_reference_keywords(ResidualVQ, vq_kwargs)
        codebook_sizes = _codebook_sizes(codebook_size, num_quantizers)
        num_quantizers = len(codebook_sizes)
        check_dropout_arguments(num_quantizers, quantize_dropout_cutoff_index, quantize_dropout_multiple_of)
        _check_arguments(heads, shared_codebook, codebook_sizes, vq_kwargs)
        codebook_dim = codebook_dim or dim
        self.dim = dim
        self.codebook_dim = codebook_dim
        self.num_quantizers = num_quantizers
        self.codebook_sizes = codebook_sizes
        self.shared_codebook = shared_codebook
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.accept_image_fmap = accept_image_fmap
        self.accept_3d_fmap = accept_3d_fmap
        # spatial dimensions of a channel-first feature map (the layers themselves run channel-last)
        self.fmap_dims = _fmap_dims(accept_image_fmap, accept_3d_fmap)

        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.layers = nn.ModuleList(
            VectorQuantize(
                dim=codebook_dim,
                codebook_size=size,
                return_zeros_for_masked_padding=return_zeros_for_masked_padding,
                **vq_kwargs,
            )
            for size in codebook_sizes
        )
        if shared_codebook:  # every depth uses the first layer's codebook, held (and saved) only there
            for layer in self.layers[1:]:
                del layer._codebook
                object.__setattr__(layer, "_codebook", self.layers[0]._codebook)

    @property
    def codebook_size(self) -> int:
        return self.codebook_sizes[0]

    @property
    def codebooks(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The codes of every depth: (Q, K, codebook_dim), or a tuple when sizes differ by depth."""
        codebooks = tuple(layer.codebook for layer in self.layers)
        return torch.stack(codebooks) if len(set(self.codebook_sizes)) == 1 else codebooks

    @property
    def codes_replaced(self) -> torch.Tensor:
        """Codes replaced by dead-code expiry per depth (Q,); one shared count with `shared_codebook`."""
        return torch.stack([layer.codes_replaced for layer in self.layers])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, ..., q <= Q) -> codes (Q, B, ..., codebook_dim); -1 and missing depths give 0."""
        depth = indices.shape[-1]
        if depth > self.num_quantizers:
            raise ValueError(f"got indices for {depth} depths, the quantizer has {self.num_quantizers}")
        if depth < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError(
                    f"got indices for {depth} of {self.num_quantizers} depths; decoding fewer depths "
                    "needs a model trained with quantize_dropout=True"
                )
            pad = indices.new_full((*indices.shape[:-1], self.num_quantizers - depth), -1)
            indices = torch.cat([indices, pad], dim=-1)
        return torch.stack(
            [layer.get_codes_from_indices(indices[..., i]) for i, layer in enumerate(self.layers)]
        )

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, ..., q) -> quantized (B, ..., dim) (channel-first for a feature map), equal to forward's in eval."""
        codes = self.get_codes_from_indices(indices)
        summed = codes[0]
        for depth_codes in codes[1:]:  # the order forward adds them in, so the sums match bit for bit
            summed = summed + depth_codes
        out = self.project_out(summed)
        if self.return_zeros_for_masked_padding:
            out = out.masked_fill((indices < 0).all(-1, keepdim=True), 0.0)
        return out.movedim(-1, 1) if exists(self.fmap_dims) else out

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
        **reference_only,
    ) -> tuple[torch.Tensor, ...]:
        """x (B, N, dim) -> quantized (B, N, dim), indices (B, N, Q), losses (Q,)[, codes (Q, B, N, codebook_dim)]."""
        check_reference_keywords(ResidualVQ, reference_only, "forward")
        x = fmap_to_channel_last(x, self.fmap_dims, self.dim)
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected input (batch, ..., {self.dim}), got last dimension {x.shape[-1]}")
        mask = mask.bool() if exists(mask) else None
        last_depth = self._last_depth(x.device, rand_quantize_dropout_fixed_seed)
        z = self.project_in(x)
        with fp32_region(z.device.type):
            quantized, indices, losses = self._residual_loop(
                z.float(), mask, last_depth, sample_codebook_temp, freeze_codebook
            )
        quantized = self.project_out(quantized.to(z.dtype))
        if exists(mask):
            padding_value = 0.0 if self.return_zeros_for_masked_padding else x
            quantized = torch.where(mask.unsqueeze(-1), quantized, padding_value)
        quantized = quantized.movedim(-1, 1) if exists(self.fmap_dims) else quantized
        if not return_all_codes:
            return quantized, indices, losses
        return quantized, indices, losses, self.get_codes_from_indices(indices)

    def _last_depth(self, device: torch.device, seed: int | None) -> int:
        """Last depth quantized this step: Q - 1, or a random one under quantize dropout (same on every rank)."""
        if not (self.training and self.quantize_dropout):
            return self.num_quantizers - 1
        return sample_dropout_index(
            self.num_quantizers,
            self.quantize_dropout_cutoff_index,
            self.quantize_dropout_multiple_of,
            device,
            seed,
        )

    def _residual_loop(
        self,
        residual: torch.Tensor,
        mask: torch.Tensor | None,
        last_depth: int,
        sample_codebook_temp: float | None,
        freeze_codebook: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 residual (B, N, d) -> summed codes (B, N, d), indices (B, N, Q), losses (Q,)."""
        if self._looks_up_only(last_depth):
            return self._lookup_loop(residual, mask, last_depth)
        shared_update = self.training and self.shared_codebook and not freeze_codebook
        quantized_out = None
        all_indices, all_losses, layer_inputs = [], [], []
        for layer in self.layers[: last_depth + 1]:
            quantized, indices, loss = layer(
                residual,
                mask=mask,
                sample_codebook_temp=sample_codebook_temp,
                freeze_codebook=freeze_codebook or self.shared_codebook,
            )
            if shared_update:
                layer_inputs.append(residual.detach())
            residual = residual - quantized.detach()
            quantized_out = quantized if quantized_out is None else quantized_out + quantized
            all_indices.append(indices)
            all_losses.append(loss)
        if shared_update:
            self._update_shared_codebook(layer_inputs, all_indices, mask)
        dropped = self.num_quantizers - len(all_indices)
        all_indices += [torch.full_like(all_indices[0], -1)] * dropped
        all_losses += [torch.zeros_like(all_losses[0])] * dropped
        return quantized_out, torch.stack(all_indices, dim=-1), torch.stack(all_losses)

    def _looks_up_only(self, last_depth: int) -> bool:
        """In eval, whether every depth only looks its input's nearest code up: one head, no projection,
        Euclidean distance, an initialised codebook, no hooks. Encoding at generation then skips each depth's
        general forward (layout, autocast region, loss, masking): a 4-depth RVQ encoding 2 positions took 0.66 ms
        through `quantize`, 0.40 this way."""
        return not self.training and all(
            layer.heads == 1 and not layer.has_projections and not layer.use_cosine_sim
            and not layer._forward_hooks and not layer._forward_pre_hooks and bool(layer._codebook.initted)
            for layer in self.layers[: last_depth + 1]
        )

    def _lookup_loop(
        self, residual: torch.Tensor, mask: torch.Tensor | None, last_depth: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_residual_loop` for depths that only look up (`_looks_up_only`): what their forwards compute in eval."""
        quantized_out, all_indices = None, []
        for layer in self.layers[: last_depth + 1]:
            codebook = layer._codebook
            indices = nearest_codes(residual.reshape(1, -1, residual.shape[-1]), codebook.embed.detach().float(), False)
            quantized = codebook.lookup(indices).view_as(residual)
            indices = indices.view(residual.shape[:-1])
            if exists(mask):  # padding's quantized values are set by `forward`
                indices = indices.masked_fill(~mask, -1)
            residual = residual - quantized
            quantized_out = quantized if quantized_out is None else quantized_out + quantized
            all_indices.append(indices)
        losses = residual.new_zeros(self.num_quantizers)
        dropped = self.num_quantizers - len(all_indices)
        all_indices += [torch.full_like(all_indices[0], -1)] * dropped
        return quantized_out, torch.stack(all_indices, dim=-1), losses

    def _update_shared_codebook(
        self, layer_inputs: list[torch.Tensor], all_indices: list[torch.Tensor], mask: torch.Tensor | None
    ) -> None:
        """One EMA step of the shared codebook from the inputs (B, N, d) and indices (B, N) of every depth."""
        first = self.layers[0]
        flat = torch.cat([first.to_codebook_space(t) for t in layer_inputs], dim=1)  # (1, Q' B N, d)
        indices = torch.cat([t.reshape(1, -1) for t in all_indices], dim=1)
        valid = None if mask is None else mask.reshape(1, -1).bool().repeat(1, len(layer_inputs))
        first._codebook.update_(flat, indices, valid)


class GroupedResidualVQ(nn.Module):
    """`groups` independent ResidualVQs, each on dim / groups channels.

    forward(x (B, N, dim), mask=None) -> quantized (B, N, dim), indices (G, B, N, Q), losses (G, Q).
    With `accept_image_fmap` (or `accept_3d_fmap`) x and quantized are channel-first feature maps
    (B, dim, H, W) (or (B, dim, T, H, W)), split into groups along dim, and indices (G, B, H, W, Q).
    """

    REFERENCE_ONLY_FORWARD_KEYWORDS: ClassVar[dict] = {"indices": None}
    PASSES_KEYWORDS_TO: ClassVar[type] = ResidualVQ

    def __init__(
        self,
        *,
        dim: int,
        groups: int = 1,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        **kwargs,
    ):
        super().__init__()
        kwargs = check_reference_keywords(GroupedResidualVQ, kwargs)
        if groups < 1 or dim % groups:
            raise ValueError(f"dim {dim} must split into groups={groups} equal parts")
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = accept_image_fmap
        self.accept_3d_fmap = accept_3d_fmap
        # each group runs channel-last; this module moves a feature map's channels in and out
        self.fmap_dims = _fmap_dims(accept_image_fmap, accept_3d_fmap)
        self.rvqs = nn.ModuleList(ResidualVQ(dim=dim // groups, **kwargs) for _ in range(groups))

    @property
    def num_quantizers(self) -> int:
        return self.rvqs[0].num_quantizers

    @property
    def codebook_size(self) -> int:
        return self.rvqs[0].codebook_size

    @property
    def codebooks(self) -> torch.Tensor:
        """(G, Q, K, codebook_dim)."""
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    @property
    def codes_replaced(self) -> torch.Tensor:
        """Codes replaced by dead-code expiry (G, Q)."""
        return torch.stack([rvq.codes_replaced for rvq in self.rvqs])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (G, B, ..., Q) -> codes (G, Q, B, ..., codebook_dim)."""
        return torch.stack([rvq.get_codes_from_indices(group) for rvq, group in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (G, B, ..., Q) -> quantized (B, ..., dim) (channel-first for a feature map)."""
        groups = [rvq.get_output_from_indices(group) for rvq, group in zip(self.rvqs, indices)]
        out = torch.cat(groups, dim=-1)
        return out.movedim(-1, 1) if exists(self.fmap_dims) else out

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool = False,
        **reference_only,
    ) -> tuple[torch.Tensor, ...]:
        """x (B, N, dim) -> quantized (B, N, dim), indices (G, B, N, Q), losses (G, Q)[, codes (G, Q, B, N, d)]."""
        check_reference_keywords(GroupedResidualVQ, reference_only, "forward")
        x = fmap_to_channel_last(x, self.fmap_dims, self.dim)
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected input (batch, ..., {self.dim}), got last dimension {x.shape[-1]}")
        seed = sync_seed(x.device) if self.training and self.rvqs[0].quantize_dropout else None
        outputs = [
            rvq(
                chunk,
                mask=mask,
                return_all_codes=return_all_codes,
                sample_codebook_temp=sample_codebook_temp,
                freeze_codebook=freeze_codebook,
                rand_quantize_dropout_fixed_seed=seed,
            )
            for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=-1))
        ]
        quantized, indices, losses, *codes = zip(*outputs)
        quantized = torch.cat(quantized, dim=-1)
        quantized = quantized.movedim(-1, 1) if exists(self.fmap_dims) else quantized
        out = (quantized, torch.stack(indices), torch.stack(losses))
        return out + (torch.stack(codes[0]),) if return_all_codes else out


def _fmap_dims(accept_image_fmap: bool, accept_3d_fmap: bool) -> int | None:
    """Spatial dimensions of a channel-first feature map: 2 for images, 3 for video, None for sequences."""
    if accept_image_fmap and accept_3d_fmap:
        raise ValueError("pass at most one of accept_image_fmap and accept_3d_fmap")
    return 2 if accept_image_fmap else 3 if accept_3d_fmap else None


def fmap_to_channel_last(x: torch.Tensor, fmap_dims: int | None, dim: int) -> torch.Tensor:
    """A feature map (B, dim, *spatial) -> (B, *spatial, dim) when fmap_dims is set; other input unchanged."""
    if not exists(fmap_dims):
        return x
    if x.dim() != fmap_dims + 2:
        spatial_names = "height, width" if fmap_dims == 2 else "time, height, width"
        raise ValueError(
            f"expected a feature map (batch, {dim}, {spatial_names}), got shape {tuple(x.shape)}"
        )
    return x.movedim(1, -1)


def _codebook_sizes(codebook_size: int | tuple[int, ...], num_quantizers: int | None) -> tuple[int, ...]:
    """Per-depth codebook sizes from an int (with num_quantizers) or a tuple."""
    if isinstance(codebook_size, (tuple, list)):
        if exists(num_quantizers) and num_quantizers != len(codebook_size):
            raise ValueError(f"num_quantizers={num_quantizers} but {len(codebook_size)} codebook sizes given")
        return tuple(codebook_size)
    if not exists(num_quantizers):
        raise ValueError("pass num_quantizers, or one codebook_size per depth as a tuple")
    return (codebook_size,) * num_quantizers


def _check_arguments(heads, shared_codebook, codebook_sizes, vq_kwargs) -> None:
    """One-line errors for bad ResidualVQ keywords, including the combinations the reference rejects."""
    if heads != 1:
        raise ValueError(
            f"ResidualVQ takes heads=1 only, got {heads}; use GroupedResidualVQ to split channels"
        )
    if shared_codebook and len(set(codebook_sizes)) > 1:
        raise ValueError("shared_codebook=True needs one codebook_size for every depth")
    if "channel_last" in vq_kwargs:
        raise ValueError("ResidualVQ takes channel-last input (batch, ..., dim) only; drop channel_last")
