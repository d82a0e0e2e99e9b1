"""Quantizer dropout for residual quantizers (SoundStream, arXiv:2107.03312): train with a random depth."""

from __future__ import annotations

import math
import random

import torch

from .quantizer_utils import all_reduce_sum_, exists

SEED_RANGE = 10_000


def sync_seed(device: torch.device) -> int:
    """A random seed that is the same on every data-parallel rank (summed over ranks)."""
    seed = torch.randint(0, SEED_RANGE, (), device=device)
    return int(all_reduce_sum_(seed).item())


def sample_dropout_index(
    num_quantizers: int, cutoff_index: int, multiple_of: int, device: torch.device, seed: int | None = None
) -> int:
    """The last depth to run this step: uniform in [cutoff_index, num_quantizers), rounded up so that
    the number of depths kept is a multiple of `multiple_of` (Encodec's structured dropout)."""
    seed = seed if exists(seed) else sync_seed(device)
    index = random.Random(seed).randrange(cutoff_index, num_quantizers)
    if multiple_of != 1:
        index = math.ceil((index + 1) / multiple_of) * multiple_of - 1
    return index


def check_dropout_arguments(num_quantizers: int, cutoff_index: int, multiple_of: int) -> None:
    if num_quantizers < 1:
        raise ValueError(f"num_quantizers must be >= 1, got {num_quantizers}")
    if not 0 <= cutoff_index < num_quantizers:
        raise ValueError(f"quantize_dropout_cutoff_index is outside [0, {num_quantizers}): {cutoff_index}")
    if multiple_of < 1:
        raise ValueError(f"quantize_dropout_multiple_of must be >= 1, got {multiple_of}")
