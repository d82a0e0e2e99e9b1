"""Lookup-free quantization (LFQ, arXiv:2310.05737): every latent channel becomes one bit, -s or +s.

The codebook is implicit (all 2**d sign patterns), so quantizing is a sign test and the index is the
bit pattern. An entropy loss keeps each prediction confident and the batch's code usage uniform.
Keywords, return values and numbers follow vector-quantize-pytorch's `LFQ`.
"""

from __future__ import annotations

import math
from collections import namedtuple
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .quantizer_utils import check_reference_keywords, default, exists, fp32_region

Return = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])
LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])

ENTROPY_EPS = 1e-5  # probabilities are clamped to this before the log


def entropy(prob: torch.Tensor) -> torch.Tensor:
    """Entropy over the last axis: prob (..., K) -> (...)."""
    return -(prob * prob.clamp(min=ENTROPY_EPS).log()).sum(dim=-1)


class SoftmaxEntropy(torch.autograd.Function):
    """logits (N, c, K) -> (entropy of softmax per row (N, c), mean probability (c, K)).

    The same numbers as `entropy(logits.softmax(-1))` and `.mean(0)`, but only the probabilities are
    kept for backward (autograd would keep four (N, c, K) tensors) and the backward runs in place.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor):
        prob = logits.softmax(dim=-1)
        ctx.save_for_backward(prob)
        return -prob.clamp(min=ENTROPY_EPS).log_().mul_(prob).sum(dim=-1), prob.mean(dim=0)

    @staticmethod
    def backward(ctx, grad_entropy: torch.Tensor, grad_mean_prob: torch.Tensor):
        (prob,) = ctx.saved_tensors
        # d entropy / d prob = -(log(clamp(p)) + 1[p >= eps]); d mean / d prob = 1 / N
        grad_prob = prob.clamp(min=ENTROPY_EPS).log_().add_(prob >= ENTROPY_EPS)
        grad_prob.mul_(-grad_entropy[..., None]).add_(grad_mean_prob / prob.shape[0])
        # softmax backward: p * (g - sum(p * g))
        return grad_prob.sub_((prob * grad_prob).sum(dim=-1, keepdim=True)).mul_(prob)


def distributed_mean(t: torch.Tensor) -> torch.Tensor:
    """Differentiable mean of a tensor over data-parallel ranks (identity on one process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t) / dist.get_world_size()


class CosineSimLinear(nn.Module):
    """Linear map between unit-normalised inputs and unit-normalised weight columns, times `scale`."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim_in) -> (..., dim_out)."""
        return (F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)) * self.scale


