"""Freeze-then-unfreeze and LoRA over a model's Qwen3 layers, shared by the RQ-VAE and the latent LM.

A model mixes in `TrainableBackbone`, names its Qwen3 stacks in `backbone_stacks()` and reads
`freeze_backbone_steps`, `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules` from its
config. Only the stacks' layers are the backbone; their final norms and everything else train.
"""

from __future__ import annotations

from itertools import chain

from torch import nn

from .lora import add_lora, is_lora_parameter, lora_parameters, merge_lora


class TrainableBackbone:
    """The backbone's flags: frozen for `config.freeze_backbone_steps` optimizer steps, then trained
    (fully, or through LoRA adapters when `config.lora_r > 0`)."""

    _backbone_frozen: bool | None = None

    def backbone_stacks(self) -> list[nn.Module]:
        """The Qwen3 stacks whose `.layers` are the backbone."""
        raise NotImplementedError

    def _add_backbone_lora(self) -> None:
        """Adapters on the backbone layers (lora_B = 0: the model starts as without them); call before post_init."""
        c = self.config
        if c.lora_r > 0:
            for stack in self.backbone_stacks():
                add_lora(stack.layers, c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_target_modules)

    def backbone_parameters(self):
        """The weights of the backbone layers, adapters excluded: what freezing and LoRA act on."""
        for stack in self.backbone_stacks():
            for name, param in stack.layers.named_parameters():
                if not is_lora_parameter(name):
                    yield param

    def adapter_parameters(self):
        """LoRA adapter parameters (empty without LoRA)."""
        return chain.from_iterable(lora_parameters(stack) for stack in self.backbone_stacks())

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Freeze or unfreeze the backbone; under LoRA the layers' weights stay frozen and the adapters toggle."""
        lora = self.config.lora_r > 0
        for param in self.backbone_parameters():
            param.requires_grad_(not frozen and not lora)
        for param in self.adapter_parameters():
            param.requires_grad_(not frozen)
        self._backbone_frozen = frozen

    def on_step_begin(self, step: int) -> None:
        """Training hook: the backbone is frozen for the first `freeze_backbone_steps` optimizer steps."""
        frozen = step < self.config.freeze_backbone_steps
        if frozen != self._backbone_frozen:
            self.set_backbone_frozen(frozen)

    def merge_lora(self):
        """Fold LoRA adapters into the base weights; the model then saves and loads without peft (lora_r=0)."""
        if self.config.lora_r == 0:
            return self
        for stack in self.backbone_stacks():
            merge_lora(stack.layers)
        self.config.lora_r = 0
        self.set_backbone_frozen(bool(self._backbone_frozen))
        return self


__all__ = ["TrainableBackbone"]
