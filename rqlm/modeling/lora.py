"""LoRA adapters on a module's linear layers through peft, started as peft starts them.

    add_lora(stack, r=8, alpha=16)      # wrap q/k/v/o/gate/up/down; lora_B = 0, so outputs are unchanged
    lora_parameters(model)              # the adapter weights (what trains under LoRA)
    merge_lora(stack)                   # fold W + B A back into plain nn.Linear layers

`add_lora` marks the adapter weights initialised for transformers, so a later `post_init()` (which
runs `_init_weights` over every submodule) leaves them as peft made them: `lora_A` random, `lora_B`
zero. It freezes the wrapped layers' base weights (as peft does) and nothing else: the caller
decides which other parameters train.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_PREFIX = "lora_"


def add_lora(
    module: nn.Module,
    r: int,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
) -> nn.Module:
    """Wrap the `target_modules` linear layers of `module` (in place) with rank-`r` LoRA adapters; returns `module`."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    trainable = {name: param.requires_grad for name, param in module.named_parameters()}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules or LORA_TARGETS)
    module = inject_adapter_in_model(config, module)
    for name, param in module.named_parameters():  # peft froze everything but the adapters: undo that
        if name in trainable:
            param.requires_grad_(trainable[name])
    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            for param in layer.get_base_layer().parameters():
                param.requires_grad_(False)
            for adapters in (getattr(layer, n) for n in LoraLayer.adapter_layer_names):
                for adapter in adapters.modules():
                    adapter._is_hf_initialized = True  # PreTrainedModel.post_init() skips it
    return module


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name (from `named_parameters`) belongs to a LoRA adapter."""
    return LORA_PREFIX in name


def lora_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The LoRA adapter parameters of `module` (none without adapters)."""
    return (param for name, param in module.named_parameters() if is_lora_parameter(name))


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA adapter of `module` into its base layer and put the plain layer back; returns `module`."""
    from peft.tuners.lora import LoraLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name), child, layer.get_base_layer())
    return module


__all__ = ["LORA_TARGETS", "add_lora", "is_lora_parameter", "lora_parameters", "merge_lora"]
