"""What every latent LM over a frozen VAE shares (the RQ-Transformer and GIVT): the VAE kept out of
training, generation's special tokens, the spatial Qwen3 stack as the backbone, and the builders."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import GenerationConfig, Qwen3Config

from .modeling_rq_vae import RQVAEModel, _load_base_weights


class FrozenVAE:
    """Mixin for a `PreTrainedModel` with `self.vae`, a frozen RQ-VAE that never trains (its config's
    `vae_config`): loading, DDP, the optimizer and train mode all leave it as it is."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained` with one-line errors; the VAE inside stays frozen."""
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model.vae.requires_grad_(False)  # loading re-creates parameters trainable; the VAE never trains
        return model

    @staticmethod
    def _frozen_vae(vae_config) -> RQVAEModel:
        """The VAE submodule, built in `__init__`: untrained weights that loading replaces, in eval mode, no grad."""
        vae = RQVAEModel(vae_config)
        for module in vae.modules():
            if not hasattr(module, "original_inv_freq"):  # rotary buffers: in no checkpoint; init computes them
                module._owns_its_init = True
        vae.requires_grad_(False)
        return vae.eval()

    def _freeze_vae(self) -> None:
        """The VAE never trains: DDP neither syncs nor broadcasts it, the trainer leaves it out of the optimizer."""
        self._ddp_params_and_buffers_to_ignore = [f"vae.{name}" for name, _ in self.vae.named_parameters()] + [
            f"vae.{name}" for name, _ in self.vae.named_buffers()
        ]

    def train(self, mode: bool = True):
        """Train or eval mode for the LM; the VAE stays in eval mode (no codebook EMA, kmeans, expiry,
        posterior sampling or dropout)."""
        super().train(mode)
        self.vae.eval()
        return self

    @property
    def compression_factor(self) -> int:
        return self.config.compression_factor


class FrozenVAELatentLM(FrozenVAE):
    """Mixin for a `PreTrainedModel` with `self.vae` (frozen), `self.spatial` (a Qwen3Stack) and a config
    class taking `backbone_config` and `vae_config`; put it before `TrainableBackbone` in the bases."""

    def _default_special_tokens(self) -> None:
        """generate() stops at the tokenizer's EOS and pads with its pad token unless told otherwise."""
        tokens = self.config.vae_config.backbone_config
        if self.generation_config is None:
            self.generation_config = GenerationConfig()
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self.generation_config, name) is None:
                setattr(self.generation_config, name, getattr(tokens, name))

    def spatial_forward(
        self,
        inputs_embeds: torch.FloatTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
    ) -> torch.FloatTensor:
        """Spatial inputs (B, S, H) -> hidden states (B, S, H), causal over positions."""
        return self.spatial(inputs_embeds, attention_mask, cache=cache, position_ids=position_ids)

    def padded_spatial_forward(self, inputs: torch.FloatTensor, valid: torch.BoolTensor | None = None) -> torch.FloatTensor:
        """Teacher-forced spatial outputs h (B, L, H) of inputs [start, x_0 .. x_{L-2}] (B, L, H).

        `valid` (B, L) marks the positions holding a real token (None: all). Padding is masked out of the spatial
        stack, the start vector sits at each row's first real position and positions count from it, as `generate`
        lays out a left-padded prompt: a padded row gives the outputs it gives alone.
        """
        if valid is None or bool(valid.all()):
            return self.spatial_forward(inputs)
        first = valid.int().argmax(1)  # (B,) each row's first real position (0 for a row of padding only)
        rows = torch.arange(len(first), device=first.device)
        inputs = inputs.clone()
        inputs[rows, first] = self.start.to(inputs.dtype)
        mask = valid.long()
        mask[rows, first] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, L)
        return self.spatial_forward(inputs, mask, positions)

    def get_input_embeddings(self) -> None:
        """None: a latent position's input is a latent, not a token (accelerate's FSDP2 asks when it shards)."""
        return

    def backbone_stacks(self) -> list[nn.Module]:
        """The spatial Qwen3 stack: its layers are what freezing and LoRA act on."""
        return [self.spatial]

    @classmethod
    def from_vae(cls, vae: RQVAEModel | str | os.PathLike, backbone_config: Qwen3Config | dict, **config_kwargs):
        """A fresh latent LM over a trained VAE (a model or its folder); the VAE is copied in, frozen."""
        if not isinstance(vae, RQVAEModel):
            vae = RQVAEModel.from_pretrained(vae)
        config = cls.config_class(backbone_config=backbone_config, vae_config=vae.config.to_dict(), **config_kwargs)
        model = cls(config)
        model.vae.load_state_dict(vae.state_dict())
        model.vae.eval()
        return model

    @classmethod
    def from_backbone(cls, name_or_path: str | os.PathLike, vae: RQVAEModel | str | os.PathLike, **config_kwargs):
        """A latent LM whose spatial layers start from a pretrained Qwen3 (hub name or folder), over `vae`.

        The Qwen3's layers and final norm are copied in; its token embeddings and LM head are not used
        (the spatial input is a latent). Freeze them for `freeze_backbone_steps` or train LoRA adapters.
        """
        from transformers import AutoModelForCausalLM

        pretrained = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
        if pretrained.config.model_type != "qwen3":
            raise ValueError(f"{name_or_path!s} is a {pretrained.config.model_type!r} model; a Qwen3 backbone is needed")
        model = cls.from_vae(vae, pretrained.config, **config_kwargs)
        for target, layer in zip(model.spatial.layers, pretrained.model.layers):
            _load_base_weights(target, layer)
        model.spatial.norm.load_state_dict(pretrained.model.norm.state_dict())
        return model


__all__ = ["FrozenVAE", "FrozenVAELatentLM"]
