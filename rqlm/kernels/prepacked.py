"""Multi-row linear calls on CPU through oneDNN with reordered weights: `prepacked_linears(model)`.

Measured on the 2-core Xeon (AVX-512, MKL 2024.2), fp32: MKL's GEMM runs a linear layer whose
weight streams from memory at the speed of that stream for 1 to 3 rows of input, and 1.5-2x slower
from 4 rows on (a 1536 x 512 layer, one thread: 217 us for 4 rows, 318 us for 8; the 151,936 x 1024
LM head: 85 ms for 4 rows against 39 ms for one). oneDNN's GEMM on a weight reordered ahead of time
(what torch.compile's CPU freezing does) costs 0.45-0.75x MKL's there, with one thread or two. For
weights of under 1 MiB, which stay in cache, MKL is as fast or faster (up to 1.4x with two threads),
and from about 32 rows on MKL is efficient again. So only weights of at least MIN_BYTES, and only
calls of MKL_FAST_ROWS < rows <= MAX_ROWS, take the reordered path. Two calls hit it: the target's
verification forward in drafting (k + 1 rows) and the VAE decoder's LM head in the RQ model's own
`generate` (C rows per sequence per step); a batched baseline's steps too. The reordering takes about
as long as 6 forwards, so a reordered copy is kept per layer while its weight stays the same (it
goes with the layer, or with `clear_prepacked_weights`): it costs those weights in memory again.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

MKL_FAST_ROWS = 3  # MKL's fp32 GEMM streams the weights at memory speed up to this many rows
MAX_ROWS = 32  # from about here on MKL's GEMM is efficient again
MIN_BYTES = 2**21  # smaller weights stay in cache, where MKL is as fast
REORDER_HINT = MKL_FAST_ROWS + 1  # the row count oneDNN's layout is tuned for: measured as good from 4 to 32

# nn.Linear -> ((its weight's version and data pointer then), weakref to the weight, the reordered weight)
_REORDERED = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def prepacked_linears(model: nn.Module):
    """While the context lasts, `model`'s fp32 CPU `nn.Linear` layers with weights of at least MIN_BYTES
    run their calls of MKL_FAST_ROWS < rows <= MAX_ROWS under `torch.no_grad` (generation) through oneDNN
    on reordered weights; other calls and layers keep `F.linear`. Yields how many layers it reordered:
    0 (nothing changed) without oneDNN, off CPU or fp32, or when a reordered product disagrees with
    `F.linear` on a random input. Layers with their own forward (hooks) are left alone; every layer is
    as before after the context."""
    reordered = _reorder_linears(model)
    for layer, weight in reordered:
        layer.forward = functools.partial(_prepacked_forward, layer, weight)
    try:
        yield len(reordered)
    finally:
        for layer, _ in reordered:
            del layer.forward


def clear_prepacked_weights() -> None:
    """Free every reordered weight that `prepacked_linears` keeps for later calls."""
    _REORDERED.clear()


def _reorder_linears(model: nn.Module) -> list[tuple[nn.Linear, torch.Tensor]]:
    """(layer, its reordered weight) for each large plain fp32 CPU linear; [] when oneDNN cannot, or computes another product."""
    layers = [
        m for m in model.modules()
        if type(m) is nn.Linear and "forward" not in vars(m) and m.weight.device.type == "cpu"
        and m.weight.dtype == torch.float32 and m.weight.numel() * m.weight.element_size() >= MIN_BYTES
    ]
    if not layers or not torch.backends.mkldnn.is_available():
        return []
    try:
        return [(m, _reordered_weight(m)) for m in layers]
    except (RuntimeError, AssertionError):  # an op missing from this torch build, or a wrong result
        return []


def _reordered_weight(layer: nn.Linear) -> torch.Tensor:
    """The kept reordered copy of the layer's weight, redone (and checked against `F.linear` on a random
    input) when the weight changed, in place or replaced."""
    weight = layer.weight
    key = (weight._version, weight.data_ptr())
    kept = _REORDERED.get(layer)
    if kept is None or kept[1]() is not weight or kept[0] != key:
        reordered = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), REORDER_HINT)
        x = torch.randn(REORDER_HINT + 1, layer.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(
                _prepacked_forward(layer, reordered, x), F.linear(x, weight, layer.bias), rtol=1e-4, atol=1e-4
            )
        kept = (key, weakref.ref(weight), reordered)
        _REORDERED[layer] = kept
    return kept[2]


def _prepacked_forward(layer: nn.Linear, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # with gradients on, F.linear: no gradient flows into a reordered copy
    if not torch.is_grad_enabled() and MKL_FAST_ROWS * x.shape[-1] < x.numel() <= MAX_ROWS * x.shape[-1]:
        return torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")
    return F.linear(x, layer.weight, layer.bias)


__all__ = ["MAX_ROWS", "MIN_BYTES", "MKL_FAST_ROWS", "clear_prepacked_weights", "prepacked_linears"]
