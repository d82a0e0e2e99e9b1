"""The lm-eval adapter (`--model rqlm`): the same bound as `rqlm evaluate`, the continuation carved at a chunk
boundary, generate_until's stop strings, and the local tasks through `rqlm lm-eval`, plain `lm_eval` and
`simple_evaluate`."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from test_generate_cli import save_baseline, save_rq_model

from rqlm.cli import main
from rqlm.commands.lm_eval import with_local_tasks
from rqlm.data.loading import get_lm_datasets
from rqlm.data.tokenizer import load_tokenizer
from rqlm.evaluation.lm_eval_adapter import RQTransformerLM
from rqlm.lm_eval_tasks import TASK_NAMES, TASKS_DIR, build_task_data

C = 4  # save_rq_model's compression
CONTEXT = "def add(a, b):\n    "
CONTINUATION = "return a + b  # the sum\n"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """(root, rq model) with a random tiny RQ model in root/rq and a random tiny baseline in root/base."""
    root = tmp_path_factory.mktemp("lm_eval")
    rq = save_rq_model(root / "rq", tokenizer)
    save_baseline(root / "base", tokenizer)
    return root, rq


@pytest.fixture(scope="module")
def adapter(folders):
    return RQTransformerLM(pretrained=str(folders[0] / "rq"), device="cpu", batch_size=2)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_rolling_equals_the_bound_rqlm_evaluate_reports(folders, adapter, tokenizer, capsys):
    root, _ = folders
    output = root / "figures.json"
    argv = ["evaluate", "--model", str(root / "rq"), "--baseline", str(root / "base"), "--block_size", "32",
            "--max_eval_blocks", "3", "--num_prompts", "0", "--brier_prefixes", "0", "--output_json", str(output)]
    assert main(argv) == 0
    capsys.readouterr()
    figures = json.loads(output.read_text())
    _, blocks = get_lm_datasets(None, tokenizer, block_size=32, compression_factor=C, max_eval_blocks=3)
    ids = [row.tolist() for row in blocks[:]["input_ids"]]
    total = sum(adapter.rolling_nll(row) for row in ids)
    assert figures["num_tokens"] == sum(len(row) for row in ids)
    assert total == pytest.approx(figures["nll_bound_per_token"] * figures["num_tokens"], rel=1e-6)

    # through lm-eval's string interface: a block whose text re-encodes to the same tokens
    texts = [(row, tokenizer.decode(row)) for row in ids]
    same = [(row, text) for row, text in texts if adapter.tok_encode(text) == row]
    assert same, "no held-out block survives decode -> encode unchanged"
    row, text = same[0]
    (rolling,) = adapter.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)
    assert rolling == pytest.approx(-adapter.rolling_nll(row), rel=1e-9)
    ((empty_context, _),) = adapter.loglikelihood([request("loglikelihood", "", text)], disable_tqdm=True)
    assert empty_context == pytest.approx(rolling, rel=1e-9)  # "" + text is scored from the start position


def continuation_terms(model, prefix: list[int], continuation: list[int]) -> float:
    """The bound's terms of the continuation alone, from the model's logits: code NLL of the chunks after the
    prefix + reconstruction NLL of the continuation's tokens (the padding of the last chunk left out)."""
    whole = prefix + continuation
    padding = -len(whole) % C
    ids = torch.tensor([whole + [0] * padding])
    mask = torch.ones_like(ids)
    mask[:, len(whole) :] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        first = len(prefix) // C
        log_pz = out.logits[0, first:].float().log_softmax(-1)  # (L', D, K)
        nll_codes = -log_pz.gather(-1, out.codes[0, first:, :, None]).sum()
        logits = model.vae.decode(out.codes.clamp(min=0))[0, len(prefix) : len(whole)]  # (n, V)
        nll_recon = F.cross_entropy(logits.float(), torch.tensor(continuation), reduction="sum")
    return float(nll_codes + nll_recon)


@pytest.mark.parametrize("context", [CONTEXT, CONTEXT + "x = 1\n    "])
def test_loglikelihood_is_the_continuations_terms_after_an_eos_padded_context(adapter, folders, context):
    _, model = folders
    ctx, cont = adapter._encode_pair(context, CONTINUATION)
    prefix = [adapter.eot_token_id] * (-len(ctx) % C) + ctx  # as generate pads a prompt
    assert len(cont) % C, "the continuation should end inside a chunk to exercise the padding"
    ((logp, _),) = adapter.loglikelihood([request("loglikelihood", context, CONTINUATION)], disable_tqdm=True)
    assert -logp == pytest.approx(continuation_terms(model, prefix, cont), rel=1e-4)
    # the documented decomposition: bound(prefix + continuation) - bound(prefix)
    assert -logp == pytest.approx(adapter.sequence_nll(prefix + cont) - adapter.sequence_nll(prefix), rel=1e-9)


