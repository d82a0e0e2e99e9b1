"""Lossless latent drafting: an RQ-Transformer proposes C tokens per spatial step, a causal LM verifies them.

    accepted text (1, T) -> the drafter's greedy continuation, as its `generate` would draft it, from
                            state kept per chunk layout (grown by the accepted chunks)   draft (1, k)
    -> one forward of the target over the k drafted tokens, in transformers' assisted decoding loop
       (greedy: keep the draft up to the first token the target's argmax disagrees with, then the
       target's own token; sampling: keep it while it equals the token sampled from the target's
       processed p at that position, then that sample)                        accepted (1, n + 1)

Why this plumbing. `target.generate(assistant_model=rq)` hands the assistant the target's token
logits processors and keeps its cache through `DynamicCache.crop` in tokens, and with sampling it
takes the assistant's per-step token scores as the proposal q of the min(1, p/q) rule. The RQ model
has none of these: its randomness is over codes, and the tokens of a chunk are the argmax of the VAE
decoder, so the marginal q of a drafted token is not available. A `CandidateGenerator` that returns
no logits sends the assisted loop to its other rule, which is exact for any draft drawn
independently of the target's sampling: every emitted token is a sample of the target's p given the
accepted text, and the draft only decides how many come out of one target forward. transformers
(5.24, 5.25) has no argument that takes a candidate generator, so `generate_with_drafter` passes
`generate` a `custom_generate=` callable: it gets the prepared generation config (max_length, EOS),
builds the candidate generator from it and runs the private assisted loop with it through
`rqlm.modeling.transformers_private.assisted_decoding`, the one place that calls it.

State after a rejection: `drafter.generate(accepted)` EOS-pads the accepted text on the left to a
multiple of C, so where its chunks begin depends on the accepted length modulo C, and that changes
whenever the target keeps a number of tokens that is not a multiple of C. The candidate generator
keeps one generation state (`CodesState`: codes, spatial and VAE-decoder KV caches) per residue: a round
grows the state of its residue by the chunks accepted since that state was last used (encoding only
those chunks when the VAE's encoder is chunk-local), drafts from it, and rolls the drafted chunks
back (the caches are cropped). Every draft equals the stateless `generate` from the accepted text
(tested); contexts beyond the drafter's positions fall back to a fresh state of the last window.

The target's verification forward on CPU runs k + 1 rows through every linear layer where plain
decoding runs one, and MKL's fp32 GEMM, as fast as a large weight streams from memory up to 3 rows,
costs 1.5-2x that from 4 rows on: more than the drafting. Callers on CPU therefore run it under
`rqlm.kernels.cpu_kernels(target, drafter)`: the calls of 4 to 32 rows of layers with large weights go
through oneDNN on weights reordered once, the rest keep `F.linear`, so plain decoding is untouched.

A draft head (`RQDraftHead`, `RQHeadCandidateGenerator`). Where the target is no larger than a
drafter's spatial stack, that stack's step costs about a target token before anything is verified. A
head instead reads the target's last hidden state at the token before the newest one (kept by a forward
hook from the verification forward that produced it) and the newest token, and drafts the chunk after
them (one chunk, C tokens at most, per step). It has no state of its own, so a rejection needs no rollback;
the prefill step, with no state yet, drafts nothing. transformers' assisted decoding is batch 1 only.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from transformers.generation.candidate_generator import CandidateGenerator

from rqlm.drafting.assisted import assistant_drafting
from rqlm.evaluation.perplexity import until_first_eos
from rqlm.modeling.generation_rq_transformer import CodesState, token_ids_of
from rqlm.modeling.modeling_rq_draft_head import RQDraftHead
from rqlm.modeling.transformers_private import assisted_decoding


@dataclass
class DraftStats:
    """What one drafted `generate` did, per verification step: the context length, the draft, the tokens kept."""

    compression_factor: int = 1
    accepted: list[int] = field(default_factory=list)  # drafted tokens the target kept at each step
    contexts: list[int] = field(default_factory=list)  # length of the accepted ids each draft continued
    drafts: list[list[int]] = field(default_factory=list)  # the drafted ids of each step
    draft_seconds: float = 0.0  # wall time spent in the drafter (encoding the accepted chunks, the spatial steps, the draft)

    @property
    def steps(self) -> int:
        return len(self.accepted)

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens emitted per target forward: the accepted draft plus the target's own token."""
        return sum(a + 1 for a in self.accepted) / max(self.steps, 1)

    @property
    def rejections_inside_a_chunk(self) -> int:
        """Steps whose first rejected token is not the first token of a drafted chunk."""
        c = self.compression_factor
        return sum(1 for draft, a in zip(self.drafts, self.accepted) if a < len(draft) and a % c)


