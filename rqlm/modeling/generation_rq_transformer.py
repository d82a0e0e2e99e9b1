"""`generate()` for RQTransformerForCausalLM: text in, text out, C tokens per spatial step.

Per step, for every row of the batch:
    one spatial step (KV cache over latent positions)         h (B, H)
    -> D depth steps (KV cache over depth), each code chosen
       through transformers' LogitsProcessors (per-depth overrides)   codes (B, D)
    -> the frozen VAE decoder's logits for the chunk's C tokens (KV cache over
       earlier chunks when it has layers); each token chosen in order, through
       transformers' token-space LogitsProcessors, by argmax or a sample  tokens (B, C)
    -> streamer -> stop at EOS or a stop string (inside a chunk: the rest is padding),
       max_new_tokens or max_time

As in transformers' CSM (a backbone, a depth decoder over codebooks, its own loop), there are two generation
modes, greedy and sampling. The settings the loop implements:
  - codes: do_sample, temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff, each with a
    per-depth override `depth_<name>=value or [one per depth]`, and `logits_processor` (on the code logits);
  - tokens (the VAE decoder's choice of each token of a chunk, given the chunk's codes, which are not re-decided):
    repetition_penalty, no_repeat_ngram_size, bad_words_ids, suppress_tokens, begin_suppress_tokens,
    sequence_bias, min_length, min_new_tokens (EOS is masked out of the choice until then), forced_eos_token_id,
    and `decoder_<name>` for the same names as the depths' (default argmax; `decoder_do_sample=True` samples
    the decoder's softmax at `decoder_temperature`: `do_sample=True, top_k=0, decoder_do_sample=True` draws
    from p(x) = sum_z p(z) p_dec(x | z), the model whose perplexity rqlm/evaluation/bound.py bounds);
  - the run: max_new_tokens / max_length, eos_token_id, pad_token_id, use_cache, num_return_sequences,
    stop_strings (with `tokenizer=`), max_time (checked after each chunk), return_dict_in_generate with
    output_scores / output_logits (code scores, one (B, D, K) tensor per step), streamer.
Any other GenerationConfig field set away from its default (num_beams, guidance_scale, penalty_alpha,
cache_implementation, ..., and fields of later transformers releases) is a one-line ValueError.

With `depth_output="codes_then_tokens"` the same `generate` runs the loop of codes_then_tokens.py: per step the D
codes (the depth processors above, `depth_<name>` overriding the run's settings), then the chunk's C tokens one by
one from the model's token decoder, each chosen through the LogitsProcessors transformers' generate builds for a
causal LM: the run's sampling settings (do_sample, temperature, top_k, top_p, ...) and TOKEN_SETTINGS act on the
tokens, as does `logits_processor`; `decoder_<name>` (there is no VAE decoder) and output_scores / output_logits
are one-line errors, and the streamer receives each token as it is chosen.

Prompts whose length is not a multiple of C are left-padded with EOS (the separator that
packing puts between training documents) up to the next multiple, so every latent position
is a full chunk; the returned ids start with the exact prompt, without that padding.
Batches are left-padded by whole chunks, with positions counted from each row's first
real chunk, so a batch generates what its rows generate one by one.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationConfig, GenerationMixin
from transformers.generation import StopStringCriteria
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.utils import ModelOutput

from .code_depth import choose
from .layers import crop_cache
from .transformers_private import default_generation_params, logits_processors, prepare_generation_config


@dataclass
class RQGenerateOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)`, for B rows (B = prompts x num_return_sequences).

    sequences (B, T0 + new) the ids; codes (B, steps, D) the chosen codes; with `output_scores`, scores: one
    (B, D, K) tensor per step, the processed code scores each depth chose from (what transformers'
    `output_scores` gives per token, here per depth); with `output_logits`, logits: the raw code logits, same shapes.
    """

    sequences: torch.LongTensor | None = None
    codes: torch.LongTensor | None = None
    scores: tuple[torch.FloatTensor, ...] | None = None
    logits: tuple[torch.FloatTensor, ...] | None = None