def test_a_tokens_mode_model_scores_exact_log_likelihoods(tmp_path, tokenizer):
    from test_generate_cli import tiny_backbone

    from rqlm import RQTransformerForCausalLM

    vae = save_rq_model(tmp_path / "vae_lm", tokenizer).vae
    torch.manual_seed(1)
    model = RQTransformerForCausalLM.from_vae(
        vae, backbone_config=tiny_backbone(tokenizer, max_position_embeddings=64), depth_output="tokens",
        depth_hidden_size=16, depth_num_attention_heads=2,
    ).eval()  # fmt: skip
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    adapter = RQTransformerLM(pretrained=str(tmp_path / "lm"), device="cpu")
    ctx, cont = adapter._encode_pair(CONTEXT, CONTINUATION)
    ((logp, _),) = adapter.loglikelihood([request("loglikelihood", CONTEXT, CONTINUATION)], disable_tqdm=True)
    # by hand: the continuation's log-probabilities under forward, the context read after one EOS, unpadded
    ids = torch.tensor([[adapter.eot_token_id, *ctx, *cont]])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    expected = sum(logprobs[len(ctx) + i, token] for i, token in enumerate(cont))
    assert logp == pytest.approx(float(expected), rel=1e-4)
    ((rolling,),) = [adapter.loglikelihood_rolling([request("loglikelihood_rolling", CONTEXT + CONTINUATION)],
                                                   disable_tqdm=True)]  # fmt: skip
    whole = adapter.tok_encode(CONTEXT + CONTINUATION)
    ids = torch.tensor([[adapter.eot_token_id, *whole]])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    assert rolling == pytest.approx(float(logprobs.gather(1, ids[0, 1:, None]).sum()), rel=1e-4)


def test_is_greedy_says_whether_greedy_generation_gives_the_continuation(adapter, tokenizer):
    ctx = adapter.tok_encode(CONTEXT)
    (greedy,) = adapter._generate([ctx], max_new_tokens=10, do_sample=False)
    assert len(greedy) >= 2, "greedy stopped at EOS at once; pick another context"
    last_wrong = [*greedy[:-1], (greedy[-1] + 1) % len(tokenizer)]
    first_wrong = [(greedy[0] + 1) % len(tokenizer), *greedy[1:]]
    pairs = [(ctx, greedy), (ctx, last_wrong), (ctx, first_wrong), ([], greedy)]
    assert adapter.greedy_reproduces(pairs) == [True, False, False, False]  # an empty context has no prompt


def test_rolling_windows_are_whole_chunks_and_the_last_reads_a_full_window(folders):
    root, _ = folders
    small = RQTransformerLM(pretrained=str(root / "rq"), device="cpu", max_length=8)
    ids = list(range(10, 30))  # 20 tokens: windows [0, 8), [8, 16), then [16, 20) read after [12, 16)
    seq = small.sequence_nll
    expected = seq(ids[:8]) + seq(ids[8:16]) + seq(ids[12:20]) - seq(ids[12:16])
    assert small.rolling_nll(ids) == pytest.approx(expected, rel=1e-9)
    long = RQTransformerLM(pretrained=str(root / "rq"), device="cpu")
    assert long.rolling_nll(ids) == pytest.approx(seq(ids), rel=1e-9)  # one window: no cut
    for bad in ("2", "100000"):
        with pytest.raises(ValueError, match="max_length"):
            RQTransformerLM(pretrained=str(root / "rq"), max_length=bad)
    with pytest.raises(ValueError, match="batch_size auto"):
        RQTransformerLM(pretrained=str(root / "rq"), batch_size="auto")


def test_generated_ids_end_before_the_first_eos(adapter, monkeypatch):
    """`_generate` returns each row's new ids up to (not including) its first EOS, whatever `generate` put after it."""
    eos = adapter.eot_token_id
    a, b = eos + 1, eos + 2
    new = torch.tensor([[a, eos, b, eos], [a, b, a, b], [eos, a, eos, b]])  # (3, 4): what generate appended
    monkeypatch.setattr(adapter.model, "generate", lambda input_ids, **kwargs: torch.cat([input_ids, new], dim=1))
    assert adapter._generate([[a], [a, b], [b]], max_new_tokens=4) == [[a], [a, b, a, b], []]


