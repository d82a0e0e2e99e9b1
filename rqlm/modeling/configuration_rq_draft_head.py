"""RQDraftHeadConfig: a residual-code draft head on a causal LM's last hidden state."""

from __future__ import annotations

from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_rq_transformer import DepthOverVAECodes
from .configuration_rq_vae import RQVAEConfig


class RQDraftHeadConfig(DepthOverVAECodes, PreTrainedConfig):
    r"""
    Configuration of [`RQDraftHead`]: from a target causal LM's last hidden state at token t and the
    token t + 1, the D residual codes of the chunk of C tokens after it (t + 2 .. t + C + 1), which a
    frozen chunk-local RQ-VAE decodes into the draft.

    Args:
        vae_config (`RQVAEConfig` or `dict`):
            The frozen RQ-VAE: its codes are the head's targets and its decoder turns them into tokens. It
            must be chunk-local (no encoder, decoder or latent layers, and a decoder that does not read the
            previous tokens), so that any C consecutive tokens have codes of their own.
        target_hidden_size (`int`): width of the target's hidden states.
        target_layers (`list[int]`, *optional*):
            Which of the target's hidden states the head reads, concatenated, as indices into the
            `hidden_states` transformers returns (i = the residual stream after layer i; the last one, N, is the
            final norm's output). None: the final output alone. Earlier layers keep more of the context than
            the state tuned to the next token (EAGLE-3 fuses low, middle and high layers).
        target_name_or_path (`str`, *optional*): the target the head was trained on (for the model card).
        hidden_size (`int`, defaults to 512): width of the head's fusion layers.
        num_layers (`int`, defaults to 1): SwiGLU residual blocks after the fusion of state and token.
        intermediate_size (`int`, *optional*): SwiGLU width (default 3 x hidden_size).
        depth_mode, depth_num_layers, depth_hidden_size, depth_num_attention_heads, depth_intermediate_size:
            the depth transformer over the D codes, as in [`RQTransformerConfig`].
        rms_norm_eps (`float`, defaults to 1e-6): epsilon of the head's RMSNorms.
    """

    model_type = "rq_draft_head"
    sub_configs_defaults = {"vae_config": SubConfigSpec(RQVAEConfig)}  # noqa: RUF012 (transformers ClassVar)

    vae_config: dict | PreTrainedConfig | None = None
    target_hidden_size: int = 0
    target_layers: list[int] | None = None
    target_name_or_path: str | None = None
    hidden_size: int = 512
    num_layers: int = 1
    intermediate_size: int | None = None
    depth_mode: str = "autoregressive"
    depth_num_layers: int = 1
    depth_hidden_size: int = 256
    depth_num_attention_heads: int = 4
    depth_intermediate_size: int | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.intermediate_size is None:
            self.intermediate_size = 3 * self.hidden_size
        if self.depth_intermediate_size is None:
            self.depth_intermediate_size = 3 * self.depth_hidden_size
        self.validate_values()

    def validate_values(self) -> None:
        """Fail early, in one line, on settings the head cannot build (the VAE and the target are checked by the
        model, `RQDraftHead.check_parts`: transformers builds a default config of every class to diff against)."""
        if self.target_layers is not None and (not self.target_layers or min(self.target_layers) < 1):
            raise ValueError(f"target_layers are indices >= 1 of the target's hidden states, got {self.target_layers}")
        self.validate_depth()
        if self.hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {self.hidden_size}")
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")


__all__ = ["RQDraftHeadConfig"]
