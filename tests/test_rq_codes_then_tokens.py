"""RQTransformerForCausalLM(depth_output="codes_then_tokens"): per chunk the D codes (a plan), then the C tokens.

The invariants: what forward's logits read (given the codes: tokens up to t and the codes of t + 1's chunk; the code
logits of chunk l: chunks < l), loss = (code NLL + token NLL) / tokens, greedy generate = repeated argmax of forward
given the greedy codes, batched left-padded = one by one, cache = no cache, logits processors on the tokens, save /
load / remote code, train-lm and the bound's terms; and the factorised token head (token_head_rank).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_rq_transformer import (
    EOS,
    PAD,
    VOCAB,
    C,
    Collect,
    D,
    K,
    assert_remote_code_generates,
    backbone,
    left_pad,
    make_vae,
    prompts,
    word_tokenizer,
)
from test_train_lm import clean_accelerate_state, corpus, lm_flags, records  # noqa: F401 (fixtures)
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM
from transformers.generation.logits_process import LogitsProcessor

from rqlm import RQTransformerConfig, RQTransformerForCausalLM, cli

GREEDY = {"do_sample": False, "eos_token_id": None}


def make_lm(
    spatial_input: str = "token_embeddings", vae_layers: int = 0, depth_output: str = "codes_then_tokens", **overrides
) -> RQTransformerForCausalLM:
    torch.manual_seed(1)
    kwargs = {"depth_hidden_size": 16, "depth_num_attention_heads": 2, "depth_num_layers": 2}
    model = RQTransformerForCausalLM.from_vae(
        make_vae(vae_layers), backbone_config=backbone(), depth_output=depth_output, spatial_input=spatial_input,
        **{**kwargs, **overrides},
    )  # fmt: skip
    return model.eval()


INPUTS = {
    "tokens, context C": ("token_embeddings", 0, {}),
    "tokens+codes, no context, mlp codes": ("token_and_code_embeddings", 0, {"token_decoder_context": 0, "depth_mode": "mlp"}),
    "codes, VAE with layers, context 6": ("code_embeddings", 1, {"token_decoder_context": 6}),
}


@pytest.fixture(params=list(INPUTS), scope="module")
def lm(request):
    spatial_input, vae_layers, overrides = INPUTS[request.param]
    return make_lm(spatial_input, vae_layers, **overrides)


def padded_prompt(prompt: torch.Tensor) -> torch.Tensor:
    """A prompt (1, T0) as generate reads it: EOS in front up to a multiple of C."""
    return F.pad(prompt, ((-prompt.shape[1]) % C, 0), value=EOS)


def changed(ids: torch.Tensor, start: int) -> torch.Tensor:
    """ids with every token from `start` on replaced by another one."""
    out = ids.clone()
    out[:, start:] = (out[:, start:] + 7) % (VOCAB - 2) + 2
    return out


# ----------------------------------------------------------------- what forward reads
@torch.no_grad()
def test_given_the_codes_token_logits_at_t_read_tokens_up_to_t_only(lm):
    ids = torch.stack(prompts([13, 13], seed=3))
    codes = lm(ids).codes  # the VAE's codes of the text, then held fixed
    base = lm(ids, codes=codes)
    for t in range(ids.shape[1] - 1):
        moved = lm(changed(ids, t + 1), codes=codes)
        torch.testing.assert_close(moved.logits[:, : t + 1], base.logits[:, : t + 1])
        torch.testing.assert_close(moved.first_logits, base.first_logits)
        q = (t + 1) // C  # the chunk of token t + 1: its code logits read the chunks before it only
        torch.testing.assert_close(moved.code_logits[:, : q + 1], base.code_logits[:, : q + 1])
        assert not torch.allclose(moved.logits[:, t + 1 :], base.logits[:, t + 1 :]), f"tokens after {t} change nothing"


@torch.no_grad()
def test_the_codes_of_a_chunk_reach_its_own_tokens_and_later_chunks_only(lm):
    ids = torch.stack(prompts([13, 13], seed=4))
    codes = lm(ids).codes  # (2, 4, D)
    base = lm(ids, codes=codes)
    for q in range(codes.shape[1]):
        other = codes.clone()
        other[:, q] = (other[:, q] + 5) % K
        moved = lm(ids, codes=other)
        first = q * C  # the first token of chunk q; logits[:, first - 1] predicts it
        torch.testing.assert_close(moved.logits[:, : max(first - 1, 0)], base.logits[:, : max(first - 1, 0)])
        torch.testing.assert_close(moved.code_logits[:, :q], base.code_logits[:, :q])
        torch.testing.assert_close(moved.code_logits[:, q, 0], base.code_logits[:, q, 0])
        predicted = base.first_logits if q == 0 else base.logits[:, first - 1]
        now = moved.first_logits if q == 0 else moved.logits[:, first - 1]
        assert not torch.allclose(now, predicted), f"the plan of chunk {q} does not reach its first token"


@torch.no_grad()
def test_with_codes_from_the_text_logits_before_the_changed_chunk_stay(lm):
    """Without `codes`, the plan of t + 1's chunk is the VAE's codes of that whole chunk: a later token of the chunk
    changes it, so only the predictions of the chunks before stay."""
    ids = torch.stack(prompts([13, 13], seed=5))
    base = lm(ids)
    for t in range(ids.shape[1] - 1):
        moved = lm(changed(ids, t + 1))
        kept = ((t + 1) // C) * C - 1  # logits[:, :kept] predict tokens of the chunks before t + 1's
        torch.testing.assert_close(moved.logits[:, : max(kept, 0)], base.logits[:, : max(kept, 0)])


@torch.no_grad()
def test_loss_is_the_code_and_token_nll_summed_over_the_text_per_token(lm):
    ids, mask = left_pad(prompts([11, 7], seed=6))
    out = lm(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    code_nll = 0.0
    for b, length in enumerate(mask.sum(1).tolist()):
        chunks = -(-length // C)
        logp = F.log_softmax(out.code_logits[b, :chunks].float(), dim=-1)  # (chunks, D, K)
        code_nll += -logp.gather(-1, out.codes[b, :chunks, :, None]).sum()
    start = (mask == 0).sum(1)
    token_nll = 0.0
    for b in range(2):
        token_nll += -F.log_softmax(out.first_logits[b].float(), -1)[ids[b, start[b]]]
        for t in range(int(start[b]), ids.shape[1] - 1):
            token_nll += -F.log_softmax(out.logits[b, t].float(), -1)[ids[b, t + 1]]
    tokens = int(mask.sum())
    torch.testing.assert_close(out.code_loss, code_nll / tokens)
    torch.testing.assert_close(out.token_loss, token_nll / tokens)
    torch.testing.assert_close(out.loss, (code_nll + token_nll) / tokens)
    assert out.logits.shape == (2, 11, VOCAB) and int(out.num_tokens) == tokens
    assert torch.equal(out.codes[1, 2], torch.full((D,), -1))  # a row of 7 tokens has 2 chunks


@torch.no_grad()
def test_the_token_after_a_text_ending_at_a_chunk_boundary_needs_the_next_plan():
    model = make_lm()
    ids = prompts([8], seed=19)[0][None]
    codes = model(ids).codes  # (1, 2, D): no plan for the chunk the next token opens
    assert codes.shape == (1, 2, D) and (model(ids).logits[:, -1] == 0).all()
    plan = torch.cat([codes, torch.randint(0, K, (1, 1, D))], dim=1)
    out = model(ids, codes=plan)
    longer = model(torch.cat([ids, torch.tensor([[5]])], dim=1), codes=plan)  # the plan is read, not scored
    assert (out.logits[:, -1] != 0).any() and out.code_logits.shape[1] == 3
    torch.testing.assert_close(out.logits[:, -1], longer.logits[:, -2])
    torch.testing.assert_close(out.loss * 8, model(ids, codes=codes).loss * 8)


@torch.no_grad()
def test_a_left_padded_batch_computes_what_its_rows_compute_alone(lm):
    rows = prompts([3, 6, 9], seed=7)
    ids, mask = left_pad(rows)
    out = lm(ids, attention_mask=mask)
    for i, row in enumerate(rows):
        alone = lm(row[None])
        torch.testing.assert_close(out.logits[i, -len(row) :], alone.logits[0])
        torch.testing.assert_close(out.first_logits[i], alone.first_logits[0])
        chunks = alone.codes.shape[1]
        assert torch.equal(out.codes[i, :chunks], alone.codes[0])
        torch.testing.assert_close(out.code_logits[i, :chunks], alone.code_logits[0])


# ----------------------------------------------------------------- generate
@torch.no_grad()
@pytest.mark.parametrize("prompt_length", [4, 5, 8])
def test_greedy_generate_is_repeated_argmax_of_forward_given_the_greedy_codes(lm, prompt_length):
    """Also the scores: `logits_processor` acts on the token logits, and sees forward's logits at every new token."""

    class Record(LogitsProcessor):
        def __init__(self):
            self.seen = []

        def __call__(self, input_ids, scores):
            self.seen.append(scores.clone())
            return scores

    prompt = prompts([prompt_length], seed=prompt_length)[0][None]
    record = Record()
    out = lm.generate(prompt, max_new_tokens=10, return_dict_in_generate=True, logits_processor=[record], **GREEDY)
    new = out.sequences[:, prompt_length:]
    assert new.shape == (1, 10) and out.codes.shape == (1, 3, D)
    text = padded_prompt(prompt)
    codes = torch.cat([lm.encode(text), out.codes], dim=1)
    forward = lm(torch.cat([text, new], dim=1), codes=codes)
    assert torch.equal(forward.logits[:, text.shape[1] - 1 : -1].argmax(-1), new)
    torch.testing.assert_close(torch.stack(record.seen, dim=1), forward.logits[:, text.shape[1] - 1 : -1])
    assert torch.equal(forward.code_logits[:, -3:].argmax(-1), out.codes)  # each depth's argmax, given the ones before
    uncached = lm.generate(prompt, max_new_tokens=10, use_cache=False, **GREEDY)
    assert torch.equal(uncached, out.sequences)