def test_generate_until_is_generate_cut_at_the_first_stop_string(adapter, folders):
    _, model = folders
    ids = torch.tensor([adapter.tok_encode(CONTEXT)])
    full = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=adapter.eot_token_id)
    text = adapter.tok_decode([t for t in full[0, ids.shape[1] :].tolist() if t != adapter.eot_token_id])
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip() and text.index(stop) > 0, repr(text)
    settings = {"max_gen_toks": 12, "do_sample": False}
    results = adapter.generate_until(
        [request("generate_until", CONTEXT, {**settings, "until": ["never there"]}),
         request("generate_until", CONTEXT, {**settings, "until": [stop]}),
         request("generate_until", CONTEXT, {**settings, "until": ["never there"], "max_gen_toks": 3})],
        disable_tqdm=True,
    )
    assert results[0] == text
    assert results[1] == text[: text.index(stop)]
    assert len(adapter.tok_encode(results[2])) <= 3 and text.startswith(results[2])


def finite_metrics(output_dir) -> dict[str, dict]:
    """{task: {metric: value}} of the one results file lm-eval wrote under output_dir; every value finite."""
    (path,) = list(output_dir.rglob("results_*.json"))
    results = json.loads(path.read_text())["results"]
    for task, metrics in results.items():
        values = {k: v for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k}
        assert values and all(math.isfinite(v) for v in values.values()), (task, metrics)
    return results


def test_local_tasks_run_through_rqlm_lm_eval_and_plain_lm_eval(folders, monkeypatch, capsys):
    root, _ = folders
    tasks = ",".join(TASK_NAMES)
    common = ["--tasks", tasks, "--limit", "3", "--device", "cpu", "--batch_size", "2"]
    argv = ["lm-eval", "--model", "rqlm", "--model_args", f"pretrained={root / 'rq'}", *common,
            "--output_path", str(root / "out_rq")]
    assert main(argv) == 0
    rq = finite_metrics(root / "out_rq")
    assert {"bits_per_byte,none", "word_perplexity,none"} <= set(rq["rqlm_heldout_text"])
    assert 0 <= rq["rqlm_next_paragraph"]["acc,none"] <= 1

    from lm_eval.__main__ import cli_evaluate

    monkeypatch.setattr(sys, "argv", ["lm-eval", "--model", "hf", "--model_args", f"pretrained={root / 'base'}",
                                      *common, "--include_path", str(TASKS_DIR), "--output_path", str(root / "out_hf")])
    cli_evaluate()
    base = finite_metrics(root / "out_hf")
    assert set(base) == set(rq) == set(TASK_NAMES)
    capsys.readouterr()


def test_simple_evaluate_takes_the_adapter_object(folders, tokenizer):
    import lm_eval
    from lm_eval.tasks import TaskManager

    _, model = folders
    lm = RQTransformerLM(pretrained=model, tokenizer=tokenizer, device="cpu")
    tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)  # skip indexing lm-eval's own tasks
    out = lm_eval.simple_evaluate(model=lm, tasks=["rqlm_next_paragraph"], limit=2, task_manager=tasks)
    assert math.isfinite(out["results"]["rqlm_next_paragraph"]["acc,none"])


def test_task_data_are_deterministic_and_small(tmp_path):
    first = build_task_data(tmp_path / "a")
    second = build_task_data(tmp_path / "b")
    for task in TASK_NAMES:
        assert first[task].read_bytes() == second[task].read_bytes()
    questions = [json.loads(line) for line in first["rqlm_next_paragraph"].read_text().splitlines()]
    texts = [json.loads(line) for line in first["rqlm_heldout_text"].read_text().splitlines()]
    assert 10 <= len(questions) <= 100 and 10 <= len(texts) <= 100
    for q in questions:
        assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4 and 0 <= q["label"] < 4


def test_local_task_folder_is_added_only_without_an_include_path():
    argv = ["--model", "rqlm", "--tasks", "x"]
    assert with_local_tasks(argv) == [*argv, "--include_path", str(TASKS_DIR)]
    mine = [*argv, "--include_path", "/my/tasks"]
    assert with_local_tasks(mine) == mine
    assert with_local_tasks([*argv, "--include_path=/my/tasks"]) == [*argv, "--include_path=/my/tasks"]
    assert with_local_tasks(["--help"]) == ["--help"]


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained folder .* does not exist"):
        RQTransformerLM(pretrained=str(tmp_path / "missing"))
