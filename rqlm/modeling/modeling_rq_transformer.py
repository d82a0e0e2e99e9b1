"""RQTransformerForCausalLM: a language model over the residual codes of a frozen RQ-VAE.

    codes (B, L, D) -> latent of each position (the VAE's quantized vector, or summed
                       per-depth code embeddings) -> linear               (B, L, H)
      shifted right by one, a learned start position first
      -> SPATIAL Qwen3 layers (causal over positions, KV cache)       h (B, L, H)
      -> DEPTH transformer per position over [h_l, e(c_l,0), ..,
         e(c_l,0..D-2)] (causal over depth)                  logits (B, L, D, K)
    loss = cross-entropy over the codes, averaged over depth
         [+ aux: C heads on h_l predict the tokens of chunk l]

`depth_output="tokens"` replaces the depth transformer with a token decoder (token_depth.py), and
`"codes_then_tokens"` keeps both: the codes first, then the tokens given them (codes_then_tokens.py).

h_l is computed from the codes of positions < l, and the logits of depth d from h_l and
the codes of depths < d at position l, so sampling goes position by position and, inside
a position, depth by depth (see generation_rq_transformer.py). The frozen RQ-VAE is a
submodule: `encode` turns text into codes for training, its decoder turns sampled codes
back into C tokens at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .backbone import TrainableBackbone
from .code_depth import CodeDepthMixin
from .codes_then_tokens import CodeDepthDecoder, CodesThenTokensMixin, CodesThenTokensOutput
from .configuration_rq_transformer import RQTransformerConfig
from .generation_rq_transformer import RQTransformerGenerationMixin
from .latent_lm import FrozenVAELatentLM
from .layers import Qwen3Stack
from .modeling_rq_vae import IGNORE_INDEX, CheckedLoading
from .token_depth import RQTokenCache, TokenDepthMixin, check_input_ids


@dataclass
class RQTransformerOutput(ModelOutput):
    """What `forward` returns.

    `loss` = `code_loss` (+ weighted `aux_loss`); `code_loss` is the mean code NLL (nats) per code;
    `depth_nll` and `depth_accuracy` are (D,) per-depth means; `logits` (B, L, D, K); `num_codes` the
    number of codes scored per depth.
    """

    loss: torch.FloatTensor | None = None
    code_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    depth_nll: torch.FloatTensor | None = None
    depth_accuracy: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None
    num_codes: torch.LongTensor | None = None
    hidden_states: torch.FloatTensor | None = None


class RQTransformerPreTrainedModel(CheckedLoading, PreTrainedModel):
    config_class = RQTransformerConfig
    config: RQTransformerConfig
    base_model_prefix = "rq_transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3DecoderLayer"]  # noqa: RUF012 (transformers convention)
    _supports_sdpa = True
    _supports_flash_attn = True
    _other_type_hint = "a latent LM is trained with `rqlm train-lm --vae VAE_DIR`"

    def _init_weights(self, module):
        """Standard init; the frozen VAE keeps its trained weights (loaded after construction)."""
        if getattr(module, "_owns_its_init", False):
            return
        super()._init_weights(module)
        std = self.config.backbone_config.initializer_range
        if isinstance(module, RQTransformerForCausalLM):
            init.normal_(module.start, std=std)
        if isinstance(module, (RQTransformerForCausalLM, CodeDepthDecoder)) and getattr(module, "depth_position", None) is not None:
            init.normal_(module.depth_position, std=std)


class RQTransformerForCausalLM(
    FrozenVAELatentLM,
    TrainableBackbone,
    CodeDepthMixin,
    TokenDepthMixin,
    CodesThenTokensMixin,
    RQTransformerGenerationMixin,
    RQTransformerPreTrainedModel,
):
    """Spatial + depth transformers over a frozen RQ-VAE's codes, or (`depth_output="tokens"`) a spatial
    transformer over chunks and a token decoder per chunk, or (`"codes_then_tokens"`) both decoders, the codes first
    (see the module docstrings)."""

    def __init__(self, config: RQTransformerConfig):
        super().__init__(config)
        backbone = config.backbone_config
        for sub in (backbone, config.vae_config, config.vae_config.backbone_config):
            if sub._attn_implementation is None:
                sub._attn_implementation_internal = config._attn_implementation
        hidden = backbone.hidden_size
        num_codes, codebook = config.num_quantizers, config.codebook_size

        self.vae = self._frozen_vae(config.vae_config)
        if self.vae.quantizer_depth != num_codes or self.vae.quantizer_size != codebook:
            raise ValueError(
                f"the VAE's quantizer gives {self.vae.quantizer_depth} codes of {self.vae.quantizer_size}, "
                f"not D={num_codes} of K={codebook}"
            )

        # spatial input: one vector of width H per latent position (codes here; tokens in build_token_depth)
        self.code_embed = self.latent_proj = None
        if config.spatial_input == "quantized":
            self.latent_proj = nn.Linear(config.vae_config.latent_dim, hidden)
        elif config.reads_codes:
            self.code_embed = nn.ModuleList([nn.Embedding(codebook, hidden) for _ in range(num_codes)])
        self.start = nn.Parameter(torch.zeros(hidden))
        self.spatial = Qwen3Stack(backbone)

        if config.depth_output == "tokens":
            self.build_token_depth(hidden, like=backbone)  # C token slots per latent position
        elif config.depth_output == "codes_then_tokens":
            self.build_codes_then_tokens(hidden, like=backbone)  # D code positions, then C token slots
        else:
            self.build_depth(hidden, like=backbone)  # D positions per latent position

        # optional auxiliary next-chunk token heads
        if config.aux_token_loss_weight > 0:
            self.aux_proj = nn.Linear(hidden, config.compression_factor * hidden)
            self.aux_head = nn.Linear(hidden, config.vae_config.backbone_config.vocab_size, bias=False)
        else:
            self.aux_proj = self.aux_head = None

        self._freeze_vae()
        self._add_backbone_lora()
        self.post_init()
        self.set_backbone_frozen(config.freeze_backbone_steps > 0)
        self._default_special_tokens()

    # ----------------------------------------------------------------- the frozen VAE
    @torch.no_grad()
    def encode(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None):
        """Tokens (B, T) -> the frozen VAE's codes (B, L, D) (-1 where a position holds only padding)."""
        return self.vae.encode(input_ids, attention_mask).codes

    # ----------------------------------------------------------------- spatial
    def embed_codes(self, codes: torch.LongTensor) -> torch.FloatTensor:
        """Codes (B, L, D) -> spatial inputs (B, L, H); -1 (padding) codes give any finite vector."""
        codes = codes.clamp(min=0)
        if self.code_embed is None:
            with torch.no_grad():
                quantized = self.vae.codes_to_quantized(codes)  # (B, L, d), exact
            return self.latent_proj(quantized.to(self.latent_proj.weight.dtype))
        return sum(embed(codes[..., i]) for i, embed in enumerate(self.code_embed))

    def spatial_inputs(self, codes: torch.LongTensor) -> torch.FloatTensor:
        """Codes (B, L, D) -> [start, x_0 .. x_{L-2}] (B, L, H): position l sees the codes of positions < l."""
        start = repeat(self.start, "h -> b 1 h", b=codes.shape[0])
        if codes.shape[1] == 1:  # one position: only the start (the VAE refuses empty codes)
            return start
        x = self.embed_codes(codes[:, :-1])  # (B, L-1, H)
        return torch.cat([start.to(x.dtype), x], dim=1)

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        codes: torch.LongTensor | None = None,
        cache: RQTokenCache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> RQTransformerOutput | CausalLMOutputWithPast | CodesThenTokensOutput:
        """Codes mode: code NLL of text (B, T) or of its precomputed codes (B, L, D), teacher-forced logits
        (B, L, D, K). Tokens mode: a causal LM's forward (see `_token_lm_forward`). codes_then_tokens: the bound
        per token and its two parts (see `_codes_then_tokens_forward`).

        Padding (attention_mask 0, or code -1) never enters the loss. In codes mode `labels` is accepted for
        the trainer's interface; the targets are the codes themselves.
        """
        if self.config.depth_output == "tokens":
            return self._token_lm_forward(input_ids, attention_mask, labels, codes, cache, use_cache, **kwargs)
        if self.config.depth_output == "codes_then_tokens":
            return self._codes_then_tokens_forward(input_ids, attention_mask, labels, codes, cache, use_cache, **kwargs)
        if codes is None:
            if input_ids is None:
                raise ValueError("pass input_ids (B, T) or their codes (B, L, D)")
            codes = self.encode(input_ids, attention_mask)
        self._check_codes(codes)
        hidden = self.padded_spatial_forward(self.spatial_inputs(codes), codes[..., 0] >= 0)  # (B, L, H)
        logits = self.depth_logits(hidden, codes)  # (B, L, D, K)

        valid = codes >= 0  # (B, L, D)
        targets = codes.masked_fill(~valid, IGNORE_INDEX)
        nll = F.cross_entropy(
            rearrange(logits.float(), "b l d k -> b k l d"), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (B, L, D)
        count = valid.sum(dim=(0, 1))  # (D,)
        depth_nll = nll.sum(dim=(0, 1)) / count.clamp(min=1)
        code_loss = depth_nll.mean()
        with torch.no_grad():
            correct = (logits.argmax(-1) == codes) & valid
            depth_accuracy = correct.sum(dim=(0, 1)) / count.clamp(min=1)

        aux_loss = None
        loss = code_loss
        if self.aux_head is not None and input_ids is not None:
            aux_loss = self._aux_token_loss(hidden, input_ids, attention_mask)
            loss = loss + self.config.aux_token_loss_weight * aux_loss
        return RQTransformerOutput(
            loss=loss,
            code_loss=code_loss,
            aux_loss=aux_loss,
            logits=logits,
            depth_nll=depth_nll.detach(),
            depth_accuracy=depth_accuracy,
            codes=codes,
            num_codes=count,
            hidden_states=hidden,
        )

    def _token_lm_forward(self, input_ids, attention_mask, labels, codes, cache, use_cache, **kwargs):
        """Tokens (B, T) -> `CausalLMOutputWithPast`: logits (B, T, V), logits[:, t] from tokens 0..t only;
        `loss` the mean NLL of labels[:, 1:] (-100 ignored). With `use_cache` the output holds an
        `RQTokenCache`; given a filled one, `input_ids` are the new tokens only (as in transformers' generate)."""
        # positions follow attention_mask (chunks start at each row's first real token); the position_ids that
        # transformers derives from the same mask (an assisted target passes them on) are not read
        unused = sorted(k for k, v in kwargs.items() if v is not None and v is not False
                        and k not in ("return_dict", "position_ids"))
        if unused:
            raise ValueError(f"the tokens-mode forward does not take {unused}")
        check_input_ids(input_ids)
        if cache is not None and not isinstance(cache, RQTokenCache):
            if cache.get_seq_length() > 0:
                raise ValueError(f"a tokens-mode model keeps an RQTokenCache, not a filled {type(cache).__name__}")
            cache = None  # an empty cache of another kind: start ours
        if cache is not None and cache.get_seq_length() > 0:
            if attention_mask is not None and attention_mask.shape[1] != cache.get_seq_length() + input_ids.shape[1]:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} columns; the cache holds "
                    f"{cache.get_seq_length()} and input_ids add {input_ids.shape[1]}"
                )
            hidden = self.token_step(cache, input_ids)  # (B, k, w)
        else:
            if cache is None and (use_cache if use_cache is not None else False):
                cache = RQTokenCache()
            hidden = self.token_forward(input_ids, attention_mask, codes, cache=cache)  # (B, T, w)
        logits = self.token_head(hidden)  # (B, T, V)
        if attention_mask is not None and attention_mask.shape[1] == logits.shape[1]:  # padding columns read 0
            logits = logits.masked_fill(attention_mask[..., None] == 0, 0.0)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """False: transformers' generate must not make a DynamicCache; the tokens mode makes its RQTokenCache."""
        return False

    def generate(self, *args, **kwargs):
        """Codes and codes_then_tokens modes: `RQTransformerGenerationMixin.generate`. Tokens mode: transformers' own `generate`, with
        every option of a causal LM (the model steps its spatial transformer once per chunk)."""
        if self.config.depth_output == "tokens":
            config = kwargs.get("generation_config") or self.generation_config
            if kwargs.get("cache") is None and kwargs.get("use_cache", config.use_cache) is not False:
                kwargs["cache"] = RQTokenCache()  # transformers makes none for this model (assisted decoding needs one)
            return GenerationMixin.generate(self, *args, **kwargs)
        return super().generate(*args, **kwargs)

    def _aux_token_loss(self, hidden, input_ids, attention_mask) -> torch.FloatTensor:
        """C heads on h_l predict the C tokens of chunk l: mean token cross-entropy."""
        c = self.compression_factor
        per_token = rearrange(self.aux_proj(hidden), "b l (c h) -> b (l c) h", c=c)
        logits = self.aux_head(per_token)  # (B, T, V)
        targets = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)

    def _check_codes(self, codes: torch.LongTensor) -> None:
        d, k = self.num_quantizers, self.config.codebook_size
        if codes.dim() != 3 or codes.shape[-1] != d:
            raise ValueError(f"codes must have shape (batch, latent_length, {d}), got {tuple(codes.shape)}")
        if codes.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"codes must be integer indices, got {codes.dtype}")
        if codes.numel() == 0:
            raise ValueError("codes are empty; pass at least one latent position")
        if codes.max() >= k or codes.min() < -1:
            raise ValueError(f"codes must lie in [0, {k}) (or -1 for padding); got [{codes.min()}, {codes.max()}]")


__all__ = ["CodesThenTokensOutput", "RQTransformerForCausalLM", "RQTransformerOutput", "RQTransformerPreTrainedModel"]