# sampling settings a depth may override with `depth_<name>=value or [value per depth]`; the VAE decoder's
# token choice takes the same names as `decoder_<name>` (a single value each)
DEPTH_SETTINGS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
# GenerationConfig fields that act on the VAE decoder's choice of each token (transformers' LogitsProcessors)
TOKEN_SETTINGS = (
    "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
    "sequence_bias", "min_length", "min_new_tokens", "forced_eos_token_id",
)  # fmt: skip
# the other GenerationConfig fields the loop implements (bos_token_id: a prompt is never empty, so it is unused)
RUN_SETTINGS = (
    "max_length", "max_new_tokens", "eos_token_id", "pad_token_id", "bos_token_id", "use_cache",
    "num_return_sequences", "return_dict_in_generate", "output_scores", "output_logits", "stop_strings", "max_time",
)  # fmt: skip


class _Record(LogitsProcessor):
    """Keeps every score tensor (N, K) it is called with, unchanged (`output_scores`, `output_logits`)."""

    def __init__(self):
        self.seen: list[torch.FloatTensor] = []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.clone())
        return scores


@dataclass
class _TokenChoice:
    """The VAE decoder's choice of a chunk's tokens: each, in order, from its logits after `processors` (which see
    the sequence so far, as transformers' do), by argmax or a sample of the softmax."""

    processors: LogitsProcessorList
    do_sample: bool

    @property
    def is_argmax(self) -> bool:
        return not self.processors and not self.do_sample

    def __call__(self, logits: torch.FloatTensor, sequence: torch.LongTensor) -> torch.LongTensor:
        """Decoder logits (B, C, V) and the ids before the chunk (B, S) -> tokens (B, C)."""
        tokens = sequence.new_zeros(sequence.shape[0], 0)
        for t in range(logits.shape[1]):
            scores = self.processors(torch.cat([sequence, tokens], dim=1), logits[:, t].float())  # (B, V)
            tokens = torch.cat([tokens, choose(scores, self.do_sample)[:, None]], dim=1)
        return tokens


