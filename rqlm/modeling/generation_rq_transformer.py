"""`generate()` for RQTransformerForCausalLM: text in, text out, C tokens per spatial step.

Per step, for every row of the batch:
    one spatial step (KV cache over latent positions)         h (B, H)
    -> D depth steps (KV cache over depth), each code chosen
       through transformers' LogitsProcessors (per-depth overrides)   codes (B, D)
    -> the frozen VAE decoder emits C tokens (argmax; KV cache over
       earlier chunks when it has layers)                      tokens (B, C)
    -> streamer -> stop at EOS (inside a chunk: the rest is padding) or max_new_tokens

Prompts whose length is not a multiple of C are left-padded with EOS (the separator that
packing puts between training documents) up to the next multiple, so every latent position
is a full chunk; the returned ids start with the exact prompt, without that padding.
Batches are left-padded by whole chunks, with positions counted from each row's first
real chunk, so a batch generates what its rows generate one by one.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationConfig, GenerationMixin
from transformers.generation.logits_process import LogitsProcessorList
from transformers.utils import ModelOutput

from .prepacked import prepacked_linears


@dataclass
class RQGenerateOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)`: the ids (B, T0 + new) and the sampled codes (B, steps, D)."""

    sequences: torch.LongTensor | None = None
    codes: torch.LongTensor | None = None


# sampling settings a depth may override with `depth_<name>=value or [value per depth]`
DEPTH_SETTINGS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