@torch.no_grad()
def test_a_left_padded_batch_generates_what_its_rows_generate_alone(lm):
    rows = prompts([3, 6, 9], seed=8)
    ids, mask = left_pad(rows)
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=9, **GREEDY)
    for i, row in enumerate(rows):
        single = lm.generate(row[None], max_new_tokens=9, **GREEDY)
        assert torch.equal(out[i, -(len(row) + 9) :], single[0])
    torch.manual_seed(0)
    sampled = lm.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=True, top_k=0, eos_token_id=None)
    assert sampled.shape == out.shape


@torch.no_grad()
def test_logits_processors_act_on_the_tokens():
    model = make_lm()
    prompt = prompts([5], seed=10)[0][None]
    greedy = model.generate(prompt, max_new_tokens=12, **GREEDY)[0, 5:]
    banned = int(greedy[1])
    no_bad = model.generate(prompt, max_new_tokens=12, bad_words_ids=[[banned]], **GREEDY)
    assert banned not in no_bad[0, 5:].tolist()
    no_repeat = model.generate(prompt, max_new_tokens=12, no_repeat_ngram_size=1, **GREEDY)[0]
    assert len(set(no_repeat.tolist())) == len(no_repeat)  # the processors see the prompt and every new token
    penalised = model.generate(prompt, max_new_tokens=12, repetition_penalty=50.0, **GREEDY)[0, 5:]
    assert not torch.equal(penalised, greedy)
    # EOS at the third new token (inside the first chunk): the row ends there; min_new_tokens holds it off
    eos = int(greedy[2])
    assert eos not in greedy[:2].tolist()
    stopped = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    assert stopped.shape[1] == 5 + 3 and int(stopped[0, -1]) == eos
    held = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=PAD, min_new_tokens=6)
    assert eos not in held[0, 5:11].tolist() and held.shape[1] >= 5 + 6
    torch.manual_seed(0)
    a = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=0.7, top_p=0.9, eos_token_id=None)
    torch.manual_seed(0)
    b = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=0.7, top_p=0.9, eos_token_id=None)
    top1 = model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=1, eos_token_id=None)
    assert torch.equal(a, b) and torch.equal(top1[0, 5:], greedy)
    # greedy plans under sampled tokens: depth_do_sample=False keeps the codes at their argmax
    planned = model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=1, depth_do_sample=False, eos_token_id=None)
    assert torch.equal(planned[0, 5:], greedy)


