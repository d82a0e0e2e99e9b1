"""RQTransformerForCausalLM on tiny configs: causality, generate() invariants, save/load, freezing, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from rqlm import RQTransformerForCausalLM, RQVAEConfig, RQVAEModel
from rqlm.kernels import cpu_kernels

VOCAB, EOS, PAD = 50, 1, 0
C, D, K = 4, 3, 16


def backbone(**overrides) -> Qwen3Config:
    values = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 16, "vocab_size": VOCAB, "eos_token_id": EOS, "pad_token_id": PAD, "max_position_embeddings": 64,
    }
    return Qwen3Config(**{**values, **overrides})


def make_vae(layers: int = 0, **overrides) -> RQVAEModel:
    config = RQVAEConfig(
        backbone_config=backbone(), compression_factor=C, num_quantizers=D, codebook_size=K, latent_dim=8,
        num_encoder_layers=layers, num_decoder_layers=layers, num_latent_layers=layers,
        latent_num_attention_heads=2, zero_init_residual_branches=False, **overrides,
    )
    torch.manual_seed(0)
    return RQVAEModel(config).eval()


def make_lm(vae: RQVAEModel | None = None, **overrides) -> RQTransformerForCausalLM:
    torch.manual_seed(1)
    kwargs = {"depth_hidden_size": 16, "depth_num_attention_heads": 2}
    model = RQTransformerForCausalLM.from_vae(vae or make_vae(), backbone_config=backbone(), **{**kwargs, **overrides})
    return model.eval()


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g) for n in lengths]


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


VAE_KINDS = {
    "per-chunk": {},
    "layers+previous-tokens": {"layers": 1, "decoder_sees_previous_tokens": True},
}
SPATIAL_INPUTS = {"per-chunk": "code_embeddings", "layers+previous-tokens": "quantized"}  # both inputs exercised


@pytest.fixture(params=list(VAE_KINDS), scope="module")
def lm(request):
    return make_lm(make_vae(**VAE_KINDS[request.param]), spatial_input=SPATIAL_INPUTS[request.param])


# ----------------------------------------------------------------- causality
def test_depth_transformer_is_causal_over_depth(lm):
    codes = torch.randint(0, K, (2, 5, D))
    base = lm(codes=codes).logits
    for d in range(D):
        changed = codes.clone()
        changed[:, 2, d] = (changed[:, 2, d] + 1) % K  # code d of position 2
        logits = lm(codes=changed).logits
        torch.testing.assert_close(logits[:, :2], base[:, :2])
        torch.testing.assert_close(logits[:, 2, : d + 1], base[:, 2, : d + 1])
        if d < D - 1:
            assert not torch.allclose(logits[:, 2, d + 1 :], base[:, 2, d + 1 :])


def test_spatial_transformer_is_causal_over_positions(lm):
    codes = torch.randint(0, K, (2, 6, D))
    base = lm(codes=codes).logits
    for position in range(6):
        changed = codes.clone()
        changed[:, position] = (changed[:, position] + 3) % K
        logits = lm(codes=changed).logits
        # position l is predicted from positions < l: logits up to l (its own depth-0) unchanged
        torch.testing.assert_close(logits[:, : position + 1, 0], base[:, : position + 1, 0])
        torch.testing.assert_close(logits[:, :position], base[:, :position])
        if position < 5:
            assert not torch.allclose(logits[:, position + 1 :], base[:, position + 1 :])


def test_loss_is_mean_code_nll_and_padding_is_ignored():
    model = make_lm()
    codes = torch.randint(0, K, (2, 5, D))
    out = model(codes=codes)
    log_probs = out.logits.log_softmax(-1)
    nll = -log_probs.gather(-1, codes[..., None]).squeeze(-1)  # (B, L, D)
    torch.testing.assert_close(out.loss, nll.mean())
    torch.testing.assert_close(out.depth_nll, nll.mean(dim=(0, 1)))
    padded = codes.clone()
    padded[0, 4] = -1  # a padding position is not scored
    out = model(codes=padded)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 4] = False
    torch.testing.assert_close(out.loss, nll[keep].mean())


# ----------------------------------------------------------------- generate
def reference_greedy(model, prompt: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """Greedy decoding with nothing but full teacher-forced forward passes and `vae.decode`."""
    c = model.compression_factor
    pad = (-len(prompt)) % c
    tokens = torch.cat([torch.full((pad,), EOS), prompt])[None]
    codes = model.encode(tokens)  # (1, L, D)
    for _ in range(num_chunks):
        new = torch.zeros(1, 1, D, dtype=torch.long)
        for d in range(D):
            logits = model(codes=torch.cat([codes, new], dim=1)).logits  # (1, L+1, D, K)
            new[0, 0, d] = logits[0, -1, d].argmax()
        codes = torch.cat([codes, new], dim=1)
        placeholder = torch.cat([tokens, torch.zeros(1, c, dtype=torch.long)], dim=1)
        chunk = model.vae.decode(codes, placeholder).argmax(-1)[:, -c:]
        tokens = torch.cat([tokens, chunk], dim=1)
    return tokens[0, pad:]


@pytest.mark.parametrize("prompt_length", [8, 7])
def test_cached_generation_equals_full_forward_greedy(lm, prompt_length):
    """Ids equal the reference's, and every step's code scores (D, K) equal the teacher-forced logits of the whole
    code sequence at that position (an argmax survives a spatial step at the wrong position; the scores do not)."""
    prompt = prompts([prompt_length])[0]
    expected = reference_greedy(lm, prompt, num_chunks=4)
    padded = torch.cat([torch.full(((-prompt_length) % C,), EOS), prompt])[None]
    for use_cache in (True, False):
        out = lm.generate(prompt[None], max_new_tokens=4 * C, do_sample=False, eos_token_id=None, use_cache=use_cache,
                          return_dict_in_generate=True, output_scores=True)
        assert torch.equal(out.sequences[0], expected), use_cache
        codes = torch.cat([lm.encode(padded), out.codes], dim=1)  # (1, L0 + 4, D)
        teacher_forced = lm(codes=codes).logits[:, -4:]  # (1, 4, D, K)
        assert len(out.scores) == 4
        torch.testing.assert_close(torch.stack(out.scores, dim=1), teacher_forced, rtol=1e-4, atol=1e-4)


def test_cached_and_uncached_steps_give_the_same_scores_for_a_padded_batch(lm):
    rows = prompts([5, 12, 8], seed=7)
    ids, mask = left_pad(rows)
    kwargs = {"max_new_tokens": 5 * C, "do_sample": False, "eos_token_id": None, "return_dict_in_generate": True,
              "output_scores": True, "output_logits": True}
    cached = lm.generate(ids, attention_mask=mask, use_cache=True, **kwargs)
    uncached = lm.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences) and torch.equal(cached.codes, uncached.codes)
    assert len(cached.scores) == len(uncached.scores) == 5 and cached.scores[0].shape == (3, D, K)
    for step, (a, b) in enumerate(zip(cached.scores, uncached.scores)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    for a, b in zip(cached.scores, cached.logits):  # greedy: the processed scores are the logits
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("depth_mode", ["autoregressive", "mlp"])
def test_generation_depth_steps_give_the_teacher_forced_depth_logits(depth_mode):
    """_sample_codes builds each depth input step by step (projection once, running embedding sum): every depth's
    scores equal `depth_logits` for the chosen codes, and depend on the codes before them (`mlp`: through the sum
    alone). Strong random depth weights, so each input term matters."""
    from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

    model = make_lm(depth_mode=depth_mode)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("depth", "depth_code_embed", "depth_in")):
                p.normal_(0.0, 1.0 if p.dim() > 1 else 0.2)

    class Recorder(LogitsProcessor):
        def __init__(self):
            self.scores = []

        def __call__(self, input_ids, scores):
            self.scores.append(scores.clone())
            return scores

    recorder = Recorder()
    processors = [(LogitsProcessorList([recorder]), False) for _ in range(D)]
    hidden = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        codes = model._sample_codes(hidden, processors)  # (3, D)
        expected = model.depth_logits(hidden[:, None], codes[:, None])[:, 0]  # (3, D, K)
    assert len(set(codes[:, 1:].flatten().tolist())) > 1
    torch.testing.assert_close(torch.stack(recorder.scores, dim=1), expected, rtol=1e-5, atol=1e-5)
    other = codes.clone()
    other[:, 0] = (other[:, 0] + 1) % K
    with torch.no_grad():
        changed = model.depth_logits(hidden[:, None], other[:, None])[:, 0]
    torch.testing.assert_close(changed[:, 0], expected[:, 0])  # code 0 does not see itself
    assert not torch.allclose(changed[:, 1], expected[:, 1])  # code 1 sees code 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_generate_runs_the_vae_decoders_multi_row_calls_prepacked_with_the_same_output(lm, small_layers_prepacked):
    """Under `cpu_kernels` the VAE decoder's C-row LM head calls go through the reordered weights, and only
    there; the output is generate's without it, and the depth heads' 1-row calls keep F.linear."""
    calls = {"head": [], "depth": []}  # (rows, reordered) of each call
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: calls[name].append((args[0].numel() // m.in_features, "forward" in vars(m)))
        )
        for name, module in (("head", lm.vae.lm_head), ("depth", lm.depth_heads[0]))
    ]
    prompt = prompts([7], seed=4)[0][None]
    try:
        with cpu_kernels(lm):
            outputs = [lm.generate(prompt, max_new_tokens=3 * C, do_sample=False, eos_token_id=None)]
        outputs.append(lm.generate(prompt, max_new_tokens=3 * C, do_sample=False, eos_token_id=None))
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(outputs[0], outputs[1])
    half = len(calls["head"]) // 2  # both runs make the same calls: a prefill with decoder layers, then C rows a step
    prepacked, plain = calls["head"][:half], calls["head"][half:]
    assert [rows for rows, _ in prepacked] == [rows for rows, _ in plain] and prepacked.count((C, True)) == 3
    assert all(reordered for _, reordered in prepacked) and not any(reordered for _, reordered in plain)
    # the depth heads' calls are one row: under the kernels they keep F.linear by the row rule (prepacked.MKL_FAST_ROWS)
    assert all(rows == 1 for rows, _ in calls["depth"])
    assert "forward" not in vars(lm.vae.lm_head) and "forward" not in vars(lm.depth_heads[0])


def test_batched_left_padded_equals_one_by_one(lm):
    rows = prompts([5, 12, 8, 1], seed=3)
    ids, mask = left_pad(rows)
    batched = lm.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert torch.equal(batched[:, : ids.shape[1]], ids)
    for i, row in enumerate(rows):
        single = lm.generate(row[None], max_new_tokens=10, do_sample=False, eos_token_id=None)
        assert torch.equal(batched[i, ids.shape[1]:], single[0, len(row):]), i


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).clone())

    def end(self):
        self.ended = True


def test_streamer_receives_exactly_the_returned_tokens(lm):
    prompt = prompts([6])[0][None]
    streamer = Collect()
    out = lm.generate(prompt, max_new_tokens=9, do_sample=False, eos_token_id=None, streamer=streamer)
    assert streamer.ended
    assert torch.equal(torch.cat(streamer.chunks), out[0])
    assert out.shape[1] == 6 + 9


def word_tokenizer():
    """Token i is the word `t{i}` (id 2, the unknown word, is `abcdef`: the prefix StopStringCriteria probes with)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {("abcdef" if i == 2 else f"t{i}"): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="abcdef"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t0")


def test_text_iterator_streamer_gives_the_decoded_text(lm):
    tokenizer = word_tokenizer()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    prompt = prompts([4])[0][None]
    out = lm.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, streamer=streamer)
    assert "".join(streamer) == tokenizer.decode(out[0, 4:])


