"""The depth transformer over the D residual codes of one latent position, shared by the RQ-Transformer
(over its spatial output) and the draft head (over the target's hidden state).

    h (N, H) -> depth_in (N, Dh); input j = depth_in(h) + position j + sum of the embeddings of codes 0..j-1
    -> a small causal Qwen3 stack over the D inputs (`autoregressive`), or all D at once from h (`parallel`),
       or SwiGLU blocks applied to each input alone (`mlp`: the running code sum is the only way earlier codes
       reach code j; no attention and no cache, so a step is three small products)
    -> head j: logits of code j (N, K)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import DynamicCache, Qwen3Config
from transformers.generation.logits_process import LogitsProcessorList

from .layers import Qwen3Stack, small_stack_config


def depth_stack_config(config, like: Qwen3Config) -> Qwen3Config:
    """A small Qwen3 config of width `depth_hidden_size` for the depth transformer (D positions)."""
    return small_stack_config(
        config.depth_hidden_size, config.depth_intermediate_size, config.depth_num_layers,
        config.depth_num_attention_heads, max(config.num_quantizers, 8), like=like,
    )  # fmt: skip


def choose(scores: torch.FloatTensor, do_sample: bool) -> torch.LongTensor:
    """Processed scores (N, K) -> one code per row: a sample of softmax(scores), or the argmax."""
    if do_sample:
        return torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return scores.argmax(-1)


def greedy_processors(depth: int) -> list[tuple[LogitsProcessorList, bool]]:
    """`sample_codes`' per-depth settings for plain argmax codes."""
    return [(LogitsProcessorList(), False)] * depth


