"""Output heads over continuous latents: GIVT's Gaussian mixture (likelihood) and CALM's energy head (likelihood-free).

    GaussianMixtureHead:  h (..., H) -> k mixture logits, k means and k log-scales of width d
        loss  = -log sum_k pi_k prod_j N(z_j; mean_kj, scale_kj^2)          (nats per position)
        sample at temperature t: a component from softmax(logits / t), then mean + sqrt(t) * scale * eps
        (t scales the variance, GIVT's temperature); t = 0 gives the mean of the most likely component.

    EnergyHead:  h (..., H) and noise eps ~ N(0, I) (..., e) -> a latent sample (..., d), an MLP generator
        loss  = energy score over S samples x_1..x_S of the generator and the target y:
                mean_i |x_i - y| - 1 / (2 S (S - 1)) sum_{i != j} |x_i - x_j|
        (strictly proper: its expectation is minimised by the true distribution of y)
        sample at temperature t: the generator fed t * eps (t = 0: one deterministic latent).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn


def gaussian_mixture_nll(
    z: torch.Tensor, logits: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """-log p(z) under a diagonal Gaussian mixture: z (..., d), logits (..., k), mean / log_scale (..., k, d) -> (...)."""
    z = z.unsqueeze(-2).float()  # (..., 1, d)
    log_scale = log_scale.float()
    per_dim = -0.5 * math.log(2 * math.pi) - log_scale - 0.5 * ((z - mean.float()) * torch.exp(-log_scale)).square()
    log_components = per_dim.sum(-1) + F.log_softmax(logits.float(), dim=-1)  # (..., k)
    return -torch.logsumexp(log_components, dim=-1)


def energy_score(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Unbiased energy score (exponent 1) of S samples (S, ..., d) against the target (..., d) -> (...)."""
    s = samples.shape[0]
    if s < 2:
        raise ValueError(f"the energy score needs at least 2 samples per target, got {s}")
    fit = (samples - target.unsqueeze(0)).norm(dim=-1).mean(0)  # (...)
    flat = rearrange(samples, "s ... d -> (...) s d")
    spread = torch.cdist(flat, flat).sum(dim=(-1, -2)) / (s * (s - 1))  # (N,) mean over i != j (diagonal is 0)
    return fit - 0.5 * spread.reshape(fit.shape)


class GaussianMixtureHead(nn.Module):
    """h (..., H) -> a k-component diagonal Gaussian mixture over latents of width d (k = 1: one Gaussian)."""

    def __init__(self, hidden_size: int, latent_dim: int, num_mixtures: int = 1, min_log_scale: float = -7.0):
        super().__init__()
        self.latent_dim, self.num_mixtures, self.min_log_scale = latent_dim, num_mixtures, min_log_scale
        self.proj = nn.Linear(hidden_size, num_mixtures * (2 * latent_dim + 1))

    def parameters_of(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (..., H) -> logits (..., k), mean (..., k, d), log_scale (..., k, d) (fp32, log_scale >= min_log_scale)."""
        k = self.num_mixtures
        out = self.proj(hidden).float()
        logits, params = out[..., :k], rearrange(out[..., k:], "... (k two d) -> ... k two d", k=k, two=2)
        return logits, params[..., 0, :], params[..., 1, :].clamp(min=self.min_log_scale)

    def nll(self, hidden: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """-log p(z | h) in nats: h (..., H), z (..., d) -> (...)."""
        return gaussian_mixture_nll(z, *self.parameters_of(hidden))

    def sample(self, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """h (N, H) -> latents (N, d); the variance scaled by `temperature`, 0 giving the likeliest component's mean."""
        logits, mean, log_scale = self.parameters_of(hidden)
        if temperature <= 0:
            component = logits.argmax(-1)
        else:
            component = torch.multinomial(F.softmax(logits / temperature, dim=-1), num_samples=1).squeeze(-1)
        pick = repeat(component, "n -> n 1 d", d=self.latent_dim)
        mean, log_scale = mean.gather(1, pick).squeeze(1), log_scale.gather(1, pick).squeeze(1)  # (N, d)
        if temperature <= 0:
            return mean
        return mean + math.sqrt(temperature) * torch.exp(log_scale) * torch.randn_like(mean)


class EnergyHead(nn.Module):
    """CALM's likelihood-free head: an MLP generator of latents from h (..., H) and Gaussian noise (..., e)."""

    def __init__(self, hidden_size: int, latent_dim: int, head_size: int = 256, num_layers: int = 2,
                 noise_dim: int | None = None, num_samples: int = 8):
        super().__init__()
        self.latent_dim, self.noise_dim = latent_dim, noise_dim or latent_dim
        self.num_samples = num_samples
        self.condition = nn.Linear(hidden_size, head_size)
        self.noise_in = nn.Linear(self.noise_dim, head_size)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(head_size), nn.Linear(head_size, head_size), nn.SiLU(),
                           nn.Linear(head_size, head_size)) for _ in range(num_layers)]
        )
        self.out = nn.Linear(head_size, latent_dim)

    def forward(self, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """h (..., H), noise (..., e) -> latents (..., d)."""
        x = self.condition(hidden) + self.noise_in(noise)
        for block in self.blocks:  # residual MLP blocks
            x = x + block(x)
        return self.out(x)

    def sample(self, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """h (N, H) -> latents (N, d), the generator fed noise scaled by `temperature` (CALM's temperature is a
        rejection scheme over many samples; this is the cheap stand-in)."""
        noise = torch.randn(*hidden.shape[:-1], self.noise_dim, device=hidden.device, dtype=hidden.dtype)
        return self(hidden, temperature * noise)

    def loss(self, hidden: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Energy score of `num_samples` generated latents against the target: h (..., H), z (..., d) -> (...)."""
        s = self.num_samples
        h = repeat(hidden, "... h -> s ... h", s=s)
        noise = torch.randn(*h.shape[:-1], self.noise_dim, device=hidden.device, dtype=hidden.dtype)
        return energy_score(self(h, noise).float(), z.float())


__all__ = ["EnergyHead", "GaussianMixtureHead", "energy_score", "gaussian_mixture_nll"]