def test_eos_stops_a_row_inside_its_chunk_and_pads_the_rest(lm):
    prompt = prompts([8])[0][None]
    free = lm.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, 8:]
    stop = int(free[5])  # make the 6th new token the EOS
    out = lm.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=stop, pad_token_id=PAD)[0, 8:]
    first = int((free == stop).nonzero()[0])
    assert torch.equal(out[: first + 1], free[: first + 1])
    assert len(out) == first + 1  # the only row stopped: nothing after its EOS
    rows = torch.cat([prompt, prompts([8], seed=9)[0][None]])
    batched = lm.generate(rows, max_new_tokens=12, do_sample=False, eos_token_id=stop, pad_token_id=PAD)[:, 8:]
    assert torch.equal(batched[0, : first + 1], free[: first + 1])
    assert (batched[0, first + 1 :] == PAD).all()


@pytest.mark.parametrize("max_new_tokens", [1, 3, 4, 10])
def test_max_new_tokens_is_exact(lm, max_new_tokens):
    out = lm.generate(prompts([5])[0][None], max_new_tokens=max_new_tokens, eos_token_id=None)
    assert out.shape == (1, 5 + max_new_tokens)


def test_sampling_is_seeded_and_top_k_1_is_greedy(lm):
    prompt = prompts([8])[0][None]
    kwargs = {"max_new_tokens": 12, "eos_token_id": None, "return_dict_in_generate": True}
    greedy = lm.generate(prompt, do_sample=False, **kwargs)
    assert greedy.codes.shape == (1, 3, D)
    torch.manual_seed(0)
    a = lm.generate(prompt, do_sample=True, temperature=1.5, top_k=0, **kwargs)
    torch.manual_seed(0)
    b = lm.generate(prompt, do_sample=True, temperature=1.5, top_k=0, **kwargs)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.codes, b.codes)
    assert not torch.equal(a.codes, greedy.codes)  # 9 codes of 16 at temperature 1.5: all greedy is unlikely
    top1 = lm.generate(prompt, do_sample=True, top_k=1, **kwargs)
    assert torch.equal(top1.codes, greedy.codes) and torch.equal(top1.sequences, greedy.sequences)
    # a per-depth override: top_k=1 on every depth equals greedy too
    per_depth = lm.generate(prompt, do_sample=True, top_k=0, depth_top_k=[1] * D, **kwargs)
    assert torch.equal(per_depth.codes, greedy.codes)
    # and an override on depth 0 alone changes only what follows from depth 0
    torch.manual_seed(0)
    hot = lm.generate(prompt, do_sample=True, top_k=1, depth_top_k=[0, 1, 1], depth_temperature=[3.0, 1, 1], **kwargs)
    assert not torch.equal(hot.codes[:, :, 0], greedy.codes[:, :, 0])


