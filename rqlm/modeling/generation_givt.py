"""`generate()` for GIVTForCausalLM: one continuous latent per spatial step, C tokens from the VAE decoder.

The loop, the prompt layout (left padding, EOS-padded partial chunks), the KV caches, the streaming VAE
decoder, streamers and stopping are the RQ model's (generation_rq_transformer.py); only the choice of
the next latent differs: the head samples it with `temperature` (Gaussian head: the variance scaled by
it; energy head: the generator's noise scaled by it), and `do_sample=False` takes the head's mean
(Gaussian: the likeliest component's mean; energy: the generator at zero noise).

The settings it implements are the RQ model's but for the code logits: for the latent, do_sample and temperature;
for the VAE decoder's choice of each token (as in the RQ model) the token settings (repetition_penalty,
bad_words_ids, min_new_tokens, ...) and `decoder_<name>`; for the run, max_new_tokens / max_length, eos and pad
ids, use_cache, num_return_sequences, stop_strings, max_time, return_dict_in_generate, streamer. The filters of a
categorical's logits (top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff), `logits_processor`,
`depth_<name>`, output_scores / output_logits and every field the RQ model refuses are one-line ValueErrors.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from .generation_rq_transformer import DEPTH_SETTINGS, RQTransformerGenerationMixin
from .transformers_private import default_generation_params

# the fields the RQ model's loop applies to code logits, which a head that samples a continuous latent does not have:
# the filters of its depths' sampling, and the scores it returns
CODE_LOGIT_SETTINGS = tuple(name for name in DEPTH_SETTINGS if name not in ("do_sample", "temperature")) + (
    "output_scores", "output_logits",
)  # fmt: skip
# values that filter nothing besides the defaults: top_k=0 is "no limit", which the CLI passes to every model
NO_FILTER = {"top_k": 0}


class GIVTGenerationMixin(RQTransformerGenerationMixin):
    """`generate` with the signature and behaviour of `GenerationMixin.generate`, over continuous latents."""

    def _check_generation_config(self, generation_config: GenerationConfig) -> None:
        """The RQ model's check (no field away from its default that its loop does not implement), then the fields
        it applies to code logits (top_k, top_p, ..., output_scores): a continuous head has none."""
        super()._check_generation_config(generation_config)
        defaults = default_generation_params()
        for name in CODE_LOGIT_SETTINGS:
            value, default = getattr(generation_config, name), defaults.get(name)
            if value == default or (value in (None, False) and default in (None, False)):
                continue
            if name in NO_FILTER and value == NO_FILTER[name]:
                continue
            raise ValueError(
                f"{name}={value!r} acts on code logits, which {type(self).__name__}.generate does not have: its head "
                "samples a continuous latent; leave it unset (temperature scales the head's noise)"
            )

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
