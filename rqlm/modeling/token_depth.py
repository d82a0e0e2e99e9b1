"""`depth_output="tokens"`: a local decoder that reads the spatial state of a chunk and writes its C tokens.

    tokens (B, T) -> each row's real tokens, from its first one, in chunks of C         (B, L, C)
    -> spatial input of position l: the embedding of chunk l-1 (its C token embeddings
       concatenated and projected, and/or the frozen VAE's codes of it); a start vector at l = 0
    -> SPATIAL Qwen3 layers, causal over chunks                                         h (B, L, H)
    -> TOKEN DECODER per chunk over [e(P tokens before the chunk), depth_in(h_l),
       e(x_l,0) .. e(x_l,C-2)], causal (P = token_decoder_context, 0 by default)         (B, L, C, w)
    -> vocabulary head: slot j predicts x_l,j                                           (B, L * C, V)

So the prediction of token t reads the spatial state of the chunks before t's chunk and the tokens of
t's own chunk before it: every logit depends on earlier tokens only, the likelihood is exact, and the
big spatial model runs once per C tokens. Chunks start at each row's first real token, so a
left-padded batch computes what its rows compute one by one. `forward` returns logits in the usual
causal-LM layout (logits[:, t] predicts token t + 1), and `RQTokenCache` lets transformers' own
`generate` (and assisted decoding) step it token by token: the spatial model steps when a chunk is
complete, and the token decoder re-reads the open chunk (at most C positions) every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import DynamicCache

from .layers import Qwen3Stack, small_stack_config


def real_spans(input_ids: torch.LongTensor, attention_mask: torch.Tensor | None):
    """Where each row's real tokens are: (start (B,), length (B,)); they must be contiguous (left or right padding)."""
    b, t = input_ids.shape
    if attention_mask is None:
        zeros = torch.zeros(b, dtype=torch.long, device=input_ids.device)
        return zeros, zeros + t
    mask = attention_mask.bool()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    length = mask.sum(1)
    if (length == 0).any():
        raise ValueError("a row is all padding (its attention_mask is all 0); give every row at least one token")
    start = mask.long().argmax(1)
    end = t - mask.flip(1).long().argmax(1)
    if ((end - start) != length).any():
        raise ValueError("attention_mask has holes: each row's real tokens must be contiguous (left or right padding)")
    return start, length


def check_input_ids(input_ids) -> None:
    """A one-line error unless input_ids is a non-empty (batch, length) tensor (the token modes' forwards)."""
    if input_ids is None or input_ids.dim() != 2 or input_ids.numel() == 0:
        shape = None if input_ids is None else tuple(input_ids.shape)
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor of token ids, got {shape}")


def token_head(width: int, vocab: int, rank: int) -> nn.Module:
    """The token decoder's vocabulary head (..., w) -> (..., V): one Linear, or Linear(w, rank) then Linear(rank, V)."""
    if not rank:
        return nn.Linear(width, vocab, bias=False)
    return nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, vocab, bias=False))


