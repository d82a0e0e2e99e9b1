"""Named Qwen3 backbone sizes: `backbone_config("tiny", vocab_size=8192)` -> `Qwen3Config`.

A preset name gives a from-scratch config sized for a machine; any other string is a hub
name or local folder whose config is loaded with `AutoConfig.from_pretrained`, so a user
with hub access passes `Qwen/Qwen3-0.6B` through the same call.
"""

from __future__ import annotations

from transformers import AutoConfig, Qwen3Config

PRESETS = {
    # unit tests: a forward pass in milliseconds
    "test": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
    },
    # 2 CPU cores: minutes of training on the embedded corpus
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
    },
    # one GPU, or a long CPU run
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
    },
    # a larger target for drafting on CPU (GPT-2-small class, 89M parameters at 8,192 tokens): a long CPU run
    "base": {
        "hidden_size": 768,
        "intermediate_size": 2304,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "head_dim": 64,
    },
}

# shared by every preset
PRESET_DEFAULTS = {
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
}


def is_preset(name_or_path: str) -> bool:
    """True when `name_or_path` names a from-scratch preset rather than a pretrained model."""
    return name_or_path in PRESETS


def backbone_config(name_or_preset: str = "tiny", vocab_size: int | None = None, **overrides) -> Qwen3Config:
    """A `Qwen3Config` from a preset name (needs `vocab_size`) or from a hub name / local folder holding a Qwen3
    (anything else, e.g. an RQ-VAE folder, is a one-line ValueError)."""
    if is_preset(name_or_preset):
        if vocab_size is None:
            raise ValueError(f"backbone preset {name_or_preset!r} needs vocab_size (the tokenizer's length)")
        return Qwen3Config(
            **{**PRESET_DEFAULTS, **PRESETS[name_or_preset], "vocab_size": vocab_size, **overrides}
        )
    try:
        config = AutoConfig.from_pretrained(name_or_preset, **overrides)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"backbone {name_or_preset!r} is neither a preset ({', '.join(PRESETS)}) "
            f"nor a loadable model: {str(e).strip().splitlines()[0]}"
        ) from None
    if config.model_type != "qwen3":
        raise ValueError(
            f"backbone {name_or_preset!r} holds a model of type {config.model_type!r}, not a Qwen3 causal LM; "
            f"pass a Qwen3 model (e.g. Qwen/Qwen3-0.6B) or a preset ({', '.join(PRESETS)})"
        )
    if vocab_size is not None and config.vocab_size < vocab_size:
        raise ValueError(
            f"backbone {name_or_preset!r} has vocab_size {config.vocab_size} < tokenizer length {vocab_size}; "
            "use the backbone's own tokenizer"
        )
    return config
