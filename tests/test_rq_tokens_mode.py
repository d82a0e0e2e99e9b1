"""RQTransformerForCausalLM(depth_output="tokens"): a plain causal LM whose spatial model steps once per chunk.

The invariants: causality of forward's logits, loss = mean next-token NLL, greedy generate = repeated argmax
of forward, cache = no cache (scores), batched left-padded = one by one, assisted decoding and beam search
through transformers' own loops, save / load / remote code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_rq_transformer import (
    PAD,
    VOCAB,
    C,
    Collect,
    assert_remote_code_generates,
    backbone,
    left_pad,
    make_vae,
    prompts,
)
from transformers import AutoModelForCausalLM

from rqlm import RQTransformerConfig, RQTransformerForCausalLM


def make_lm(spatial_input: str = "token_embeddings", vae_layers: int = 0, **overrides) -> RQTransformerForCausalLM:
    torch.manual_seed(1)
    kwargs = {"depth_hidden_size": 16, "depth_num_attention_heads": 2, "depth_num_layers": 2}
    model = RQTransformerForCausalLM.from_vae(
        make_vae(vae_layers), backbone_config=backbone(), depth_output="tokens", spatial_input=spatial_input,
        **{**kwargs, **overrides},
    )  # fmt: skip
    return model.eval()


INPUTS = {
    "tokens": ("token_embeddings", 0, 0),
    "tokens+codes": ("token_and_code_embeddings", 0, 0),
    "codes, VAE with layers": ("code_embeddings", 1, 0),
    "tokens, 6 tokens of context": ("token_embeddings", 0, 6),
}


@pytest.fixture(params=list(INPUTS), scope="module")
def lm(request):
    spatial_input, vae_layers, context = INPUTS[request.param]
    return make_lm(spatial_input, vae_layers, token_decoder_context=context)


@torch.no_grad()
def test_logits_at_t_depend_on_tokens_up_to_t_only(lm):
    ids = prompts([13, 13], seed=3)
    ids = torch.stack(ids)
    base = lm(ids).logits
    for t in range(ids.shape[1] - 1):
        changed = ids.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % (VOCAB - 2) + 2
        moved = lm(changed).logits
        torch.testing.assert_close(moved[:, : t + 1], base[:, : t + 1])
        assert not torch.allclose(moved[:, t + 1 :], base[:, t + 1 :]), f"tokens after {t} change nothing"


@torch.no_grad()
def test_loss_is_the_mean_next_token_nll_with_ignored_labels(lm):
    ids = torch.stack(prompts([11, 11], seed=4))
    labels = ids.clone()
    labels[0, 3] = -100
    out = lm(ids, labels=labels)
    logp = F.log_softmax(out.logits.float(), dim=-1)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(10) if labels[b, t + 1] != -100]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())
    assert out.logits.shape == (2, 11, VOCAB)


@torch.no_grad()
@pytest.mark.parametrize("prompt_length", [1, 3, 4, 6])
def test_greedy_generate_is_repeated_argmax_of_forward(lm, prompt_length):
    prompt = prompts([prompt_length], seed=prompt_length)[0][None]
    out = lm.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert torch.equal(lm.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None), out)
    ids = prompt
    for _ in range(10):
        ids = torch.cat([ids, lm(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


@torch.no_grad()
def test_cached_scores_equal_uncached_scores_on_a_left_padded_batch(lm):
    ids, mask = left_pad(prompts([2, 5, 7], seed=5))
    settings = {"max_new_tokens": 11, "do_sample": False, "eos_token_id": None, "output_scores": True,
                "return_dict_in_generate": True}
    cached = lm.generate(ids, attention_mask=mask, use_cache=True, **settings)
    uncached = lm.generate(ids, attention_mask=mask, use_cache=False, **settings)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores))


@torch.no_grad()
def test_a_left_padded_batch_computes_what_its_rows_compute_alone(lm):
    rows = prompts([3, 6, 9], seed=6)
    ids, mask = left_pad(rows)
    logits = lm(ids, attention_mask=mask).logits
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, eos_token_id=None)
    for i, row in enumerate(rows):
        alone = lm(row[None]).logits[0]
        torch.testing.assert_close(logits[i, -len(row) :], alone)
        single = lm.generate(row[None], max_new_tokens=9, do_sample=False, eos_token_id=None)
        assert torch.equal(out[i, -(len(row) + 9) :], single[0])


@torch.no_grad()
def test_assisted_decoding_and_prompt_lookup_keep_the_targets_greedy_output():
    target = make_lm()
    assistant = make_lm(depth_num_layers=1)  # another tokens-mode model with the same vocabulary
    prompt = torch.tensor([[5, 6, 7, 5, 6, 7, 5]])
    expected = target.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=None)
    drafted = target.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=None, assistant_model=assistant)
    looked_up = target.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=None, prompt_lookup_num_tokens=3)
    assert torch.equal(drafted, expected) and torch.equal(looked_up, expected)


@torch.no_grad()
def test_the_cache_crops_back_to_what_a_fresh_prefill_holds():
    model = make_lm()
    ids = prompts([14], seed=8)[0][None]
    out = model(ids[:, :5], use_cache=True)
    cache = out.cache
    model(ids[:, 5:12], cache=cache, use_cache=True)
    for keep in (11, 9, 8, 6):  # each rollback is followed by another token than the one cropped
        cache.crop(keep - cache.get_seq_length())
        other = (ids[:, keep : keep + 1] + 5) % (VOCAB - 2) + 2
        step = model(other, cache=cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, model(torch.cat([ids[:, :keep], other], 1)).logits[:, -1])
        cache.crop(-1)


@torch.no_grad()
def test_beam_search_with_the_cache_equals_beam_search_without():
    model = make_lm()
    ids, mask = left_pad(prompts([3, 6], seed=9))
    settings = {"max_new_tokens": 7, "num_beams": 3, "num_return_sequences": 2, "do_sample": False, "eos_token_id": None}
    cached = model.generate(ids, attention_mask=mask, use_cache=True, **settings)
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **settings)
    assert cached.shape == (4, ids.shape[1] + 7) and torch.equal(cached, uncached)


@torch.no_grad()
def test_logits_processors_act_on_tokens():
    model = make_lm()
    prompt = prompts([5], seed=10)[0][None]
    greedy = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, 5:]
    banned = int(greedy[0])
    no_bad = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, bad_words_ids=[[banned]])
    assert banned not in no_bad[0, 5:].tolist()
    # EOS as the greedy choice at the first step: min_new_tokens holds it off, and it ends a row inside a chunk
    eos = int(greedy[2])
    stopped = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    assert stopped.shape[1] == 5 + 3 and int(stopped[0, -1]) == eos
    held = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=PAD, min_new_tokens=6)
    assert eos not in held[0, 5:10].tolist() and held.shape[1] >= 5 + 6
    torch.manual_seed(0)
    a = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=1.0, eos_token_id=None)
    torch.manual_seed(0)
    b = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=1.0, eos_token_id=None)
    top1 = model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=1, eos_token_id=None)
    assert torch.equal(a, b) and torch.equal(top1[0, 5:], greedy)


@torch.no_grad()
def test_streamer_receives_the_tokens_as_they_are_made():
    model, streamer = make_lm(), Collect()
    prompt = prompts([6], seed=11)[0][None]
    out = model.generate(prompt, max_new_tokens=9, do_sample=False, eos_token_id=None, streamer=streamer)
    assert streamer.chunks[0].tolist() == prompt[0].tolist() and streamer.ended
    assert torch.cat(streamer.chunks[1:]).tolist() == out[0, 6:].tolist() and len(streamer.chunks) == 1 + 9


def test_training_steps_lower_the_loss_and_reach_every_part():
    model = make_lm("token_and_code_embeddings").train()
    ids = torch.stack(prompts([16, 16, 16, 16], seed=12))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        for name in ("spatial.layers.0.mlp.up_proj.weight", "depth.layers.0.mlp.up_proj.weight", "chunk_proj.weight",
                     "code_embed.0.weight", "token_head.weight", "start"):  # fmt: skip
            assert model.get_parameter(name).grad.abs().sum() > 0, name
        optimizer.step()
    assert loss.item() < 0.7 * first  # 3.7 -> 2.3 nats when measured
    assert not any(p.requires_grad for p in model.vae.parameters())


def test_save_load_and_remote_code_give_identical_generations(tmp_path):
    model = make_lm("token_and_code_embeddings")
    prompt = prompts([6], seed=13)[0][None]
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is RQTransformerForCausalLM and loaded.config.depth_output == "tokens"
    assert torch.equal(loaded.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None), expected)
    assert_remote_code_generates(tmp_path, prompt, expected)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"depth_output": "words"}, "depth_output must be one of codes, tokens"),
        ({"depth_output": "codes", "spatial_input": "token_embeddings"}, "needs depth_output='tokens'"),
        ({"depth_output": "tokens", "depth_mode": "parallel"}, "the token decoder is autoregressive"),
        ({"depth_output": "tokens", "aux_token_loss_weight": 0.5}, "aux_token_loss_weight is for depth_output='codes'"),
    ],
)
def test_bad_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        RQTransformerConfig(backbone_config=backbone(), vae_config=make_vae().config, **overrides)


@torch.no_grad()
def test_bad_input_is_a_one_line_error():
    model = make_lm()
    with pytest.raises(ValueError, match="all padding"):
        model(torch.tensor([[3, 4]]), attention_mask=torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="contiguous"):
        model(torch.tensor([[3, 4, 5]]), attention_mask=torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="does not take"):
        model(torch.tensor([[3, 4, 5]]), output_attentions=True)
    limit = 64 * C - 1  # the spatial model's 64 positions: a start and 63 finished chunks
    model(torch.randint(2, VOCAB, (1, limit)))
    with pytest.raises(ValueError, match="more than the model's 64"):
        model(torch.randint(2, VOCAB, (1, limit + 1)))
    with pytest.raises(ValueError, match="more than the model's 64"):
        model.generate(torch.randint(2, VOCAB, (1, limit - 2)), max_new_tokens=4, eos_token_id=None)
