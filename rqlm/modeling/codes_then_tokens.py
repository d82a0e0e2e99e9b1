"""`depth_output="codes_then_tokens"`: per latent position, first a plan (the next chunk's D residual codes, over
depth as in the codes mode), then the chunk's C tokens from the tokens mode's token decoder, which reads that plan.

    tokens (B, T) -> each row's real tokens, from its first one, in chunks of C             (B, L, C)
    the frozen VAE encoder's codes of each chunk (or precomputed ones)                   z (B, L, D)
    -> spatial input of position l: chunk l-1 (its tokens and/or its codes); a start vector at l = 0
    -> SPATIAL Qwen3 layers, causal over chunks                                          h (B, L, H)
    -> CODE DEPTH decoder (the codes mode's) over [h_l, z_l,0 .. z_l,D-2]      code logits (B, L, D, K)
    -> TOKEN DECODER over [x (P tokens before the chunk), depth_in(h_l) + plan(z_l),
       x_l,0 .. x_l,C-2], causal; plan(z_l) = sum_d e_d(z_l,d)                             (B, L, C, w)
    -> vocabulary head: slot j predicts x_l,j                                           (B, L * C, V)

    loss = (sum of code NLL + sum of token NLL) / real tokens

For any codes z, -log p(x) <= -log p(z) - log p(x | z); with z the VAE encoder's codes of x (a function of the
text) the loss is that bound per token, term for term what `rqlm evaluate` reports for the codes mode (with the
token decoder in place of the VAE decoder). What is causal: the code logits of chunk l read the tokens and codes of
chunks < l (and the codes of depths < d at depth d); the logits of token j of chunk l read the chunks < l, z_l and
the tokens before j. So given the codes, logits[:, t] depend on tokens up to t only; with codes computed from the
text, they also read the codes of t + 1's chunk, which are a function of that whole chunk (the plan is teacher-forced).

`generate` (in generation_rq_transformer.py, the loop here) draws per chunk: one spatial step, the D codes, then
the C tokens one by one through transformers' logits processors. The spatial input of a generated chunk reads the
codes that were drawn for it (the plan), as it reads z = enc(x) in training: the sampler draws from the joint whose
likelihood the loss bounds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers.utils import ModelOutput

from .code_depth import CodeDepthMixin, choose
from .configuration_rq_transformer import CODE_DEPTH_NUM_LAYERS
from .generation_rq_transformer import RQGenerateOutput, SpatialState
from .modeling_rq_vae import IGNORE_INDEX
from .token_depth import check_input_ids, real_spans


@dataclass
class CodesThenTokensOutput(ModelOutput):
    """What `forward` returns with `depth_output="codes_then_tokens"` (nats; "per token": divided by `num_tokens`).

    loss: the bound per token, `code_loss + token_loss`; code_loss: the code NLL of every chunk holding a real token,
    per token; token_loss: the NLL of every real token (each row's first too) given its chunk's codes, per token.
    logits (B, T, V): causal layout, logits[:, t] predicts token t + 1 given the codes of its chunk (0 on padding
    columns and where those codes are unknown: a text ending at a chunk boundary without a plan in `codes`).
    first_logits (B, V): the prediction of each row's first real token (from the start state and its chunk's codes),
    which the causal layout has no column for. code_logits (B, L, D, K) and codes (B, L, D): per chunk counted from
    each row's first real token (-1: no real token there). num_tokens: real tokens scored.
    """

    loss: torch.FloatTensor | None = None
    code_loss: torch.FloatTensor | None = None
    token_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    first_logits: torch.FloatTensor | None = None
    code_logits: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None
    num_tokens: torch.LongTensor | None = None


class CodeDepthDecoder(CodeDepthMixin, nn.Module):
    """The codes mode's depth decoder as a submodule (its names would clash with the token decoder's on the model):
    h (N, H) -> the D codes of the next chunk, with the codes mode's depth (CODE_DEPTH_NUM_LAYERS layers) and the
    depth transformer's width, heads and `depth_mode`."""

    def __init__(self, config, hidden: int, like):
        super().__init__()
        self.config = SimpleNamespace(
            depth_hidden_size=config.depth_hidden_size,
            depth_num_attention_heads=config.depth_num_attention_heads,
            depth_intermediate_size=config.depth_intermediate_size,
            depth_num_layers=CODE_DEPTH_NUM_LAYERS,
            depth_mode=config.depth_mode,
            num_quantizers=config.num_quantizers,
            codebook_size=config.codebook_size,
        )
        self.build_depth(hidden, like)