@torch.no_grad()
@pytest.mark.parametrize("max_new_tokens", [1, 5, 8])
def test_max_new_tokens_counts_tokens(max_new_tokens):
    model = make_lm()
    ids, mask = left_pad(prompts([3, 6], seed=11))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, **GREEDY)
    assert out.shape == (2, ids.shape[1] + max_new_tokens) and torch.equal(out[:, : ids.shape[1]], ids)


@torch.no_grad()
def test_streamer_receives_each_token_as_it_is_made():
    model, streamer = make_lm(), Collect()
    prompt = prompts([6], seed=12)[0][None]
    out = model.generate(prompt, max_new_tokens=9, streamer=streamer, **GREEDY)
    assert streamer.chunks[0].tolist() == prompt[0].tolist() and streamer.ended and len(streamer.chunks) == 1 + 9
    assert torch.cat(streamer.chunks[1:]).tolist() == out[0, 6:].tolist()


@torch.no_grad()
def test_stop_strings_max_time_and_num_return_sequences():
    model, tokenizer = make_lm(), word_tokenizer()
    rows = torch.cat([prompts([8], seed=17)[0][None], prompts([8], seed=18)[0][None]])
    free = model.generate(rows, max_new_tokens=12, **GREEDY)[:, 8:]
    stop = tokenizer.decode(free[0, 5])  # the text of row 0's sixth token
    ends = [min((i + 1 for i in range(12) if stop in tokenizer.decode(torch.cat([r, f[: i + 1]]))), default=12)
            for r, f in zip(rows, free)]  # fmt: skip
    out = model.generate(rows, max_new_tokens=12, stop_strings=[stop], tokenizer=tokenizer, pad_token_id=PAD, **GREEDY)
    assert ends[0] <= 6 and out.shape[1] == 8 + max(ends)
    for row, end in enumerate(ends):
        assert torch.equal(out[row, 8 : 8 + end], free[row, :end]) and (out[row, 8 + end :] == PAD).all()
    assert model.generate(rows, max_new_tokens=4 * C, max_time=0.0, **GREEDY).shape[1] == 8 + C  # after one chunk
    torch.manual_seed(0)
    copies = model.generate(rows, max_new_tokens=8, do_sample=True, num_return_sequences=3, eos_token_id=None)
    assert copies.shape == (6, 16) and all(torch.equal(copies[i, :8], rows[i // 3]) for i in range(6))
    assert len({tuple(row.tolist()) for row in copies[:3]}) > 1  # sampled copies differ


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_beams": 2}, "num_beams=2 is not implemented"),
        ({"penalty_alpha": 0.5, "top_k": 4}, "penalty_alpha=0.5 is not implemented"),
        ({"output_scores": True, "return_dict_in_generate": True}, "output_scores and output_logits"),
        ({"decoder_temperature": 0.5}, "decoder_temperature"),
        ({"depth_temperature": [1.0]}, "D=3"),
    ],
)
def test_settings_the_loop_does_not_implement_are_one_line_errors(settings, message):
    model = make_lm()
    with pytest.raises(ValueError, match=message) as error:
        model.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=4, **settings)
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------- training, save / load, the bound
def test_training_steps_lower_the_loss_and_reach_every_part():
    model = make_lm("token_and_code_embeddings").train()
    ids = torch.stack(prompts([16, 16, 16, 16], seed=13))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(30):
        out = model(ids, labels=ids)
        first = first if first is not None else (out.code_loss.item(), out.token_loss.item())
        optimizer.zero_grad()
        out.loss.backward()
        for name in ("spatial.layers.0.mlp.up_proj.weight", "depth.layers.0.mlp.up_proj.weight", "chunk_proj.weight",
                     "code_embed.0.weight", "token_head.weight", "start", "plan_embed.2.weight",
                     "code_depth.depth.layers.0.mlp.up_proj.weight", "code_depth.depth_heads.2.weight",
                     "code_depth.depth_position"):  # fmt: skip
            assert model.get_parameter(name).grad.abs().sum() > 0, name
        optimizer.step()
    assert out.code_loss.item() < 0.7 * first[0] and out.token_loss.item() < 0.7 * first[1], (first, out)
    assert not any(p.requires_grad for p in model.vae.parameters())
    with pytest.raises(ValueError, match="labels must be input_ids"):
        model(ids, labels=ids.masked_fill(ids == ids[0, 0], -100))


