"""Shared fixtures: tiny Qwen3 backbones built from code, so tests run offline in seconds."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_qwen3_config(vocab_size: int = 96, hidden_size: int = 32, num_hidden_layers: int = 2, **overrides):
    from transformers import Qwen3Config

    values = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": hidden_size // 2,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }
    values.update(overrides)
    return Qwen3Config(**values)


@pytest.fixture
def qwen3_config():
    return tiny_qwen3_config()


@pytest.fixture
def small_layers_prepacked(monkeypatch):
    """prepacked_linears reorders only weights of 2 MiB and more; the tiny test models' layers are all smaller."""
    import rqlm.kernels.prepacked

    monkeypatch.setattr(rqlm.kernels.prepacked, "MIN_BYTES", 0)