class RQTransformerGenerationMixin(GenerationMixin):
    """`generate` with the signature and behaviour of `GenerationMixin.generate`, over latent positions."""

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        streamer=None,
        prepack: bool = True,
        **kwargs,
    ) -> torch.LongTensor | RQGenerateOutput:
        """Prompt ids (B, T0) (left-padded, with `attention_mask`) -> (B, T0 + new) ids starting with the prompt.

        Accepts GenerationConfig fields as keywords (`max_new_tokens`, `do_sample`, `temperature`, `top_k`,
        `top_p`, `eos_token_id`, `pad_token_id`, `use_cache`, ...) and per-depth overrides
        `depth_temperature=[t_0, .., t_{D-1}]` (or one value), likewise for the other DEPTH_SETTINGS.
        `logits_processor` acts on the code logits (N, K) of every depth. `prepack` runs the VAE's large
        linear layers' calls of 4 to 32 rows (its decoder's LM head over C rows per step) through
        `prepacked_linears`: on CPU in fp32, MKL's GEMM costs 1.5-2x as much for 4 rows as for one there.
        """
        depth_overrides = {k[len("depth_"):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("depth_")}
        generation_config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        unknown = sorted(k for k in model_kwargs if k not in ("output_attentions", "output_hidden_states"))
        if unknown:
            raise ValueError(f"generate() got arguments it does not use: {unknown}")
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask)
        max_new_tokens = self._max_new_tokens(generation_config, input_ids.shape[1])
        processors = self._depth_processors(generation_config, depth_overrides, logits_processor, input_ids.device)
        with prepacked_linears(self.vae) if prepack else nullcontext():
            return self._generate(input_ids, attention_mask, generation_config, processors, streamer, max_new_tokens)

    def _generate(self, input_ids, attention_mask, generation_config, processors, streamer, max_new_tokens):
        """The decoding loop of `generate`, on checked arguments."""
        eos = _token_ids(generation_config.eos_token_id)
        pad = generation_config.pad_token_id
        pad = pad if pad is not None else (eos[0] if eos else 0)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        state = _State(self, input_ids, attention_mask, use_cache=generation_config.use_cache is not False)
        c = self.compression_factor
        new = torch.full((input_ids.shape[0], max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        produced, longest = 0, 0
        while produced < max_new_tokens and not done.all():
            codes = self._sample_codes(state.hidden(), processors)  # (B, D)
            n = min(c, max_new_tokens - produced)
            tokens = state.append(codes, advance=produced + n < max_new_tokens)  # (B, C)
            tokens = tokens[:, :n].masked_fill(done[:, None], pad)
            emitted = torch.full_like(done, n, dtype=torch.long)
            if eos:
                is_eos = torch.isin(tokens, torch.tensor(eos, device=tokens.device)) & ~done[:, None]
                first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, n)
                after = torch.arange(n, device=tokens.device)[None] >= first[:, None]
                tokens = tokens.masked_fill(after, pad)
                emitted = torch.where(done, 0, first)
                done = done | is_eos.any(1)
            new[:, produced : produced + n] = tokens
            if streamer is not None:
                streamer.put(tokens[:, : int(emitted.max())].cpu())
            longest = produced + int(emitted.max())
            produced += n
        if streamer is not None:
            streamer.end()
        sequences = torch.cat([input_ids, new[:, :longest]], dim=1)
        if generation_config.return_dict_in_generate:
            steps = -(-produced // c)
            return RQGenerateOutput(sequences=sequences, codes=state.codes[:, state.codes.shape[1] - steps :])
        return sequences

    # ----------------------------------------------------------------- steps
    # ----------------------------------------------------------------- checks and settings
    def _check_prompt(self, input_ids, attention_mask):
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"input_ids must be a non-empty (batch, length) prompt, got {shape}")
        if input_ids.is_floating_point():
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        if (attention_mask.sum(1) == 0).any():
            raise ValueError("a prompt is empty (its attention_mask is all 0); give every row at least one token")
        if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
            raise ValueError("prompts must be left-padded (padding first); tokenizer.padding_side = 'left'")
        vocab = self.config.vae_config.backbone_config.vocab_size
        if input_ids.min() < 0 or input_ids.max() >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}); is the tokenizer the model's?")
        positions = -(-int(attention_mask.sum(1).max()) // self.compression_factor) + 1
        limit = self.config.backbone_config.max_position_embeddings
        if positions > limit:
            raise ValueError(
                f"the prompt needs {positions} latent positions, more than the model's {limit} "
                f"({limit * self.compression_factor} tokens at C={self.compression_factor}); shorten it"
            )
        return input_ids, attention_mask.long()

    def _max_new_tokens(self, generation_config: GenerationConfig, prompt_length: int) -> int:
        n = generation_config.max_new_tokens
        if n is None:
            n = generation_config.max_length - prompt_length
        if n < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {n}")
        return n

    def _depth_processors(self, generation_config, overrides, logits_processor, device):
        """One (LogitsProcessorList, do_sample) per depth: the run's sampling settings, then the overrides."""
        d = self.config.num_quantizers
        unknown = sorted(set(overrides) - set(DEPTH_SETTINGS))
        if unknown:
            raise ValueError(f"unknown per-depth settings {['depth_' + k for k in unknown]}; use depth_ + one of {DEPTH_SETTINGS}")
        per_depth = []
        for j in range(d):
            settings = {name: getattr(generation_config, name) for name in DEPTH_SETTINGS}
            for name, value in overrides.items():
                if isinstance(value, (list, tuple)):
                    if len(value) != d:
                        raise ValueError(f"depth_{name} has {len(value)} values; the model has D={d} depths")
                    value = value[j]
                settings[name] = value
            config = GenerationConfig(**settings)
            config.update(**{k: v for k, v in config._get_default_generation_params().items() if getattr(config, k) is None})
            processors = self._get_logits_processor(
                config, input_ids_seq_length=0, logits_processor=copy.copy(logits_processor) or LogitsProcessorList(), device=device
            )
            per_depth.append((processors, bool(config.do_sample)))
        return per_depth


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


class _State:
    """The running sequence of one `generate` call: prompt layout, caches, and the two ways to step.

    With `use_cache`, the spatial transformer and the VAE decoder keep KV caches and run only the new
    position / chunk; without it, every step recomputes them over the whole sequence (the reference the
    tests compare the cached path with).
    """

    def __init__(self, model, input_ids: torch.LongTensor, attention_mask: torch.LongTensor, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        vae, c = model.vae, model.compression_factor
        eos = model.config.vae_config.backbone_config.eos_token_id
        pad = vae.config.backbone_config.pad_token_id or 0
        self.separator = eos if isinstance(eos, int) else (eos[0] if eos else pad)
        lengths = attention_mask.sum(1)  # (B,)
        chunks = -(-lengths // c)  # (B,) latent positions of each prompt
        num = int(chunks.max())
        b, device = input_ids.shape[0], input_ids.device
        # tokens (B, num * C): whole-chunk left padding (mask 0), then EOS up to a multiple of C, then the prompt
        tokens = torch.full((b, num * c), pad, dtype=torch.long, device=device)
        token_mask = torch.zeros_like(tokens)
        for i in range(b):
            real = input_ids[i, attention_mask[i].bool()]
            start = num * c - int(chunks[i]) * c
            tokens[i, start : num * c - len(real)] = self.separator
            tokens[i, num * c - len(real) :] = real
            token_mask[i, start:] = 1
        self.tokens, self.token_mask = tokens, token_mask
        self.codes = model.encode(tokens, token_mask)  # (B, num, D), -1 on padding chunks
        # spatial sequence (B, num + 1): padding, start, prompt latents
        latent_mask = vae.latent_mask(token_mask)  # (B, num): chunks holding a real token (codes -1 elsewhere)
        self.spatial_mask = torch.cat([torch.zeros_like(latent_mask[:, :1]), latent_mask], dim=1).long()
        first = num - chunks  # index of the start position
        self.spatial_mask[torch.arange(b, device=device), first] = 1
        self.first = first
        self.spatial_cache = DynamicCache(config=model.spatial.config) if use_cache else None
        self.decoder = _ChunkDecoder(vae, self.tokens, self.token_mask, self.codes) if use_cache else None
        self._hidden = self._spatial_prefill()

    def _spatial_embeds(self) -> torch.FloatTensor:
        """(B, S, H): [padding.., start, x_0 .. x_{n-1}] for the whole sequence so far."""
        model = self.model
        x = model.embed_codes(self.codes)  # (B, L, H)
        x = torch.cat([x.new_zeros(x.shape[0], 1, x.shape[2]), x], dim=1)
        b = torch.arange(x.shape[0], device=x.device)
        x[b, self.first] = model.start.to(x.dtype)
        return x

    def _positions(self) -> torch.LongTensor:
        return (self.spatial_mask.cumsum(1) - 1).clamp(min=0)

    def _spatial_prefill(self) -> torch.FloatTensor:
        hidden = self.model.spatial_forward(
            self._spatial_embeds(), self.spatial_mask, self._positions(), cache=self.spatial_cache
        )
        return hidden[:, -1]

    def hidden(self) -> torch.FloatTensor:
        """The spatial output at the last position (B, H): it predicts the next position's codes."""
        return self._hidden

    def append(self, codes: torch.LongTensor, advance: bool = True) -> torch.LongTensor:
        """Add the next position's codes (B, D): decode its C tokens (B, C) and step the spatial model.

        `advance=False` skips the spatial step (nothing will be drawn after this position); `hidden()` is
        then stale until `rollback`.
        """
        model, c = self.model, self.model.compression_factor
        previous = self.tokens[:, -c:]
        self.codes = torch.cat([self.codes, codes[:, None]], dim=1)
        self.spatial_mask = F.pad(self.spatial_mask, (0, 1), value=1)
        self.token_mask = F.pad(self.token_mask, (0, c), value=1)
        if self.use_cache:
            logits = self.decoder.step(codes[:, None], previous, self.token_mask)
            if advance:
                x = model.embed_codes(codes[:, None])
                position = self._positions()[:, -1:]
                self._hidden = model.spatial_forward(x, self.spatial_mask, position, cache=self.spatial_cache)[:, -1]
        else:
            placeholder = F.pad(self.tokens, (0, c), value=0)  # the new chunk's own tokens never reach its logits
            logits = model.vae.decode(self.codes, placeholder, self.token_mask)[:, -c:]
            if advance:
                self._hidden = self._spatial_prefill()
        tokens = logits.argmax(-1)  # (B, C)
        self.tokens = torch.cat([self.tokens, tokens], dim=1)
        return tokens

    # ----------------------------------------------------------------- drafting: grow, mark, roll back
    def extend(self, tokens: torch.LongTensor) -> None:
        """Add known text (B, m * C) after the sequence: encode its m chunks, step the spatial model and the
        decoder caches over them. The state is then what a fresh `_State` of the longer prompt holds."""
        model, vae, c = self.model, self.model.vae, self.model.compression_factor
        m = tokens.shape[1] // c
        if m == 0:
            return
        ones = torch.ones_like(tokens)
        if vae.config.num_encoder_layers == 0 and vae.config.num_latent_layers == 0:  # chunk-local encoder
            codes = model.encode(tokens, ones)
        else:  # the encoder attends to earlier chunks: run it over the whole sequence (causal, so the old codes stay)
            codes = model.encode(torch.cat([self.tokens, tokens], 1), torch.cat([self.token_mask, ones], 1))[:, -m:]
        self.codes = torch.cat([self.codes, codes], dim=1)
        self.tokens = torch.cat([self.tokens, tokens], dim=1)
        self.token_mask = torch.cat([self.token_mask, ones], dim=1)
        self.spatial_mask = F.pad(self.spatial_mask, (0, m), value=1)
        if not self.use_cache:
            self._hidden = self._spatial_prefill()
            return
        if self.decoder.latent_cache is not None or self.decoder.token_cache is not None:
            shifted = None
            if vae.decoder_embed_tokens is not None:  # each new chunk sees the one before it, as in the prefill
                shifted = vae._previous_chunk_tokens(self.tokens, self.tokens.shape[1])[:, -m * c :]
            self.decoder._run(codes, shifted, self.token_mask)
        x = model.embed_codes(codes)
        positions = self._positions()[:, -m:]
        self._hidden = model.spatial_forward(x, self.spatial_mask, positions, cache=self.spatial_cache)[:, -1]

    def mark(self) -> tuple:
        """What `rollback` returns to: the sequence as it is now."""
        return self.tokens, self.token_mask, self.codes, self.spatial_mask, self._hidden

    def rollback(self, mark: tuple) -> None:
        """Forget every position appended since `mark` (tensors, and KV caches cropped to their length then)."""
        self.tokens, self.token_mask, self.codes, self.spatial_mask, self._hidden = mark
        if self.use_cache:
            _crop(self.spatial_cache, self.spatial_mask.shape[1])
            _crop(self.decoder.latent_cache, self.codes.shape[1])
            _crop(self.decoder.token_cache, self.tokens.shape[1])


def _crop(cache: DynamicCache | None, length: int) -> None:
    """Cut a KV cache back to its first `length` positions."""
    if cache is not None and cache.get_seq_length() > length:
        cache.crop(length - cache.get_seq_length())


class _ChunkDecoder:
    """The VAE decoder run chunk by chunk, with KV caches in its latent and token layers.

    It computes what `RQVAEModel.decode_quantized` computes over the growing sequence: without decoder
    or latent layers a chunk depends on its own codes (and previous tokens) only; with layers, the caches
    hold the earlier chunks.
    """

    def __init__(self, vae, tokens: torch.LongTensor, token_mask: torch.LongTensor, codes: torch.LongTensor):
        self.vae = vae
        self.latent_cache = self._cache(vae.latent_decoder)
        self.token_cache = self._cache(vae.decoder)
        if self.latent_cache is not None or self.token_cache is not None:  # prefill with the prompt
            shifted = vae._previous_chunk_tokens(tokens, tokens.shape[1]) if vae.decoder_embed_tokens is not None else None
            self._run(codes, shifted, token_mask)

    @staticmethod
    def _cache(stack):
        layers = getattr(stack, "layers", None)
        return DynamicCache(config=stack.config) if layers is not None and len(layers) else None

    def _run(self, codes, shifted_tokens, token_mask) -> torch.FloatTensor:
        """Codes (B, n, D) of the newest n chunks -> logits (B, n * C, V).

        `shifted_tokens` (B, n * C) hold, at each position, the token C positions back (when the decoder
        sees previous tokens); `token_mask` covers the whole sequence so far.
        """
        vae = self.vae
        x = vae.codes_to_quantized(codes)  # (B, n, d)
        if self.latent_cache is not None:
            x = vae.latent_decoder(x, vae.latent_mask(token_mask).long(), cache=self.latent_cache)
        hidden = vae.upsample(vae.from_latent(x))  # (B, n * C, H)
        if vae.decoder_embed_tokens is not None:
            hidden = hidden + vae.decoder_embed_tokens(shifted_tokens)
        if self.token_cache is not None:
            hidden = vae.decoder(hidden, token_mask, cache=self.token_cache)
        else:  # a stack without layers is its final norm
            hidden = vae.decoder.norm(hidden)
        return vae.lm_head(hidden)  # (B, n * C, V)

    def step(self, codes: torch.LongTensor, previous: torch.LongTensor, token_mask: torch.LongTensor):
        """Codes (B, 1, D) of the new chunk and the previous chunk's tokens (B, C) -> logits (B, C, V)."""
        return self._run(codes, previous, token_mask)


__all__ = ["DEPTH_SETTINGS", "RQGenerateOutput", "RQTransformerGenerationMixin"]