@torch.no_grad()
def test_the_bounds_terms_are_the_forwards_parts():
    from rqlm.commands.evaluate import held_out_figures
    from rqlm.evaluation.bound import bound_terms

    model = make_lm()
    ids = torch.stack(prompts([12, 12], seed=14))
    out, terms = model(ids), bound_terms(model, ids)
    assert float(terms["num_tokens"]) == 24
    torch.testing.assert_close(terms["nll_codes"].float(), out.code_loss * 24)
    torch.testing.assert_close(terms["nll_recon"].float(), out.token_loss * 24)
    assert float(terms["num_codes_depth"][0]) == 2 * 3
    baseline = Qwen3ForCausalLM(backbone()).eval()
    figures = held_out_figures(model, baseline, [{"input_ids": row} for row in ids], batch_size=2, separator_id=EOS)
    assert "perplexity" not in figures  # a bound, not an exact perplexity
    torch.testing.assert_close(torch.tensor(figures["perplexity_bound"]), out.loss.exp(), rtol=1e-5, atol=0)


def test_save_load_and_remote_code_give_identical_generations(tmp_path):
    model = make_lm("token_and_code_embeddings", token_head_rank=4)
    prompt = prompts([6], seed=15)[0][None]
    expected = model.generate(prompt, max_new_tokens=8, **GREEDY)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is RQTransformerForCausalLM and loaded.config.depth_output == "codes_then_tokens"
    assert loaded.config.token_head_rank == 4
    assert torch.equal(loaded.generate(prompt, max_new_tokens=8, **GREEDY), expected)
    assert_remote_code_generates(tmp_path, prompt, expected)


