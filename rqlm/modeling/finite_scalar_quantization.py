"""Finite scalar quantization (FSQ, arXiv:2309.15505): round every latent channel to a few fixed levels.

Keywords and return values follow vector-quantize-pytorch's `FSQ`, and so do the numbers: the same
inputs give the same indices and outputs. The implicit codebook is the grid of all level combinations,
so `codebook_size = prod(levels)` and nothing is learned except the optional projections. The grid's
constants are derived from `levels` on the device in use, never stored as buffers: `from_pretrained`
leaves non-persistent buffers uninitialised, and persistent ones would break the reference's state dicts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .quantizer_utils import check_reference_keywords, default, exists, fp32_region, module_device

BOUND_EPS = 1e-3  # keeps tanh's range a hair wider than the outermost levels


def round_ste(z: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return z + (z.round() - z).detach()


def floor_ste(z: torch.Tensor) -> torch.Tensor:
    """Floor with a straight-through gradient."""
    return z + (z.floor() - z).detach()


class FSQ(nn.Module):
    """Quantize (..., dim) vectors channel by channel onto `levels` (one entry per codebook channel).

    `dim` defaults to len(levels) * num_codebooks; any other `dim` adds linear projections in and out.
    `preserve_symmetry` uses the symmetric grid of arXiv:2411.19842 (needed for levels of 2, and for
    `noise_dropout`); `bound_hard_clamp` clamps instead of tanh (for inputs already soft-clamped).
    `materialize_codebook=False` makes `implicit_codebook` None, as in the reference, so that nothing of
    size codebook_size is ever built (for grids too large to list); quantizing and decoding never need it.
    """

    def __init__(
        self,
        levels: list[int] | tuple[int, ...],
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        scale: float | None = None,
        allowed_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
        channel_first: bool = False,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        force_quantization_f32: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.0,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
        materialize_codebook: bool = True,
        **reference_only,
    ):
        super().__init__()
        check_reference_keywords(FSQ, reference_only)
        levels = [int(level) for level in levels]
        keep_num_codebooks_dim = default(keep_num_codebooks_dim, num_codebooks > 1)
        _check_arguments(levels, num_codebooks, keep_num_codebooks_dim, preserve_symmetry, noise_dropout)

        self.levels = levels
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = default(dim, self.effective_codebook_dim)
        self.codebook_size = math.prod(levels)
        self.num_quantizers = 1
        self.scale = scale  # accepted for compatibility; unused, as in the reference
        self.allowed_dtypes = tuple(allowed_dtypes)
        self.channel_first = channel_first
        self.return_indices = return_indices
        self.force_quantization_f32 = force_quantization_f32
        self.preserve_symmetry = preserve_symmetry
        self.noise_dropout = noise_dropout
        self.bound_hard_clamp = bound_hard_clamp
        self.orthogonal_rotation = orthogonal_rotation
        self.materialize_codebook = materialize_codebook

        self.has_projections = self.dim != self.effective_codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.effective_codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(self.effective_codebook_dim, self.dim, bias=projection_has_bias)
        else:
            self.project_in = self.project_out = nn.Identity()

        if orthogonal_rotation:
            self.register_buffer("orthogonal_rot", nn.init.orthogonal_(torch.empty(len(levels), len(levels))))

        # constants of the grid, derived from `levels` per device (see the module docstring)
        self._grid_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ grid constants

    def _grid(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Constants of the level grid on `device` (fp32, and int64 levels/basis), with the reference's ops."""
        grid = self._grid_cache.get(device)
        if grid is None:
            levels = torch.tensor(self.levels, dtype=torch.int32, device=device)
            half_l = (levels - 1) * (1 + BOUND_EPS) / 2
            offset = torch.where(levels % 2 == 0, 0.5, 0.0)
            ratio = offset / half_l
            grid = {
                "levels_minus_1": (levels - 1).float(),
                "step": 2.0 / (levels - 1),  # symmetric grid spacing
                "half_l": half_l,
                "offset": offset,
                "shift": ratio if self.bound_hard_clamp else torch.atanh(ratio),
                "half_width": (levels // 2).float(),
                "levels": levels.long(),
                "basis": torch.cumprod(torch.tensor([1] + self.levels[:-1], device=device), dim=0),
            }
            self._grid_cache[device] = grid
        return grid

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        return z.clamp(-1.0, 1.0) if self.bound_hard_clamp else z.tanh()

    # ------------------------------------------------------------------ quantization

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., d) fp32 -> (codes in [-1, 1] with straight-through gradient, level indices (..., d))."""
        grid = self._grid(z.device)
        if self.preserve_symmetry:
            bracket = grid["levels_minus_1"] * (self._bound(z) + 1) / 2.0 + 0.5
            level_index = floor_ste(bracket)  # 0 .. L-1
            return grid["step"] * level_index - 1.0, level_index.detach()
        bounded = self._bound(z + grid["shift"]) * grid["half_l"] - grid["offset"]
        rounded = round_ste(bounded)  # -L//2 .. (L-1)//2
        return rounded / grid["half_width"], rounded.detach() + grid["half_width"]

    def _level_indices_to_indices(self, level_index: torch.Tensor) -> torch.Tensor:
        """Level indices (..., d) -> flat codebook indices (...) as int64."""
        return (level_index.long() * self._grid(level_index.device)["basis"]).sum(dim=-1)

    def _maybe_apply_noise(self, codes: torch.Tensor) -> torch.Tensor:
        """Noise dropout (arXiv:2411.19842): replace a random fraction of codes by code + U(-0.5, 0.5)."""
        if not self.training or self.noise_dropout == 0.0:
            return codes
        noise_mask = torch.full_like(codes, self.noise_dropout).bernoulli_().bool()
        noise = torch.rand_like(codes) - 0.5
        return torch.where(noise_mask, codes + noise, codes).clamp(-1.0, 1.0)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z (B, N, dim), or (B, dim, ...) when channel-first -> (quantized like z, indices).

        indices are int64 of shape (B, N), or (B, N, num_codebooks) with keep_num_codebooks_dim;
        image-like inputs (ndim >= 4) are channel-first and give indices (B, H, W[, C]).
        """
        move_channel = self.channel_first or z.ndim >= 4
        if move_channel:
            z = z.movedim(1, -1)  # (B, ..., dim)
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ expected feature dimension {self.dim}, got shape {tuple(z.shape)}")

        z = self.project_in(z).unflatten(-1, (self.num_codebooks, self.codebook_dim))  # (..., c, d)
        if self.orthogonal_rotation:
            z = z @ self.orthogonal_rot

        codes, indices = self._quantize_fp32(z)  # (..., c, d), (..., c)
        out = self.project_out(codes.flatten(-2))  # (..., dim)

        if move_channel:
            out = out.movedim(-1, 1)
        if exists(indices) and not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return out, indices

    def _quantize_fp32(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(..., c, d) -> (codes in z's dtype, indices (..., c)); the rounding runs in fp32 if forced."""
        orig_dtype = z.dtype
        if not self.force_quantization_f32:
            return self._quantize_codes(z)
        with fp32_region(z.device.type):
            if orig_dtype not in self.allowed_dtypes:
                z = z.float()
            codes, indices = self._quantize_codes(z)
        return codes.to(orig_dtype), indices

    def _quantize_codes(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        codes, level_index = self.quantize(z)
        indices = self._level_indices_to_indices(level_index) if self.return_indices else None
        codes = self._maybe_apply_noise(codes)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        return codes, indices

    # ------------------------------------------------------------------ indices <-> codes

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Flat indices (...) -> per-channel level indices (..., d) in 0 .. L-1."""
        grid = self._grid(indices.device)
        return (indices[..., None] // grid["basis"]) % grid["levels"]

    def _level_indices_to_codes(self, level_index: torch.Tensor) -> torch.Tensor:
        grid = self._grid(level_index.device)
        if self.preserve_symmetry:
            return level_index * grid["step"] - 1.0
        return (level_index - grid["half_width"]) / grid["half_width"]

    def codes_to_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        """Codes (..., d) on the grid -> flat indices (...) as int64."""
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"codes must have last dimension {self.codebook_dim}, got {tuple(zhat.shape)}")
        grid = self._grid(zhat.device)
        if self.preserve_symmetry:
            level_index = (zhat + 1.0) / grid["step"]
        else:
            level_index = zhat * grid["half_width"] + grid["half_width"]
        return self._level_indices_to_indices(level_index.round())

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, N[, C]) -> quantized (B, N, dim) (channel-first for images / channel_first)."""
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]  # (..., 1)
        codes = self._level_indices_to_codes(self.indices_to_level_indices(indices))  # (..., c, d)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        codes = self.project_out(codes.flatten(-2))  # (..., dim)
        if is_img_or_video or self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes

    @property
    def implicit_codebook(self) -> torch.Tensor | None:
        """The grid's codes (codebook_size, d) before any projection; None unless materialize_codebook."""
        return self.grid_codes() if self.materialize_codebook else None

    def grid_codes(self) -> torch.Tensor:
        """The grid's codes (codebook_size, d) before any projection, built now on the module's device."""
        all_indices = torch.arange(self.codebook_size, device=module_device(self))
        return self._level_indices_to_codes(self.indices_to_level_indices(all_indices))


def _check_arguments(levels, num_codebooks, keep_num_codebooks_dim, preserve_symmetry, noise_dropout):
    if len(levels) == 0:
        raise ValueError("FSQ needs at least one level, e.g. levels=[8, 5, 5, 5]")
    if min(levels) < 2:
        raise ValueError(f"FSQ levels must all be >= 2, got {levels}")
    if 2 in levels and not preserve_symmetry:
        raise ValueError(f"levels {levels} contain 2: pass preserve_symmetry=True or use levels >= 3")
    if num_codebooks < 1:
        raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")
    if num_codebooks > 1 and not keep_num_codebooks_dim:
        raise ValueError("num_codebooks > 1 needs keep_num_codebooks_dim=True (indices keep a codebook axis)")
    if not 0.0 <= noise_dropout <= 1.0:
        raise ValueError(f"noise_dropout must be in [0, 1], got {noise_dropout}")
    if noise_dropout > 0 and not preserve_symmetry:
        raise ValueError("noise_dropout > 0 needs preserve_symmetry=True")
