"""`generate()` for GIVTForCausalLM: one continuous latent per spatial step, C tokens from the VAE decoder.

The loop, the prompt layout (left padding, EOS-padded partial chunks), the KV caches, the streaming VAE
decoder, streamers and stopping are the RQ model's (generation_rq_transformer.py); only the choice of
the next latent differs: the head samples it with `temperature` (Gaussian head: the variance scaled by
it; energy head: the generator's noise scaled by it), and `do_sample=False` takes the head's mean
(Gaussian: the likeliest component's mean; energy: the generator at zero noise).
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from .generation_rq_transformer import RQTransformerGenerationMixin


class GIVTGenerationMixin(RQTransformerGenerationMixin):
    """`generate` with the signature and behaviour of `GenerationMixin.generate`, over continuous latents."""

    def _depth_processors(self, generation_config: GenerationConfig, overrides, logits_processor, device):
        """The sampling settings of the run, (temperature, do_sample): a continuous head has no logits to process."""
        if overrides:
            raise ValueError(f"per-depth settings {sorted('depth_' + k for k in overrides)} apply to the RQ model; "
                             "a continuous latent has no depths")
        if logits_processor:
            raise ValueError("logits_processor needs code logits; a continuous head samples latents (use temperature)")
        temperature = 1.0 if generation_config.temperature is None else float(generation_config.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        return temperature, bool(generation_config.do_sample)

    def _sample_codes(self, hidden: torch.FloatTensor, settings: tuple[float, bool]) -> torch.FloatTensor:
        """Spatial output h (B, H) -> the next latent (B, d), from the head at the run's temperature."""
        temperature, do_sample = settings
        return self.head.sample(hidden, temperature if do_sample else 0.0)


__all__ = ["GIVTGenerationMixin"]
