"""The random-weight models `rqlm bench` measures, their prompts, and the KV-cache bytes each run ends with.

The baseline is a Qwen3ForCausalLM at a shape (the real Qwen3-0.6B's, or a preset's); a latent LM (a `Variant`)
is an RQTransformerForCausalLM or a GIVTForCausalLM with a spatial stack of that shape over a VAE at the CPU
defaults. Random weights: the speed of a step does not depend on them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

# the Qwen3-0.6B shape, written out so no hub access is needed (random weights)
QWEN3_0_6B = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
}
# the RQ-VAE at train-vae's CPU defaults: only the per-chunk path, no Qwen3 layers
VAE_DEFAULTS = {
    "num_quantizers": 8,
    "codebook_size": 1024,
    "latent_dim": 64,
    "num_encoder_layers": 0,
    "num_decoder_layers": 0,
    "num_latent_layers": 0,
}
DEPTH_DEFAULTS = {"depth_hidden_size": 256, "depth_num_layers": 1, "depth_num_attention_heads": 4}
# depth_output="tokens": a 4-layer token decoder of width 256 (its vocabulary head runs once per token)
TOKEN_DEPTH_DEFAULTS = {"depth_hidden_size": 256, "depth_num_layers": 4, "depth_num_attention_heads": 4}


@dataclass
class Variant:
    """A latent LM to measure: compression and depth mode (RQ), or a continuous head (`head`: GIVT)."""

    compression_factor: int
    depth_mode: str | None = "autoregressive"
    head: str | None = None
    depth_output: str = "codes"
    depth: dict = field(default_factory=dict)  # depth decoder overrides (depth_hidden_size, depth_num_layers)

    @property
    def name(self) -> str:
        if self.head is not None:
            return f"GIVT C={self.compression_factor} {self.head}"
        sizes = "".join(f" {k.removeprefix('depth_')}={v}" for k, v in sorted(self.depth.items()))
        return f"RQ C={self.compression_factor}" + (
            " parallel-depth" if self.depth_mode == "parallel" else ""
        ) + ("" if self.depth_output == "codes" else f" {self.depth_output}") + sizes


def shape_config(shape: str, vocab_size: int = 8192) -> Qwen3Config:
    """'qwen3-0.6b' (the real model's shape) or a preset name ('tiny', 'test') -> a Qwen3Config without EOS."""
    from rqlm.presets import PRESETS, backbone_config

    if shape == "qwen3-0.6b":
        config = Qwen3Config(**QWEN3_0_6B)
    elif shape in PRESETS:
        config = backbone_config(shape, vocab_size=vocab_size)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose qwen3-0.6b or a preset ({', '.join(PRESETS)})")
    config.bos_token_id = config.eos_token_id = None  # EOS ignored: every run makes max_new_tokens
    config.pad_token_id = 0
    return config


def build_rq_model(
    backbone: Qwen3Config,
    compression_factor: int = 4,
    depth_mode: str = "autoregressive",
    depth_output: str = "codes",
    **overrides,
) -> torch.nn.Module:
    """A random-weight RQTransformerForCausalLM: spatial stack of `backbone`'s shape over a VAE at the CPU defaults,
    with the depth decoder of `depth_output` (DEPTH_DEFAULTS or TOKEN_DEPTH_DEFAULTS, then `overrides`)."""
    from rqlm import RQTransformerConfig, RQTransformerForCausalLM, RQVAEConfig

    vae_kwargs = {k: overrides.pop(k) for k in list(overrides) if k in VAE_DEFAULTS}
    vae_config = RQVAEConfig(
        backbone_config=copy.deepcopy(backbone),
        compression_factor=compression_factor,
        **{**VAE_DEFAULTS, **vae_kwargs},
    )
    config = RQTransformerConfig(
        backbone_config=copy.deepcopy(backbone),
        vae_config=vae_config,
        depth_mode=depth_mode,
        depth_output=depth_output,
        **{**(DEPTH_DEFAULTS if depth_output == "codes" else TOKEN_DEPTH_DEFAULTS), **overrides},
    )
    torch.manual_seed(0)
    return RQTransformerForCausalLM(config).eval()


def build_givt_model(backbone: Qwen3Config, compression_factor: int = 4, head: str = "gaussian") -> torch.nn.Module:
    """A random-weight GIVTForCausalLM: spatial stack of `backbone`'s shape over a Gaussian VAE of the same
    per-chunk path as the RQ model's (d = 64), with the given continuous head."""
    from rqlm import GIVTConfig, GIVTForCausalLM, RQVAEConfig

    sizes = {k: v for k, v in VAE_DEFAULTS.items() if k not in ("num_quantizers", "codebook_size")}
    vae_config = RQVAEConfig(
        backbone_config=copy.deepcopy(backbone), compression_factor=compression_factor, quantizer_type="gaussian", **sizes
    )
    config = GIVTConfig(backbone_config=copy.deepcopy(backbone), vae_config=vae_config, head=head)
    torch.manual_seed(0)
    return GIVTForCausalLM(config).eval()


def build_variant(backbone: Qwen3Config, variant: Variant) -> torch.nn.Module:
    """The random-weight latent LM a `Variant` names: an RQ model, or a GIVT model with its head."""
    if variant.head is not None:
        return build_givt_model(backbone, variant.compression_factor, variant.head)
    return build_rq_model(backbone, variant.compression_factor, variant.depth_mode, variant.depth_output, **variant.depth)


def build_baseline(backbone: Qwen3Config) -> Qwen3ForCausalLM:
    """A random-weight Qwen3ForCausalLM of `backbone`'s shape."""
    torch.manual_seed(0)
    return Qwen3ForCausalLM(copy.deepcopy(backbone)).eval()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def kv_cache_bytes(config: Qwen3Config, positions: int, batch_size: int, dtype: torch.dtype) -> int:
    """Bytes of a full KV cache of `positions` positions: keys and values of every layer."""
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_position * positions * batch_size * torch.empty((), dtype=dtype).element_size()


def baseline_cache_bytes(
    config: Qwen3Config, prompt_length: int, new_tokens: int, batch_size: int, dtype
) -> int:
    """The baseline's dynamic KV cache at the end of a run: every position but the last new token."""
    return kv_cache_bytes(config, prompt_length + new_tokens - 1, batch_size, dtype)


def rq_cache_bytes(model, prompt_length: int, new_tokens: int, batch_size: int, dtype: torch.dtype) -> int:
    """The RQ model's KV caches at the end of a run: spatial (start + one per chunk), depth (D) and VAE decoder."""
    c = model.compression_factor
    chunks = -(-prompt_length // c) + -(-new_tokens // c)
    vae = model.vae
    spatial = kv_cache_bytes(model.config.backbone_config, chunks + 1, batch_size, dtype)
    # GIVT has no depth transformer; the token decoder re-reads its open chunk and keeps no cache; codes_then_tokens'
    # code depth decoder is a submodule
    code_depth = getattr(model, "code_depth", model)
    depth = (
        kv_cache_bytes(code_depth.depth.config, model.num_quantizers, batch_size, dtype)
        if getattr(model.config, "depth_mode", None) == "autoregressive" and getattr(model.config, "depth_output", "codes") != "tokens"
        else 0
    )
    decoder = 0
    if len(getattr(vae.decoder, "layers", [])):
        decoder += kv_cache_bytes(vae.decoder.config, chunks * c, batch_size, dtype)
    if len(getattr(vae.latent_decoder, "layers", [])):
        decoder += kv_cache_bytes(vae.latent_decoder.config, chunks, batch_size, dtype)
    return spatial + depth + decoder



def prompts(batch_size: int, length: int, vocab_size: int, device: torch.device) -> torch.LongTensor:
    """Seeded random prompts (B, T0), ids in [1, V) so none is the pad id 0."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, vocab_size, (batch_size, length), generator=g).to(device)
