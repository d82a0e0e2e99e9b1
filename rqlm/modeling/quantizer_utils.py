"""Small helpers shared by every quantizer: defaults, fp32 regions, distributed sync, usage statistics."""

from __future__ import annotations

import functools
import inspect
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


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer; cpu for a module that holds no tensor."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


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


# ----------------------------------------------------------------------------- shared math


def l2norm(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Unit-normalize the last dimension; a zero vector stays zero (no NaN)."""
    return torch.nn.functional.normalize(t, p=2, dim=-1, eps=eps)


def masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of values (..., d) over positions where valid (...) is True; 0 when none is."""
    if valid is None:
        return values.mean()
    weights = valid.to(values.dtype).unsqueeze(-1)
    count = weights.sum() * values.shape[-1]
    return (values * weights).sum() / count.clamp(min=1)


class _StraightThrough(torch.autograd.Function):
    """Value of tgt, identity gradient to src."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return tgt.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _RotateTo(torch.autograd.Function):
    """Value of tgt; the gradient to src goes through the rotation (and rescaling) that maps src onto tgt."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, tgt: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(src, tgt)
        ctx.eps = eps
        return tgt.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        src, tgt = ctx.saved_tensors
        src_norm = src.norm(dim=-1, keepdim=True).clamp(min=ctx.eps)
        tgt_norm = tgt.norm(dim=-1, keepdim=True).clamp(min=ctx.eps)
        u, q = src / src_norm, tgt / tgt_norm
        w = l2norm(u + q)
        # forward is s R src with R = I - 2 w w^T + 2 q u^T and s = |tgt| / |src| (constants): grad = s R^T grad
        rotated = grad - 2 * (grad * w).sum(-1, keepdim=True) * w + 2 * (grad * q).sum(-1, keepdim=True) * u
        return rotated * (tgt_norm / src_norm), None, None


def straight_through(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: value of tgt, gradient passed unchanged to src (same shapes)."""
    return _StraightThrough.apply(src, tgt.detach())


def rotate_to(src: torch.Tensor, tgt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotation trick (arXiv:2410.06424): value of tgt (..., d), gradient to src through the rotation taking it to tgt.

    Same gradient as the reference's `rotate_to`, but the value is tgt exactly and the forward costs one copy.
    """
    return _RotateTo.apply(src, tgt.detach(), eps)


def gumbel_noise(t: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise shaped like t."""
    uniform = torch.rand_like(t)
    return -torch.log(-torch.log(uniform.clamp(min=1e-20)).clamp(min=1e-20))


# ----------------------------------------------------------------------------- reference keywords


def _is_default(value, default_value) -> bool:
    if default_value is None or value is default_value:
        return value is default_value
    try:
        return bool(value == default_value)
    except (RuntimeError, TypeError, ValueError):  # a tensor or a module compared to a default
        return False


@functools.cache
def _named_parameters(function) -> frozenset[str]:
    params = inspect.signature(function).parameters.values()
    names = {p.name for p in params if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}
    return frozenset(names - {"self"})


def keyword_names(cls: type) -> set[str]:
    """Every keyword `cls` accepts: its named parameters, its reference-only ones, and those it passes on."""
    names = _named_parameters(cls.__init__) | set(getattr(cls, "REFERENCE_ONLY_KEYWORDS", {}))
    passes_to = getattr(cls, "PASSES_KEYWORDS_TO", None)
    return names | keyword_names(passes_to) if exists(passes_to) else names


def check_reference_keywords(cls: type, extra: dict, method: str = "__init__") -> dict:
    """Validate the keywords `cls.<method>` got beyond its named ones; returns those it passes on inward.

    A keyword of vector-quantize-pytorch that rqlm does not implement (`cls.REFERENCE_ONLY_KEYWORDS`,
    or `REFERENCE_ONLY_FORWARD_KEYWORDS` for forward: name -> the reference's default) is accepted at
    that default and refused otherwise; a keyword no one knows is refused with the list of valid ones.
    Constructors pass the rest on to `cls.PASSES_KEYWORDS_TO` (the quantizer they stack).
    """
    if not extra:  # the common case, and every forward: nothing to check (signatures are slow to read)
        return {}
    if method == "__init__":
        owner = cls.__name__
        reference_only = getattr(cls, "REFERENCE_ONLY_KEYWORDS", {})
        passes_to = getattr(cls, "PASSES_KEYWORDS_TO", None)
        valid = keyword_names(cls)
    else:
        owner = f"{cls.__name__}.{method}"
        reference_only = getattr(cls, "REFERENCE_ONLY_FORWARD_KEYWORDS", {})
        passes_to = None
        valid = _named_parameters(getattr(cls, method)) | set(reference_only)
    inner = keyword_names(passes_to) if exists(passes_to) else set()
    passed_on = {}
    for name, value in extra.items():
        if name in reference_only:
            if not _is_default(value, reference_only[name]):
                raise ValueError(
                    f"{owner}: {name}={value!r} is not implemented in rqlm; leave it at "
                    f"{reference_only[name]!r} or use vector_quantize_pytorch itself"
                )
        elif name in inner:
            passed_on[name] = value
        else:
            raise ValueError(
                f"{owner} got an unknown keyword {name!r}; valid keywords: {', '.join(sorted(valid))}"
            )
    return passed_on
