"""GIVTForCausalLM: a language model over the continuous latents of a frozen Gaussian VAE (GIVT / CALM).

    latents z (B, L, d) (VAE posterior: a sample in training, the mean at eval)
      -> linear d->H, shifted right by one, a learned start position first      (B, L, H)
      -> SPATIAL Qwen3 layers (causal over positions, KV cache)               h (B, L, H)
      -> head on h_l:  "gaussian": mixture of diagonal Gaussians over z_l, loss = NLL (nats per position)
                       "energy":   MLP generator fed noise, loss = energy score against z_l

h_l is computed from the latents of positions < l, so generation samples one latent per step from the
head and the frozen VAE decoder turns it into C tokens (see generation_givt.py). The RQ model's spatial
path, generation loop and streaming decoder are shared; only the latent's representation and the head
differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import repeat
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .backbone import TrainableBackbone
from .configuration_givt import GIVTConfig
from .continuous_heads import EnergyHead, GaussianMixtureHead
from .generation_givt import GIVTGenerationMixin
from .latent_lm import FrozenVAELatentLM
from .layers import Qwen3Stack
from .modeling_rq_vae import CheckedLoading


@dataclass
class GIVTOutput(ModelOutput):
    """What `forward` returns.

    `loss`: the Gaussian head's NLL per latent dimension (`latent_nll` / d), or the energy head's mean energy
    score; `latent_nll` the mean NLL in nats per latent position (Gaussian head only); `latents` (B, L, d) the
    targets; `num_latents` the positions scored; `hidden_states` (B, L, H) the spatial outputs.
    """

    loss: torch.FloatTensor | None = None
    latent_nll: torch.FloatTensor | None = None
    energy_score: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    num_latents: torch.LongTensor | None = None
    hidden_states: torch.FloatTensor | None = None


class GIVTPreTrainedModel(CheckedLoading, PreTrainedModel):
    config_class = GIVTConfig
    config: GIVTConfig
    base_model_prefix = "givt"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3DecoderLayer"]  # noqa: RUF012 (transformers convention)
    _supports_sdpa = True
    _supports_flash_attn = True
    _other_type_hint = "a continuous latent LM is trained with `rqlm train-givt --vae GAUSSIAN_VAE_DIR`"

    def _init_weights(self, module):
        """Standard init; the frozen VAE keeps its trained weights (loaded after construction)."""
        if getattr(module, "_owns_its_init", False):
            return
        super()._init_weights(module)
        if isinstance(module, GIVTForCausalLM):
            init.normal_(module.start, std=self.config.backbone_config.initializer_range)


class GIVTForCausalLM(FrozenVAELatentLM, TrainableBackbone, GIVTGenerationMixin, GIVTPreTrainedModel):
    """Spatial transformer and a continuous head over a frozen Gaussian VAE's latents (see the module docstring)."""

    logged_output_keys = ("latent_nll", "energy_score")  # scalar outputs the training loop logs

    def __init__(self, config: GIVTConfig):
        super().__init__(config)
        backbone = config.backbone_config
        for sub in (backbone, config.vae_config, config.vae_config.backbone_config):
            if sub._attn_implementation is None:
                sub._attn_implementation_internal = config._attn_implementation
        hidden, d = backbone.hidden_size, config.latent_dim

        self.vae = self._frozen_vae(config.vae_config)

        self.latent_proj = nn.Linear(d, hidden)
        self.start = nn.Parameter(torch.zeros(hidden))
        self.spatial = Qwen3Stack(backbone)
        if config.head == "gaussian":
            self.head = GaussianMixtureHead(hidden, d, config.num_mixtures, config.min_log_scale)
        else:
            self.head = EnergyHead(hidden, d, config.energy_head_size, config.energy_num_layers,
                                   config.energy_noise_dim, config.energy_num_samples)

        self._freeze_vae()
        self._add_backbone_lora()
        self.post_init()
        self.set_backbone_frozen(config.freeze_backbone_steps > 0)
        self._default_special_tokens()

    # ----------------------------------------------------------------- the frozen VAE
    @torch.no_grad()
    def encode(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.FloatTensor:
        """Tokens (B, T) -> the VAE's posterior means (B, L, d) (0 where a position holds only padding)."""
        return self.vae.encode(input_ids, attention_mask).quantized

    @torch.no_grad()
    def posterior(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None):
        """Tokens (B, T) -> q(z|x): mean, logvar (B, L, d) and the latent mask (B, L) (None without a mask)."""
        encoded = self.vae.encode(input_ids, attention_mask)
        return encoded.posterior_mean, encoded.posterior_logvar, encoded.latent_mask

    # ----------------------------------------------------------------- spatial
    def embed_codes(self, latents: torch.FloatTensor) -> torch.FloatTensor:
        """Latents (B, L, d) -> spatial inputs (B, L, H) (the name the shared generation state calls)."""
        return self.latent_proj(latents.to(self.latent_proj.weight.dtype))

    def spatial_inputs(self, latents: torch.FloatTensor) -> torch.FloatTensor:
        """Latents (B, L, d) -> [start, x_0 .. x_{L-2}] (B, L, H): position l sees the latents of positions < l."""
        start = repeat(self.start, "h -> b 1 h", b=latents.shape[0])
        x = self.embed_codes(latents[:, :-1])  # (B, L-1, H)
        return torch.cat([start.to(x.dtype), x], dim=1)

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        latents: torch.FloatTensor | None = None,
        latent_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> GIVTOutput:
        """Head loss on the latents of text (B, T), or on given latents (B, L, d) with an optional mask (B, L).

        From text, the targets are the VAE posterior's samples in training (`sample_posterior`), its mean
        otherwise. Padding never enters the loss. `labels` is accepted for the trainer's interface.
        """
        if latents is None:
            if input_ids is None:
                raise ValueError("pass input_ids (B, T) or their latents (B, L, d)")
            mean, logvar, latent_mask = self.posterior(input_ids, attention_mask)
            latents = mean
            if self.training and self.config.sample_posterior:
                latents = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        self._check_latents(latents)
        valid = torch.ones(latents.shape[:2], dtype=torch.bool, device=latents.device) if latent_mask is None else latent_mask.bool()
        hidden = self.padded_spatial_forward(self.spatial_inputs(latents), None if latent_mask is None else valid)
        count = valid.sum().clamp(min=1)
        if self.config.head == "gaussian":
            nll = self.head.nll(hidden, latents)  # (B, L)
            latent_nll = (nll * valid).sum() / count
            return GIVTOutput(loss=latent_nll / self.config.latent_dim, latent_nll=latent_nll, latents=latents,
                              num_latents=valid.sum(), hidden_states=hidden)
        score = (self.head.loss(hidden, latents) * valid).sum() / count
        return GIVTOutput(loss=score, energy_score=score, latents=latents, num_latents=valid.sum(), hidden_states=hidden)

    def _check_latents(self, latents: torch.Tensor) -> None:
        d = self.config.latent_dim
        if not latents.is_floating_point() or latents.dim() != 3 or latents.shape[-1] != d or latents.shape[1] == 0:
            raise ValueError(f"latents must be a float tensor (batch, latent_length >= 1, {d}), got "
                             f"{latents.dtype} {tuple(latents.shape)}")


__all__ = ["GIVTForCausalLM", "GIVTOutput", "GIVTPreTrainedModel"]
