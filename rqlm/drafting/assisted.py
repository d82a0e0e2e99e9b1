"""A tokens-mode RQ model (`depth_output="tokens"`) drafting through transformers' own assisted decoding.

Such a model gives an exact q(token), so `target.generate(assistant_model=model)` drafts with it as with any
small causal LM. transformers reads the draft length, its schedule and its confidence gate from the assistant's
own generation config: `assistant_drafting` sets them for the length of a call and puts them back after. The gate
(transformers' default 0.4) is switched off, so a step drafts the length asked, as rqlm's own drafting does.
Acceptance (tokens per verification step) is the new tokens over the target's forward calls, counted by
`forward_calls`: each call verifies one draft.
"""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def assistant_drafting(model: nn.Module, num_draft_tokens: int | None = None):
    """While the context lasts, `model` drafts `num_draft_tokens` (default its C) tokens a step, a constant
    schedule and no confidence gate, when passed to `generate(assistant_model=model)`."""
    drafting = {
        "num_assistant_tokens": num_draft_tokens or model.compression_factor,
        "num_assistant_tokens_schedule": "constant",
        "assistant_confidence_threshold": 0.0,
    }
    saved = {name: getattr(model.generation_config, name) for name in drafting}
    model.generation_config.update(**drafting)
    try:
        yield
    finally:
        model.generation_config.update(**saved)


@contextlib.contextmanager
def forward_calls(**models: nn.Module):
    """Count each named model's forward calls while the context lasts: yields {name: calls so far}, kept current."""
    calls = dict.fromkeys(models, 0)

    def counter(name):
        def hook(module, args, kwargs):
            calls[name] += 1
        return hook

    handles = [model.register_forward_pre_hook(counter(name), with_kwargs=True) for name, model in models.items()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["assistant_drafting", "forward_calls"]
