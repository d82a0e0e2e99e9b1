"""Lossless latent drafting on tiny models: greedy identity, fresh drafts after rejections, the sampling distribution."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.stats
import torch
from test_rq_transformer import EOS, PAD, VOCAB, C, backbone, make_lm, make_vae
from transformers import GenerationConfig, GenerationMixin, Qwen3ForCausalLM
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.logits_process import TopKLogitsWarper

import rqlm.kernels.lean_stack
import rqlm.modeling.layers
from rqlm.drafting.verification import DraftStats, generate_with_drafter
from rqlm.kernels import cpu_kernels, prepacked
from rqlm.kernels.prepacked import prepacked_linears
from rqlm.modeling.generation_rq_transformer import CodesState
from rqlm.modeling.transformers_private import SUPPORTED_TRANSFORMERS

NEW = 16


@pytest.fixture(scope="module")
def drafter():
    """An RQ model whose drafts depend on the context (its VAE decoder sees the previous chunk's tokens)."""
    return make_lm(make_vae(layers=1, decoder_sees_previous_tokens=True), spatial_input="quantized")


@pytest.fixture(scope="module")
def target(drafter):
    """A tiny Qwen3 fitted for a few steps to the drafter's continuations: it agrees with some drafted tokens, not all."""
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(2, VOCAB, (1, 4 + i % 9), generator=g) for i in range(24)]
    rows = [drafter.generate(ids, max_new_tokens=2 * C, do_sample=False, eos_token_id=None)[0] for ids in contexts]
    width = max(len(r) for r in rows)
    text = torch.full((len(rows), width), PAD)
    labels, mask = torch.full_like(text, -100), torch.zeros_like(text)
    for i, row in enumerate(rows):
        text[i, : len(row)], mask[i, : len(row)] = row, 1
        labels[i, len(row) - 2 * C : len(row)] = row[-2 * C :]  # the loss on the drafter's tokens only
    torch.manual_seed(5)
    model = Qwen3ForCausalLM(backbone())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = model(text, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def prompt(length: int, seed: int, with_eos: bool = False) -> torch.LongTensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (1, length), generator=g)
    if with_eos:
        ids[0, length // 2] = EOS  # a document separator inside the prompt
    return ids


def plain_and_drafted(target, drafter, ids, num_draft_tokens=None, kernels=True, **kwargs):
    settings = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": PAD, **kwargs}
    stats = DraftStats()
    with cpu_kernels(target, drafter, enabled=kernels):
        drafted = generate_with_drafter(
            target, drafter, ids, num_draft_tokens=num_draft_tokens, stats=stats, **settings
        )
    return target.generate(ids, **settings), drafted, stats


def assert_drafts_fresh_and_kept_where_target_agrees(output, stats, fresh_draft):
    """The drafter's side of a greedy run whose output (1, T) is the target's: each step's draft is
    `fresh_draft(accepted ids, n)`, a stateless draft of the text accepted by then, and the target kept it up to
    its first token the output disagrees with (fewer only where the output ends); steps advance by kept + 1."""
    ends = [*stats.contexts[1:], output.shape[1]]
    for start, end, draft, kept in zip(stats.contexts, ends, stats.drafts, stats.accepted, strict=True):
        assert end == start + kept + 1, (start, end, kept)
        if draft:
            assert draft == fresh_draft(output[:, :start], len(draft)), (start, draft)
        following = output[0, start : start + len(draft)].tolist()
        agree = next((i for i, (d, t) in enumerate(zip(draft, following)) if d != t), len(following))
        assert kept == min(agree, output.shape[1] - start - 1), (start, draft, following, kept)


def fresh_rq_draft(drafter, eos_token_id=None):
    """`fresh_draft` for an RQ drafter: its `generate` from the accepted ids, with no state kept between calls."""

    def draft(context: torch.LongTensor, n: int) -> list[int]:
        out = drafter.generate(context, max_new_tokens=n, do_sample=False, eos_token_id=eos_token_id)
        return out[0, context.shape[1] :].tolist()

    return draft


@pytest.mark.parametrize(
    ("length", "with_eos", "num_draft_tokens"),
    [(8, False, C), (5, False, C), (7, True, C), (1, False, C), (6, True, 2 * C + 1)],  # a multiple of C, and not
)
def test_greedy_output_is_the_targets(target, drafter, length, with_eos, num_draft_tokens):
    ids = prompt(length, seed=length, with_eos=with_eos)
    plain, drafted, stats = plain_and_drafted(target, drafter, ids, eos_token_id=None, num_draft_tokens=num_draft_tokens)
    assert torch.equal(drafted, plain)
    assert sum(a + 1 for a in stats.accepted) == NEW and stats.steps < NEW  # some drafted tokens were kept
    # the output is the target's whatever the drafts are: the drafts and the kept counts are the drafter's test
    assert_drafts_fresh_and_kept_where_target_agrees(drafted, stats, fresh_rq_draft(drafter))


def onednn_calls(layer, x) -> int:
    """How many oneDNN linear ops `layer(x)` runs (the profiler's record of the ops actually called)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        layer(x)
    return sum(e.count for e in profile.key_averages() if e.key == "mkldnn::_linear_pointwise")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
@torch.no_grad()
def test_prepacked_linears_compute_the_same_products_and_leave_nothing_behind(target, small_layers_prepacked):
    linears = [m for m in target.modules() if type(m) is torch.nn.Linear]
    own = target.model.layers[0].mlp.up_proj
    own.forward = own.forward  # a layer with its own forward (as hooks and adapters give it) is left alone
    q = target.model.layers[0].self_attn.q_proj
    g = torch.Generator().manual_seed(0)
    many, one = torch.randn(2, 5, q.in_features, generator=g), torch.randn(1, 1, q.in_features, generator=g)
    ids = prompt(9, seed=1)
    before = (q(many), q(one), target(ids).logits)
    try:
        with prepacked_linears(target) as reordered:
            assert reordered == len(linears) - 1
            assert all(("forward" in vars(m)) for m in linears)
            torch.testing.assert_close(q(many), before[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(q(one), before[1])  # 1 row: F.linear, as without the context
            wide = torch.randn(prepacked.MAX_ROWS + 1, q.in_features, generator=g)  # where MKL is efficient again
            assert [onednn_calls(q, x) for x in (one, many, wide)] == [0, 1, 0]
            with torch.enable_grad():  # training: F.linear, so the weight gets its gradient
                assert onednn_calls(q, many) == 0 and q(many).requires_grad
            torch.testing.assert_close(target(ids).logits, before[2], rtol=1e-4, atol=1e-4)
        assert [m for m in linears if "forward" in vars(m)] == [own]
        with prepacked_linears(target):  # the reordered weights are kept, and redone once a weight changes
            kept = q.forward.args[1]
        with prepacked_linears(target):
            assert q.forward.args[1] is kept
        q.weight.mul_(2)
        with prepacked_linears(target):
            renewed = q.forward.args[1]
            torch.testing.assert_close(q(many), 2 * before[0], rtol=1e-5, atol=1e-5)
        with prepacked_linears(target):
            assert renewed is not kept and q.forward.args[1] is renewed
        prepacked.MIN_BYTES = 2**21  # the default: the tiny target's weights are all smaller, none is reordered
        with prepacked_linears(target) as reordered:
            assert reordered == 0 and not any("forward" in vars(m) for m in linears if m is not own)
    finally:
        del own.forward
        q.weight.div_(2)  # exact: the module-scoped target is shared


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("kernels", [True, False])
def test_the_verification_runs_the_targets_multi_row_linears_prepacked(target, drafter, kernels, small_layers_prepacked):
    q = target.model.layers[0].self_attn.q_proj
    calls = []  # (rows, reordered) of every q_proj call
    hook = q.register_forward_pre_hook(lambda m, args: calls.append((args[0].numel() // m.in_features, "forward" in vars(m))))
    try:
        plain, drafted, stats = plain_and_drafted(target, drafter, prompt(6, seed=6), eos_token_id=None, kernels=kernels)
    finally:
        hook.remove()
    assert torch.equal(drafted, plain) and sum(stats.accepted) > 0
    assert_drafts_fresh_and_kept_where_target_agrees(drafted, stats, fresh_rq_draft(drafter))
    reordered_rows = {rows for rows, reordered in calls if reordered}
    assert reordered_rows >= ({C + 1} if kernels else set()) and (kernels or not reordered_rows)
    assert "forward" not in vars(q)


def test_a_tokens_mode_drafter_is_verified_through_assisted_decoding_with_its_steps_counted(target):
    """`rqlm generate --verify-with` with train-lm's default drafter (tokens mode): the target's greedy output, and
    one DraftStats step per target forward whose kept tokens add up to the new ones (it once raised AttributeError)."""
    from test_rq_tokens_mode import make_lm as make_tokens_lm

    drafter = make_tokens_lm()
    ids, stats, forwards = prompt(9, seed=5), DraftStats(), []
    settings = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": PAD, "eos_token_id": None}
    hook = target.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        drafted = generate_with_drafter(target, drafter, ids, stats=stats, **settings)
    finally:
        hook.remove()
    assert torch.equal(drafted, target.generate(ids, **settings))
    assert stats.steps == len(forwards) > 1 and stats.compression_factor == C
    assert sum(a + 1 for a in stats.accepted) == drafted.shape[1] - ids.shape[1] == NEW
    assert all(0 <= a <= C for a in stats.accepted) and stats.contexts[0] == ids.shape[1]


def test_generate_and_drafting_run_the_lean_stack_forward_with_the_same_output(target, drafter, monkeypatch):
    """Under `cpu_kernels` (and only there) the RQ model's stacks (spatial, depth, VAE decoder) step through
    `lean_forward` in generation; same ids."""
    calls = []
    lean = rqlm.kernels.lean_stack.lean_forward
    monkeypatch.setattr(rqlm.kernels.lean_stack, "lean_forward", lambda stack, *a: calls.append(stack) or lean(stack, *a))
    ids = prompt(11, seed=3)
    want_rq = drafter.generate(ids, max_new_tokens=12, do_sample=False)
    want_drafted = generate_with_drafter(target, drafter, ids, max_new_tokens=12, do_sample=False)
    assert not calls
    with cpu_kernels(target, drafter):
        assert torch.equal(drafter.generate(ids, max_new_tokens=12, do_sample=False), want_rq)
        assert {id(s) for s in calls} >= {id(drafter.spatial), id(drafter.depth), id(drafter.vae.decoder)}
        assert torch.equal(generate_with_drafter(target, drafter, ids, max_new_tokens=12, do_sample=False), want_drafted)
    assert rqlm.modeling.layers.Qwen3Stack.inference_kernel is None  # the switch is off again


def test_greedy_stops_at_eos_where_the_target_does(target, drafter):
    ids = prompt(7, seed=3)
    free = target.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    eos = int(free[0, ids.shape[1] + 9])  # a token the target emits mid-way stands in for EOS
    plain, drafted, stats = plain_and_drafted(target, drafter, ids, eos_token_id=eos)
    assert plain.shape[1] < free.shape[1] and int(plain[0, -1]) == eos
    assert torch.equal(drafted, plain) and sum(stats.accepted) > 0
    assert_drafts_fresh_and_kept_where_target_agrees(drafted, stats, fresh_rq_draft(drafter, eos))


@pytest.mark.parametrize("num_draft_tokens", [None, 2 * C + 1])
def test_every_draft_continues_the_accepted_text_after_rejections_inside_chunks(target, drafter, num_draft_tokens):
    """Each draft is the drafter's fresh `generate` from the accepted ids, also when they end inside a chunk:
    the state kept per chunk layout grows by the accepted chunks and forgets its drafted ones."""
    inside = 0
    for length in (5, 7):
        ids = prompt(length, seed=10 + length)
        _, drafted, stats = plain_and_drafted(target, drafter, ids, eos_token_id=None, num_draft_tokens=num_draft_tokens)
        inside += stats.rejections_inside_a_chunk
        assert_drafts_fresh_and_kept_where_target_agrees(drafted, stats, fresh_rq_draft(drafter))
        assert sum(stats.accepted) > 0  # some drafted tokens were kept: the drafts are exercised
    assert inside > 0  # an accepted prefix ended inside a drafted chunk


@pytest.mark.parametrize("layers", [0, 1])  # a chunk-local encoder, and encoder/latent/decoder layers with caches
def test_kept_state_grows_and_rolls_back_to_what_a_fresh_prompt_gives(layers):
    """`CodesState.extend` by accepted chunks, after drafted chunks were appended and rolled back, holds the codes and
    the spatial output a fresh `CodesState` of the whole text computes, and drafts what it drafts."""
    lm = make_lm(make_vae(layers=layers, decoder_sees_previous_tokens=True), spatial_input="quantized")
    text = prompt(3 * C + 2, seed=layers)
    greedy = lm._depth_processors(GenerationConfig(do_sample=False), {}, None, text.device)
    kept = CodesState(lm, text[:, : C + 2], torch.ones_like(text[:, : C + 2]), use_cache=True)
    for end in (2 * C + 2, 3 * C + 2):
        mark = kept.mark()
        for _ in range(2):  # two drafted chunks, then forgotten
            kept.append(lm._sample_codes(kept.hidden(), greedy))
        kept.rollback(mark)
        kept.extend(text[:, end - C : end])
        fresh = CodesState(lm, text[:, :end], torch.ones_like(text[:, :end]), use_cache=True)
        assert torch.equal(kept.codes, fresh.codes) and torch.equal(kept.tokens, fresh.tokens)
        torch.testing.assert_close(kept.hidden(), fresh.hidden(), rtol=1e-4, atol=1e-5)
        mark = kept.mark()
        drafted = [s.append(lm._sample_codes(s.hidden(), greedy)) for s in (kept, fresh) for _ in range(2)]
        assert torch.equal(torch.cat(drafted[:2], 1), torch.cat(drafted[2:], 1))
        kept.rollback(mark)


def test_batches_and_other_vocabularies_are_one_line_errors(target, drafter):
    ids = torch.randint(2, VOCAB, (2, 8))
    with pytest.raises(ValueError, match="batch 1"):
        generate_with_drafter(target, drafter, ids, max_new_tokens=4)
    other = Qwen3ForCausalLM(backbone(vocab_size=VOCAB + 2)).eval()
    with pytest.raises(ValueError, match="draft with a model trained on the target's tokenizer"):
        generate_with_drafter(other, drafter, ids[:1], max_new_tokens=4)


def test_a_release_without_the_private_assisted_loop_is_a_one_line_error_naming_the_supported_range(
    target, drafter, monkeypatch
):
    """The private assisted loop, or what it reads of a candidate generator, moved: one line with the tested range."""
    ids = prompt(6, seed=1)
    monkeypatch.delattr(CandidateGenerator, "requires_model_outputs")  # read by the loop of 5.24 and 5.25
    with pytest.raises(RuntimeError, match=f"rqlm supports transformers{re.escape(SUPPORTED_TRANSFORMERS)}") as error:
        generate_with_drafter(target, drafter, ids, max_new_tokens=4)
    assert "requires_model_outputs" in str(error.value) and "\n" not in str(error.value)
    monkeypatch.undo()
    monkeypatch.delattr(GenerationMixin, "_assisted_decoding")
    with pytest.raises(RuntimeError, match="no _assisted_decoding.*rqlm supports transformers>="):
        generate_with_drafter(target, drafter, ids, max_new_tokens=4)
    assert "_get_candidate_generator" not in vars(target)  # the stand-in leaves the target with the call


# ----------------------------------------------------------------- sampling keeps the target's distribution
TOP_K, SAMPLES = 2, 200


def first_two_distribution(target, ids) -> dict[tuple[int, int], float]:
    """The target's exact top-k sampling probability of every pair of first two new tokens."""
    warp = TopKLogitsWarper(TOP_K)
    probs = {}
    first = warp(ids, target(ids).logits[:, -1].detach()).softmax(-1)[0]
    for a in first.nonzero().flatten().tolist():
        longer = torch.cat([ids, torch.tensor([[a]])], dim=1)
        second = warp(longer, target(longer).logits[:, -1].detach()).softmax(-1)[0]
        for b in second.nonzero().flatten().tolist():
            probs[(a, b)] = float(first[a] * second[b])
    return probs


def chi_square_p_value(counts: dict, probs: dict, n: int) -> float:
    """Pearson's chi-square test of `n` observed `counts` against `probs` over its cells: the upper-tail p-value."""
    assert sum(counts.values()) == n == sum(counts.get(cell, 0) for cell in probs)  # no sample outside the support
    cells = list(probs)
    expected = np.array([probs[cell] for cell in cells])
    expected *= n / expected.sum()  # the float32 product probabilities sum to 1 only up to rounding
    return float(scipy.stats.chisquare([counts.get(cell, 0) for cell in cells], expected).pvalue)


@torch.no_grad()
def test_sampling_keeps_the_targets_distribution(target, drafter):
    """Pearson's test of the first two sampled tokens against the target's exact top-k distribution.

    One token is drafted (max_new_tokens=2 leaves room for it and the target's own): the first token goes
    through the acceptance rule, the second is the target's token after it.
    """
    # a prompt where the drafter's greedy token is likely under the target, so drafts are kept some of the time
    for seed in range(200):
        ids = prompt(6, seed=seed)
        probs = first_two_distribution(target, ids)
        draft = int(drafter.generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=None)[0, -1])
        if 0.2 < sum(p for (a, _), p in probs.items() if a == draft) < 0.9:
            break
    else:
        pytest.fail("no prompt where the drafter proposes a likely token")
    torch.manual_seed(0)
    counts, kept = {}, 0
    for _ in range(SAMPLES):
        stats = DraftStats()
        out = generate_with_drafter(
            target, drafter, ids, max_new_tokens=2, do_sample=True, top_k=TOP_K,
            eos_token_id=None, pad_token_id=PAD, stats=stats,
        )
        pair = tuple(out[0, ids.shape[1] : ids.shape[1] + 2].tolist())
        counts[pair] = counts.get(pair, 0) + 1
        kept += stats.accepted[0]
    assert SAMPLES * 0.1 < kept < SAMPLES * 0.95  # drafts were kept and rejected: the acceptance rule is exercised
    assert chi_square_p_value(counts, probs, SAMPLES) > 1e-3, (counts, probs)