# ----------------------------------------------------------------- the factorised token head
@pytest.mark.parametrize("depth_output", ["tokens", "codes_then_tokens"])
def test_a_factorised_token_head_has_its_parameters_and_shapes_and_loads(depth_output, tmp_path):
    width, rank = 16, 4
    full = make_lm(depth_output=depth_output)
    factorised = make_lm(depth_output=depth_output, token_head_rank=rank)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(full) - count(factorised) == width * VOCAB - (width * rank + rank * VOCAB)
    assert [tuple(p.shape) for p in factorised.token_head.parameters()] == [(rank, width), (VOCAB, rank)]
    ids = torch.stack(prompts([9, 9], seed=16))
    with torch.no_grad():
        logits = factorised(ids).logits
    assert logits.shape == (2, 9, VOCAB)
    factorised.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"depth_output": "codes_then_tokens", "aux_token_loss_weight": 0.5}, "aux_token_loss_weight is for"),
        ({"depth_output": "codes", "token_head_rank": 4}, "token_head_rank is for"),
        ({"depth_output": "tokens", "token_head_rank": -1}, "token_head_rank must be >= 0"),
        ({"depth_output": "codes", "token_decoder_context": 2}, "token_decoder_context is for"),
    ],
)
def test_bad_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        RQTransformerConfig(backbone_config=backbone(), vae_config=make_vae().config, **overrides)


def test_the_mode_takes_the_token_decoders_defaults_and_a_one_layer_code_decoder():
    config = RQTransformerConfig(backbone_config=backbone(), vae_config=make_vae().config, depth_output="codes_then_tokens")
    assert (config.depth_num_layers, config.token_decoder_context, config.spatial_input) == (4, C, "token_embeddings")
    model = RQTransformerForCausalLM(config)
    assert len(model.depth.layers) == 4 and len(model.code_depth.depth.layers) == 1


# ----------------------------------------------------------------- the commands
def test_train_lm_trains_the_mode_and_reports_the_bound_and_its_parts(corpus, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "lm"
    flags = lm_flags(corpus, out, depth_output="codes_then_tokens", depth_num_layers=2, token_head_rank=8,
                     max_steps=40)  # fmt: skip
    assert cli.main(["train-lm", *flags]) == 0, capsys.readouterr().err
    evals = [r for r in records(out) if "eval_perplexity_bound" in r]
    assert [r["step"] for r in evals] == [20, 40]
    first, last = evals[0], evals[-1]
    assert last["eval_perplexity_bound"] < 0.9 * first["eval_perplexity_bound"], (first, last)
    for r in evals:  # the bound is its two parts: code NLL and the token decoder's NLL given the codes, per token
        assert "eval_perplexity" not in r
        assert r["eval_perplexity_bound"] == pytest.approx(
            math.exp(r["eval_nll_codes_per_token"] + r["eval_nll_recon_per_token"]), rel=1e-6
        )
    trained = [r for r in records(out) if "code_loss" in r and "token_loss" in r]
    assert trained and trained[-1]["loss"] == pytest.approx(trained[-1]["code_loss"] + trained[-1]["token_loss"], rel=1e-5)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.depth_output == "codes_then_tokens" and model.config.token_head_rank == 8
    prompt = torch.tensor([[5, 6, 7]])
    assert model.generate(prompt, max_new_tokens=6, **GREEDY).shape == (1, 9)


def test_bench_times_the_mode_at_a_tiny_shape(tmp_path, capsys):
    output = tmp_path / "generation.json"
    flags = ["--quick", "--threads", "1", "--no_memory", "--depth_output", "codes_then_tokens", "--depth_num_layers",
             "2", "--token_head_rank", "16", "--output_json", str(output)]  # fmt: skip
    assert cli.main(["bench", *flags]) == 0, capsys.readouterr().err
    rows = json.loads(output.read_text())["shapes"][0]["rows"]
    rq = [r for r in rows if r["model"].startswith("RQ")]
    assert {r["model"] for r in rq} == {"RQ C=4 codes_then_tokens num_layers=2 token_head_rank=16"} and len(rq) == 2
    assert all(r["new_tokens"] == 8 and r["tokens_per_second"] > 0 for r in rq)
