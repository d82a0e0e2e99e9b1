"""RQVAEConfig: the configuration of the residual-quantized chunk autoencoder."""

from __future__ import annotations

from transformers import PreTrainedConfig, Qwen3Config
from transformers.configuration_utils import SubConfigSpec

from .lora import LORA_TARGETS
from .quantizer_registry import QUANTIZER_CLASSES

GAUSSIAN = "gaussian"  # quantizer_type of the continuous (diagonal-Gaussian) VAE
SEMANTIC_QUANTIZERS = ("residual_vq", "rvq")  # the quantizer types whose first level can be distilled


class RQVAEConfig(PreTrainedConfig):
    r"""
    Configuration of [`RQVAEModel`]: Qwen3 encoder -> downsample by C -> latent layers ->
    residual quantizer (depth D, codebook K) -> latent layers -> upsample -> Qwen3 decoder -> LM head.

    Args:
        backbone_config (`Qwen3Config` or `dict`):
            The Qwen3 backbone whose layers, embeddings and LM head make the encoder and decoder.
            Its `layer_types` / `sliding_window` give local attention when wanted.
        compression_factor (`int`, defaults to 4):
            C, tokens per latent position; a power of two. Downsampling uses log2(C) stride-2 convs.
        num_quantizers (`int`, defaults to 4):
            D, the residual depth: codes per latent position.
        codebook_size (`int`, defaults to 1024):
            K, codes per codebook (for FSQ/LFQ-style quantizers the product of levels or 2**bits).
        latent_dim (`int`, defaults to 64):
            d, the width of the latent (codebook) space.
        num_encoder_layers (`int`, defaults to 2): Qwen3 layers of the encoder backbone.
        num_decoder_layers (`int`, defaults to 2): Qwen3 layers of the decoder backbone.
        num_latent_layers (`int`, defaults to 1):
            Causal transformer layers at width d on each side of the quantizer (0 for none).
        latent_num_attention_heads (`int`, defaults to 2): attention heads of the latent layers.
        latent_intermediate_size (`int`, *optional*): SwiGLU width of the latent layers (default 4 d).
        quantizer_type (`str`, defaults to `"residual_vq"`):
            A name of `quantizer_registry.QUANTIZER_CLASSES`, or `"gaussian"`: no quantizer but a diagonal-Gaussian
            posterior (mean and log-variance heads on the latent; a sample in training, the mean in eval), the
            continuous VAE of GIVT / CALM. `num_quantizers`, `codebook_size` and `quantizer_kwargs` are then unused.
        quantizer_kwargs (`dict`, *optional*):
            Keyword arguments of the quantizer class (vector-quantize-pytorch names), e.g.
            `{"decay": 0.9, "kmeans_init": True, "threshold_ema_dead_code": 2}`.
        decoder_sees_previous_tokens (`bool`, defaults to `False`):
            Add the embeddings of the tokens C positions back to the decoder input, so chunk l is
            decoded from codes 0..l and the (already known) tokens of chunks 0..l-1.
        decoder_block_causal (`bool`, defaults to `True`):
            Block-causal decoder attention: every position of chunk l sees every position of chunks 0..l
            (so with `decoder_sees_previous_tokens` all tokens of earlier chunks, not only the one C back).
            Within a chunk every position derives from the same codes, so chunk causality holds either way.
        quantizer_loss_weight (`float`, defaults to 1.0): weight of the quantizer's own losses.
        kl_weight (`float`, defaults to 1e-3):
            Gaussian VAE only: weight of KL(q(z|x) || N(0, I)) in the loss (CALM's 1e-3).
        kl_clamp (`float`, defaults to 0.5):
            Gaussian VAE only: the KL of every latent dimension is clamped below at this many nats (free bits,
            CALM's 0.5), so the loss never pushes a dimension's posterior all the way onto the prior.
        token_mask_prob (`float`, defaults to 0.0):
            In training, the probability that an input token's embedding is zeroed before the encoder (CALM's
            input masking, p=0.15 there): the latent must carry the chunk from partial evidence.
        latent_dropout (`float`, defaults to 0.0):
            In training, dropout on the latent (the quantized vector or the Gaussian sample) before the decoder
            (CALM's p=0.15): the decoder learns to read a latent that the LM predicted imperfectly.
        zero_init_residual_branches (`bool`, defaults to `True`):
            Initialise the attention and MLP output projections of the backbone layers at zero, so a
            from-scratch encoder and decoder start as the identity and the per-chunk path (embedding ->
            convs -> quantizer -> convs -> LM head) learns token identity before the layers add context.
            Pretrained weights loaded by `from_backbone` / `from_pretrained` overwrite it.
        freeze_backbone_steps (`int`, defaults to 0):
            Optimizer steps during which the backbone's Qwen3 layers are frozen; with zero-initialised
            layers they stay the identity meanwhile. Everything outside the layers (embeddings, the stacks'
            final norms, the LM head, convs, latent layers, quantizer) always trains.
        lora_r (`int`, defaults to 0):
            LoRA rank on the backbone layers; 0 trains them fully instead. Under LoRA the layers' own
            weights (norms included) stay frozen for good, the adapters train once the backbone unfreezes
            (they start at zero, so the model starts equal to its base), and everything outside the layers
            trains as without LoRA.
        lora_alpha (`int`, defaults to 16): LoRA scaling numerator.
        lora_dropout (`float`, defaults to 0.0): LoRA dropout.
        lora_target_modules (`list[str]`, *optional*): modules given adapters (default q/k/v/o/gate/up/down).
        semantic_dim (`int`, defaults to 0):
            The width of a teacher's hidden states the first residual level is distilled toward (Mimi's and
            SpeechTokenizer's semantic level 0); 0 for none. When set, `semantic_proj` (d -> semantic_dim) maps
            each position's level-0 quantized vector onto its teacher vector, and `forward(semantic_targets=)`
            reports `semantic_loss`, the mean over real positions of 1 - cosine. Needs `quantizer_type="residual_vq"`.
        semantic_weight (`float`, defaults to 0.0):
            Weight of `semantic_loss` in the loss (0: reported only). Needs `semantic_dim > 0` when positive.
        rate_weight (`float`, defaults to 0.0):
            Weight of `rate_loss` in the loss: joint rate-distortion training (Kaiser et al. 2018, Roy et al.
            2018). `forward(code_log_prior=)` takes a frozen code prior's log-probabilities of the codes (a latent
            LM trained on this VAE's codes) and adds the expected code NLL under soft assignments, nats per token,
            so that the encoder moves its latents toward codes the prior predicts. Needs
            `quantizer_type="residual_vq"`.
        rate_temperature (`float`, defaults to 1.0):
            Temperature of the soft assignments: level d's code k gets softmax_k(-||r_d - e_k||^2 / temperature).
    """

    model_type = "rq_vae"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(Qwen3Config)}  # noqa: RUF012 (transformers ClassVar)

    backbone_config: dict | PreTrainedConfig | None = None
    compression_factor: int = 4
    num_quantizers: int = 4
    codebook_size: int = 1024
    latent_dim: int = 64
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    num_latent_layers: int = 1
    latent_num_attention_heads: int = 2
    latent_intermediate_size: int | None = None
    quantizer_type: str = "residual_vq"
    quantizer_kwargs: dict | None = None
    decoder_sees_previous_tokens: bool = False
    decoder_block_causal: bool = True
    quantizer_loss_weight: float = 1.0
    kl_weight: float = 1e-3
    kl_clamp: float = 0.5
    token_mask_prob: float = 0.0
    latent_dropout: float = 0.0
    zero_init_residual_branches: bool = True
    freeze_backbone_steps: int = 0
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    semantic_dim: int = 0
    semantic_weight: float = 0.0
    rate_weight: float = 0.0
    rate_temperature: float = 1.0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.quantizer_kwargs = dict(self.quantizer_kwargs or {})
        self.lora_target_modules = list(self.lora_target_modules or LORA_TARGETS)
        if self.latent_intermediate_size is None:
            self.latent_intermediate_size = 4 * self.latent_dim
        self.validate_values()

    @property
    def is_continuous(self) -> bool:
        """True for the Gaussian VAE (continuous latents, no codes)."""
        return self.quantizer_type == GAUSSIAN

    def validate_values(self) -> None:
        """Fail early, in one line, on combinations the model cannot build."""
        c = self.compression_factor
        if not isinstance(c, int) or c < 1 or c & (c - 1):
            raise ValueError(f"compression_factor must be a power of two >= 1, got {c}")
        for name in ("num_quantizers", "codebook_size", "latent_dim", "latent_num_attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "num_encoder_layers", "num_decoder_layers", "num_latent_layers", "freeze_backbone_steps", "lora_r",
            "semantic_dim", "semantic_weight", "rate_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.quantizer_type not in QUANTIZER_CLASSES and not self.is_continuous:
            raise ValueError(
                f"unknown quantizer {self.quantizer_type!r}; choose from {', '.join(sorted(QUANTIZER_CLASSES))} "
                f"or {GAUSSIAN!r}"
            )
        for name in ("token_mask_prob", "latent_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.kl_weight < 0 or self.kl_clamp < 0:
            raise ValueError(f"kl_weight and kl_clamp must be >= 0, got {self.kl_weight} and {self.kl_clamp}")
        if self.semantic_dim and self.quantizer_type not in SEMANTIC_QUANTIZERS:
            raise ValueError(
                f"a semantic level 0 (semantic_dim={self.semantic_dim}) needs quantizer_type 'residual_vq', "
                f"got {self.quantizer_type!r}; set semantic_dim=0 or use residual_vq"
            )
        if self.semantic_weight > 0 and not self.semantic_dim:
            raise ValueError(
                f"semantic_weight={self.semantic_weight} needs semantic_dim > 0 (the teacher's hidden size)"
            )
        if self.rate_weight and self.quantizer_type not in SEMANTIC_QUANTIZERS:
            raise ValueError(
                f"rate_weight={self.rate_weight} needs quantizer_type 'residual_vq' (soft assignments over its "
                f"codebooks), got {self.quantizer_type!r}"
            )
        if self.rate_temperature <= 0:
            raise ValueError(f"rate_temperature must be > 0, got {self.rate_temperature}")
        if self.latent_dim % self.latent_num_attention_heads:
            raise ValueError(
                f"latent_dim {self.latent_dim} is not divisible by latent_num_attention_heads "
                f"{self.latent_num_attention_heads}"
            )
        max_layers = self.backbone_config.num_hidden_layers
        for name in ("num_encoder_layers", "num_decoder_layers"):
            if getattr(self, name) > max_layers:
                raise ValueError(
                    f"{name}={getattr(self, name)} exceeds the backbone's {max_layers} layers; "
                    f"raise backbone_config.num_hidden_layers or lower {name}"
                )


__all__ = ["GAUSSIAN", "RQVAEConfig"]