GREEDY = {"do_sample": False, "eos_token_id": None}


def greedy_new_tokens(model, prompt, max_new_tokens=16, **kwargs):
    return model.generate(prompt, max_new_tokens=max_new_tokens, **{**GREEDY, **kwargs})[0, prompt.shape[1] :]


def test_min_new_tokens_and_min_length_keep_eos_out_of_the_decoders_choice_until_then(lm):
    prompt = prompts([8])[0][None]
    free = greedy_new_tokens(lm, prompt)
    stop = int(free[0])  # EOS = the first greedy token: the row ends at once
    assert len(greedy_new_tokens(lm, prompt, eos_token_id=stop)) == 1
    held = greedy_new_tokens(lm, prompt, eos_token_id=stop, min_new_tokens=6)
    assert stop not in held[:6].tolist() and len(held) > 6
    assert torch.equal(greedy_new_tokens(lm, prompt, eos_token_id=stop, min_length=8 + 6), held)


def test_token_space_settings_act_on_the_decoders_choice(lm):
    """Each setting changes the greedy text the way transformers' token LogitsProcessor does, chunk after chunk."""
    prompt = prompts([8])[0][None]
    free = greedy_new_tokens(lm, prompt)
    first = int(free[0])
    common = max(set(free.tolist()), key=free.tolist().count)
    for settings in ({"suppress_tokens": [common]}, {"bad_words_ids": [[common]]}, {"sequence_bias": {(common,): -1e4}}):
        out = greedy_new_tokens(lm, prompt, **settings)
        assert common not in out.tolist() and not torch.equal(out, free), settings
    out = greedy_new_tokens(lm, prompt, begin_suppress_tokens=[first])
    assert int(out[0]) != first
    def repeats(new):  # new tokens that repeat one before them (the prompt's included)
        text = torch.cat([prompt[0], new]).tolist()
        return sum(text[8 + i] in text[: 8 + i] for i in range(len(new)))

    assert repeats(free) > 0
    for settings in ({"no_repeat_ngram_size": 1}, {"repetition_penalty": 100.0}):
        assert repeats(greedy_new_tokens(lm, prompt, **settings)) == 0, settings
    forced = greedy_new_tokens(lm, prompt, max_new_tokens=10, forced_eos_token_id=7)
    assert int(forced[-1]) == 7 and torch.equal(forced[:-1], free[:9])


