"""`rqlm plan`: parameter counts of the written-in Qwen3 configs, and bytes that match a real training step."""

from __future__ import annotations

import pytest
import torch

from rqlm.benchmarks import memory_plan as mp
from rqlm.cli import main as cli_main
from rqlm.trainer.loop import parameter_groups

# released totals of the Qwen3 dense models (their model cards' parameter counts, embeddings included)
RELEASED_PARAMETERS = {"Qwen/Qwen3-0.6B": 596_049_920, "Qwen/Qwen3-8B": 8_190_735_360}


def qwen3_parameters(config) -> int:
    """Parameters of a Qwen3ForCausalLM counted by hand from its config."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    layer = h * q + 2 * h * kv + q * h + 2 * config.head_dim + 3 * h * i + 2 * h
    return v * h * (1 if config.tie_word_embeddings else 2) + config.num_hidden_layers * layer + h


@pytest.mark.parametrize("name", list(mp.QWEN3_CONFIGS))
def test_written_configs_built_on_meta_have_the_counted_parameters(name):
    config = mp.qwen3_config(name)
    model = mp.build_model("baseline", config)
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == qwen3_parameters(config)
    if name in RELEASED_PARAMETERS:
        assert qwen3_parameters(config) == RELEASED_PARAMETERS[name]


def test_short_names_and_unknown_backbones():
    assert mp.qwen3_config("8B").hidden_size == mp.qwen3_config("Qwen/Qwen3-8B").hidden_size == 4096
    with pytest.raises(ValueError, match="no written-in config"):
        mp.qwen3_config("Qwen/Qwen3-7B")


@pytest.fixture
def tiny_size(monkeypatch):
    """A Qwen3 'size' small enough to train a step on CPU, planned like the released ones."""
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "tie_word_embeddings": False}
    monkeypatch.setitem(mp.QWEN3_CONFIGS, "Qwen/Qwen3-tiny", tiny)
    monkeypatch.setitem(mp._QWEN3_SHARED, "vocab_size", 512)
    monkeypatch.setitem(mp._QWEN3_SHARED, "head_dim", 16)
    monkeypatch.setitem(mp._QWEN3_SHARED, "num_key_value_heads", 1)
    monkeypatch.setitem(mp.LM_FIELDS, "depth_hidden_size", 32)
    return "Qwen/Qwen3-tiny"


def measured_step_bytes(model) -> tuple[int, int, int]:
    """(weight, gradient, optimizer-state) bytes after one real AdamW step of the shared loop's groups."""
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-3)
    ids = torch.randint(0, 500, (2, 16))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    return weights, grads, state


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", mp.MODELS)
def test_plan_figures_match_a_real_training_step(tiny_size, kind, lora):
    plan = mp.memory_plan(tiny_size, gpu_counts=(1, 8), block_size=16, lora_r=4)
    one, eight = [r for r in plan.rows if r.model == kind and r.lora == lora]
    torch.manual_seed(0)
    model = mp.build_model(kind, mp.qwen3_config(tiny_size), lora_r=4 if lora else 0, device="cpu")
    if kind == "lm":
        model.vae.eval()
    weights, grads, state = measured_step_bytes(model)
    assert (one.weights, one.gradients, one.optimizer) == (weights, grads, state)
    assert one.parameters == sum(p.numel() for p in model.parameters())
    assert (eight.weights, eight.gradients, eight.optimizer) == (weights / 8, grads / 8, state / 8)
    assert one.activations_checkpointed < one.activations


def test_accelerate_config_per_gpu_count():
    assert mp.accelerate_config(1) == "configs/accelerate/single_gpu_bf16.yaml"
    assert mp.accelerate_config(8) == "configs/accelerate/fsdp.yaml"
    assert mp.accelerate_config(64).endswith("--num_machines 8 --num_processes 64")


def test_cli_prints_every_row_offline(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert cli_main(["plan", "--backbone", "Qwen/Qwen3-0.6B", "--gpus", "1", "8", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith(("| vae", "| lm", "| baseline"))]
    assert len(rows) == 3 * 2 * 2
    assert "| baseline | full | 1 | 0.596B |" in table
    assert out.is_file()


def test_cli_unknown_backbone_is_one_line(capsys):
    assert cli_main(["plan", "--backbone", "Qwen/Qwen3-7B"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rqlm plan: error: no written-in config") and "\n" not in err
