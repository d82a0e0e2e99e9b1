"""Random-projection quantizer (BEST-RQ, arXiv:2202.01855): frozen random projections and codebooks.

Keywords and return values follow vector-quantize-pytorch's `RandomProjectionQuantizer`: forward
returns only the indices, meant as self-supervised targets. Nothing in it is trained.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .quantizer_utils import check_reference_keywords
from .vector_quantize import VectorQuantize


class RandomProjectionQuantizer(nn.Module):
    """Normalize (B, N, dim), project with `num_codebooks` random (dim, codebook_dim) matrices, and take
    the cosine-nearest of `codebook_size` random codes per projection.

    forward(x, mask=None) -> indices (B, N), or (B, N, num_codebooks) when num_codebooks > 1.
    """

    REFERENCE_ONLY_FORWARD_KEYWORDS: ClassVar[dict] = {"indices": None}
    PASSES_KEYWORDS_TO: ClassVar[type] = VectorQuantize

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        codebook_dim: int,
        num_codebooks: int = 1,
        norm: bool = True,
        **vq_kwargs,
    ):
        super().__init__()
        vq_kwargs = check_reference_keywords(RandomProjectionQuantizer, vq_kwargs)
        self.dim = dim
        self.num_codebooks = num_codebooks
        rand_projs = torch.empty(num_codebooks, dim, codebook_dim)
        nn.init.xavier_normal_(rand_projs)
        self.register_buffer("rand_projs", rand_projs)
        # "The input data is normalized to have 0 mean and standard deviation of 1 ... to prevent collapse" (sec. 3)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False) if norm else nn.Identity()
        vq_kwargs.setdefault(
            "codebook_dim", codebook_dim
        )  # the reference leaves it out: a random Linear per head
        self.vq = VectorQuantize(
            dim=codebook_dim * num_codebooks,
            heads=num_codebooks,
            codebook_size=codebook_size,
            use_cosine_sim=True,
            separate_codebook_per_head=True,
            **vq_kwargs,
        )

    @property
    def codebook_size(self) -> int:
        return self.vq.codebook_size

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim) -> normalized random projections (B, N, num_codebooks * codebook_dim)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected input (batch, ..., {self.dim}), got last dimension {x.shape[-1]}")
        x = self.norm(x)
        projected = torch.einsum("...d,hde->...he", x, self.rand_projs.to(x.dtype))
        return projected.flatten(-2)

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, N[, num_codebooks]) -> the chosen unit codes (B, N, num_codebooks * codebook_dim)."""
        return self.vq.get_codes_from_indices(indices)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, **reference_only) -> torch.Tensor:
        """x (B, N, dim) -> indices (B, N[, num_codebooks]); -1 at padded positions of `mask`."""
        check_reference_keywords(RandomProjectionQuantizer, reference_only, "forward")
        self.vq.eval()  # the codebooks stay random
        _, indices, _ = self.vq(self.project(x), mask=mask)
        return indices
