"""The lean cached forward of Qwen3Stack computes what transformers' forward computes, and runs only where it may."""

import pytest
import torch
from conftest import tiny_qwen3_config
from transformers import DynamicCache

import rqlm.kernels.lean_stack
from rqlm.kernels import cpu_kernels
from rqlm.kernels.lean_stack import runs_lean
from rqlm.modeling.layers import Qwen3Stack

# the same arithmetic; SDPA may pick another kernel than transformers' GQA handling does (rounding only)
EXACT = {"rtol": 1e-5, "atol": 1e-6}


def _stack(block_size=None, attn="sdpa", seed=0, **overrides):
    """A 2-layer GQA stack with every weight random (no identity-initialised branch or unit norm)."""
    torch.manual_seed(seed)
    config = tiny_qwen3_config(**overrides)
    config._attn_implementation_internal = attn
    stack = Qwen3Stack(config, block_size=block_size).eval()
    with torch.no_grad():
        for p in stack.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3)
    return stack


@pytest.fixture
def lean_calls(monkeypatch):
    """Counts the calls that took the lean path."""
    calls = []
    original = rqlm.kernels.lean_stack.lean_forward

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(rqlm.kernels.lean_stack, "lean_forward", counting)
    return calls


def _run(stack, lean: bool, steps, mask):
    """Prefill then cached steps through `stack`: outputs of each call and the final cache."""
    cache = DynamicCache(config=stack.config)
    outputs, seen = [], 0
    with torch.no_grad(), cpu_kernels(enabled=lean):
        for x in steps:
            seen += x.shape[1]
            outputs.append(stack(x, mask[:, :seen], cache=cache))
    return outputs, cache


@pytest.mark.parametrize("block_size", [None, 4])
def test_lean_forward_equals_transformers_with_left_padding_and_cache(block_size, lean_calls):
    stack = _stack(block_size)
    torch.manual_seed(1)
    steps = [torch.randn(2, 8, 32), torch.randn(2, 1, 32), torch.randn(2, 3, 32), torch.randn(2, 4, 32)]
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0  # row 1 left-padded
    reference, ref_cache = _run(stack, False, steps, mask)
    assert not lean_calls
    lean, lean_cache = _run(stack, True, steps, mask)
    assert len(lean_calls) == len(steps)
    for got, want in zip(lean, reference):
        assert torch.isfinite(got).all()
        real = mask[:, : got.shape[1]].bool() if got.shape[1] == 8 else slice(None)
        torch.testing.assert_close(got[real] if got.shape[1] == 8 else got, want[real] if want.shape[1] == 8 else want, **EXACT)
    for layer in range(2):
        real = mask.bool()
        for name in ("keys", "values"):
            got, want = (getattr(c.layers[layer], name).transpose(1, 2)[real] for c in (lean_cache, ref_cache))
            torch.testing.assert_close(got, want, **EXACT)


def test_lean_forward_without_mask_and_with_positions(lean_calls):
    """The depth transformer's call: no attention mask, explicit position ids."""
    stack = _stack()
    cache_ref, cache_lean = DynamicCache(config=stack.config), DynamicCache(config=stack.config)
    torch.manual_seed(2)
    with torch.no_grad():
        for j in range(4):
            x, positions = torch.randn(3, 1, 32), torch.full((1, 1), j)
            want = stack(x, cache=cache_ref, position_ids=positions)
            with cpu_kernels():
                got = stack(x, cache=cache_lean, position_ids=positions)
            torch.testing.assert_close(got, want, **EXACT)
    assert len(lean_calls) == 4


def test_lean_forward_bf16_close_to_transformers():
    stack = _stack().to(torch.bfloat16)
    steps = [torch.randn(1, 6, 32, dtype=torch.bfloat16), torch.randn(1, 1, 32, dtype=torch.bfloat16)]
    mask = torch.ones(1, 7, dtype=torch.long)
    reference, _ = _run(stack, False, steps, mask)
    lean, _ = _run(stack, True, steps, mask)
    for got, want in zip(lean, reference):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)


def test_lean_path_only_where_it_computes_the_same(lean_calls):
    stack = _stack()
    cache, x = DynamicCache(config=stack.config), torch.randn(1, 2, 32)
    mask, fired = torch.ones(1, 2, dtype=torch.long), []
    with torch.no_grad():
        stack(x, mask, cache=DynamicCache(config=stack.config))
        assert not lean_calls  # the kernels are off unless switched on
    with torch.no_grad(), cpu_kernels():
        assert runs_lean(stack, cache, mask, 2) and runs_lean(stack, cache, None, 2)
        assert not runs_lean(stack, None, mask, 2)  # no cache: training-shaped call
        assert not runs_lean(stack, cache, torch.ones(1, 3, dtype=torch.long), 2)  # a mask of another length
        assert not runs_lean(stack, cache, torch.ones(1, 1, 2, 2, dtype=torch.bool), 2)  # a 4D mask
        assert not runs_lean(_stack(attn="eager"), cache, mask, 2)
        assert not runs_lean(_stack(layer_types=["full_attention", "sliding_attention"], sliding_window=4), cache, mask, 2)
        handle = stack.layers[1].post_attention_layernorm.register_forward_hook(lambda *a: None)
        assert not runs_lean(stack, cache, mask, 2)  # a hook on a module whose forward it replaces
        handle.remove()
        for called in (stack, stack.norm, stack.layers[0].mlp.up_proj):  # still called as modules: their hooks run
            handle = called.register_forward_hook(lambda module, args, out: fired.append(module))
            assert runs_lean(stack, cache, mask, 2)
            stack(x, mask, cache=DynamicCache(config=stack.config))
            assert fired.pop() is called and lean_calls.pop()
            handle.remove()
    with cpu_kernels():
        assert not runs_lean(stack, cache, mask, 2)  # gradients on
        stack(x, mask, cache=cache)
    assert not lean_calls


def test_lean_forward_runs_lora_adapters(lean_calls):
    """LoRA-wrapped projections are called as modules: the adapters act on the lean path as on transformers'."""
    from rqlm.modeling.lora import add_lora, lora_parameters

    stack = _stack()
    add_lora(stack, r=2, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for p in lora_parameters(stack):
            p.normal_(0.0, 0.5)
    steps = [torch.randn(1, 5, 32), torch.randn(1, 1, 32), torch.randn(1, 2, 32)]
    mask = torch.ones(1, 8, dtype=torch.long)
    reference, _ = _run(stack, False, steps, mask)
    lean, _ = _run(stack, True, steps, mask)
    assert len(lean_calls) == len(steps)
    for got, want in zip(lean, reference):
        torch.testing.assert_close(got, want, **EXACT)
    stack.eval()
    for p in lora_parameters(stack):
        p.data.zero_()
    plain, _ = _run(stack, True, steps, mask)
    assert (plain[0] - lean[0]).abs().max() > 1e-3  # the adapters changed the lean path's output