def test_stop_strings_end_a_row_at_the_token_that_completes_one(lm):
    tokenizer = word_tokenizer()
    rows = torch.cat([prompts([8])[0][None], prompts([8], seed=5)[0][None]])
    free = lm.generate(rows, max_new_tokens=16, **GREEDY)[:, 8:]
    stop = tokenizer.decode(free[0, 5])  # the text of row 0's sixth token
    assert stop not in tokenizer.decode(rows[0]) and stop not in tokenizer.decode(rows[1])
    ends = [min((i + 1 for i in range(16) if stop in tokenizer.decode(torch.cat([r, f[: i + 1]]))), default=16)
            for r, f in zip(rows, free)]
    assert ends[0] <= 6
    out = lm.generate(rows, max_new_tokens=16, stop_strings=[stop], tokenizer=tokenizer, pad_token_id=PAD, **GREEDY)
    assert out.shape[1] == 8 + max(ends)
    for row, end in enumerate(ends):
        assert torch.equal(out[row, 8 : 8 + end], free[row, :end]) and (out[row, 8 + end :] == PAD).all()


def test_max_time_ends_the_run_after_the_chunk_it_ran_out_in(lm):
    out = lm.generate(prompts([8])[0][None], max_new_tokens=4 * C, max_time=0.0, **GREEDY)
    assert out.shape[1] == 8 + C
    assert lm.generate(prompts([8])[0][None], max_new_tokens=4 * C, max_time=60.0, **GREEDY).shape[1] == 8 + 4 * C


