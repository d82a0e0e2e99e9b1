"""RQTransformerConfig: the configuration of the latent language model over RQ-VAE codes."""

from __future__ import annotations

from transformers import PreTrainedConfig, Qwen3Config
from transformers.configuration_utils import SubConfigSpec

from .configuration_rq_vae import LORA_TARGETS, RQVAEConfig

SPATIAL_INPUTS = ("quantized", "code_embeddings", "token_embeddings", "token_and_code_embeddings")
TOKEN_SPATIAL_INPUTS = ("token_embeddings", "token_and_code_embeddings")  # inputs that read the chunk's tokens
DEPTH_MODES = ("autoregressive", "parallel", "mlp")
DEPTH_OUTPUTS = ("codes", "tokens", "codes_then_tokens")
TOKEN_OUTPUTS = ("tokens", "codes_then_tokens")  # the outputs with a token decoder
CODE_DEPTH_NUM_LAYERS = 1  # the code depth decoder's default layers (codes mode; codes_then_tokens' code plan)
TOKEN_DEPTH_NUM_LAYERS = 4  # the token decoder's default layers: measured far ahead of 1 or 2 in the tokens mode


class DepthOverVAECodes:
    """What a config with a `vae_config` and the depth transformer's fields shares: the VAE's C, D and K, and
    the depth fields' checks (the RQ-Transformer's and the draft head's)."""

    @property
    def compression_factor(self) -> int:
        """C: tokens per latent position (the VAE's)."""
        return self.vae_config.compression_factor

    @property
    def num_quantizers(self) -> int:
        """D: codes per latent position (the VAE's)."""
        return self.vae_config.num_quantizers

    @property
    def codebook_size(self) -> int:
        """K: codes per codebook (the VAE's)."""
        return self.vae_config.codebook_size

    def validate_depth(self) -> None:
        """One-line errors for depth settings the depth transformer cannot build."""
        if self.depth_mode not in DEPTH_MODES:
            raise ValueError(f"depth_mode must be one of {', '.join(DEPTH_MODES)}, got {self.depth_mode!r}")
        for name in ("depth_hidden_size", "depth_num_attention_heads", "depth_num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.depth_hidden_size % self.depth_num_attention_heads:
            raise ValueError(
                f"depth_hidden_size {self.depth_hidden_size} is not divisible by depth_num_attention_heads "
                f"{self.depth_num_attention_heads}"
            )


class RQTransformerConfig(DepthOverVAECodes, PreTrainedConfig):
    r"""
    Configuration of [`RQTransformerForCausalLM`]: a Qwen3 spatial transformer over latent positions and a
    small depth decoder per position (over the D codes of the next position, or over the C tokens of the next
    chunk), on top of a frozen [`RQVAEModel`].

    Args:
        backbone_config (`Qwen3Config` or `dict`):
            The spatial transformer: its layers run over latent positions (C tokens each). Its `vocab_size`
            is unused (the spatial input is a latent, not a token).
        vae_config (`RQVAEConfig` or `dict`):
            The frozen RQ-VAE whose codes the model predicts and whose decoder turns them back into tokens.
        depth_output (`str`, defaults to `"codes"`):
            What the depth decoder writes for the next latent position. `"codes"`: its D residual codes, which
            the frozen VAE decoder turns into C tokens (the likelihood is a bound). `"tokens"`: its C tokens,
            one by one, with logits over the vocabulary (a Block-Transformer-style local decoder that reads the
            spatial state as its first input); the model is then a plain causal LM with exact likelihood,
            `forward` gives (B, T, V) logits and transformers' own `generate` drives it through
            `RQTokenCache`. `"codes_then_tokens"`: first the next position's D codes (a plan, over depth as in
            `"codes"`), then its C tokens from the tokens mode's token decoder, which also reads that plan; the loss
            is the bound -log p(codes) - log p(tokens | codes) per token, with the frozen VAE encoder's codes of
            the text (its own `generate`, see `codes_then_tokens.py`).
        spatial_input (`str`, *optional*):
            What represents a finished chunk at the spatial input: `"code_embeddings"`, a sum of learned
            per-depth embeddings of the VAE's codes; `"quantized"`, the VAE's exact quantized vector of the
            codes (d wide, projected to H); `"token_embeddings"`, the chunk's C token embeddings concatenated
            and projected (no VAE in the loop); `"token_and_code_embeddings"`, the sum of the last two.
            The token inputs need a token decoder (`depth_output="tokens"` or `"codes_then_tokens"`). Defaults to
            `"code_embeddings"` for codes and `"token_embeddings"` for the other two.
        depth_mode (`str`, defaults to `"autoregressive"`):
            `"autoregressive"`: a causal depth transformer reads the spatial output and the codes already
            chosen (D sequential steps per position at generation). `"parallel"`: every depth is predicted at
            once from the spatial output (one step, codes of one position independent given the context).
            `"mlp"`: autoregressive over depth without attention: SwiGLU blocks read each depth input alone (the
            spatial output plus the sum of the chosen codes' embeddings), no KV cache; the cheapest step.
            With `depth_output="tokens"` the token decoder is always causal over the chunk (`"autoregressive"`);
            with `"codes_then_tokens"` `depth_mode` is the code depth decoder's (the token decoder is causal).
        depth_num_layers (`int`, *optional*): layers of the depth transformer (the token decoder's layers); defaults
            to 1 for codes and 4 with a token decoder (a 4-layer decoder measured far ahead of 1 or 2 in the tokens
            mode). In `"codes_then_tokens"` the code depth decoder keeps the codes mode's 1 layer.
        depth_hidden_size (`int`, defaults to 256): width of the depth transformer (and of the token decoder's
            token embeddings and vocabulary head: its cost per token is vocab_size x width).
        depth_num_attention_heads (`int`, defaults to 4): attention heads of the depth transformer.
        depth_intermediate_size (`int`, *optional*): SwiGLU width of the depth transformer (default 3 x width).
        token_decoder_context (`int`, *optional*):
            Tokens and codes_then_tokens modes: how many tokens before the chunk the token decoder also reads, in front of the spatial
            state (its input is then [x_{lC-P} .. x_{lC-1}, h_l, x_{lC} .. x_{lC+C-2}]), so the chunk's first
            tokens see their neighbours across the chunk boundary and not only the spatial summary. Before the
            text's start these slots hold the pad token. 0 reads the chunk alone (Block Transformer's decoder).
            Defaults to C (one chunk) with a token decoder, which measured 1.09x the baseline's perplexity against
            1.49x without it in the tokens mode, and 0 for codes.
        token_head_rank (`int`, defaults to 0):
            The token decoder's vocabulary head: 0 is one `Linear(width, V)`; r > 0 factorises it as
            `Linear(width, r)` then `Linear(r, V)` (no biases), which cuts its cost per token from V x width to
            (width + V) x r (at the Qwen3 vocabulary of 151,936 the head dominates a small token decoder).
        aux_token_loss_weight (`float`, defaults to 0.0):
            Weight of an auxiliary loss: C linear heads on the spatial output predict the next chunk's tokens
            (cross-entropy), a learning signal as direct as the token baseline's. 0 turns the heads off.
        freeze_backbone_steps (`int`, defaults to 0):
            Optimizer steps during which the spatial Qwen3 layers stay frozen while the input projection and the
            depth transformer learn (meant for a pretrained backbone from `from_backbone`).
        lora_r (`int`, defaults to 0): LoRA rank on the spatial layers; 0 trains them fully.
        lora_alpha (`int`, defaults to 16): LoRA scaling numerator.
        lora_dropout (`float`, defaults to 0.0): LoRA dropout.
        lora_target_modules (`list[str]`, *optional*): modules given adapters (default q/k/v/o/gate/up/down).
    """

    model_type = "rq_transformer"
    sub_configs_defaults = {  # noqa: RUF012 (transformers ClassVar)
        "backbone_config": SubConfigSpec(Qwen3Config),
        "vae_config": SubConfigSpec(RQVAEConfig),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    vae_config: dict | PreTrainedConfig | None = None
    depth_output: str = "codes"
    spatial_input: str | None = None
    depth_mode: str = "autoregressive"
    depth_num_layers: int | None = None
    depth_hidden_size: int = 256
    depth_num_attention_heads: int = 4
    depth_intermediate_size: int | None = None
    token_decoder_context: int | None = None
    token_head_rank: int = 0
    aux_token_loss_weight: float = 0.0
    freeze_backbone_steps: int = 0
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.lora_target_modules = list(self.lora_target_modules or LORA_TARGETS)
        tokens = self.writes_tokens
        if self.depth_num_layers is None:
            self.depth_num_layers = TOKEN_DEPTH_NUM_LAYERS if tokens else CODE_DEPTH_NUM_LAYERS
        if self.token_decoder_context is None:
            self.token_decoder_context = self.vae_config.compression_factor if tokens else 0
        if self.spatial_input is None:
            self.spatial_input = "token_embeddings" if tokens else "code_embeddings"
        if self.depth_intermediate_size is None:
            self.depth_intermediate_size = 3 * self.depth_hidden_size
        self.validate_values()

    def validate_values(self) -> None:
        """Fail early, in one line, on combinations the model cannot build."""
        if self.depth_output not in DEPTH_OUTPUTS:
            raise ValueError(f"depth_output must be one of {', '.join(DEPTH_OUTPUTS)}, got {self.depth_output!r}")
        if self.spatial_input not in SPATIAL_INPUTS:
            raise ValueError(f"spatial_input must be one of {', '.join(SPATIAL_INPUTS)}, got {self.spatial_input!r}")
        if self.spatial_input in TOKEN_SPATIAL_INPUTS and not self.writes_tokens:
            raise ValueError(f"spatial_input={self.spatial_input!r} needs depth_output='tokens' or 'codes_then_tokens'; "
                             "the codes mode reads codes only ('code_embeddings' or 'quantized')")
        if self.depth_output == "tokens" and self.depth_mode != "autoregressive":
            raise ValueError(f"depth_mode={self.depth_mode!r} is for codes; the token decoder is autoregressive over "
                             "the chunk (leave depth_mode at 'autoregressive')")
        if self.token_decoder_context < 0:
            raise ValueError(f"token_decoder_context must be >= 0, got {self.token_decoder_context}")
        if self.token_decoder_context and not self.writes_tokens:
            raise ValueError("token_decoder_context is for depth_output='tokens' or 'codes_then_tokens' (the token "
                             "decoder's reach)")
        if self.token_head_rank < 0:
            raise ValueError(f"token_head_rank must be >= 0, got {self.token_head_rank}")
        if self.token_head_rank and not self.writes_tokens:
            raise ValueError("token_head_rank is for depth_output='tokens' or 'codes_then_tokens' (the token decoder's "
                             "vocabulary head)")
        if self.writes_tokens and self.aux_token_loss_weight > 0:
            raise ValueError(f"aux_token_loss_weight is for depth_output='codes'; the {self.depth_output} mode is "
                             "trained on tokens")
        self.validate_depth()
        for name in ("freeze_backbone_steps", "lora_r"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.aux_token_loss_weight < 0:
            raise ValueError(f"aux_token_loss_weight must be >= 0, got {self.aux_token_loss_weight}")


    @property
    def vocab_size(self) -> int:
        """V: the tokenizer's vocabulary (the VAE's); transformers' generate reads it (assisted decoding)."""
        return self.vae_config.backbone_config.vocab_size

    @property
    def writes_tokens(self) -> bool:
        """Whether the model has a token decoder (`depth_output` "tokens" or "codes_then_tokens")."""
        return self.depth_output in TOKEN_OUTPUTS

    @property
    def reads_tokens(self) -> bool:
        """Whether the spatial input embeds the chunk's tokens."""
        return self.spatial_input in TOKEN_SPATIAL_INPUTS

    @property
    def reads_codes(self) -> bool:
        """Whether the spatial input embeds the VAE's codes of the chunk."""
        return self.spatial_input != "token_embeddings"


__all__ = ["DEPTH_OUTPUTS", "DepthOverVAECodes", "RQTransformerConfig"]
