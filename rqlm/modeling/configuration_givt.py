"""GIVTConfig: the configuration of the latent language model over a Gaussian VAE's continuous latents."""

from __future__ import annotations

from transformers import PreTrainedConfig, Qwen3Config
from transformers.configuration_utils import SubConfigSpec

from .configuration_rq_vae import GAUSSIAN, LORA_TARGETS, RQVAEConfig

HEADS = ("gaussian", "energy")


class GIVTConfig(PreTrainedConfig):
    r"""
    Configuration of [`GIVTForCausalLM`]: a Qwen3 spatial transformer over the continuous latents of a frozen
    Gaussian VAE ([`RQVAEModel`] with `quantizer_type="gaussian"`), each latent projected linearly to the
    backbone width, and a continuous output head.

    Args:
        backbone_config (`Qwen3Config` or `dict`):
            The spatial transformer over latent positions (C tokens each); its `vocab_size` is unused.
        vae_config (`RQVAEConfig` or `dict`, defaults to a default `RQVAEConfig(quantizer_type="gaussian")`):
            The frozen Gaussian VAE whose latents the model predicts and whose decoder turns them into tokens.
        head (`str`, defaults to `"gaussian"`):
            `"gaussian"`: GIVT's head, a diagonal Gaussian (mixture) per position trained by negative
            log-likelihood. `"energy"`: CALM's energy head, an MLP generator fed noise, trained with the energy
            score (likelihood-free: no perplexity bound, BrierLM only).
        num_mixtures (`int`, defaults to 1): k, Gaussian mixture components of the Gaussian head.
        min_log_scale (`float`, defaults to -7.0): lower clamp of the Gaussian head's log standard deviations.
        energy_head_size (`int`, defaults to 256): width of the energy head's MLP.
        energy_num_layers (`int`, defaults to 2): residual MLP blocks of the energy head.
        energy_noise_dim (`int`, *optional*): width of the energy head's input noise (default: the latent's d).
        energy_num_samples (`int`, defaults to 8): generator samples per target in the energy score (>= 2).
        sample_posterior (`bool`, defaults to `True`):
            In training, fit latents sampled from the VAE posterior q(z|x) (what the ELBO bound scores) rather
            than its mean; evaluation always reads the mean.
        freeze_backbone_steps (`int`, defaults to 0): optimizer steps the spatial Qwen3 layers stay frozen.
        lora_r (`int`, defaults to 0): LoRA rank on the spatial layers; 0 trains them fully.
        lora_alpha (`int`, defaults to 16): LoRA scaling numerator.
        lora_dropout (`float`, defaults to 0.0): LoRA dropout.
        lora_target_modules (`list[str]`, *optional*): modules given adapters (default q/k/v/o/gate/up/down).
    """

    model_type = "givt"
    sub_configs_defaults = {  # noqa: RUF012 (transformers ClassVar)
        "backbone_config": SubConfigSpec(Qwen3Config),
        "vae_config": SubConfigSpec(RQVAEConfig),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    vae_config: dict | PreTrainedConfig | None = None
    head: str = "gaussian"
    num_mixtures: int = 1
    min_log_scale: float = -7.0
    energy_head_size: int = 256
    energy_num_layers: int = 2
    energy_noise_dim: int | None = None
    energy_num_samples: int = 8
    sample_posterior: bool = True
    freeze_backbone_steps: int = 0
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.vae_config is None:  # the default sub-config is a Gaussian VAE, not the RQ-VAE's residual VQ
            self.vae_config = {"quantizer_type": GAUSSIAN}
        super().__post_init__(**kwargs)
        self.lora_target_modules = list(self.lora_target_modules or LORA_TARGETS)
        self.validate_values()

    @property
    def compression_factor(self) -> int:
        """C: tokens per latent position (the VAE's)."""
        return self.vae_config.compression_factor

    @property
    def latent_dim(self) -> int:
        """d: the width of a latent (the VAE's)."""
        return self.vae_config.latent_dim

    def validate_values(self) -> None:
        """Fail early, in one line, on combinations the model cannot build."""
        if not self.vae_config.is_continuous:
            raise ValueError(
                f"GIVT predicts continuous latents, but the VAE is quantized ({self.vae_config.quantizer_type!r}); "
                "train one with `rqlm train-vae --quantizer_type gaussian`, or use RQTransformerForCausalLM"
            )
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        for name in ("num_mixtures", "energy_head_size", "energy_num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.energy_num_samples < 2:
            raise ValueError(f"energy_num_samples must be >= 2 (the energy score compares samples), got {self.energy_num_samples}")
        for name in ("freeze_backbone_steps", "lora_r"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


__all__ = ["HEADS", "GIVTConfig"]