def test_num_return_sequences_repeats_each_row(lm):
    ids, mask = left_pad(prompts([8, 5], seed=2))
    torch.manual_seed(0)
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, num_return_sequences=3,
                      eos_token_id=None)
    assert out.shape == (6, ids.shape[1] + 8)
    for i in range(6):
        assert torch.equal(out[i, : ids.shape[1]], ids[i // 3])
    assert len({tuple(row.tolist()) for row in out[:3]}) > 1  # sampled copies differ
    torch.manual_seed(0)
    single = lm.generate(ids[:1, -8:], max_new_tokens=8, do_sample=True, num_return_sequences=3, eos_token_id=None)
    assert single.shape == (3, 16)


def test_output_scores_and_logits_give_each_steps_code_scores(lm):
    prompt = prompts([8])[0][None]
    torch.manual_seed(0)
    out = lm.generate(prompt, max_new_tokens=3 * C - 1, do_sample=True, temperature=2.0, top_k=0,
                      return_dict_in_generate=True, output_scores=True, output_logits=True, eos_token_id=None)
    assert len(out.scores) == len(out.logits) == 3 and out.codes.shape == (1, 3, D)
    for scores, logits in zip(out.scores, out.logits):
        assert scores.shape == logits.shape == (1, D, K)
        torch.testing.assert_close(scores, logits / 2.0)  # temperature 2 is the only processor


def test_decoder_sampling_draws_the_chunks_tokens_from_the_decoders_softmax():
    """Codes greedy in every run: argmax tokens are a function of the codes; sampled ones are not. At a temperature
    near 0 the sample is the argmax; at 1 it gives chunks that no code sequence's argmax gives."""
    model = make_lm()  # a decoder that sees the codes only: one chunk's argmax depends on its own codes
    prompt = prompts([8])[0][None]
    kwargs = {"max_new_tokens": 5 * C, "return_dict_in_generate": True, **GREEDY}
    greedy = model.generate(prompt, **kwargs)
    cold = model.generate(prompt, decoder_do_sample=True, decoder_temperature=1e-4, **kwargs)
    assert torch.equal(cold.sequences, greedy.sequences)
    torch.manual_seed(0)
    hot = model.generate(prompt, decoder_do_sample=True, decoder_temperature=1.0, **kwargs)
    assert torch.equal(hot.codes, greedy.codes) and not torch.equal(hot.sequences, greedy.sequences)
    every_code = torch.cartesian_prod(*[torch.arange(K)] * D)[:, None]  # (K^D, 1, D)
    reachable = {tuple(chunk) for chunk in model.vae.decode(every_code).argmax(-1).tolist()}  # argmax chunks
    sampled = hot.sequences[0, 8:].view(-1, C).tolist()
    assert any(tuple(chunk) not in reachable for chunk in sampled)
    model.generation_config.decoder_do_sample = True  # a checkpoint's default, as a GenerationConfig entry
    torch.manual_seed(0)
    assert torch.equal(model.generate(prompt, **kwargs).sequences, hot.sequences)


@pytest.mark.parametrize(
    "settings",
    [
        {"num_beams": 4}, {"num_beams": 2, "num_return_sequences": 2}, {"guidance_scale": 1.5},
        {"penalty_alpha": 0.6, "top_k": 4}, {"cache_implementation": "static"}, {"output_attentions": True},
        {"output_hidden_states": True}, {"exponential_decay_length_penalty": (2, 1.5)}, {"renormalize_logits": True},
        {"low_memory": True}, {"top_h": 0.5}, {"prompt_lookup_num_tokens": 3}, {"decoder_start_token_id": 3},
    ],
    ids=lambda settings: ",".join(settings),
)
def test_settings_the_loop_does_not_implement_are_one_line_errors(settings):
    model = make_lm()
    prompt = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError) as error:
        model.generate(prompt, max_new_tokens=4, **settings)
    assert "\n" not in str(error.value)
    assert next(iter(settings)) in str(error.value), str(error.value)  # the first setting it meets is named
    model.generation_config.update(**settings)  # the model's own generation_config is checked too
    with pytest.raises(ValueError):
        model.generate(prompt, max_new_tokens=4)


def test_parallel_depth_mode_generates_and_is_causal_over_positions():
    model = make_lm(depth_mode="parallel")
    codes = torch.randint(0, K, (1, 4, D))
    base = model(codes=codes).logits
    changed = codes.clone()
    changed[:, 2] = (changed[:, 2] + 1) % K
    torch.testing.assert_close(model(codes=changed).logits[:, :3], base[:, :3])
    prompt = prompts([7])[0]
    expected = reference_greedy(model, prompt, num_chunks=2)
    assert torch.equal(model.generate(prompt[None], max_new_tokens=8, do_sample=False, eos_token_id=None)[0], expected)


def test_code_embedding_input_and_aux_heads_train():
    model = make_lm(spatial_input="code_embeddings", aux_token_loss_weight=0.5).train()
    ids = torch.randint(2, VOCAB, (2, 16))
    out = model(input_ids=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.code_loss + 0.5 * out.aux_loss)
    out.loss.backward()
    assert model.aux_head.weight.grad.abs().sum() > 0
    assert model.code_embed[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------- the frozen VAE, freezing, LoRA
def test_vae_stays_frozen_and_in_eval_mode():
    vae = make_vae(quantizer_kwargs={"kmeans_init": True, "threshold_ema_dead_code": 2, "decay": 0.5})
    vae.train()(torch.randint(2, VOCAB, (4, 32)))  # a trained VAE: codebooks initialised by kmeans
    model = make_lm(vae.eval())
    before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    model.train()
    assert not model.vae.training and all(not m.training for m in model.vae.modules())
    assert not any(p.requires_grad for p in model.vae.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=torch.randint(2, VOCAB, (2, 16))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for key, value in model.vae.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert set(model._ddp_params_and_buffers_to_ignore) >= {f"vae.{k}" for k in before}


def test_spatial_backbone_moves_only_after_unfreezing():
    model = make_lm(freeze_backbone_steps=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    weight = model.spatial.layers[0].self_attn.q_proj.weight
    snapshots = [weight.detach().clone()]
    depth_weight = model.depth_heads[0].weight
    depth_before = depth_weight.detach().clone()
    for step in range(4):
        model.on_step_begin(step)
        model(input_ids=torch.randint(2, VOCAB, (2, 16))).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        snapshots.append(weight.detach().clone())
    assert torch.equal(snapshots[0], snapshots[1]) and torch.equal(snapshots[1], snapshots[2])
    assert not torch.equal(snapshots[2], snapshots[3])
    assert not torch.equal(depth_weight, depth_before)


def test_lora_starts_as_the_plain_model_and_only_adapters_move():
    vae = make_vae()
    plain = make_lm(vae)
    lora = make_lm(vae, lora_r=4)
    target = lora.state_dict()
    for key, value in plain.state_dict().items():  # same base weights; adapters as peft starts them
        name = key if key in target else key.replace(".weight", ".base_layer.weight")
        target[name].copy_(value)
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in lora.named_parameters() if "lora_B" in n)
    codes = torch.randint(0, K, (2, 5, D))
    torch.testing.assert_close(lora(codes=codes).logits, plain(codes=codes).logits)
    lora.train()
    base = {n: p.detach().clone() for n, p in lora.spatial.named_parameters() if "lora_" not in n and "norm" not in n}
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.on_step_begin(0)
    for _ in range(2):
        lora(codes=codes).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in lora.spatial.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name
    assert any(p.abs().sum() > 0 for n, p in lora.spatial.named_parameters() if "lora_B" in n)


# ----------------------------------------------------------------- save / load
def test_save_load_and_remote_code_give_identical_generations(tmp_path):
    model = make_lm(make_vae(layers=1, decoder_sees_previous_tokens=True))
    prompt = prompts([6])[0][None]
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is RQTransformerForCausalLM
    assert not any(p.requires_grad for p in loaded.vae.parameters()) and not loaded.train().vae.training
    loaded.eval()
    assert torch.equal(loaded.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None), expected)
    assert_remote_code_generates(tmp_path, prompt, expected)


def assert_remote_code_generates(folder, prompt: torch.Tensor, expected: torch.Tensor) -> None:
    """A user without rqlm loads `folder` with trust_remote_code, and greedy `generate` of `prompt` gives `expected`."""
    torch.save({"prompt": prompt, "expected": expected}, folder / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["rqlm"] = None  # rqlm is not installed for this user
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "rqlm" not in type(model).__module__.split(".")[0], type(model).__module__
        data = torch.load({str(folder / "expected.pt")!r})
        out = model.generate(data["prompt"], max_new_tokens=data["expected"].shape[1] - data["prompt"].shape[1],
                             do_sample=False, eos_token_id=None)
        assert torch.equal(out, data["expected"]), (out, data["expected"])
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_with_rqlm_imported_the_auto_classes_read_a_folder_without_a_remote_code_prompt(tmp_path):
    """The README's quick start: `import rqlm`, then AutoTokenizer / AutoModelForCausalLM on an LM folder (which
    carries an auto_map) load without asking to run custom code, and without the model-type warning."""
    from rqlm.data.tokenizer import train_tokenizer

    make_lm(make_vae()).save_pretrained(tmp_path)
    train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300, output_dir=tmp_path)  # loading only
    script = textwrap.dedent(
        f"""
        import rqlm
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path)!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        assert type(model).__module__.startswith("rqlm."), type(model).__module__
        print("ok", len(tokenizer))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "ok" in result.stdout, output[-2000:]
    assert "custom code" not in output and "model of type" not in output, output[-2000:]


def test_loading_a_vae_folder_as_the_lm_is_a_one_line_error(tmp_path):
    make_vae().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'rq_vae' checkpoint"):
        RQTransformerForCausalLM.from_pretrained(tmp_path)


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.generate(torch.zeros(1, 0, dtype=torch.long)), "non-empty"),
        (lambda m: m.generate(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.zeros(1, 4)), "empty"),
        (lambda m: m.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=0), "max_new_tokens"),
        (lambda m: m.generate(torch.ones(1, 64 * C, dtype=torch.long), max_new_tokens=4), "latent positions"),
        (lambda m: m.generate(torch.ones(1, 4)), "integer"),
        (lambda m: m.generate(torch.full((1, 4), VOCAB)), "lie in"),
        (lambda m: m.generate(torch.ones(1, 4, dtype=torch.long), depth_temperature=[1.0]), "D=3"),
        (lambda m: m.generate(torch.ones(1, 4, dtype=torch.long), bogus_flag=3), "does not use"),
        (lambda m: m.generate(torch.ones(1, 4, dtype=torch.long), generation_config=GenerationConfig(bogus=3)), "bogus"),
        (lambda m: m.generate(torch.ones(1, 4, dtype=torch.long), stop_strings="t3"), "tokenizer"),
        (lambda m: m.generate(torch.ones(1, 4, dtype=torch.long), output_scores=True), "return_dict_in_generate"),
        (lambda m: m.generate(torch.ones(1, 4, dtype=torch.long), decoder_bogus=1), "decoder_bogus"),
        (lambda m: m.generate(torch.ones(1, 4, dtype=torch.long), max_time=-1.0), "max_time"),
        (lambda m: m.generate(torch.ones(1, 4, dtype=torch.long), num_return_sequences=2), "num_return_sequences"),
        (lambda m: m(codes=torch.full((1, 2, D), K)), "lie in"),
        (lambda m: m(codes=torch.zeros(1, 2, D + 1, dtype=torch.long)), "shape"),
        (lambda m: m(), "input_ids"),
    ],
)
def test_bad_input_is_a_one_line_error(call, message):
    model = make_lm()
    with pytest.raises(ValueError, match=message) as error:
        call(model)
    assert "\n" not in str(error.value)
