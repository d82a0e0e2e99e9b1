"""Small helpers shared by every quantizer: defaults, fp32 regions, distributed sync, usage statistics."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist


def exists(value) -> bool:
    return value is not None


def default(value, fallback):
    return value if exists(value) else fallback


@contextmanager
def fp32_region(device_type: str = "cpu"):
    """Disable autocast so distances, EMA statistics and losses are computed in fp32."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor in place over data-parallel ranks (no-op on one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite a tensor in place with rank `src`'s copy (no-op on one process)."""
    if is_distributed():
        dist.broadcast(tensor, src)
    return tensor


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> dict[str, list[float]]:
    """Per-depth usage of codes: indices (..., D) -> {'perplexity': [D], 'dead_fraction': [D]}.

    Perplexity is exp(entropy of code frequencies), between 1 and codebook_size; a code is
    dead when it never occurs in `indices`. Negative indices (padding) are ignored.
    """
    if indices.dim() == 1:
        indices = indices[:, None]
    flat = indices.reshape(-1, indices.shape[-1])
    perplexity, dead = [], []
    for depth in range(flat.shape[-1]):
        column = flat[:, depth]
        column = column[column >= 0]
        counts = torch.bincount(column, minlength=codebook_size).double()
        total = counts.sum().clamp(min=1)
        probs = counts / total
        entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum().item()
        perplexity.append(math.exp(entropy))
        dead.append((counts == 0).double().mean().item())
    return {"perplexity": perplexity, "dead_fraction": dead}