class _ChunkDrafts(CandidateGenerator):
    """What both candidate generators share: the draft length, the stats and the EOS cut."""

    def __init__(self, drafter, num_draft_tokens, max_length, eos_token_id, stats):
        self.num_draft_tokens = num_draft_tokens
        self.max_length = max_length
        self.stats = stats if stats is not None else DraftStats()
        self.stats.compression_factor = drafter.compression_factor
        self.eos_ids = torch.tensor(token_ids_of(eos_token_id), dtype=torch.long, device=drafter.device)

    @property
    def num_drafting_tokens(self) -> int:
        """The most tokens a step drafts (transformers 5.25's assisted loop reads it to size its cache records)."""
        return self.num_draft_tokens

    def _begin_step(self, input_ids: torch.LongTensor) -> int:
        """Record a step over the accepted ids (1, T); how many tokens it may draft (0: none fit before max_length)."""
        self.stats.contexts.append(input_ids.shape[1])
        return min(self.num_draft_tokens, self.max_length - input_ids.shape[1] - 1)

    def _until_eos(self, tokens: torch.LongTensor) -> tuple[torch.LongTensor, bool]:
        """Drafted tokens (1, n) cut after their first EOS, as `generate` stops there; and whether one was found."""
        kept = int(until_first_eos(tokens, self.eos_ids).sum())
        return tokens[:, :kept], bool(torch.isin(tokens[0, kept - 1], self.eos_ids))

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        """Record how many drafted tokens the target kept; the draft length stays fixed."""
        self.stats.accepted.append(int(num_matches))

    def close(self) -> None:
        """Release what the generator holds on the target (nothing here)."""