@dataclass
class _Run:
    """The checked settings of one `generate` call."""

    max_new_tokens: int
    eos: list[int]
    pad: int
    depth_processors: list
    tokens: _TokenChoice
    stop: StopStringCriteria | None = None
    max_time: float | None = None
    use_cache: bool = True
    return_dict: bool = False
    scores: list[_Record] | None = None  # one per depth (output_scores)
    logits: list[_Record] | None = None  # one per depth (output_logits)


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
        tokenizer=None,
        **kwargs,
    ) -> torch.LongTensor | RQGenerateOutput:
        """Prompt ids (B, T0) (left-padded, with `attention_mask`) -> (B * num_return_sequences, T0 + new) ids
        starting with the prompt, or an `RQGenerateOutput` with `return_dict_in_generate`.

        Accepts the GenerationConfig fields of the module docstring as keywords or in `generation_config`, per-depth
        overrides `depth_temperature=[t_0, .., t_{D-1}]` (or one value, likewise for the other DEPTH_SETTINGS) and
        the decoder's `decoder_do_sample`, `decoder_temperature`, ... `logits_processor` acts on the code logits
        (N, K) of every depth; `tokenizer` is needed by `stop_strings`. On CPU, `rqlm.kernels.cpu_kernels(model)`
        around the call runs it faster (the same arithmetic).
        """
        started = time.perf_counter()
        depth_overrides = _pop_prefixed(kwargs, "depth_")
        decoder_settings = _pop_prefixed(kwargs, "decoder_")
        generation_config, model_kwargs = prepare_generation_config(self, generation_config, kwargs)
        unknown = sorted(k for k in model_kwargs if k not in ("output_attentions", "output_hidden_states"))
        if unknown:
            raise ValueError(f"generate() got arguments it does not use: {unknown}")
        # depth_* / decoder_* entries of a GenerationConfig (passed, or the model's), the keywords winning
        depth_overrides = {**_custom_entries(generation_config, "depth_"), **depth_overrides}
        decoder_settings = {**_custom_entries(generation_config, "decoder_"), **decoder_settings}
        self._check_generation_config(generation_config)
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask)
        copies = generation_config.num_return_sequences or 1
        if copies > 1:  # as transformers does: each prompt's row repeated, in place
            input_ids, attention_mask = input_ids.repeat_interleave(copies, 0), attention_mask.repeat_interleave(copies, 0)
        run = self._run_settings(
            generation_config, depth_overrides, decoder_settings, logits_processor, tokenizer, input_ids, attention_mask
        )
        if getattr(self.config, "depth_output", None) == "codes_then_tokens":
            return self._generate_codes_then_tokens(input_ids, attention_mask, run, streamer, started)
        return self._generate(input_ids, attention_mask, run, streamer, started)

    def _generate(self, input_ids, attention_mask, run: _Run, streamer, started: float):
        """The decoding loop of `generate`, on checked arguments."""
        if streamer is not None:
            streamer.put(input_ids.cpu())
        state = CodesState(self, input_ids, attention_mask, use_cache=run.use_cache)
        c, pad, max_new_tokens = self.compression_factor, run.pad, run.max_new_tokens
        eos = torch.tensor(run.eos, dtype=torch.long, device=input_ids.device)
        new = torch.full((input_ids.shape[0], max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        produced, longest = 0, 0
        while produced < max_new_tokens and not done.all():
            codes = self._sample_codes(state.hidden(), run.depth_processors)  # (B, D)
            n = min(c, max_new_tokens - produced)
            sequence = torch.cat([input_ids, new[:, :produced]], dim=1)  # (B, T0 + produced): what is returned so far
            chooser = None if run.tokens.is_argmax else (lambda logits, before=sequence: run.tokens(logits, before))
            tokens = state.append(codes, advance=produced + n < max_new_tokens, choose=chooser)  # (B, C)
            tokens = tokens[:, :n].masked_fill(done[:, None], pad)
            ends = torch.isin(tokens, eos) if len(run.eos) else torch.zeros_like(tokens, dtype=torch.bool)  # (B, n)
            if run.stop is not None:  # a stop string completed by token t
                for t in range(n):
                    ends[:, t] |= run.stop(torch.cat([sequence, tokens[:, : t + 1]], dim=1), None)
            ends &= ~done[:, None]
            first = torch.where(ends.any(1), ends.float().argmax(1) + 1, n)  # tokens kept in this chunk
            after = torch.arange(n, device=tokens.device)[None] >= first[:, None]
            tokens = tokens.masked_fill(after, pad)
            emitted = torch.where(done, 0, first)
            done = done | ends.any(1)
            new[:, produced : produced + n] = tokens
            if streamer is not None:
                streamer.put(tokens[:, : int(emitted.max())].cpu())
            longest = produced + int(emitted.max())
            produced += n
            if run.max_time is not None and time.perf_counter() - started > run.max_time:
                break
        if streamer is not None:
            streamer.end()
        sequences = torch.cat([input_ids, new[:, :longest]], dim=1)
        if not run.return_dict:
            return sequences
        steps = -(-produced // c)
        return RQGenerateOutput(
            sequences=sequences,
            codes=state.codes[:, state.codes.shape[1] - steps :],
            scores=_per_step(run.scores, steps),
            logits=_per_step(run.logits, steps),
        )

    # ----------------------------------------------------------------- checks and settings
    def _check_generation_config(self, generation_config: GenerationConfig) -> None:
        """No field set away from its default that the loop does not implement: every mode but greedy and sampling
        needs one (num_beams, penalty_alpha, assistant settings, ...), so those two are all there is, as in CSM."""
        defaults, values = _default_settings(), generation_config.to_dict()
        implemented = set(DEPTH_SETTINGS + TOKEN_SETTINGS + RUN_SETTINGS)
        for name, value in values.items():
            custom = name not in defaults and name.startswith(("depth_", "decoder_"))  # read by generate
            if name in implemented or custom or name.startswith("_") or name == "transformers_version":
                continue
            default = defaults.get(name)
            if value == default or (value in (None, False) and default in (None, False)):
                continue
            raise ValueError(
                f"{name}={value!r} is not implemented by {type(self).__name__}.generate (greedy or sampled codes, "
                "C tokens per step); leave it unset"
            )

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

    def _run_settings(
        self, generation_config, depth_overrides, decoder_settings, logits_processor, tokenizer, input_ids, attention_mask
    ) -> _Run:
        """The checked settings of a call: lengths, special tokens, the depths' and the tokens' processors, stops."""
        eos = token_ids_of(generation_config.eos_token_id)
        pad = generation_config.pad_token_id
        max_new_tokens = self._max_new_tokens(generation_config, input_ids.shape[1])
        stop = None
        if generation_config.stop_strings is not None:
            if tokenizer is None:
                raise ValueError("stop_strings needs the model's tokenizer: pass generate(..., tokenizer=tokenizer)")
            stop = StopStringCriteria(tokenizer, generation_config.stop_strings)
        max_time = generation_config.max_time
        if max_time is not None and max_time < 0:
            raise ValueError(f"max_time must be >= 0 seconds, got {max_time}")
        if getattr(self.config, "depth_output", None) == "codes_then_tokens":  # the text is the token decoder's: settings act on it
            self._check_codes_then_tokens_settings(generation_config, decoder_settings)
            code_processor = None
            tokens = self._text_token_choice(generation_config, logits_processor, eos, input_ids, attention_mask,
                                             max_new_tokens)  # fmt: skip
        else:
            code_processor = logits_processor
            tokens = self._token_choice(generation_config, decoder_settings, eos, input_ids, attention_mask, max_new_tokens)
        run = _Run(
            max_new_tokens=max_new_tokens,
            eos=eos,
            pad=pad if pad is not None else (eos[0] if eos else 0),
            depth_processors=self._depth_processors(generation_config, depth_overrides, code_processor, input_ids.device),
            tokens=tokens,
            stop=stop,
            max_time=max_time,
            use_cache=generation_config.use_cache is not False,
            return_dict=bool(generation_config.return_dict_in_generate),
        )
        if generation_config.output_scores or generation_config.output_logits:
            if not run.return_dict:
                raise ValueError("output_scores and output_logits come back in the output of return_dict_in_generate=True")
            if generation_config.output_scores:  # after every processor of each depth
                run.scores = [_Record() for _ in run.depth_processors]
                for (procs, _), record in zip(run.depth_processors, run.scores):
                    procs.append(record)
            if generation_config.output_logits:  # before any
                run.logits = [_Record() for _ in run.depth_processors]
                for (procs, _), record in zip(run.depth_processors, run.logits):
                    procs.insert(0, record)
        return run

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
            config.update(**{k: v for k, v in default_generation_params().items() if getattr(config, k) is None})
            processors = logits_processors(
                self, config, 0, logits_processor=copy.copy(logits_processor) or LogitsProcessorList(), device=device
            )
            per_depth.append((processors, bool(config.do_sample)))
        return per_depth

    def _check_codes_then_tokens_settings(self, generation_config, decoder_settings) -> None:
        """codes_then_tokens has no VAE decoder to set, and records no scores."""
        if decoder_settings:
            raise ValueError(f"{sorted('decoder_' + k for k in decoder_settings)} set the codes mode's VAE decoder; with "
                             "codes_then_tokens the run's settings act on the tokens and depth_<name> on the codes")
        if generation_config.output_scores or generation_config.output_logits:
            raise ValueError("output_scores and output_logits are not implemented by the codes_then_tokens generate; "
                             "leave them unset")

    def _text_token_choice(self, generation_config, logits_processor, eos, input_ids, attention_mask, max_new_tokens):
        """codes_then_tokens: how each token is chosen from the token decoder's logits, as transformers' generate
        chooses a causal LM's (the run's sampling and TOKEN_SETTINGS, its defaults, and `logits_processor`)."""
        settings = {name: getattr(generation_config, name) for name in DEPTH_SETTINGS + TOKEN_SETTINGS}
        config = GenerationConfig(**settings, max_length=input_ids.shape[1] + max_new_tokens)
        config.update(**{k: v for k, v in default_generation_params().items() if getattr(config, k, 0) is None})
        processors = logits_processors(
            self, config, input_ids.shape[1], logits_processor=copy.copy(logits_processor) or LogitsProcessorList(),
            device=input_ids.device, eos_token_ids=eos, attention_mask=attention_mask,
        )  # fmt: skip
        return _TokenChoice(processors, bool(config.do_sample))

    def _token_choice(self, generation_config, decoder_settings, eos, input_ids, attention_mask, max_new_tokens):
        """How the VAE decoder's tokens are chosen: the run's TOKEN_SETTINGS, then `decoder_<name>` sampling
        (default argmax; sampling reads the softmax as it is, with no top_k unless `decoder_top_k` is given)."""
        unknown = sorted(set(decoder_settings) - set(DEPTH_SETTINGS))
        if unknown:
            raise ValueError(f"unknown decoder settings {['decoder_' + k for k in unknown]}; use decoder_ + one of {DEPTH_SETTINGS}")
        for name, value in decoder_settings.items():
            if isinstance(value, (list, tuple)):
                raise TypeError(f"decoder_{name} takes one value (the decoder has no depths), got {value!r}")
        settings = {name: getattr(generation_config, name) for name in TOKEN_SETTINGS}
        config = GenerationConfig(**settings, **decoder_settings, max_length=input_ids.shape[1] + max_new_tokens)
        processors = logits_processors(
            self, config, input_ids.shape[1], device=input_ids.device, eos_token_ids=eos, attention_mask=attention_mask
        )
        return _TokenChoice(processors, bool(config.do_sample))


@functools.cache
def _default_settings() -> dict:
    """Every GenerationConfig field with the value `generate` gives it when nobody sets it (read only)."""
    reference = GenerationConfig()
    reference.update(**default_generation_params(), defaults_only=True)
    return reference.to_dict()


def _pop_prefixed(kwargs: dict, prefix: str) -> dict:
    """Remove the `prefix<name>` keywords that are no GenerationConfig field from `kwargs`: {name: value}."""
    fields = _default_settings()
    return {k[len(prefix) :]: kwargs.pop(k) for k in list(kwargs) if k.startswith(prefix) and k not in fields}


def _custom_entries(generation_config: GenerationConfig, prefix: str) -> dict:
    """The `prefix<name>` entries a GenerationConfig carries beyond its fields: {name: value}."""
    fields = _default_settings()
    return {
        k[len(prefix) :]: v for k, v in generation_config.to_dict().items() if k.startswith(prefix) and k not in fields
    }


def _per_step(records: list[_Record] | None, steps: int) -> tuple[torch.FloatTensor, ...] | None:
    """One recorder per depth, each called once per step -> one (B, D, K) tensor per step."""
    if records is None:
        return None
    return tuple(torch.stack([record.seen[s] for record in records], dim=1) for s in range(steps))


def token_ids_of(value) -> list[int]:
    """An id, a list of ids or None (as generation configs hold EOS ids) -> a list of ids."""
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


class SpatialState:
    """What every rqlm generation loop keeps of its running sequence: the tokens laid out in whole chunks
    (`whole_chunk_layout`), their codes (the VAE's for the prompt), and the spatial model over
    [padding.., start, chunk_0, ..] with its KV cache (`use_cache`; without, each step recomputes it).

    A loop's own state says how a chunk enters the spatial model (`_embed`) and adds its own decoding.
    """

    def __init__(self, model, input_ids: torch.LongTensor, attention_mask: torch.LongTensor, use_cache: bool, pad: int):
        self.model, self.use_cache = model, use_cache
        self.separator = separator_token(model)
        self.tokens, self.token_mask = whole_chunk_layout(
            input_ids, attention_mask, model.compression_factor, self.separator, pad
        )  # (B, num * C)
        self.codes = model.encode(self.tokens, self.token_mask)  # (B, num, D), -1 on padding chunks
        latent_mask = model.vae.latent_mask(self.token_mask)  # (B, num): chunks holding a real token
        self.first = (~latent_mask).sum(1)  # (B,) column of each row's start vector
        # spatial sequence (B, num + 1): padding, start, prompt chunks
        self.spatial_mask = torch.cat([torch.zeros_like(latent_mask[:, :1]), latent_mask], dim=1).long()
        self.spatial_mask[torch.arange(len(self.first), device=self.first.device), self.first] = 1
        self.spatial_cache = DynamicCache(config=model.spatial.config) if use_cache else None

    def _embed(self, tokens: torch.LongTensor, codes: torch.LongTensor) -> torch.FloatTensor:
        """Chunks (B, n * C) with their codes (B, n, D) -> the spatial model's inputs (B, n, H)."""
        raise NotImplementedError

    def _check_positions(self) -> None:
        """A one-line error before the spatial model runs past its positions (where the model checks them)."""

    def hidden(self) -> torch.FloatTensor:
        """The spatial output at the last position (B, H): it predicts the next chunk."""
        return self._hidden

    def _positions(self) -> torch.LongTensor:
        return (self.spatial_mask.cumsum(1) - 1).clamp(min=0)

    def _spatial_prefill(self) -> torch.FloatTensor:
        """Run the spatial model over [padding.., start, chunk_0 ..] (B, S, H) -> the last output (B, H)."""
        self._check_positions()
        x = self._embed(self.tokens, self.codes)  # (B, num, H)
        x = torch.cat([x.new_zeros(x.shape[0], 1, x.shape[2]), x], dim=1)
        x[torch.arange(x.shape[0], device=x.device), self.first] = self.model.start.to(x.dtype)
        return self.model.spatial_forward(x, self.spatial_mask, self._positions(), cache=self.spatial_cache)[:, -1]

    def _spatial_step(self, tokens: torch.LongTensor, codes: torch.LongTensor) -> None:
        """Step the spatial model over the newest n chunks (B, n * C) and codes (B, n, D), already appended."""
        if not self.use_cache:
            self._hidden = self._spatial_prefill()
            return
        self._check_positions()
        positions = self._positions()[:, -codes.shape[1] :]
        x = self._embed(tokens, codes)
        self._hidden = self.model.spatial_forward(x, self.spatial_mask, positions, cache=self.spatial_cache)[:, -1]


class CodesState(SpatialState):
    """The running sequence of one codes-mode `generate` call: the spatial state plus the VAE decoder's caches.

    With `use_cache`, the spatial transformer and the VAE decoder keep KV caches and run only the new
    position / chunk; without it, every step recomputes them over the whole sequence (the reference the
    tests compare the cached path with).
    """

    def __init__(self, model, input_ids: torch.LongTensor, attention_mask: torch.LongTensor, use_cache: bool):
        vae = model.vae
        super().__init__(model, input_ids, attention_mask, use_cache, pad=vae.config.backbone_config.pad_token_id or 0)
        self.decoder = vae.decoder_cache() if use_cache else None  # the VAE decoder's KV caches, chunk by chunk
        if use_cache and self.decoder.holds_state:  # prefill them with the prompt
            vae.decode_quantized(vae.codes_to_quantized(self.codes), self.tokens, self.token_mask, cache=self.decoder)
        self._hidden = self._spatial_prefill()

    def _embed(self, tokens: torch.LongTensor, codes: torch.LongTensor) -> torch.FloatTensor:
        return self.model.embed_codes(codes)

    def append(self, codes: torch.LongTensor, advance: bool = True, choose=None) -> torch.LongTensor:
        """Add the next position's codes (B, D): decode its C tokens (B, C) and step the spatial model.

        `choose` turns the decoder's logits (B, C, V) into the tokens (default: argmax). `advance=False` skips
        the spatial step (nothing will be drawn after this position); `hidden()` is then stale until `rollback`.
        """
        model, c = self.model, self.model.compression_factor
        previous = self.tokens[:, -c:]
        self.codes = torch.cat([self.codes, codes[:, None]], dim=1)
        self.spatial_mask = F.pad(self.spatial_mask, (0, 1), value=1)
        self.token_mask = F.pad(self.token_mask, (0, c), value=1)
        if self.use_cache:
            quantized = model.vae.codes_to_quantized(codes[:, None])
            logits = model.vae.decode_quantized(quantized, None, self.token_mask, self.decoder, shifted_tokens=previous)
        else:
            placeholder = F.pad(self.tokens, (0, c), value=0)  # the new chunk's own tokens never reach its logits
            logits = model.vae.decode(self.codes, placeholder, self.token_mask)[:, -c:]
        tokens = logits.argmax(-1) if choose is None else choose(logits)  # (B, C)
        self.tokens = torch.cat([self.tokens, tokens], dim=1)
        if advance:
            self._spatial_step(tokens, codes[:, None])
        return tokens

    # ----------------------------------------------------------------- drafting: grow, mark, roll back
    def extend(self, tokens: torch.LongTensor) -> None:
        """Add known text (B, m * C) after the sequence: encode its m chunks, step the spatial model and the
        decoder caches over them. The state is then what a fresh `CodesState` of the longer prompt holds."""
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
        if self.use_cache and self.decoder.holds_state:
            shifted = None
            if vae.decoder_embed_tokens is not None:  # each new chunk sees the one before it, as in the prefill
                shifted = vae._previous_chunk_tokens(self.tokens, self.tokens.shape[1])[:, -m * c :]
            vae.decode_quantized(vae.codes_to_quantized(codes), None, self.token_mask, self.decoder, shifted_tokens=shifted)
        self._spatial_step(tokens, codes)

    def mark(self) -> tuple:
        """What `rollback` returns to: the sequence as it is now."""
        return self.tokens, self.token_mask, self.codes, self.spatial_mask, self._hidden

    def rollback(self, mark: tuple) -> None:
        """Forget every position appended since `mark` (tensors, and KV caches cropped to their length then)."""
        self.tokens, self.token_mask, self.codes, self.spatial_mask, self._hidden = mark
        if self.use_cache:
            crop_cache(self.spatial_cache, self.spatial_mask.shape[1])
            self.decoder.crop(self.codes.shape[1], self.tokens.shape[1])


def separator_token(model) -> int:
    """What fills a prompt's first chunk in front of it: the tokenizer's EOS (what packing puts between documents)."""
    eos = model.config.vae_config.backbone_config.eos_token_id
    pad = model.config.vae_config.backbone_config.pad_token_id or 0
    return eos if isinstance(eos, int) else (eos[0] if eos else pad)


def whole_chunk_layout(input_ids, attention_mask, c: int, separator: int, pad: int):
    """Left-padded prompts (B, T0) -> tokens (B, num * C) and their mask: whole-chunk left padding (mask 0), then
    the separator up to a multiple of C (mask 1), then the prompt, so every row's chunks start at a multiple of C."""
    chunks = -(-attention_mask.sum(1) // c)  # (B,) latent positions of each prompt
    num = int(chunks.max())
    tokens = torch.full((input_ids.shape[0], num * c), pad, dtype=torch.long, device=input_ids.device)
    token_mask = torch.zeros_like(tokens)
    for i in range(input_ids.shape[0]):
        real = input_ids[i, attention_mask[i].bool()]
        start = num * c - int(chunks[i]) * c
        tokens[i, start : num * c - len(real)] = separator
        tokens[i, num * c - len(real) :] = real
        token_mask[i, start:] = 1
    return tokens, token_mask


__all__ = [
    "DEPTH_SETTINGS", "CodesState", "RQGenerateOutput", "RQTransformerGenerationMixin", "SpatialState", "separator_token",
    "token_ids_of", "whole_chunk_layout",
]
