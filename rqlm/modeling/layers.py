"""Building blocks shared by the rqlm models, built on transformers' own Qwen3 pieces.

`Qwen3Stack` is a run of Qwen3 decoder layers (causal or block-causal attention, SwiGLU MLP,
RoPE, final RMSNorm) over embeddings the caller provides; `Downsample` / `Upsample`
change the sequence length by a power of two with kernel-2 stride-2 convolutions,
which act inside one chunk only (so they keep chunk causality).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import Qwen3Config
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding


def same_block(block_size: int):
    """A transformers mask function: query and key positions lie in the same block of `block_size` positions.

    OR-ed with the causal mask it gives block-causal attention: every position of block l sees every
    position of blocks 0..l (positions are absolute, so it holds with a cache too).
    """

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        return q_idx // block_size == kv_idx // block_size

    return inner_mask


def small_stack_config(
    width: int, intermediate_size: int, num_layers: int, num_heads: int, max_positions: int, like: Qwen3Config
) -> Qwen3Config:
    """A Qwen3 config for a small stack at its own width (the VAE's latent layers, the LM's depth transformer),
    with the norm epsilon and attention implementation of the backbone config `like`."""
    config = Qwen3Config(
        vocab_size=1,
        hidden_size=width,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=width // num_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=like.rms_norm_eps,
    )
    config._attn_implementation_internal = like._attn_implementation
    return config


def crop_cache(cache, length: int) -> None:
    """Cut a KV cache (a DynamicCache, or None) back to its first `length` positions."""
    if cache is not None and cache.get_seq_length() > length:
        cache.crop(length - cache.get_seq_length())


class Qwen3Stack(nn.Module):
    """`num_layers` Qwen3 layers + final norm over given embeddings: (B, T, H) -> (B, T, H).

    Attention is causal, or block-causal with `block_size` (position t sees every position of the blocks
    up to its own, t // block_size). The stack shares `config` (not a copy), so a change of attention
    implementation reaches it. `inference_kernel` is a hook for rqlm's opt-in CPU kernels
    (`rqlm.kernels.cpu_kernels`): a function (stack, hidden_states, attention_mask, cache, position_ids)
    that returns the stack's output, or None where it does not compute the same; None (the default and in
    a `trust_remote_code` copy) runs transformers' layers.
    """

    inference_kernel = None

    def __init__(self, config: Qwen3Config, num_layers: int | None = None, block_size: int | None = None):
        super().__init__()
        self.config = config
        self.block_size = block_size
        num_layers = config.num_hidden_layers if num_layers is None else num_layers
        self.layers = nn.ModuleList([Qwen3DecoderLayer(config, i) for i in range(num_layers)])
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config=config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not len(self.layers):  # a stack without layers is its final norm (no mask or rotary embedding to build)
            return self.norm(hidden_states)
        kernel = Qwen3Stack.inference_kernel
        if kernel is not None:
            out = kernel(self, hidden_states, attention_mask, cache, position_ids)
            if out is not None:
                return out
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None] + past
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": hidden_states,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
            "or_mask_function": same_block(self.block_size) if self.block_size else None,
        }
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in self.config.layer_types:
            from transformers.masking_utils import create_sliding_window_causal_mask

            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for i, layer in enumerate(self.layers):  # (B, T, H)
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[self.config.layer_types[i]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
            )
        return self.norm(hidden_states)


def num_stages(compression_factor: int) -> int:
    """log2(C) for a power of two C >= 1."""
    return int(math.log2(compression_factor))


class Downsample(nn.Module):
    """log2(C) Conv1d(kernel=2, stride=2) stages: (B, T, H) -> (B, T / C, H)."""

    def __init__(self, hidden_size: int, compression_factor: int):
        super().__init__()
        n = num_stages(compression_factor)
        self.convs = nn.ModuleList([nn.Conv1d(hidden_size, hidden_size, kernel_size=2, stride=2) for _ in range(n)])
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] % 2 ** len(self.convs):
            raise ValueError(f"Downsample takes a length that is a multiple of {2 ** len(self.convs)}, got {x.shape[1]}")
        for i, conv in enumerate(self.convs):
            # conv(kernel 2, stride 2) as one GEMM over pairs, reading the weight (out, in, 2) as (out, in * 2) in
            # place: on CPU, 3x faster than conv1d's im2col at one chunk and 1.5x in training, same result
            pairs = rearrange(x, "b (l k) h -> b l (h k)", k=2)
            x = F.linear(pairs, conv.weight.flatten(1), conv.bias)
            if i < len(self.convs) - 1:
                x = self.act(x)
        return x


class Upsample(nn.Module):
    """log2(C) ConvTranspose1d(kernel=2, stride=2) stages: (B, L, H) -> (B, L * C, H)."""

    def __init__(self, hidden_size: int, compression_factor: int):
        super().__init__()
        n = num_stages(compression_factor)
        self.convs = nn.ModuleList(
            [nn.ConvTranspose1d(hidden_size, hidden_size, kernel_size=2, stride=2) for _ in range(n)]
        )
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            # conv_transpose(kernel 2, stride 2) as one GEMM with the weight (in, out, 2) read as (in, out * 2) in
            # place, then each position's two outputs interleaved (as fast as Downsample's, same result)
            pairs = torch.matmul(x, conv.weight.flatten(1))  # (B, L, out * 2)
            # contiguous: a strided (B, T, H) view sends the LM head after it down a GEMM path ~10x slower on CPU
            x = rearrange(pairs, "b l (h k) -> b (l k) h", k=2).contiguous() + conv.bias
            if i < len(self.convs) - 1:
                x = self.act(x)
        return x