class TokenDepthMixin:
    """The tokens mode's modules and passes, for `RQTransformerForCausalLM` (see the module docstring)."""

    def build_token_depth(self, hidden: int, like) -> None:
        """Token embeddings, the chunk projection, the token decoder and its vocabulary head; call before post_init."""
        config = self.config
        width, c = config.depth_hidden_size, config.compression_factor
        vocab = config.vae_config.backbone_config.vocab_size
        self.token_embed = nn.Embedding(vocab, width)
        self.chunk_proj = nn.Linear(c * width, hidden) if config.reads_tokens else None
        self.depth_in = nn.Linear(hidden, width)
        self.depth = Qwen3Stack(
            small_stack_config(width, config.depth_intermediate_size, config.depth_num_layers,
                               config.depth_num_attention_heads, max(config.token_decoder_context + c, 8), like=like)
        )  # fmt: skip
        self.token_head = token_head(width, vocab, config.token_head_rank)

    # ----------------------------------------------------------------- spatial inputs
    def chunk_embeddings(self, tokens: torch.LongTensor, codes: torch.LongTensor | None) -> torch.FloatTensor:
        """Chunks (B, n * C) and their codes (B, n, D) (or None when the input reads tokens only) -> (B, n, H)."""
        x = 0
        if self.chunk_proj is not None:
            e = self.token_embed(tokens)  # (B, n * C, w)
            x = self.chunk_proj(rearrange(e, "b (n c) w -> b n (c w)", c=self.compression_factor))
        if codes is not None:
            x = x + self.embed_codes(codes)
        return x

    def chunk_codes(self, tokens: torch.LongTensor, end: torch.LongTensor) -> torch.LongTensor | None:
        """The frozen VAE's codes (B, n, D) of chunks (B, n * C) whose real tokens end at `end` (B,); None when
        the spatial input does not read codes."""
        if not self.config.reads_codes:
            return None
        mask = (torch.arange(tokens.shape[1], device=tokens.device)[None] < end[:, None]).long()
        return self.encode(tokens, mask)

    # ----------------------------------------------------------------- token decoder
    def token_decoder_hidden(
        self,
        h: torch.FloatTensor,
        chunk_tokens: torch.LongTensor,
        before: torch.LongTensor | None = None,
        plan: torch.FloatTensor | None = None,
    ) -> torch.FloatTensor:
        """h (N, H), the first tokens of each chunk (N, R - 1) and the P tokens before it (N, P) -> decoder outputs
        (N, R, w) at the state's slot and after it. `plan` (N, w), when given, is added to the state's slot (the
        embedded codes of the chunk, `codes_then_tokens`)."""
        state = self.depth_in(h) if plan is None else self.depth_in(h) + plan
        parts = [state[:, None], self.token_embed(chunk_tokens)]
        if before is not None and before.shape[1]:
            parts.insert(0, self.token_embed(before))
        slots = torch.cat(parts, dim=1)  # (N, P + R, w)
        # without gradients, a throwaway cache sends the call down the stack's lean path (the same arithmetic)
        cache = None if torch.is_grad_enabled() else DynamicCache(config=self.depth.config)
        r = chunk_tokens.shape[1] + 1
        return self.depth(slots, cache=cache)[:, -r:]

    def tokens_before(self, tokens: torch.LongTensor, chunk: torch.LongTensor) -> torch.LongTensor | None:
        """The P tokens before each chunk (B, ..., P) of chunk indices (B, ...) in tokens (B, N); pad before the
        text's start. None when the decoder reads no context."""
        p = self.config.token_decoder_context
        if not p:
            return None
        index = chunk[..., None] * self.compression_factor - p + torch.arange(p, device=chunk.device)  # (B, ..., P)
        gathered = tokens.gather(1, index.clamp(min=0).flatten(1)).view(index.shape)
        return gathered.masked_fill(index < 0, self._filler_token())

    # ----------------------------------------------------------------- teacher-forced pass
    def token_forward(self, input_ids, attention_mask=None, codes=None, cache: RQTokenCache | None = None):
        """Tokens (B, T) -> decoder outputs (B, T, w) in causal-LM layout (row t predicts token t + 1).

        With `cache` (empty), the spatial pass fills it for generation.
        """
        c = self.compression_factor
        start, length = real_spans(input_ids, attention_mask)
        b, t = input_ids.shape
        num_chunks = -(-(int(length.max()) + 1) // c)  # chunks holding a prediction of tokens 1..length
        self._check_positions(num_chunks)
        n = num_chunks * c
        index = (start[:, None] + torch.arange(n, device=input_ids.device)[None]).clamp(max=t - 1)
        real = torch.arange(n, device=input_ids.device)[None] < length[:, None]  # (B, n)
        tokens = input_ids.gather(1, index).masked_fill(~real, self._filler_token())  # (B, n): from each row's start

        finished = tokens[:, : n - c]  # chunks 0..L-2 feed positions 1..L-1
        if not self.config.reads_codes:
            codes = None
        elif codes is not None and (start == 0).all() and codes.shape[1] >= num_chunks - 1:
            codes = codes[:, : num_chunks - 1]  # precomputed by the same VAE on the same layout
        else:
            codes = self.chunk_codes(finished, length) if num_chunks > 1 else None
        x = self.spatial_inputs_from(finished, codes, b)  # (B, L, H)
        spatial_cache = None
        if cache is not None:
            spatial_cache = DynamicCache(config=self.spatial.config)
        h = self.spatial_forward(x, cache=spatial_cache)  # (B, L, H)

        chunks = rearrange(tokens, "b (l c) -> (b l) c", c=c)
        before = self.tokens_before(tokens, torch.arange(num_chunks, device=tokens.device)[None].expand(b, -1))
        before = None if before is None else before.flatten(0, 1)  # (B * L, P)
        y = self.token_decoder_hidden(rearrange(h, "b l h -> (b l) h"), chunks[:, :-1], before)  # (B * L, C, w)
        y = rearrange(y, "(b l) c w -> b (l c) w", b=b)  # row j predicts internal token j

        if cache is not None:
            cache.start_from(self, tokens, length, t, h, spatial_cache)
        # external row s (a real column) predicts token s + 1, i.e. internal row s - start + 1
        ext = torch.arange(t, device=input_ids.device)[None] - start[:, None] + 1
        return y.gather(1, ext.clamp(0, n - 1)[..., None].expand(-1, -1, y.shape[-1]))  # (B, T, w)

    def spatial_inputs_from(self, finished: torch.LongTensor, codes, batch_size: int) -> torch.FloatTensor:
        """[start, chunk_0 .. chunk_{L-2}] (B, L, H) from the finished chunks' tokens (B, (L - 1) * C)."""
        start = self.start[None, None].expand(batch_size, 1, -1)
        if finished.shape[1] == 0:
            return start
        x = self.chunk_embeddings(finished, codes)
        return torch.cat([start.to(x.dtype), x], dim=1)

    def _check_positions(self, num_positions: int) -> None:
        """One line when a text needs more latent positions than the spatial model has."""
        limit = self.config.backbone_config.max_position_embeddings
        if num_positions > limit:
            c = self.compression_factor
            raise ValueError(f"the text needs {num_positions} latent positions, more than the model's {limit} "
                             f"({limit * c - 1} tokens at C={c}); shorten it")

    def _filler_token(self) -> int:
        """What fills the slots after a row's real tokens (never read by a prediction that is used)."""
        pad = self.config.vae_config.backbone_config.pad_token_id
        return int(pad) if pad is not None else 0

    # ----------------------------------------------------------------- one generation step
    def token_step(self, cache: RQTokenCache, new_ids: torch.LongTensor) -> torch.FloatTensor:
        """The next k tokens of every row (B, k) after the cached ones -> decoder outputs (B, k, w), row j
        predicting the token after new token j."""
        c = self.compression_factor
        old = cache.length.clone()
        cache.append(new_ids)
        self._advance_spatial(cache, old)
        k = new_ids.shape[1]
        target = old[:, None] + torch.arange(1, k + 1, device=new_ids.device)[None]  # (B, k) internal index predicted
        chunk, slot = target // c, target % c
        h = cache.hidden_at(chunk)  # (B, k, H)
        r = int(slot.max()) + 1
        index = chunk[..., None] * c + torch.arange(r - 1, device=new_ids.device)  # (B, k, R - 1)
        cache.reserve(int(index.max()) + 1 if r > 1 else 0)
        chunk_tokens = cache.tokens.gather(1, index.flatten(1)).view(index.shape) if r > 1 else index
        before = self.tokens_before(cache.tokens, chunk)  # (B, k, P) or None
        before = None if before is None else before.flatten(0, 1)
        y = self.token_decoder_hidden(h.flatten(0, 1), chunk_tokens.flatten(0, 1), before)  # (B * k, R, w)
        y = y.view(*chunk.shape, r, -1)
        return y.gather(2, slot[..., None, None].expand(-1, -1, 1, y.shape[-1]))[:, :, 0]  # (B, k, w)

    def _advance_spatial(self, cache: RQTokenCache, old_length: torch.LongTensor) -> None:
        """Run the spatial model over the chunks that the newest tokens finished (a column per chunk; rows that
        finished fewer get masked columns)."""
        c = self.compression_factor
        done_before, done_now = old_length // c, cache.length // c
        added = done_now - done_before  # (B,) chunks finished by this step
        steps = int(added.max())
        if steps == 0:
            return
        self._check_positions(int(done_now.max()) + 1)
        device = cache.tokens.device
        j = torch.arange(steps, device=device)[None]
        real = j < added[:, None]  # (B, A)
        chunk = (done_before[:, None] + j).masked_fill(~real, 0)  # (B, A): index of the chunk each column reads
        index = chunk[..., None] * c + torch.arange(c, device=device)  # (B, A, C)
        tokens = cache.tokens.gather(1, index.flatten(1))  # (B, A * C)
        codes = None
        if self.config.reads_codes:
            codes = self._codes_of_chunks(cache, chunk)
        x = self.chunk_embeddings(tokens, codes)  # (B, A, H)
        position = (chunk + 1).masked_fill(~real, 0)  # column for chunk q holds h_{q+1}
        mask = torch.cat([cache.spatial_mask, real.long()], dim=1)
        h = self.spatial_forward(x, mask, position, cache=cache.spatial_cache)  # (B, A, H)
        cache.add_columns(h, position.masked_fill(~real, -1), mask)

    def _codes_of_chunks(self, cache: RQTokenCache, chunk: torch.LongTensor) -> torch.LongTensor:
        """The VAE's codes (B, A, D) of chunks (B, A) of the cached tokens."""
        c, vae = self.compression_factor, self.vae
        if vae.config.num_encoder_layers == 0 and vae.config.num_latent_layers == 0:  # chunk-local: each chunk alone
            index = chunk[..., None] * c + torch.arange(c, device=chunk.device)
            tokens = rearrange(cache.tokens.gather(1, index.flatten(1)), "b (a c) -> (b a) c", c=c)
            return rearrange(self.encode(tokens), "(b a) 1 d -> b a d", b=chunk.shape[0])
        end = int(chunk.max() + 1) * c  # the encoder reads earlier chunks: encode the whole prefix
        codes = self.chunk_codes(cache.tokens[:, :end], cache.length)  # (B, n, D)
        return codes.gather(1, chunk[..., None].expand(-1, -1, codes.shape[-1]))


class RQTokenCache:
    """What `generate` keeps between steps of a tokens-mode model: the tokens, and the spatial model's KV cache.

    Each row's real tokens are kept from its first one (`tokens` (B, N), `length` (B,)); `columns` counts the
    caller's (left-padded) columns. The spatial cache holds columns: the start column and
    one per finished chunk; a row that finished fewer chunks than another in a step gets masked columns
    (`spatial_mask` 0, `spatial_chunk` -1), and `spatial_chunk` says which h_q each column holds.
    `crop` rolls the whole state back to a shorter text (assisted decoding), `reorder_cache` follows beam search.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = ()

    def __init__(self):
        self.tokens = None

    def start_from(self, model, tokens, length, columns, hidden, spatial_cache) -> None:
        """Fill the cache from a teacher-forced pass: tokens (B, n) from each row's start, hidden (B, L, H)."""
        c = model.compression_factor
        self.compression_factor = c
        self.filler = model._filler_token()
        self.tokens, self.length, self.columns = tokens, length.clone(), columns
        num = hidden.shape[1]
        q = torch.arange(num, device=tokens.device)[None].expand(tokens.shape[0], -1)
        real = q <= (length // c)[:, None]  # column q reads chunk q - 1, which must be finished
        self.spatial_cache = spatial_cache
        self.spatial_mask = real.long()
        self.spatial_chunk = q.masked_fill(~real, -1)
        self.spatial_hidden = hidden

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns of the caller's layout seen so far (padding included)."""
        return 0 if self.tokens is None else self.columns

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None) -> None:
        """Assisted decoding asks caches to keep what a rollback needs; this one always can roll back (`crop`)."""

    def reserve(self, size: int) -> None:
        """Grow `tokens` (with filler) so that it holds at least `size` positions."""
        if size > self.tokens.shape[1]:
            grow = max(size - self.tokens.shape[1], 4 * self.compression_factor)
            self.tokens = F.pad(self.tokens, (0, grow), value=self.filler)

    def append(self, new_ids: torch.LongTensor) -> None:
        """Add k tokens (B, k) after each row's last one."""
        k = new_ids.shape[1]
        self.reserve(int(self.length.max()) + k + self.compression_factor)
        index = self.length[:, None] + torch.arange(k, device=new_ids.device)[None]
        self.tokens = self.tokens.scatter(1, index, new_ids)
        self.length = self.length + k
        self.columns += k

    def add_columns(self, hidden, chunk, mask) -> None:
        """Spatial outputs (B, A, H) of A new columns, the h_q each holds (B, A) (-1: masked), the full mask."""
        self.spatial_hidden = torch.cat([self.spatial_hidden, hidden], dim=1)
        self.spatial_chunk = torch.cat([self.spatial_chunk, chunk], dim=1)
        self.spatial_mask = mask

    def hidden_at(self, q: torch.LongTensor) -> torch.FloatTensor:
        """h_q (B, k, H) of each row for chunk indices q (B, k)."""
        match = self.spatial_chunk[:, None, :] == q[..., None]  # (B, k, S)
        if not match.any(-1).all():
            raise RuntimeError("the spatial state of a chunk is missing from the cache")
        column = match.long().argmax(-1)  # (B, k)
        return self.spatial_hidden.gather(1, column[..., None].expand(-1, -1, self.spatial_hidden.shape[-1]))

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` columns (a negative value: drop that many from the end; 0: nothing)."""
        if max_length == 0 or self.tokens is None:
            return
        columns = self.columns + max_length if max_length < 0 else min(max_length, self.columns)
        drop = self.columns - columns
        if drop <= 0:
            return
        self.length = self.length - drop
        if (self.length < 1).any():
            raise ValueError(f"cannot crop the cache to {columns} columns: that cuts into a row's first token")
        self.columns = columns
        valid = (self.spatial_chunk >= 0) & (self.spatial_chunk <= (self.length // self.compression_factor)[:, None])
        self.spatial_chunk = self.spatial_chunk.masked_fill(~valid, -1)
        self.spatial_mask = self.spatial_mask * valid.long()
        keep = int(valid.any(0).nonzero().max()) + 1  # the start column is always valid
        extra = self.spatial_mask.shape[1] - keep
        if extra:
            self.spatial_cache.crop(-extra)
            self.spatial_mask, self.spatial_chunk = self.spatial_mask[:, :keep], self.spatial_chunk[:, :keep]
            self.spatial_hidden = self.spatial_hidden[:, :keep]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the rows for beam search."""
        for name in ("tokens", "length", "spatial_mask", "spatial_chunk", "spatial_hidden"):
            setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.tokens.device)))
        self.spatial_cache.reorder_cache(beam_idx)


__all__ = ["RQTokenCache", "TokenDepthMixin", "real_spans", "token_head"]