class SwiGLUBlock(nn.Module):
    """x + down(silu(gate(norm x)) * up(norm x))."""

    def __init__(self, hidden: int, intermediate: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=eps)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class DepthMLP(nn.Module):
    """The `mlp` depth mode's stack: SwiGLU blocks and a final RMSNorm on every depth input alone; called like a
    Qwen3Stack (the cache and positions are not needed: no input reads another)."""

    def __init__(self, hidden: int, intermediate: int, num_layers: int, eps: float):
        super().__init__()
        self.layers = nn.ModuleList([SwiGLUBlock(hidden, intermediate, eps) for _ in range(num_layers)])
        self.norm = nn.RMSNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, attention_mask=None, cache=None, position_ids=None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class CodeDepthMixin:
    """Mixin for a model whose config has `depth_*`, `depth_mode`, `num_quantizers` and `codebook_size`:
    `build_depth` makes the modules, the methods run them (teacher-forced, step by step, or all at once)."""

    def build_depth(self, hidden: int, like: Qwen3Config) -> None:
        """The depth modules over an input of width `hidden`; call in `__init__` before `post_init`."""
        config = self.config
        depth_hidden, num_codes, codebook = config.depth_hidden_size, config.num_quantizers, config.codebook_size
        self.depth_in = nn.Linear(hidden, depth_hidden)
        self.depth_position = nn.Parameter(torch.zeros(num_codes, depth_hidden))
        self.depth_code_embed = (
            nn.ModuleList([nn.Embedding(codebook, depth_hidden) for _ in range(num_codes - 1)])
            if config.depth_mode != "parallel"
            else None
        )
        if config.depth_mode == "mlp":
            self.depth = DepthMLP(depth_hidden, config.depth_intermediate_size, config.depth_num_layers, like.rms_norm_eps)
        else:
            self.depth = Qwen3Stack(depth_stack_config(config, like))
        self.depth_heads = nn.ModuleList([nn.Linear(depth_hidden, codebook, bias=False) for _ in range(num_codes)])

    @property
    def num_quantizers(self) -> int:
        return self.config.num_quantizers

    def depth_inputs(self, hidden: torch.FloatTensor, codes: torch.LongTensor | None) -> torch.FloatTensor:
        """h (N, H) and the codes already chosen (N, d) -> depth inputs (N, d+1, Dh).

        Input j holds the spatial output, the depth position j and the sum of the embeddings of
        codes 0..j-1 (the partial residual, as in the RQ-Transformer paper); `parallel` mode uses
        the spatial output and the position only.
        """
        h = self.depth_in(hidden)[:, None]  # (N, 1, Dh)
        length = 1 if codes is None else codes.shape[1] + 1
        if self.depth_code_embed is None:
            length = self.num_quantizers
        x = h + self.depth_position[:length]  # (N, length, Dh)
        if self.depth_code_embed is not None and codes is not None and codes.shape[1]:
            embedded = torch.stack([self.depth_code_embed[j](codes[:, j]) for j in range(codes.shape[1])], dim=1)
            x = x + F.pad(embedded.cumsum(dim=1), (0, 0, 1, 0))
        return x

    def depth_logits(self, hidden: torch.FloatTensor, codes: torch.LongTensor) -> torch.FloatTensor:
        """Teacher-forced depth logits: h (B, L, H), codes (B, L, D) -> (B, L, D, K)."""
        b = hidden.shape[0]
        flat_h = rearrange(hidden, "b l h -> (b l) h")
        flat_codes = rearrange(codes.clamp(min=0), "b l d -> (b l) d")[:, :-1]
        x = self.depth_inputs(flat_h, None if self.depth_code_embed is None else flat_codes)
        y = self.depth(x)  # (N, D, Dh)
        logits = torch.stack([head(y[:, j]) for j, head in enumerate(self.depth_heads)], dim=1)
        return rearrange(logits, "(b l) d k -> b l d k", b=b)

    def depth_step(
        self, hidden: torch.FloatTensor, codes: torch.LongTensor, cache, inputs: torch.FloatTensor | None = None
    ) -> torch.FloatTensor:
        """One depth step at generation: h (N, H), codes chosen so far (N, j) -> logits of code j (N, K).

        With a depth cache, only the newest depth input is run through the depth layers. `inputs` (N, 1, Dh)
        is that input when the caller keeps it (`depth_inputs(hidden, codes)[:, -1:]`, built step by step).
        """
        j = codes.shape[1]
        x = self.depth_inputs(hidden, codes)[:, -1:] if inputs is None else inputs  # (N, 1, Dh)
        y = self.depth(x, cache=cache, position_ids=torch.full((1, 1), j, device=x.device))
        return self.depth_heads[j](y[:, -1])

    def parallel_depth_logits(self, hidden: torch.FloatTensor) -> torch.FloatTensor:
        """`parallel` depth mode: h (N, H) -> logits of every depth at once (N, D, K)."""
        y = self.depth(self.depth_inputs(hidden, None))
        return torch.stack([head(y[:, j]) for j, head in enumerate(self.depth_heads)], dim=1)

    def _sample_codes(self, hidden: torch.FloatTensor, processors: list[tuple[LogitsProcessorList, bool]]):
        """h (B, H) -> the D codes of the next position (B, D), depth by depth."""
        parallel = self.config.depth_mode == "parallel"
        logits = self.parallel_depth_logits(hidden) if parallel else None  # (B, D, K)
        cache = DynamicCache(config=self.depth.config) if self.config.depth_mode == "autoregressive" else None
        projected = None if parallel else self.depth_in(hidden)[:, None]  # (B, 1, Dh), once per position
        partial = None  # running sum of the chosen codes' depth embeddings, as `depth_inputs` adds them
        codes = hidden.new_zeros(hidden.shape[0], 0, dtype=torch.long)
        for j, (procs, do_sample) in enumerate(processors):
            if parallel:
                step_logits = logits[:, j]
            else:
                x = projected + self.depth_position[j : j + 1]
                step_logits = self.depth_step(hidden, codes, cache, inputs=x if partial is None else x + partial)
            scores = procs(codes, step_logits.float())  # (B, K)
            chosen = choose(scores, do_sample)
            codes = torch.cat([codes, chosen[:, None]], dim=1)
            if not parallel and j + 1 < len(processors):
                embedded = self.depth_code_embed[j](chosen)[:, None]
                partial = embedded if partial is None else partial + embedded
        return codes


__all__ = ["CodeDepthMixin", "DepthMLP", "SwiGLUBlock", "choose", "depth_stack_config", "greedy_processors"]