class RQDraftCandidateGenerator(_ChunkDrafts):
    """Candidates for transformers' assisted decoding from an RQ model: its greedy continuation, C tokens per step."""

    def __init__(
        self,
        drafter,
        num_draft_tokens: int,
        max_length: int,
        eos_token_id=None,
        prompt_padding: int = 0,
        stats: DraftStats | None = None,
    ):
        super().__init__(drafter, num_draft_tokens, max_length, eos_token_id, stats)
        self.drafter = drafter
        self.prompt_padding = prompt_padding  # left padding of the target's prompt: never shown to the drafter
        c = drafter.compression_factor
        # the drafter reads at most its own positions: the start, the context's chunks and the draft's
        self.window = (drafter.config.backbone_config.max_position_embeddings - 1 - -(-num_draft_tokens // c)) * c
        self.phases = {}  # context length modulo C -> (CodesState of that chunk layout, the context it holds)
        self.depth_processors = drafter._depth_processors(GenerationConfig(do_sample=False), {}, None, drafter.device)

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, None]:
        """Accepted ids (1, T) -> (1, T + k): the drafter's next k tokens appended; no logits (see the module docstring).

        Fewer than k when the draft reaches EOS.
        """
        k = self._begin_step(input_ids)
        if k <= 0:
            self.stats.drafts.append([])
            return input_ids, None
        context = input_ids[:, self.prompt_padding :].to(self.drafter.device)
        start = time.perf_counter()
        if context.shape[1] <= self.window:
            state = self._kept_state(context)
        else:  # a fresh state of the last window the drafter can read
            context = context[:, -self.window :]
            state = CodesState(self.drafter, context, torch.ones_like(context), use_cache=True)
        draft = self._draft(state, k)
        if draft.is_cuda:
            torch.cuda.synchronize(draft.device)
        self.stats.draft_seconds += time.perf_counter() - start
        draft = draft.to(input_ids.device)
        self.stats.drafts.append(draft[0].tolist())
        return torch.cat([input_ids, draft], dim=1), None

    def _kept_state(self, context: torch.LongTensor) -> CodesState:
        """The generation state of `context` (1, T), as a fresh `CodesState(context)` holds it, from the kept ones.

        `generate` EOS-pads a context on the left to a multiple of C, so its chunk boundaries depend on
        the context's length modulo C: one `CodesState` per residue keeps that layout's codes and KV caches
        and grows by the chunks accepted since its last use.
        """
        c = self.drafter.compression_factor
        length = context.shape[1]
        phase = -length % c
        state, known = self.phases.get(phase, (None, None))
        if state is None or known.shape[1] > length or not torch.equal(context[:, : known.shape[1]], known):
            state = CodesState(self.drafter, context, torch.ones_like(context), use_cache=True)
        else:
            state.extend(context[:, known.shape[1] :])
        self.phases[phase] = (state, context)
        return state

    def _draft(self, state: CodesState, k: int) -> torch.LongTensor:
        """The drafter's greedy continuation of `state` (1, <= k), as its `generate(max_new_tokens=k)` makes it;
        the state is rolled back afterwards."""
        c = self.drafter.compression_factor
        mark = state.mark()
        drafted, made = [], 0
        while made < k:
            n = min(c, k - made)
            codes = self.drafter._sample_codes(state.hidden(), self.depth_processors)
            tokens = state.append(codes, advance=made + n < k)[:, :n]
            made += n
            tokens, ended = self._until_eos(tokens)
            drafted.append(tokens)
            if ended:
                break
        state.rollback(mark)
        return torch.cat(drafted, dim=1) if drafted else state.tokens.new_zeros(1, 0)


class RQHeadCandidateGenerator(_ChunkDrafts):
    """Candidates from an `RQDraftHead`: the chunk after the accepted text, drafted from the target's own state.

    Forward hooks on the target (its base model, or the layers of the head's `target_layers`) keep the hidden
    states of its latest forward, whose last k + 1 rows are the last accepted token and the k drafted ones.
    After the target keeps m of them (and adds its own token), row m is the state at the token before that new
    one: with the new token it is all the head reads. The first step (the prompt's prefill) has no state yet
    and drafts nothing.
    """

    def __init__(
        self,
        head,
        target,
        num_draft_tokens: int,
        max_length: int,
        eos_token_id=None,
        stats: DraftStats | None = None,
    ):
        c = head.compression_factor
        if not 1 <= num_draft_tokens <= c:
            raise ValueError(f"a draft head drafts one chunk per step: num_draft_tokens in [1, C={c}], got {num_draft_tokens}")
        super().__init__(head, num_draft_tokens, max_length, eos_token_id, stats)
        self.head = head
        self.captured = {}  # hooked module's index -> its output's last k + 1 rows: [last accepted token, the k drafted]
        self.row = 0  # the row of the states at the token before the newest one
        self.drafted = 0  # k of the step being verified
        self.hooks = [
            module.register_forward_hook(functools.partial(self._keep_states, i))
            for i, module in enumerate(head.state_modules(target))
        ]

    def _keep_states(self, index: int, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", output)
        self.captured[index] = hidden[:, -(self.drafted + 1) :]

    @property
    def states(self) -> torch.FloatTensor | None:
        """(1, k + 1, Ht x layers): the states the head reads, of the latest target forward's last k + 1 tokens."""
        if len(self.captured) < len(self.hooks):
            return None
        return torch.cat([self.captured[i] for i in range(len(self.hooks))], dim=-1)

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, None]:
        """Accepted ids (1, T) -> (1, T + k): the head's draft appended (fewer at EOS, none at the first step)."""
        k = self._begin_step(input_ids)
        draft = input_ids.new_zeros(1, 0)
        states = self.states
        if k > 0 and states is not None:
            start = time.perf_counter()
            state = states[:, self.row].to(self.head.device)
            tokens = self.head.draft(state, input_ids[:, -1].to(self.head.device))
            draft = self._until_eos(tokens[:, :k])[0].to(input_ids.device)
            self.stats.draft_seconds += time.perf_counter() - start
        self.drafted = draft.shape[1]
        self.stats.drafts.append(draft[0].tolist())
        return torch.cat([input_ids, draft], dim=1), None

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        """Record how many drafted tokens the target kept; the state to draft from next is row `num_matches`."""
        super().update_candidate_strategy(input_ids, scores, num_matches)
        self.row = int(num_matches)

    def close(self) -> None:
        """Remove the hooks from the target."""
        for hook in self.hooks:
            hook.remove()


def _drafted_decoding(candidates_for, streamer=None):
    """A `custom_generate` callable: assisted decoding with the drafts of `candidates_for(generation_config)`.

    `generate` calls it with the prepared inputs and generation config (its final max_length and EOS ids), after
    putting the prompt to `streamer`; it passes a callable no streamer, so the streamer is bound here.
    """

    def decode(model, input_ids: torch.LongTensor, *, generation_config: GenerationConfig, **kwargs):
        candidates = candidates_for(generation_config)
        try:
            return assisted_decoding(
                model, input_ids, candidates, generation_config=generation_config, streamer=streamer, **kwargs
            )
        finally:
            candidates.close()  # a head's hooks leave the target with the call

    return decode


@torch.inference_mode()
def generate_with_drafter(
    target,
    drafter,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    num_draft_tokens: int | None = None,
    streamer=None,
    stats: DraftStats | None = None,
    **generate_kwargs,
):
    """`target.generate(input_ids (1, T0), **generate_kwargs)` with `drafter` (an RQ model) proposing the tokens.

    Returns what `target.generate` returns: under greedy decoding the same ids, under sampling the same
    distribution. `num_draft_tokens` (default C) tokens are drafted per target forward; `stats` (a
    DraftStats) is filled with the context, the draft and the accepted count of every step.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"drafted generation takes one prompt (1, T), got {tuple(input_ids.shape)}; transformers' assisted "
            "decoding runs batch 1, so generate one prompt at a time"
        )
    target_vocab = target.config.get_text_config().vocab_size
    drafter_vocab = drafter.config.vae_config.backbone_config.vocab_size
    if target_vocab != drafter_vocab:
        raise ValueError(
            f"the target reads {target_vocab} tokens, the RQ drafter {drafter_vocab}; draft with a model trained "
            "on the target's tokenizer"
        )
    c = drafter.compression_factor
    num_draft_tokens = c if num_draft_tokens is None else num_draft_tokens
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be at least 1, got {num_draft_tokens}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompt_padding = int((attention_mask[0] == 0).sum())
    if isinstance(drafter, RQDraftHead):
        drafter.check_target(target)
    if getattr(drafter.config, "depth_output", None) == "tokens":  # an exact q(token): transformers' own drafting
        return _assisted_generate(target, drafter, input_ids, attention_mask, num_draft_tokens, streamer, stats,
                                  generate_kwargs)

    def candidates_for(config: GenerationConfig) -> _ChunkDrafts:
        """The candidate generator of this call, up to its prepared max_length and EOS ids."""
        if isinstance(drafter, RQDraftHead):
            return RQHeadCandidateGenerator(
                drafter, target, num_draft_tokens, max_length=config.max_length, eos_token_id=config.eos_token_id,
                stats=stats,
            )  # fmt: skip
        return RQDraftCandidateGenerator(
            drafter, num_draft_tokens, max_length=config.max_length, eos_token_id=config.eos_token_id,
            prompt_padding=prompt_padding, stats=stats,
        )  # fmt: skip

    decoding = _drafted_decoding(candidates_for, streamer=streamer)
    return target.generate(
        input_ids, attention_mask=attention_mask, streamer=streamer, custom_generate=decoding, **generate_kwargs
    )


def _assisted_generate(target, drafter, input_ids, attention_mask, num_draft_tokens, streamer, stats, generate_kwargs):
    """`generate_with_drafter` for a tokens-mode RQ model: `target.generate(assistant_model=drafter)`, C tokens a draft.

    `stats` gets the tokens kept at each verification step, read from the target's cache at each forward: a step
    continues a sequence of S tokens (the prompt at the first, else the cache's length + 1, the last kept token
    not yet in it) and emits the next step's S minus its own, the kept drafts and the target's token.
    """
    lengths = []  # S of each target forward

    def record(module, args, kwargs):
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.25 passes `cache`, earlier releases the other
        cached = past.get_seq_length() if past is not None else 0
        lengths.append(cached + 1 if cached else input_ids.shape[1])

    hook = target.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with assistant_drafting(drafter, num_draft_tokens):
            output = target.generate(
                input_ids, attention_mask=attention_mask, streamer=streamer, assistant_model=drafter, **generate_kwargs
            )
    finally:
        hook.remove()
    if stats is not None:
        stats.compression_factor = drafter.compression_factor
        stats.contexts.extend(lengths)
        stats.accepted.extend(end - start - 1 for start, end in zip(lengths, [*lengths[1:], output.shape[1]]))
    return output


__all__ = ["DraftStats", "RQDraftCandidateGenerator", "RQHeadCandidateGenerator", "generate_with_drafter"]
