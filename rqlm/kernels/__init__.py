"""rqlm's CPU inference kernels, off unless asked for, behind one switch: `cpu_kernels(*models)`.

Two kernels, each computing what the plain path computes (tested equal to float rounding):
- `lean_stack`: a Qwen3 stack's cached, gradient-free forward without transformers' per-call machinery
  (the RQ models' spatial, depth and VAE stacks step one position at a time in generation);
- `prepacked`: linear calls of 4 to 32 rows through oneDNN on weights reordered once (the VAE decoder's
  C rows per step, a batch's rows, drafting's verification).

Models load and generate without them (a `trust_remote_code` folder never imports this package);
`rqlm generate`, `rqlm bench` and `rqlm serve` turn them on unless `--no_cpu_kernels` is given.
docs/results/speed.md shows what they pay.
"""

from __future__ import annotations

import contextlib

from torch import nn

from rqlm.modeling.layers import Qwen3Stack

from .lean_stack import lean_kernel
from .prepacked import clear_prepacked_weights, prepacked_linears


@contextlib.contextmanager
def cpu_kernels(*models: nn.Module, enabled: bool = True):
    """While the context lasts, every `Qwen3Stack` steps through `lean_forward` where it is equivalent and the
    large linear layers of `models` run their 4-to-32-row calls on prepacked weights. `enabled=False` is a no-op,
    so callers keep one code path for `--no_cpu_kernels`."""
    if not enabled:
        yield
        return
    previous = Qwen3Stack.inference_kernel
    Qwen3Stack.inference_kernel = lean_kernel
    try:
        with contextlib.ExitStack() as packing:
            for model in models:
                packing.enter_context(prepacked_linears(model))
            yield
    finally:
        Qwen3Stack.inference_kernel = previous


__all__ = ["clear_prepacked_weights", "cpu_kernels", "prepacked_linears"]
