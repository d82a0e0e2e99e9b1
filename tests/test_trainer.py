"""The shared Accelerate loop and `rqlm train-baseline` on tiny models, CPU, offline.

Covers: the baseline learns and saves a folder transformers loads (with tokenizer and card);
an interrupted-then-resumed run reaches the weights of an uninterrupted one; the
`on_step_begin` hook and frozen-then-unfrozen parameters; a real two-process
`accelerate launch` run ending with identical weights on both ranks; one-line errors.
"""

import importlib.util
import itertools
import json
import os
import signal
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import launch_two_processes
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

from rqlm import cli
from rqlm.pipeline import fresh_accelerate_state
from rqlm.presets import PRESETS, backbone_config
from rqlm.trainer.arguments import (
    TrainingArguments,
    add_training_arguments,
    training_arguments_from_namespace,
)
from rqlm.trainer.loop import TRAINER_STATE_NAME, find_checkpoint, train

VOCAB = 64
BLOCK = 16


@pytest.fixture(autouse=True)
def clean_accelerate_state():
    """Each `train` call builds its own Accelerator; start every test from a clean shared state."""
    fresh_accelerate_state()
    yield
    fresh_accelerate_state()


def synthetic_blocks(num_blocks: int, seed: int = 0) -> Dataset:
    """Blocks (num_blocks, BLOCK) of a learnable pattern: counting mod 8 from a random offset."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, VOCAB, (num_blocks, 1), generator=g)
    ids = (offsets + torch.arange(BLOCK) % 8) % VOCAB
    return Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")


class HookedQwen3(Qwen3ForCausalLM):
    """A Qwen3 that records `on_step_begin`, unfreezes its first layer at a step, and can be interrupted."""

    unfreeze_at_step = None  # step at which layer 0 (frozen by the test) becomes trainable
    interrupt_at_forward = None  # send this process a SIGINT (Ctrl-C) at this training forward (1-based)
    raise_at_forward = None  # raise KeyboardInterrupt at this training forward, as a second Ctrl-C does

    def on_step_begin(self, step: int) -> None:
        self.calls = [*getattr(self, "calls", []), step]
        if step == self.unfreeze_at_step:
            self.layer0_at_unfreeze = {k: v.clone() for k, v in self.model.layers[0].state_dict().items()}
            self.model.layers[0].requires_grad_(True)

    def forward(self, *args, **kwargs):
        if self.training:
            self.forwards = getattr(self, "forwards", 0) + 1
            if self.forwards == self.interrupt_at_forward:
                os.kill(os.getpid(), signal.SIGINT)
            if self.forwards == self.raise_at_forward:
                raise KeyboardInterrupt
        return super().forward(*args, **kwargs)


def make_model(cls=Qwen3ForCausalLM, seed=0):
    torch.manual_seed(seed)
    return cls(backbone_config("test", vocab_size=VOCAB))


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------
# arguments


def test_training_flags_from_yaml_strings_and_overrides():
    import argparse

    parser = argparse.ArgumentParser()
    add_training_arguments(parser, learning_rate=5e-4, output_dir="runs/x")
    # YAML 1.1 reads "1e-3" as a string and "none" stays a string: rqlm/cli.py sets them as defaults
    parser.set_defaults(learning_rate="1e-3", save_total_limit="none", max_minutes=2)
    args = training_arguments_from_namespace(parser.parse_args(["--max_steps", "7"]))
    assert args.learning_rate == 1e-3 and args.save_total_limit is None and args.max_minutes == 2.0
    assert args.max_steps == 7 and args.output_dir == "runs/x"
    with pytest.raises(ValueError, match="--max_steps must be at least 1"):
        TrainingArguments(max_steps=0)
    with pytest.raises(TypeError, match="unknown defaults"):
        add_training_arguments(argparse.ArgumentParser(), learning_rat=1.0)


def test_shipped_baseline_config_parses():
    import argparse

    from rqlm.commands import train_baseline

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    train_baseline.add_arguments(parser)
    config = Path(__file__).resolve().parents[1] / "configs" / "baseline.yaml"
    cli._load_yaml_defaults(parser, ["--config", str(config)])  # raises on an unknown option
    args = training_arguments_from_namespace(parser.parse_args(["--max_steps", "5"]))
    assert args.max_steps == 5 and args.learning_rate == 1e-3 and args.max_minutes == 10


def test_presets():
    tiny = backbone_config("tiny", vocab_size=1000)
    assert (tiny.hidden_size, tiny.num_attention_heads, tiny.num_key_value_heads, tiny.head_dim) == (
        256,
        4,
        2,
        64,
    )
    assert tiny.tie_word_embeddings and tiny.vocab_size == 1000
    assert backbone_config("test", vocab_size=10, num_hidden_layers=1).num_hidden_layers == 1
    for name in PRESETS:  # every preset's attention is consistent: heads x head_dim = width, whole KV groups
        c = backbone_config(name, vocab_size=1000)
        assert c.num_attention_heads * c.head_dim == c.hidden_size, name
        assert c.num_attention_heads % c.num_key_value_heads == 0, name
    base = backbone_config("base", vocab_size=8192)  # the larger drafting target: 89M parameters
    h, hd = base.hidden_size, base.head_dim
    per_layer = 2 * h * base.num_attention_heads * hd + 2 * h * base.num_key_value_heads * hd + 3 * h * base.intermediate_size
    assert 88e6 < base.num_hidden_layers * per_layer + base.vocab_size * h < 90e6
    with pytest.raises(ValueError, match="needs vocab_size"):
        backbone_config("tiny")
    with pytest.raises(ValueError, match="neither a preset"):
        backbone_config("no-such-org/no-such-model-rqlm")


# ----------------------------------------------------------------------------
# (1) the baseline learns and saves a loadable folder


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    """A jsonl corpus of short repetitive documents and a 300-token BPE trained on it."""
    from rqlm.data.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("corpus")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    docs = [" ".join(words[(i + j) % len(words)] for j in range(24)) + "." for i in range(240)]
    with open(folder / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    train_tokenizer(docs, vocab_size=300, output_dir=folder / "tokenizer")
    return folder


def test_train_baseline_learns_and_saves_loadable_folder(text_corpus, tmp_path, capsys):
    out = tmp_path / "baseline"
    config = tmp_path / "baseline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dataset": str(text_corpus / "docs.jsonl"),
                "tokenizer": str(text_corpus / "tokenizer"),
                "backbone": "test",
                "block_size": 32,
                "per_device_train_batch_size": 4,
                "learning_rate": "3e-3",
                "warmup_steps": 2,
                "max_steps": 100,  # overridden on the command line below
                "logging_steps": 5,
                "eval_steps": 15,
                "eval_batches": 2,
                "save_steps": 0,
            }
        )
    )
    rc = cli.main(["train-baseline", "--config", str(config), "--max_steps", "30", "--output_dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "trained 30 steps" in capsys.readouterr().out

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert records[-1]["step"] == 30 and len(evals) == 2
    assert losses[-1] < 0.7 * losses[0] and evals[-1] < evals[0]

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = Qwen3ForCausalLM.from_pretrained(out).eval()
    auto = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer("alpha beta gamma delta", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, auto(ids).logits)
    assert (out / "model.safetensors").is_file() and (out / "training_curves.png").is_file()
    card = (out / "README.md").read_text()
    assert "| optimizer steps | 30 |" in card and "eval_loss" in card
    assert "rqlm train-baseline --dataset" in card and "--max_steps 30" in card

    # the saved weights are the final ones: they reproduce the logged final held-out loss
    from rqlm.data.loading import get_lm_datasets

    _, eval_blocks = get_lm_datasets(
        str(text_corpus / "docs.jsonl"), tokenizer, block_size=32, max_eval_blocks=2 * 8
    )
    with torch.no_grad():
        batches = [eval_blocks[i : i + 8]["input_ids"] for i in range(0, len(eval_blocks), 8)]
        sizes = [len(b) for b in batches]
        per_batch = [model(input_ids=b, labels=b).loss.item() for b in batches]
    recomputed = sum(s * loss for s, loss in zip(sizes, per_batch)) / sum(sizes)
    assert recomputed == pytest.approx(evals[-1], abs=1e-4)


# ----------------------------------------------------------------------------
# (2) resume: interrupted + resumed == uninterrupted


def resume_args(output_dir, **overrides) -> TrainingArguments:
    # 14 blocks / batch 2 = 7 micro-batches per epoch; with accumulation 3 an epoch is 3 optimizer steps
    # of 3, 3 and 1 micro-batches, so 7 steps cross two epoch boundaries
    values = {
        "output_dir": str(output_dir),
        "max_steps": 7,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 4,
        "gradient_accumulation_steps": 3,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "eval_steps": 2,
        "eval_batches": 1,
        "save_steps": 3,
        "save_total_limit": None,
        "logging_steps": 1,
    }
    values.update(overrides)
    return TrainingArguments(**values)


def test_resume_reaches_the_weights_of_an_uninterrupted_run(tmp_path, capsys):
    train_blocks, eval_blocks = synthetic_blocks(14), synthetic_blocks(4, seed=1)

    reference = make_model(HookedQwen3)
    full = train(reference, train_blocks, eval_blocks, resume_args(tmp_path / "full"))
    assert full.step == 7

    # Ctrl-C in the middle of step 5's gradient accumulation (forward 12 = its 2nd of 3 micro-batches):
    # the loop finishes step 5, saves it like a periodic checkpoint, then raises KeyboardInterrupt
    interrupted = make_model(HookedQwen3)
    interrupted.interrupt_at_forward = 12
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, train_blocks, eval_blocks, resume_args(tmp_path / "run"))
    assert interrupted.forwards == 13
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-3", "step-5"]
    state = json.loads((checkpoints / "step-5" / TRAINER_STATE_NAME).read_text())
    assert (state["step"], state["epoch"], state["batches_done"]) == (5, 1, 6)
    capsys.readouterr()

    # resume from the interrupt ("latest") and from the end-of-epoch checkpoint (step 3), to step 7
    for resume_from, output_dir in (("latest", "run"), (str(checkpoints / "step-3"), "from-step-3")):
        resumed = make_model(HookedQwen3, seed=1)  # different init: the checkpoint must overwrite it
        result = train(
            resumed,
            train_blocks,
            eval_blocks,
            resume_args(tmp_path / output_dir, resume_from_checkpoint=resume_from),
        )
        first_step = 5 if resume_from == "latest" else 3
        assert f"resumed from step {first_step} of 7" in capsys.readouterr().out
        assert result.step == 7 and resumed.calls[0] == first_step
        assert_same_weights(weights(resumed), weights(reference))
        assert result.eval_metrics == pytest.approx(full.eval_metrics, abs=1e-6)
        assert [r["step"] for r in result.history] == [r["step"] for r in full.history]

    # a second Ctrl-C stops at once, in the middle of step 5, and saves nothing of it
    hard = make_model(HookedQwen3)
    hard.raise_at_forward = 12
    with pytest.raises(KeyboardInterrupt):
        train(hard, train_blocks, eval_blocks, resume_args(tmp_path / "hard"))
    assert sorted(p.name for p in (tmp_path / "hard" / "checkpoints").iterdir()) == ["step-3"]
    assert "interrupted during step 5: not saved" in capsys.readouterr().out


def test_save_total_limit_keeps_the_newest_checkpoints_and_latest_resumes_the_newest(tmp_path, capsys):
    def rotating_args(max_steps, **overrides):
        return resume_args(tmp_path / "run", max_steps=max_steps, eval_steps=0, save_steps=1, save_total_limit=2,
                           **overrides)  # fmt: skip

    train(make_model(), synthetic_blocks(14), None, rotating_args(4))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-3", "step-4"]
    capsys.readouterr()
    result = train(make_model(), synthetic_blocks(14), None, rotating_args(6, resume_from_checkpoint="latest"))
    assert "resumed from step 4 of 6" in capsys.readouterr().out and result.step == 6
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-5", "step-6"]
    assert json.loads((checkpoints / "step-6" / TRAINER_STATE_NAME).read_text())["step"] == 6


# ----------------------------------------------------------------------------
# (3) on_step_begin and frozen-then-unfrozen parameters


def test_on_step_begin_and_unfrozen_parameters_are_trained(tmp_path):
    model = make_model(HookedQwen3)
    model.unfreeze_at_step = 3
    model.model.layers[0].requires_grad_(False)
    initial = weights(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hook"),
        max_steps=6,
        per_device_train_batch_size=2,
        warmup_steps=0,
        eval_steps=3,
        save_steps=0,
        learning_rate=3e-3,
    )

    def evaluate_fn(model, eval_dataloader, accelerator):  # a model-specific evaluation replaces the default
        assert not model.training
        return {"blocks": float(sum(len(b["input_ids"]) for b in eval_dataloader))}

    result = train(model, synthetic_blocks(8), synthetic_blocks(4, seed=1), args, evaluate_fn=evaluate_fn)
    assert model.calls == list(range(6))
    assert [(r["step"], r["eval_blocks"]) for r in result.history if "eval_blocks" in r] == [
        (3, 4.0),
        (6, 4.0),
    ]
    final = weights(model)
    layer0 = [k for k in initial if k.startswith("model.layers.0.")]
    others = [k for k in initial if k.startswith("model.layers.1.") and "norm" not in k]
    # frozen for steps 0-2: untouched (no gradient, no weight decay); then in the optimizer and trained
    for k in layer0:
        torch.testing.assert_close(model.layer0_at_unfreeze[k.removeprefix("model.layers.0.")], initial[k])
    assert all(not torch.equal(final[k], initial[k]) for k in layer0 if "norm" not in k)
    assert all(not torch.equal(final[k], initial[k]) for k in others)


class UnfreezingQwen3(Qwen3ForCausalLM):
    """A Qwen3 whose layer 0 is its `backbone_parameters()`, frozen for `config.freeze_backbone_steps` steps."""

    def backbone_parameters(self):
        return self.model.layers[0].parameters()

    def on_step_begin(self, step: int) -> None:
        self.model.layers[0].requires_grad_(step >= self.config.freeze_backbone_steps)


def test_unfrozen_backbone_gets_its_own_warmup(tmp_path):
    model = make_model(UnfreezingQwen3)
    model.config.freeze_backbone_steps = 3
    args = TrainingArguments(
        output_dir=str(tmp_path / "unfreeze"),
        max_steps=9,
        per_device_train_batch_size=2,
        lr_scheduler="constant",
        warmup_steps=2,
        unfreeze_warmup_steps=4,
        logging_steps=1,
        eval_steps=0,
        save_steps=0,
    )
    result = train(model, synthetic_blocks(8), None, args)
    # steps 1-2 warm up every group; the backbone is frozen (rate 0) for steps 1-3, then ramps over 4 steps
    assert [r["lr"] / args.learning_rate for r in result.history] == pytest.approx([0.5] + [1] * 8)
    assert [r["lr_backbone"] / args.learning_rate for r in result.history] == pytest.approx(
        [0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    )


def test_time_budget_stops_cleanly_and_saves(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path / "budget"),
        max_steps=50,
        max_minutes=1e-6,
        per_device_train_batch_size=2,
        eval_batches=1,
        save_steps=0,
    )
    result = train(make_model(), synthetic_blocks(8), synthetic_blocks(4, seed=1), args)
    # the first step has no step time to project from; after it the next step is projected past the budget
    assert result.step == 2 and result.stopped_by_time and "eval_loss" in result.eval_metrics
    assert (tmp_path / "budget" / "checkpoints" / "step-2" / TRAINER_STATE_NAME).is_file()
    assert "time budget" in (tmp_path / "budget" / "README.md").read_text()
    Qwen3ForCausalLM.from_pretrained(tmp_path / "budget")


def budget_args(output_dir, max_minutes, **overrides) -> TrainingArguments:
    values = {
        "output_dir": str(output_dir),
        "max_steps": 100_000,
        "max_minutes": max_minutes,
        "per_device_train_batch_size": 2,
        "warmup_steps": 2,
        "logging_steps": 1,
        "eval_steps": 0,
        "save_steps": 0,
    }
    values.update(overrides)
    return TrainingArguments(**values)


class SlowStepQwen3(Qwen3ForCausalLM):
    """A Qwen3 whose one step, `after` seconds into training, takes `pause` seconds longer."""

    pause, after = 1.0, 0.0

    def on_step_begin(self, step: int) -> None:
        self.started = getattr(self, "started", time.perf_counter())
        if not getattr(self, "paused", False) and time.perf_counter() - self.started > self.after:
            self.paused = True
            time.sleep(self.pause)


def test_the_learning_rate_never_rises_in_the_decay_when_step_times_vary(tmp_path):
    """Progress is the training time projected to the step's end from the recent step time. After one slow step
    the estimate falls back faster than fast steps add time, and without the projection kept from moving back
    the rate would rise again (a step a hundred times longer than the others, as a busy machine makes them)."""
    budget = 8.0 / 60
    model = make_model(SlowStepQwen3)
    model.after = 5.0  # seconds: inside the decay (the last half here), with time left after the slow step
    result = train(model, synthetic_blocks(8), None, budget_args(tmp_path / "run", budget, decay_fraction=0.5))
    records = [r for r in result.history if "lr" in r]
    lrs = [r["lr"] for r in records]
    assert model.paused and records[-1]["train_seconds"] > 6.0 and lrs[-1] < lrs[1]
    assert all(b <= a for a, b in itertools.pairwise(lrs[1:])), lrs


def test_time_budget_decays_to_the_floor_and_resumes_with_the_time_left(tmp_path, capsys):
    budget = 2.4 / 60  # minutes
    model, blocks = make_model(), synthetic_blocks(8)
    args = budget_args(tmp_path / "run", budget)
    assert args.lr_scheduler == "wsd"  # the default under --max_minutes
    result = train(model, blocks, None, args)
    train_records = [r for r in result.history if "lr" in r]
    lrs = [r["lr"] / args.learning_rate for r in train_records]
    assert result.stopped_by_time and result.step == train_records[-1]["step"] > 4
    assert lrs[-1] == pytest.approx(args.min_lr_ratio)  # the last step is at the floor, whatever the speed
    assert max(lrs) == 1.0 and lrs.index(1.0) == 1  # warmup, then stable at the peak
    assert all(b <= a for a, b in itertools.pairwise(lrs[1:]))
    # the decay spans the last 20% of the training time (not counting evaluation or saving), give or take
    # the step-time projection's error of about a step
    seconds = [r["train_seconds"] for r in train_records]
    longest_step = max(b - a for a, b in itertools.pairwise([0.0, *seconds]))
    first_decaying = next(i for i, lr in enumerate(lrs) if i >= args.warmup_steps and lr < 1)
    assert abs(seconds[first_decaying] - 0.8 * 60 * budget) < 2 * longest_step
    spent = train_records[-1]["train_seconds"]
    # the last step is the one PROJECTED to reach the budget: a step faster than the estimate ends a little short
    assert 60 * budget - longest_step < spent < 60 * budget + 2 * longest_step

    # resumed with a budget twice as long: it trains for the time left, starting at the saved training time
    capsys.readouterr()
    longer = budget_args(tmp_path / "run", 2 * budget, resume_from_checkpoint="latest")
    resumed = train(make_model(seed=1), blocks, None, longer)
    assert (
        f"resumed from step {result.step} of 100000, 0.0 of {2 * budget:g} minutes" in capsys.readouterr().out
    )
    new_records = [r for r in resumed.history if "lr" in r][len(train_records) :]
    assert new_records[0]["train_seconds"] > spent
    new_longest = max(
        b["train_seconds"] - a["train_seconds"]
        for a, b in itertools.pairwise([train_records[-1], *new_records])
    )
    assert 2 * 60 * budget - new_longest < new_records[-1]["train_seconds"] < 2 * 60 * budget + 1.0
    assert new_records[-1]["lr"] == pytest.approx(args.min_lr_ratio * args.learning_rate)
    # and a run resumed once its budget is spent trains no further
    done = train(make_model(seed=1), blocks, None, longer)
    assert done.step == resumed.step and done.stopped_by_time


def test_a_run_ended_by_its_budget_stays_ended_though_its_last_step_was_fast(tmp_path):
    """A run ends when its next step is projected past the budget, so the training time it saves can fall short of
    the budget (a last step faster than the estimate). Resumed with the same budget it must not train on: here the
    saved time is cut to half the budget, which without the recorded budget would leave time for many steps."""
    budget = 1.2 / 60
    first = train(make_model(), synthetic_blocks(8), None, budget_args(tmp_path / "run", budget))
    assert first.stopped_by_time
    state_file = find_checkpoint("latest", tmp_path / "run") / TRAINER_STATE_NAME
    state = json.loads(state_file.read_text())
    assert state["step"] == first.step and state["time_budget_spent"] == pytest.approx(60 * budget)
    state["train_seconds"] = 30 * budget
    state_file.write_text(json.dumps(state))
    again = train(make_model(), synthetic_blocks(8), None, budget_args(tmp_path / "run", budget, resume_from_checkpoint="latest"))
    assert again.step == first.step and again.stopped_by_time
    longer = train(make_model(), synthetic_blocks(8), None, budget_args(tmp_path / "run", 2 * budget, resume_from_checkpoint="latest"))
    assert longer.step > first.step  # a longer budget still trains on


@pytest.mark.parametrize("streaming", [False, True])
def test_too_little_data_for_one_batch_is_an_error(tmp_path, streaming):
    blocks = synthetic_blocks(1)
    blocks = blocks.to_iterable_dataset().with_format("torch") if streaming else blocks
    args = TrainingArguments(output_dir=str(tmp_path / "empty"), max_steps=2, per_device_train_batch_size=2)
    with pytest.raises(ValueError, match="lower --per_device_train_batch_size or give more data"):
        train(make_model(), blocks, None, args)


# ----------------------------------------------------------------------------
# (4) a real two-process run (CPU, gloo)

TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import Qwen3ForCausalLM
    from rqlm.presets import backbone_config
    from rqlm.trainer.arguments import TrainingArguments
    from rqlm.trainer.loop import train

    class Unfreezing(Qwen3ForCausalLM):
        def on_step_begin(self, step):
            if step == 2:
                self.model.layers[0].requires_grad_(True)

    out = sys.argv[1]
    torch.manual_seed(0)
    model = Unfreezing(backbone_config("test", vocab_size=64))
    model.model.layers[0].requires_grad_(False)
    layer0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    ids = ((torch.arange(24)[:, None] * 5 + torch.arange(16) % 8) % 64).tolist()
    blocks = Dataset.from_dict({"input_ids": ids}).with_format("torch")
    args = TrainingArguments(output_dir=out, max_steps=5, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=3e-3, warmup_steps=1,
                             eval_steps=3, eval_batches=2, save_steps=3, logging_steps=1)
    result = train(model, blocks.select(range(16)), blocks.select(range(16, 24)), args)
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in model.state_dict().values())).hexdigest()
    rank = PartialState().process_index
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"num_processes": PartialState().num_processes, "digest": digest, "step": result.step,
                   "eval": result.eval_metrics,
                   "layer0_trained": not torch.equal(layer0, model.model.layers[0].mlp.up_proj.weight)}, f)
    """
)


def test_accelerate_launch_two_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "out"
    launch_two_processes(TWO_PROCESS_SCRIPT, [out], tmp_path)
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["num_processes"] == 2 and r["step"] == 5 for r in ranks)
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["eval"] == ranks[1]["eval"]
    assert ranks[0]["layer0_trained"], "the parameters unfrozen at step 2 were not trained"
    assert (out / "checkpoints" / "step-3" / "random_states_1.pkl").is_file()
    assert (out / "model.safetensors").is_file()


# ----------------------------------------------------------------------------
# (5) bad input


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resume_from_checkpoint", "{tmp}/missing"], "not found"),
        (["--resume_from_checkpoint", "latest"], "no checkpoint to resume from"),
        (["--max_steps", "0"], "--max_steps must be at least 1"),
        pytest.param(
            ["--report_to", "tensorboard"],
            "needs the tensorboard package",
            marks=pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="installed"),
        ),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, capsys, flags, message):
    flags = [f.format(tmp=tmp_path) for f in flags]
    rc = cli.main(["train-baseline", "--output_dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1, err