class LFQ(nn.Module):
    """Quantize (B, N, dim) vectors to sign patterns of log2(codebook_size) bits per codebook.

    Returns `Return(quantized, indices, entropy_aux_loss)`; in training the aux loss is
    entropy_loss_weight * (per-sample entropy - diversity_gamma * batch entropy)
    + commitment_loss_weight * commitment. `spherical` normalises inputs and codes (BSQ, arXiv:2406.07548).
    """

    def __init__(
        self,
        *,
        dim: int | None = None,
        codebook_size: int | None = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.0,
        diversity_gamma: float = 1.0,
        straight_through_activation: nn.Module | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        codebook_scale: float = 1.0,
        frac_per_sample_entropy: float = 1.0,
        has_projections: bool | None = None,
        projection_has_bias: bool = True,
        soft_clamp_input_value: float | None = None,
        cosine_sim_project_in: bool = False,
        cosine_sim_project_in_scale: float | None = None,
        channel_first: bool | None = None,
        experimental_softplus_entropy_loss: bool = False,
        entropy_loss_offset: float = 5.0,
        spherical: bool = False,
        force_quantization_f32: bool = True,
        orthogonal_rotation: bool = False,
        **reference_only,
    ):
        super().__init__()
        check_reference_keywords(LFQ, reference_only)
        keep_num_codebooks_dim = default(keep_num_codebooks_dim, num_codebooks > 1)
        _check_arguments(dim, codebook_size, num_codebooks, keep_num_codebooks_dim, frac_per_sample_entropy,
                         soft_clamp_input_value, codebook_scale)
        codebook_size = default(codebook_size, 2**dim if exists(dim) else None)
        codebook_dim = int(math.log2(codebook_size))
        codebook_dims = codebook_dim * num_codebooks
        dim = default(dim, codebook_dims)

        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks
        self.num_quantizers = 1
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.channel_first = channel_first
        self.activation = default(straight_through_activation, nn.Identity())
        self.spherical = spherical
        self.orthogonal_rotation = orthogonal_rotation
        self.entropy_loss_weight = entropy_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.diversity_gamma = diversity_gamma
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.codebook_scale = codebook_scale
        self.soft_clamp_input_value = soft_clamp_input_value
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.entropy_loss_offset = entropy_loss_offset
        self.force_quantization_f32 = force_quantization_f32

        self.has_projections = default(has_projections, dim != codebook_dims)
        if self.has_projections:
            if cosine_sim_project_in:
                scale = default(cosine_sim_project_in_scale, codebook_scale)
                self.project_in = CosineSimLinear(dim, codebook_dims, scale=scale)
            else:
                self.project_in = nn.Linear(dim, codebook_dims, bias=projection_has_bias)
            self.project_out = nn.Linear(codebook_dims, dim, bias=projection_has_bias)
        else:
            self.project_in = self.project_out = nn.Identity()

        if orthogonal_rotation:
            rotation = nn.init.orthogonal_(torch.empty(codebook_dim, codebook_dim))
            self.register_buffer("orthogonal_rot", rotation)
        # bit weights, most significant bit first; persistent so state dicts match the reference's
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))
        self._codebook_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    # ------------------------------------------------------------------ codes

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """Bits {0, 1} -> codes {-s, +s}."""
        return bits * self.codebook_scale * 2 - self.codebook_scale

    def _maybe_l2norm(self, t: torch.Tensor) -> torch.Tensor:
        return F.normalize(t, dim=-1) * self.codebook_scale if self.spherical else t

    def _indices_to_bits(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (...) -> bits (..., d) as fp32."""
        return ((indices[..., None].int() & self.mask) != 0).float()

    @property
    def codebook(self) -> torch.Tensor:
        """Every code, (codebook_size, d), in fp32 (before spherical normalisation)."""
        all_indices = torch.arange(self.codebook_size, device=self.mask.device)
        return self.bits_to_codes(self._indices_to_bits(all_indices))

    def _entropy_codebook(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """2 * codebook, transposed to (d, K): x @ it is the reference's -distance before the temperature."""
        key = (device, dtype)
        codebook = self._codebook_cache.get(key)
        if codebook is None:
            all_indices = torch.arange(self.codebook_size, device=device)
            codes = self.bits_to_codes(((all_indices[..., None].int() & self.mask.to(device)) != 0).float())
            codebook = (2 * self._maybe_l2norm(codes)).to(dtype).t().contiguous()
            self._codebook_cache[key] = codebook
        return codebook

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Indices (B, N[, C]) -> quantized (B, N, dim) (channel-first for images / channel_first)."""
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]  # (..., 1)
        codes = self._maybe_l2norm(self.bits_to_codes(self._indices_to_bits(indices)))  # (..., c, d)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        codes = codes.flatten(-2)  # (..., c * d)
        if project_out:
            codes = self.project_out(codes)
        if default(self.channel_first, is_img_or_video):
            codes = codes.movedim(-1, 1)
        return codes

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: torch.Tensor,
        inv_temperature: float = 100.0,
        return_loss_breakdown: bool = False,
        mask: torch.Tensor | None = None,
    ):
        """x (B, N, dim) (or (B, dim, ...) channel-first) -> Return(quantized like x, indices (B, N[, C]),
        aux loss scalar); `mask` (B, N) bool keeps padded positions out of the losses."""
        move_channel = default(self.channel_first, x.ndim >= 4)
        if move_channel:
            x = x.movedim(1, -1)  # (B, ..., dim)
        if x.shape[-1] != self.dim:
            raise ValueError(f"LFQ expected feature dimension {self.dim}, got shape {tuple(x.shape)}")

        x = self.project_in(x)
        if exists(self.soft_clamp_input_value):
            x = (x / self.soft_clamp_input_value).tanh() * self.soft_clamp_input_value
        x = x.unflatten(-1, (self.num_codebooks, self.codebook_dim))  # (..., c, d)
        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot
        x = self._maybe_l2norm(x)

        orig_dtype = x.dtype
        with fp32_region(x.device.type) if self.force_quantization_f32 else nullcontext():
            if self.force_quantization_f32:
                x = x.float()
            quantized, indices = self._quantize(x)  # (..., c, d), (..., c)
            out = self._straight_through(x, quantized)
            losses = self._losses(x, quantized, mask, inv_temperature, return_loss_breakdown)
            if self.force_quantization_f32:
                out = out.to(orig_dtype)

        if self.orthogonal_rotation:
            out = out @ self.orthogonal_rot.t()
        out = self.project_out(out.flatten(-2))  # (..., dim)
        if move_channel:
            out = out.movedim(-1, 1)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)

        aux_loss, breakdown = losses
        ret = Return(out, indices, aux_loss)
        return (ret, breakdown) if return_loss_breakdown else ret

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., c, d) -> (codes +-s (spherically normalised if asked), indices (..., c) int64)."""
        bits = x > 0
        indices = (bits.long() * self.mask).sum(dim=-1)
        quantized = self._maybe_l2norm(self.bits_to_codes(bits.to(x.dtype)))
        return quantized, indices

    def _straight_through(self, x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        """The codes in value; in training, the gradient of the (activated) input."""
        if not self.training:
            return quantized
        if not isinstance(self.activation, nn.Identity):
            x = self.activation(x)
        return x + (quantized - x).detach()

    def _losses(self, x, quantized, mask, inv_temperature, return_loss_breakdown):
        """-> (weighted aux loss, LossBreakdown or None); zeros outside training."""
        zero = x.new_zeros(())
        if not self.training:
            return zero, LossBreakdown(zero, zero, zero) if return_loss_breakdown else None

        per_sample_entropy = batch_entropy = entropy_aux_loss = zero
        if self.entropy_loss_weight != 0 or return_loss_breakdown:
            per_sample_entropy, batch_entropy = self._entropies(x, mask, inv_temperature)
            entropy_aux_loss = per_sample_entropy - self.diversity_gamma * batch_entropy
            if self.experimental_softplus_entropy_loss:
                entropy_aux_loss = F.softplus(entropy_aux_loss + self.entropy_loss_offset)

        commitment = zero
        if self.commitment_loss_weight > 0:
            commitment = F.mse_loss(x, quantized.detach(), reduction="none")
            commitment = (commitment[mask] if exists(mask) else commitment).mean()

        aux_loss = entropy_aux_loss * self.entropy_loss_weight + commitment * self.commitment_loss_weight
        if not return_loss_breakdown:
            return aux_loss, None
        return aux_loss, LossBreakdown(per_sample_entropy, batch_entropy, commitment)

    def _entropies(self, x: torch.Tensor, mask: torch.Tensor | None, inv_temperature: float):
        """x (..., c, d) -> (mean per-sample entropy, mean batch entropy) of the softmax over all codes."""
        if exists(mask):
            x = x[mask]  # (M, c, d)
        x = x.reshape(-1, self.num_codebooks, self.codebook_dim)  # (N, c, d)
        if self.frac_per_sample_entropy < 1.0:
            num_tokens = x.shape[0]
            chosen = torch.randn(num_tokens).argsort(dim=-1) < int(num_tokens * self.frac_per_sample_entropy)
            x = x[chosen.to(x.device)]

        logits = (x @ self._entropy_codebook(x.device, x.dtype)) * inv_temperature  # (N, c, K)
        per_sample_entropy, avg_prob = SoftmaxEntropy.apply(logits)  # (N, c), (c, K)
        avg_prob = distributed_mean(avg_prob)
        return per_sample_entropy.mean(), entropy(avg_prob).mean()


def _check_arguments(dim, codebook_size, num_codebooks, keep_num_codebooks_dim, frac_per_sample_entropy,
                     soft_clamp_input_value, codebook_scale):
    if not (exists(dim) or exists(codebook_size)):
        raise ValueError("LFQ needs dim or codebook_size")
    if exists(codebook_size) and (codebook_size < 2 or not math.log2(codebook_size).is_integer()):
        suggested = 2 ** max(1, math.ceil(math.log2(max(codebook_size, 1))))
        raise ValueError(f"LFQ codebook_size must be a power of 2, got {codebook_size} (try {suggested})")
    if num_codebooks < 1:
        raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")
    if num_codebooks > 1 and not keep_num_codebooks_dim:
        raise ValueError("num_codebooks > 1 needs keep_num_codebooks_dim=True (indices keep a codebook axis)")
    if not 0 < frac_per_sample_entropy <= 1:
        raise ValueError(f"frac_per_sample_entropy must be in (0, 1], got {frac_per_sample_entropy}")
    if exists(soft_clamp_input_value) and soft_clamp_input_value < codebook_scale:
        raise ValueError(
            f"soft_clamp_input_value {soft_clamp_input_value} must be >= codebook_scale {codebook_scale}"
        )