# ----------------------------------------------------------------- rqlm generate --verify-with
def continuation(out: str) -> str:
    """What `rqlm generate` streamed: the text between its header line and the speed lines."""
    return out.split("---\n", 1)[1].split("\n\nmodel:")[0]


def test_generate_verify_with_prints_the_targets_greedy_text(tmp_path, capsys):
    from test_generate_cli import PROMPT, save_baseline, save_rq_model

    from rqlm.cli import main
    from rqlm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    save_rq_model(tmp_path / "rq", tokenizer)
    save_baseline(tmp_path / "target", tokenizer)
    capsys.readouterr()
    common = [PROMPT, "--max_new_tokens", "10"]
    assert main(["generate", *common, "--model", str(tmp_path / "target")]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", *common, "--model", str(tmp_path / "rq"), "--verify-with", str(tmp_path / "target")]) == 0
    verified = capsys.readouterr().out
    assert continuation(verified) == continuation(plain) and PROMPT in continuation(plain)
    assert "drafted by" in verified and "acceptance" in verified.splitlines()[-1]
    for argv, message in [
        (["--model", str(tmp_path / "target"), "--verify-with", str(tmp_path / "target")], "'qwen3' checkpoint"),
        (["--model", str(tmp_path / "rq"), "--verify-with", str(tmp_path / "rq")], "is an RQ model"),
        (["--model", str(tmp_path / "rq"), "--verify-with", str(tmp_path / "target"), "--draft_tokens", "0"], "--draft_tokens"),
    ]:
        assert main(["generate", *common, *argv]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


# ----------------------------------------------------------------- rqlm bench --drafting
def test_bench_drafting_quick_prints_the_table_and_the_summary_line(tmp_path, capsys):
    import json
    import re

    from rqlm.cli import main

    output = tmp_path / "drafting.json"
    argv = [
        "bench", "--drafting", "--quick", "--threads", "1", "--draft_tokens", "4,9",
        "--output_json", str(output),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"drafting speedup batch 1: \d+\.\d\dx \(acceptance \d+\.\d\d tokens/step, target \d+ tok/s\)", out[-1])
    rows = json.loads(output.read_text())["rows"]
    assert [r["draft_tokens"] for r in rows] == [4, 9]
    for row in rows:
        assert row["identical"] and 1 <= row["acceptance"] <= row["draft_tokens"] + 1 and row["verified_tokens_per_second"] > 0
        assert 0 <= row["kept_share"] <= 1 and 1 < row["bound_on_target_text"] < float("inf")
    assert sum(line.startswith("| RQ test C=4") and line.endswith("| yes |") for line in out) == 2
    assert json.loads(output.read_text())["cpu_kernels"] and any(line.endswith("CPU kernels on") for line in out)
    base = argv[: argv.index("--draft_tokens")]
    assert main([*base, "--no_cpu_kernels", "--output_json", str(output)]) == 0
    assert not json.loads(output.read_text())["cpu_kernels"] and "CPU kernels off" in capsys.readouterr().out
    assert main([*base, "--draft_tokens", "0"]) == 1


def test_generate_takes_any_causal_lm_folder_as_the_model(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rqlm.cli import main
    from rqlm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    capsys.readouterr()
    assert main(["generate", "def main():", "--model", str(tmp_path / "llama"), "--max_new_tokens", "5"]) == 0
    ids = tokenizer("def main():", add_special_tokens=False, return_tensors="pt")["input_ids"]
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(expected[0], skip_special_tokens=True) in capsys.readouterr().out
    assert main(["generate", "def main():", "--model", str(tmp_path / "llama"), "--max_new_tokens", "80"]) == 1
    assert "exceeds the 64 positions of --model" in capsys.readouterr().err


# ----------------------------------------------------------------- rqlm distill-data
def test_distill_data_writes_the_targets_greedy_continuations_of_training_text_and_resumes(tmp_path, capsys):
    import json

    from test_generate_cli import save_baseline, save_rq_model

    from rqlm.cli import main
    from rqlm.commands.distill_data import prompt_windows
    from rqlm.data.loading import load_text_dataset
    from rqlm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    target = save_baseline(tmp_path / "target", tokenizer)
    out = tmp_path / "distill.jsonl"
    argv = ["distill-data", "--target", str(tmp_path / "target"), "--output", str(out), "--prompts", "5",
            "--prompt_length", "8", "--new_tokens", "6", "--batch_size", "2"]  # fmt: skip
    assert main(argv) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 5
    train = list(load_text_dataset(None)["train"]["text"])
    documents = tokenizer(train, add_special_tokens=False)["input_ids"]
    prompts = prompt_windows(documents, 5, 8, seed=0)
    assert prompt_windows(documents, 7, 8, seed=0)[:5] == prompts != prompt_windows(documents, 5, 8, seed=1)
    for line, ids in zip(lines, prompts):
        ids = torch.tensor([ids])
        greedy = target.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.eos_token_id)[0].tolist()  # fmt: skip
        if tokenizer.eos_token_id in greedy[8:]:
            greedy = greedy[: greedy.index(tokenizer.eos_token_id, 8)]
        assert json.loads(line)["text"] == tokenizer.decode(greedy)
    # a killed run (two lines and a half-written one) continues with the same prompts
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    assert main(argv) == 0
    assert out.read_text().splitlines() == lines
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    save_rq_model(tmp_path / "rq", tokenizer)
    capsys.readouterr()
    for change, message in [
        (["--output", str(tmp_path / "d.txt")], "must be a .jsonl file"),
        (["--prompts", "0"], "--prompts must be at least 1"),
        (["--target", str(tmp_path / "rq")], "is a latent LM"),
        (["--target", str(tmp_path / "missing")], "does not exist"),
    ]:
        assert main([*argv, *change]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@torch.no_grad()
def test_a_tokens_mode_drafter_is_measured_through_transformers_assisted_decoding(target):
    """The bench's row for a tokens-mode drafter: `assistant_model`, the target's greedy text, and acceptance read from
    the calls it made (steps = the target's forwards, so tokens / steps is at most draft length + 1)."""
    from test_rq_tokens_mode import make_lm as make_tokens_lm

    from rqlm.drafting.speed import Drafter, benchmark_drafting, format_drafting_table

    drafter = make_tokens_lm()
    before = drafter.generation_config.to_dict()
    prompts = [prompt(7, seed=s) for s in range(2)]
    result = benchmark_drafting(target, [Drafter("tokens", drafter)], prompts, NEW, num_draft_tokens=[3],
                                log=lambda *_: None)
    (row,) = result["rows"]
    assert row["identical"] and row["draft_tokens"] == 3
    steps_per_prompt = row["steps"] / len(prompts)
    # every verification step emits between 1 and 4 tokens: NEW tokens take between NEW / 4 and NEW steps
    assert NEW / 4 <= steps_per_prompt <= NEW and row["acceptance"] == pytest.approx(len(prompts) * NEW / row["steps"])
    assert 0 <= row["kept_share"] <= 1 and 1 < row["bound_on_target_text"] < float("inf")
    # the assistant drafted at most 3 tokens a step, and at least one in every step but each prompt's last ones
    assert row["steps"] - 2 * len(prompts) <= row["drafted_tokens"] <= 3 * row["steps"]
    assert drafter.generation_config.to_dict() == before  # the assistant's own settings are restored
    assert "| tokens | 4 | 3 |" in format_drafting_table(result)
