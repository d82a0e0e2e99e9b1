"""RQDraftHead: a target causal LM's next chunk, drafted in a frozen RQ-VAE's residual codes.

    target's last hidden state at token t (N, Ht), token t + 1 (N,)
    -> from_target(state) + embed(token), SwiGLU residual blocks, RMSNorm      h (N, H)
    -> depth transformer over the D codes (as the RQ-Transformer's)     codes (N, D)
    -> the frozen chunk-local VAE decoder                   tokens t + 2 .. t + C + 1 (N, C)

Why. An RQ-Transformer drafter runs its own spatial transformer, one step per chunk; when that stack is
as large as the target, a drafted chunk costs about as much as a target token before the target has
verified anything, and drafting cannot pay (measured: 0.70-0.93x). The head reads the state the
target's verification forward has already computed (the token after it is the target's own token of
that step), so a draft costs the depth steps and a chunk's decoding only. It keeps no state of its
own: nothing to roll back after a rejection.

Training (`rqlm train-draft-head`): the target stays frozen and is attached (`attach_target`, not a
submodule: it is neither saved nor trained); on the target's own greedy text (`rqlm distill-data`) the
target's states of every position and the VAE's codes of every window of C tokens give one training
example per position, loss = cross-entropy over the D codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .code_depth import CodeDepthMixin, SwiGLUBlock, greedy_processors
from .configuration_rq_draft_head import RQDraftHeadConfig
from .latent_lm import FrozenVAE
from .modeling_rq_vae import IGNORE_INDEX, CheckedLoading


@dataclass
class RQDraftHeadOutput(ModelOutput):
    """What `forward` returns: `loss` = `code_loss`, the mean code NLL (nats); `depth_nll` and `depth_accuracy`
    per depth (D,); `logits` (B, P, D, K) for the P positions with a whole chunk after them; `codes` their targets."""

    loss: torch.FloatTensor | None = None
    code_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    depth_nll: torch.FloatTensor | None = None
    depth_accuracy: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None
    num_codes: torch.LongTensor | None = None


class RQDraftHeadPreTrainedModel(CheckedLoading, PreTrainedModel):
    config_class = RQDraftHeadConfig
    config: RQDraftHeadConfig
    base_model_prefix = "rq_draft_head"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _other_type_hint = "a draft head is trained with `rqlm train-draft-head --target TARGET_DIR --vae VAE_DIR`"

    def _init_weights(self, module):
        """Standard init (std 0.02); the frozen VAE keeps its trained weights (loaded after construction)."""
        if getattr(module, "_owns_its_init", False):
            return
        super()._init_weights(module)
        if isinstance(module, RQDraftHead):
            init.normal_(module.depth_position, std=0.02)


class RQDraftHead(FrozenVAE, CodeDepthMixin, RQDraftHeadPreTrainedModel):
    """A target's next chunk from its last hidden state, in a frozen chunk-local RQ-VAE's codes (module docstring)."""

    def __init__(self, config: RQDraftHeadConfig):
        super().__init__(config)
        vae_config = config.vae_config
        for sub in (vae_config, vae_config.backbone_config):
            if sub._attn_implementation is None:
                sub._attn_implementation_internal = config._attn_implementation
        self.check_parts(config)
        hidden = config.hidden_size
        self.vae = self._frozen_vae(vae_config)
        self.from_target = nn.Linear(config.target_hidden_size * len(config.target_layers or [0]), hidden)
        self.embed_tokens = nn.Embedding(vae_config.backbone_config.vocab_size, hidden)
        self.blocks = nn.ModuleList(
            [SwiGLUBlock(hidden, config.intermediate_size, config.rms_norm_eps) for _ in range(config.num_layers)]
        )
        self.norm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        self.build_depth(hidden, like=vae_config.backbone_config)
        self._freeze_vae()
        self.post_init()

    @staticmethod
    def check_parts(config: RQDraftHeadConfig) -> None:
        """One-line errors for a VAE the head cannot draft with or a missing target width."""
        vae = config.vae_config
        if vae.is_continuous:
            raise ValueError("a draft head predicts codes; its VAE must be residual-quantized, not Gaussian")
        layers = {
            "num_encoder_layers": vae.num_encoder_layers, "num_decoder_layers": vae.num_decoder_layers,
            "num_latent_layers": vae.num_latent_layers, "decoder_sees_previous_tokens": int(vae.decoder_sees_previous_tokens),
        }  # fmt: skip
        if any(layers.values()):
            found = ", ".join(f"{name}={value}" for name, value in layers.items() if value)
            raise ValueError(
                f"a draft head needs a chunk-local VAE (the codes of any C tokens alone), this one has {found}; "
                "train one with the CPU default (`rqlm train-vae`)"
            )
        if config.target_hidden_size < 1:
            raise ValueError(f"target_hidden_size must be >= 1 (the target's hidden size), got {config.target_hidden_size}")

    @classmethod
    def for_target(cls, target, vae, **config_kwargs) -> RQDraftHead:
        """A fresh head for `target` (a causal LM) over a trained chunk-local `vae` (copied in, frozen)."""
        text = target.config.get_text_config()
        if text.vocab_size != vae.config.backbone_config.vocab_size:
            raise ValueError(
                f"the target reads {text.vocab_size} tokens, the VAE {vae.config.backbone_config.vocab_size}; "
                "train the VAE on the target's tokenizer"
            )
        config = RQDraftHeadConfig(
            vae_config=vae.config.to_dict(), target_hidden_size=text.hidden_size,
            target_name_or_path=str(target.config._name_or_path or "") or None, **config_kwargs,
        )  # fmt: skip
        head = cls(config)
        head.check_target(target)
        head.vae.load_state_dict(vae.state_dict())
        head.vae.eval()
        return head

    # ----------------------------------------------------------------- the target
    def check_target(self, target) -> None:
        """One-line error for a target whose states this head cannot read."""
        text = target.config.get_text_config()
        if text.hidden_size != self.config.target_hidden_size:
            raise ValueError(
                f"the draft head reads states of width {self.config.target_hidden_size}, the target's are "
                f"{text.hidden_size}; pass the target the head was trained on"
            )
        layers = self.config.target_layers or []
        if layers and max(layers) > text.num_hidden_layers:
            raise ValueError(f"target_layers {layers} name hidden states past the target's {text.num_hidden_layers} layers")

    def state_modules(self, target) -> list[nn.Module]:
        """The target's modules whose outputs are the states the head reads, in order (for forward hooks): its
        base model (the final norm's output) or the decoder layer whose output is hidden state i."""
        base = target.base_model
        last = target.config.get_text_config().num_hidden_layers
        return [base if i == last else base.layers[i - 1] for i in self.config.target_layers or [last]]

    def attach_target(self, target) -> None:
        """Use `target` (a causal LM, frozen) for the states `forward` reads when it is given none.

        Kept out of the module tree: it is not saved with the head, not trained and not moved by `.to()`."""
        self.check_target(target)
        target.requires_grad_(False)
        self.__dict__["_target"] = target.eval()

    @torch.no_grad()
    def target_states(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.FloatTensor:
        """The attached target's hidden states (B, T, Ht x len(target_layers)) of `input_ids` (B, T) that the head reads."""
        target = self.__dict__.get("_target")
        if target is None:
            raise ValueError("no target attached: pass target_hidden, or call head.attach_target(target) first")
        layers = self.config.target_layers
        out = target.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(layers))
        if not layers:
            return out.last_hidden_state
        return torch.cat([out.hidden_states[i] for i in layers], dim=-1)

    # ----------------------------------------------------------------- the head
    def head_hidden(self, states: torch.FloatTensor, next_tokens: torch.LongTensor) -> torch.FloatTensor:
        """The target's states (..., Ht x layers) at token t and the tokens t + 1 (...) -> the depth transformer's input (..., H)."""
        x = self.from_target(states.to(self.from_target.weight.dtype)) + self.embed_tokens(next_tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    @torch.no_grad()
    def window_codes(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """Tokens (B, T) -> the VAE's codes of every window of C tokens, (B, T - C + 1, D): window w = tokens w .. w + C - 1."""
        c = self.compression_factor
        windows = input_ids.unfold(1, c, 1)  # (B, W, C)
        codes = self.vae.encode(windows.reshape(-1, c)).codes  # (B * W, 1, D)
        return codes.reshape(*windows.shape[:2], -1)

    def _examples(self, input_ids, attention_mask, target_hidden):
        """Per position t with a whole chunk after t + 1: (head input (B, P, H), codes of t + 2 .. t + C + 1 (B, P, D)
        with -1 where any token involved is padding), P = T - C - 1."""
        c, length = self.compression_factor, input_ids.shape[1]
        if length < c + 2:
            raise ValueError(f"a draft head trains on blocks of at least C + 2 = {c + 2} tokens, got {length}")
        if target_hidden is None:
            target_hidden = self.target_states(input_ids, attention_mask)
        p = length - c - 1
        codes = self.window_codes(input_ids)[:, 2:]  # windows starting at t + 2, t = 0 .. P - 1
        if attention_mask is not None:  # every token from t to t + C + 1 must be real
            real = attention_mask.bool().unfold(1, c + 2, 1).all(-1)  # (B, P)
            codes = codes.masked_fill(~real[..., None], -1)
        hidden = self.head_hidden(target_hidden[:, :p], input_ids[:, 1 : p + 1])
        return hidden, codes

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        target_hidden: torch.FloatTensor | None = None,
        **kwargs,
    ) -> RQDraftHeadOutput:
        """Code NLL of the chunk after every position of `input_ids` (B, T), teacher-forced over depth.

        `target_hidden` (B, T, Ht) are the target's last hidden states of `input_ids` (default: the attached
        target's). `labels` is accepted for the trainer's interface; the targets are the codes themselves.
        """
        hidden, codes = self._examples(input_ids, attention_mask, target_hidden)
        logits = self.depth_logits(hidden, codes)  # (B, P, D, K)
        valid = codes >= 0
        nll = F.cross_entropy(
            rearrange(logits.float(), "b p d k -> b k p d"), codes.masked_fill(~valid, IGNORE_INDEX),
            ignore_index=IGNORE_INDEX, reduction="none",
        )  # fmt: skip
        count = valid.sum(dim=(0, 1))  # (D,)
        depth_nll = nll.sum(dim=(0, 1)) / count.clamp(min=1)
        with torch.no_grad():
            depth_accuracy = ((logits.argmax(-1) == codes) & valid).sum(dim=(0, 1)) / count.clamp(min=1)
        return RQDraftHeadOutput(
            loss=depth_nll.mean(), code_loss=depth_nll.mean(), logits=logits, depth_nll=depth_nll.detach(),
            depth_accuracy=depth_accuracy, codes=codes, num_codes=count,
        )  # fmt: skip

    # ----------------------------------------------------------------- drafting
    @torch.no_grad()
    def draft(self, states: torch.FloatTensor, next_tokens: torch.LongTensor) -> torch.LongTensor:
        """Greedy draft: the target's states (N, Ht) at token t and tokens t + 1 (N,) -> tokens t + 2 .. t + C + 1 (N, C)."""
        codes = self._sample_codes(self.head_hidden(states, next_tokens), greedy_processors(self.num_quantizers))
        return self.vae.decode(codes[:, None]).argmax(-1)  # (N, C)

    @torch.no_grad()
    def accepted_lengths(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, target_hidden=None
    ) -> torch.LongTensor:
        """Teacher-forced acceptance on text the target would write (its greedy text): for every position t,
        how many of the greedy draft's C tokens match tokens t + 2 .. (B, P), -1 where padding is involved."""
        hidden, codes = self._examples(input_ids, attention_mask, target_hidden)
        b, p, c = hidden.shape[0], hidden.shape[1], self.compression_factor
        chosen = self._sample_codes(hidden.reshape(b * p, -1), greedy_processors(self.num_quantizers))
        drafts = self.vae.decode(chosen[:, None]).argmax(-1).reshape(b, p, c)
        truth = input_ids.unfold(1, c, 1)[:, 2:]  # (B, P, C)
        lengths = (drafts == truth).long().cumprod(-1).sum(-1)
        return lengths.masked_fill(codes[..., 0] < 0, -1)


__all__ = ["RQDraftHead", "RQDraftHeadOutput", "RQDraftHeadPreTrainedModel"]