class CodesThenTokensMixin:
    """The codes_then_tokens mode's modules, teacher-forced pass and generation loop, for `RQTransformerForCausalLM`."""

    def build_codes_then_tokens(self, hidden: int, like) -> None:
        """The token decoder (tokens mode's), the code depth decoder and the plan embeddings; call before post_init."""
        config = self.config
        self.build_token_depth(hidden, like)
        self.code_depth = CodeDepthDecoder(config, hidden, like)
        # the plan joins the state's slot as one vector, the sum of per-depth code embeddings (as a residual
        # quantizer sums its codewords): D extra slots would lengthen every token decoder call by D positions
        self.plan_embed = nn.ModuleList(
            [nn.Embedding(config.codebook_size, config.depth_hidden_size) for _ in range(config.num_quantizers)]
        )

    def embed_plan(self, codes: torch.LongTensor) -> torch.FloatTensor:
        """Codes (..., D) -> the token decoder's plan vector (..., w); -1 (no chunk) gives any finite vector."""
        codes = codes.clamp(min=0)
        return sum(embed(codes[..., d]) for d, embed in enumerate(self.plan_embed))

    # ----------------------------------------------------------------- teacher-forced pass
    def _codes_then_tokens_forward(self, input_ids, attention_mask, labels, codes, cache, use_cache, **kwargs):
        """Tokens (B, T) [and their codes (B, L, D), counted from each row's first real token] -> the bound and its
        parts, token and code logits (`CodesThenTokensOutput`).

        `codes` may hold one chunk more than the text: the plan of the chunk that the token after the text opens;
        it gives that token's logits and is not scored. `labels` (the trainer passes them) must be `input_ids`
        (-100 on padding): the bound scores every real token.
        """
        unused = sorted(k for k, v in kwargs.items() if v is not None and v is not False and k != "return_dict")
        if unused or cache is not None or use_cache:
            raise ValueError(f"the codes_then_tokens forward takes no cache and does not take {unused or 'use_cache'}; "
                             "its generate runs its own loop")
        check_input_ids(input_ids)
        c, device = self.compression_factor, input_ids.device
        start, length = real_spans(input_ids, attention_mask)
        self._check_labels(labels, input_ids, attention_mask)
        b, t = input_ids.shape
        scored = -(-length // c)  # (B,) chunks holding a real token
        num_chunks = int(scored.max())
        if codes is not None:
            codes = self._plan_codes(codes, scored, int(length.max()))
            num_chunks = codes.shape[1]
        self._check_positions(num_chunks)
        n = num_chunks * c
        index = (start[:, None] + torch.arange(n, device=device)[None]).clamp(max=t - 1)
        real = torch.arange(n, device=device)[None] < length[:, None]  # (B, n)
        tokens = input_ids.gather(1, index).masked_fill(~real, self._filler_token())  # (B, n): from each row's start
        if codes is None:
            codes = self.encode(tokens, real.long())  # (B, L, D), -1 on chunks of filler only

        spatial_codes = codes[:, :-1] if self.config.reads_codes else None
        x = self.spatial_inputs_from(tokens[:, : n - c], spatial_codes, b)  # (B, L, H)
        h = self.spatial_forward(x)  # (B, L, H)
        code_logits = self.code_depth.depth_logits(h, codes)  # (B, L, D, K)
        chunk = torch.arange(num_chunks, device=device)[None].expand(b, -1)  # (B, L)
        before = self.tokens_before(tokens, chunk)
        y = self.token_decoder_hidden(
            rearrange(h, "b l h -> (b l) h"),
            rearrange(tokens, "b (l c) -> (b l) c", c=c)[:, :-1],
            None if before is None else before.flatten(0, 1),
            plan=rearrange(self.embed_plan(codes), "b l w -> (b l) w"),
        )  # (B * L, C, w)
        token_logits = self.token_head(rearrange(y, "(b l) c w -> b (l c) w", b=b))  # (B, n, V): row j predicts token j

        token_nll = F.cross_entropy(
            rearrange(token_logits.float(), "b n v -> b v n"), tokens.masked_fill(~real, IGNORE_INDEX),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )  # fmt: skip
        scored_chunk = (chunk < scored[:, None])[..., None]  # (B, L, 1)
        code_nll = F.cross_entropy(
            rearrange(code_logits.float(), "b l d k -> b k l d"), codes.masked_fill(~scored_chunk, IGNORE_INDEX),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )  # fmt: skip
        num_tokens = length.sum()
        return CodesThenTokensOutput(
            loss=(code_nll + token_nll) / num_tokens,
            code_loss=code_nll / num_tokens,
            token_loss=token_nll / num_tokens,
            logits=self._causal_layout(token_logits, codes, start, attention_mask, t),
            first_logits=token_logits[:, 0],
            code_logits=code_logits,
            codes=codes,
            num_tokens=num_tokens,
        )

    def _causal_layout(self, token_logits, codes, start, attention_mask, t: int) -> torch.FloatTensor:
        """Logits (B, n, V) of the tokens from each row's start -> (B, T, V) in the caller's columns, column s
        predicting token s + 1; 0 on padding columns and where the predicted token's chunk has no codes."""
        n = token_logits.shape[1]
        target = torch.arange(t, device=start.device)[None] - start[:, None] + 1  # (B, T) internal token predicted
        known = codes[..., 0] >= 0  # (B, L)
        has_plan = (target < n) & known.gather(1, (target.clamp(0, n - 1) // self.compression_factor))
        logits = token_logits.gather(1, target.clamp(0, n - 1)[..., None].expand(-1, -1, token_logits.shape[-1]))
        keep = has_plan if attention_mask is None else has_plan & attention_mask.bool()
        return logits.masked_fill(~keep[..., None], 0.0)

    def _plan_codes(self, codes: torch.LongTensor, scored: torch.LongTensor, longest: int) -> torch.LongTensor:
        """Checked precomputed codes (B, >= L, D), cut to the chunks a prediction of tokens 0..length can read."""
        self._check_codes(codes)
        num_chunks = int(scored.max())
        if codes.shape[0] != len(scored) or codes.shape[1] < num_chunks:
            raise ValueError(f"codes {tuple(codes.shape)} must hold {num_chunks} chunks of each of the {len(scored)} "
                             "rows (counted from each row's first real token)")
        codes = codes[:, : max(num_chunks, -(-(longest + 1) // self.compression_factor))]
        chunk = torch.arange(codes.shape[1], device=codes.device)[None]
        if ((codes[..., 0] < 0) & (chunk < scored[:, None])).any():
            raise ValueError("codes are -1 on a chunk that holds real tokens; pass the codes of every chunk of the text")
        return codes

    @staticmethod
    def _check_labels(labels, input_ids, attention_mask) -> None:
        """Labels, when given, are the inputs (-100 on padding): this mode has no way to leave a real token out."""
        if labels is None:
            return
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if labels.shape != input_ids.shape or not torch.equal(labels[real], input_ids[real]):
            raise ValueError("labels must be input_ids (-100 on padding): the codes_then_tokens bound scores every "
                             "real token; pass no labels or labels=input_ids")

    # ----------------------------------------------------------------- generation
    def _generate_codes_then_tokens(self, input_ids, attention_mask, run, streamer, started: float):
        """The decoding loop of `generate` on checked arguments: per chunk a spatial step, the D codes (the run's
        depth processors), then C tokens one by one (the run's token processors); EOS or a stop string ends a row
        inside its chunk, max_new_tokens counts tokens, max_time is checked after each chunk."""
        if streamer is not None:
            streamer.put(input_ids.cpu())
        state = _PlanState(self, input_ids, attention_mask, use_cache=run.use_cache)
        b, device = input_ids.shape[0], input_ids.device
        eos = torch.tensor(run.eos, dtype=torch.long, device=device)
        new = torch.full((b, run.max_new_tokens), run.pad, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        plans, produced = [], 0
        while produced < run.max_new_tokens and not done.all():
            h = state.hidden()  # (B, H)
            codes = self.code_depth._sample_codes(h, run.depth_processors)  # (B, D)
            plans.append(codes)
            plan, before = self.embed_plan(codes), state.tokens_before()  # (B, w), (B, P) or None
            chunk = codes.new_zeros(b, 0)  # (B, j): the tokens chosen so far, as the decoder reads them
            for _ in range(min(self.compression_factor, run.max_new_tokens - produced)):
                logits = self.token_head(self.token_decoder_hidden(h, chunk, before, plan=plan)[:, -1])  # (B, V)
                sequence = torch.cat([input_ids, new[:, :produced]], dim=1)  # what is returned so far
                token = choose(run.tokens.processors(sequence, logits.float()), run.tokens.do_sample)  # (B,)
                chunk = torch.cat([chunk, token[:, None]], dim=1)
                token = token.masked_fill(done, run.pad)
                new[:, produced] = token
                produced += 1
                ends = torch.isin(token, eos) if len(run.eos) else torch.zeros_like(done)
                if run.stop is not None:  # a stop string completed by this token
                    ends |= run.stop(torch.cat([sequence, token[:, None]], dim=1), None)
                if streamer is not None:
                    streamer.put(token.cpu())
                done = done | ends
                if done.all():
                    break
            if done.all() or produced == run.max_new_tokens:
                break
            state.append(chunk, codes)
            if run.max_time is not None and time.perf_counter() - started > run.max_time:
                break
        if streamer is not None:
            streamer.end()
        sequences = torch.cat([input_ids, new[:, :produced]], dim=1)
        if not run.return_dict:
            return sequences
        return RQGenerateOutput(sequences=sequences, codes=torch.stack(plans, dim=1))


class _PlanState(SpatialState):
    """The running sequence of a codes_then_tokens `generate`: the spatial state (`SpatialState`) over the tokens
    and their codes (the VAE's for the prompt, the drawn plans after it); a chunk enters the spatial model as
    `chunk_embeddings` of its tokens (and codes, where the model reads them).
    """

    def __init__(self, model, input_ids: torch.LongTensor, attention_mask: torch.LongTensor, use_cache: bool):
        super().__init__(model, input_ids, attention_mask, use_cache, pad=model._filler_token())
        self._hidden = self._spatial_prefill()

    def _embed(self, tokens: torch.LongTensor, codes: torch.LongTensor) -> torch.FloatTensor:
        return self.model.chunk_embeddings(tokens, codes if self.model.config.reads_codes else None)

    def _check_positions(self) -> None:
        self.model._check_positions(int(self.spatial_mask.sum(1).max()))

    def tokens_before(self) -> torch.LongTensor | None:
        """The P tokens before the next chunk (B, P), filler before each row's start (the layout's padding is
        filler); None when P = 0."""
        p = self.model.config.token_decoder_context
        if not p:
            return None
        return F.pad(self.tokens, (p, 0), value=self.model._filler_token())[:, -p:]

    def append(self, tokens: torch.LongTensor, codes: torch.LongTensor) -> None:
        """Add a chunk's tokens (B, C) and its plan (B, D), and step the spatial model over it."""
        self.tokens = torch.cat([self.tokens, tokens], dim=1)
        self.token_mask = F.pad(self.token_mask, (0, tokens.shape[1]), value=1)
        self.codes = torch.cat([self.codes, codes[:, None]], dim=1)
        self.spatial_mask = F.pad(self.spatial_mask, (0, 1), value=1)
        self._spatial_step(tokens, codes[:, None])


__all__ = ["CodeDepthDecoder", "CodesThenTokensMixin", "CodesThenTokensOutput"]
