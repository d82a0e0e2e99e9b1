"""The frozen causal LM a semantic level 0 is distilled toward (`rqlm train-vae --semantic_teacher`).

    input_ids (B, T) -> teacher's last-layer hidden states (B, T, S)
      -> mean over each chunk's real tokens                 (B, L, S)   L = T / C

Mimi and SpeechTokenizer distil their first RVQ level toward a semantic model; here the teacher is a causal LM
of the same tokenizer (e.g. a `rqlm train-baseline` folder), whose hidden states carry what is predictable from
context. The teacher lives outside the RQ-VAE: it is called on every batch under no_grad, in eval mode, and
never enters the VAE's parameters, optimizer or checkpoint.
"""

from __future__ import annotations

import torch
from einops import rearrange

RQLM_MODEL_TYPES = ("rq_vae", "rq_transformer", "givt", "rq_draft_head")  # not token-level causal LMs


class SemanticTeacher:
    """`teacher(input_ids (B, T), attention_mask (B, T) | None) -> targets (B, T / C, S)`: per chunk of C tokens,
    the mean of the teacher's last-layer hidden states over the chunk's real tokens (0 for a chunk of padding)."""

    def __init__(self, model: torch.nn.Module, compression_factor: int):
        self.model = model.eval().requires_grad_(False)
        self.compression_factor = compression_factor

    @property
    def hidden_size(self) -> int:
        """S, the width of the targets (the RQ-VAE's `semantic_dim`)."""
        return self.model.config.hidden_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, tokenizer, compression_factor: int) -> SemanticTeacher:
        """Load a causal LM (folder or hub name) in fp32, frozen; one-line errors when it is missing or does not
        read the tokenizer's ids."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError):
            raise FileNotFoundError(
                f"semantic teacher {name_or_path!r} not found (no model folder there, nor a hub model in the "
                "cache); pass a `rqlm train-baseline` output folder or a causal LM's hub name"
            ) from None
        if config.model_type in RQLM_MODEL_TYPES or not hasattr(config, "hidden_size"):
            raise ValueError(
                f"semantic teacher {name_or_path!r} is a {config.model_type!r} checkpoint, not a token-level causal "
                "LM; pass a `rqlm train-baseline` output folder or a causal LM's hub name"
            )
        if config.vocab_size < len(tokenizer):
            raise ValueError(
                f"semantic teacher {name_or_path!r} has vocab_size {config.vocab_size}, fewer than the tokenizer's "
                f"{len(tokenizer)} tokens; the teacher must be a causal LM of the same tokenizer"
            )
        try:
            own_tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError):  # a model without tokenizer files: the size check above is all there is
            own_tokenizer = None
        if own_tokenizer is not None and own_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"semantic teacher {name_or_path!r} has another vocabulary than the tokenizer "
                f"({len(own_tokenizer)} against {len(tokenizer)} tokens); the teacher must be a causal LM "
                "of the same tokenizer"
            )
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
        return cls(model, compression_factor)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.FloatTensor:
        """Tokens (B, T) -> one teacher vector per chunk of C tokens (B, T / C, S), fp32."""
        if next(self.model.parameters()).device != input_ids.device:
            self.model.to(input_ids.device)
        # the base model's hidden states: the LM head's logits are not needed
        outputs = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        )
        hidden = outputs.hidden_states[-1].float()  # (B, T, S)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        mask = rearrange(mask.float(), "b (l c) -> b l c 1", c=self.compression_factor)
        hidden = rearrange(hidden, "b (l c) s -> b l c s", c=self.compression_factor)
        return (hidden * mask).sum(2) / mask.sum(2).clamp(min=1)  # (B, L, S)


__all__ = ["SemanticTeacher"]
