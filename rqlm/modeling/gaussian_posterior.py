"""GaussianPosterior: the continuous stand-in for a quantizer in the chunk autoencoder (CALM / GIVT style).

    latents (B, L, d) -> mean, log-variance heads             q(z|x) = N(mean, exp(logvar))   (B, L, d)
      -> z = mean + exp(logvar / 2) * eps  (training)  or  z = mean  (eval)
    loss = kl_weight * mean over positions of sum over dims of max(KL_dim, kl_clamp)

KL_dim = KL(N(mean, var) || N(0, 1)) per dimension; clamping it below at `kl_clamp` (free bits) stops the
posterior from collapsing onto the prior in the dimensions the decoder uses little. Latents are computed in
fp32, like the quantizers' distances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GaussianSample:
    """What `GaussianPosterior.forward` returns: z (B, L, d), the posterior's mean / logvar, the weighted loss and the raw KL."""

    z: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor
    loss: torch.Tensor
    kl: torch.Tensor


def gaussian_kl_to_standard(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per dimension, same shape as `mean`."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(logvar)) per dimension, same shape as `z`."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mean).square() * torch.exp(-logvar))


class GaussianPosterior(nn.Module):
    """Diagonal-Gaussian posterior over latents of width `dim`, with a free-bits KL to N(0, I)."""

    def __init__(self, dim: int, kl_weight: float = 1e-3, kl_clamp: float = 0.5):
        super().__init__()
        self.dim = dim
        self.kl_weight, self.kl_clamp = kl_weight, kl_clamp
        self.to_mean = nn.Linear(dim, dim)
        self.to_logvar = nn.Linear(dim, dim)

    def posterior(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, L, d) -> mean, logvar (B, L, d) in fp32."""
        with torch.autocast(latents.device.type, enabled=False):
            latents = latents.float()
            return self.to_mean(latents), self.to_logvar(latents)

    def forward(self, latents: torch.Tensor, mask: torch.Tensor | None = None) -> GaussianSample:
        """Latents (B, L, d) -> a sample (training) or the mean (eval); padding (mask False) gives z = 0."""
        mean, logvar = self.posterior(latents)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.training else mean
        kl = gaussian_kl_to_standard(mean, logvar)  # (B, L, d)
        valid = torch.ones(mean.shape[:-1], dtype=torch.bool, device=mean.device) if mask is None else mask.bool()
        count = valid.sum().clamp(min=1)
        clamped = (kl.clamp(min=self.kl_clamp).sum(-1) * valid).sum() / count
        raw = (kl.sum(-1) * valid).sum() / count  # nats per position, for logging
        z = z.masked_fill(~valid[..., None], 0.0)
        return GaussianSample(z=z, mean=mean, logvar=logvar, loss=self.kl_weight * clamped, kl=raw)


__all__ = ["GaussianPosterior", "GaussianSample", "gaussian_kl_to_standard", "gaussian_log_density"]
