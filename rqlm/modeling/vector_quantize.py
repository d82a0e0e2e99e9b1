"""Vector quantization with EMA or learnable codebooks (VQ-VAE, arXiv:1711.00937), computed in fp32.

Keywords and return values follow vector-quantize-pytorch's `VectorQuantize`: `forward(x, mask=None)`
returns `(quantized, indices, loss)` and `get_output_from_indices(indices)` gives `quantized` back
exactly in eval mode. The state dict uses the reference's buffer names (`_codebook.embed`,
`_codebook.embed_avg`, `_codebook.cluster_size`, `_codebook.initted`), so its checkpoints load.

Inside, h codebooks of K codes live in one (h, K, d) tensor and every input is laid out as
(h, M, d): h = heads with `separate_codebook_per_head`, else 1 (heads then share one codebook and
their vectors are stacked along M). Under data parallelism (`sync_codebook`), the EMA statistics and
kmeans sums are all-reduced and replacement codes are broadcast, so every rank holds the same codebook.

The EMA update is the reference's since 1.34 (up to 1.31 both Laplace-smoothed the counts): the
statistics start at zero and a code is (embed_avg + eps * code) / (cluster_size + eps), the EMA mean
of the vectors assigned to it; a code that gets none stays where it is (the smoothed rule pulled it to
the origin). Dead codes expire below a ratio of their codebook's mean EMA count, as in the reference
(`dead_code_threshold_ratio`, `reset_cluster_size_ratio`), or below an EMA count, as up to 1.31
(`threshold_ema_dead_code`, `reset_cluster_size`). The reference now reads a count T >= 1 as the ratio
T / codebook_size, a different threshold (the same only when the counts sum to codebook_size ** 2):
rqlm keeps the count, so its configs mean what they meant. Kmeans init also seeds the statistics with
its clusters' counts and sums (the reference leaves zeros): they are a fixed point of the update, and
from zero counts a threshold T would expire every code with fewer than T / (1 - decay) vectors in the
first batch.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .quantizer_utils import (
    all_reduce_sum_,
    broadcast_,
    check_reference_keywords,
    default,
    exists,
    fp32_region,
    gumbel_noise,
    is_distributed,
    l2norm,
    masked_mean,
    rotate_to,
    straight_through,
)


def uniform_init(*shape: int) -> torch.Tensor:
    """Kaiming-uniform tensor of the given shape (the reference's codebook init)."""
    t = torch.empty(shape)
    nn.init.kaiming_uniform_(t)
    return t


def half_similarity(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """x.e - |e|^2 / 2 = (|x|^2 - |x - e|^2) / 2 for x (h, M, d), codes (h, K, d) -> (h, M, K), one GEMM."""
    return torch.baddbmm(-0.5 * codes.pow(2).sum(-1).unsqueeze(1), x, codes.transpose(1, 2))


def nearest_codes(x: torch.Tensor, codes: torch.Tensor, use_cosine_sim: bool) -> torch.Tensor:
    """Index (h, M) of the nearest (or most cosine-similar) of codes (h, K, d) for each x (h, M, d)."""
    scores = torch.bmm(x, codes.transpose(1, 2)) if use_cosine_sim else half_similarity(x, codes)
    return scores.max(-1).indices  # faster than argmax on CPU


def orthogonal_loss(codebooks: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity between codes (h, n, d), minus its floor 1/n (arXiv:2112.00384)."""
    h, n = codebooks.shape[:2]
    normed = l2norm(codebooks)
    cosine = torch.bmm(normed, normed.transpose(1, 2))
    return cosine.pow(2).sum() / (h * n * n) - 1 / n


class Codebook(nn.Module):
    """h codebooks of K codes, embed (h, K, d), with EMA statistics, kmeans init and dead-code expiry.

    Dead-code expiry uses an absolute EMA count (`threshold_ema_dead_code` > 0) or a ratio of the
    codebook's mean EMA count (`dead_code_threshold_ratio` > 0). A replaced code restarts at the count
    `reset_cluster_size`, or `reset_cluster_size_ratio` times the mean count; by default at the threshold.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_codebooks: int = 1,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        decay: float = 0.8,
        eps: float = 1e-5,
        threshold_ema_dead_code: float = 0,
        dead_code_threshold_ratio: float = 0.0,
        reset_cluster_size: float | None = None,
        reset_cluster_size_ratio: float | None = None,
        learnable_codebook: bool = False,
        ema_update: bool = True,
        use_cosine_sim: bool = False,
        sync_codebook: bool | None = None,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.kmeans_iters = kmeans_iters
        self.decay = decay
        self.eps = eps
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.dead_code_threshold_ratio = dead_code_threshold_ratio
        if threshold_ema_dead_code > 0 and not exists(reset_cluster_size_ratio):
            reset_cluster_size = default(reset_cluster_size, threshold_ema_dead_code)
        self.reset_cluster_size = reset_cluster_size
        self.reset_cluster_size_ratio = default(reset_cluster_size_ratio, dead_code_threshold_ratio)
        self.ema_update = ema_update
        self.use_cosine_sim = use_cosine_sim
        self.sync_codebook = sync_codebook
        self._replace_round = 0  # whose batch supplies replacement codes, in turn, under data parallelism

        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            embed = uniform_init(num_codebooks, codebook_size, dim)
            embed = l2norm(embed) if use_cosine_sim else embed
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.zeros(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", torch.zeros(num_codebooks, codebook_size, dim))
        # saved with the codebook (a non-persistent buffer stays uninitialized after from_pretrained)
        self.register_buffer("codes_replaced", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_pre_hook(_allow_missing_codes_replaced)
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)

    # ------------------------------------------------------------------ lookup
    def offsets(self) -> torch.Tensor:
        """(h, 1) start of each codebook in the flattened (h * K, d) table."""
        return torch.arange(self.num_codebooks, device=self.embed.device)[:, None] * self.codebook_size

    @property
    def expires_codes(self) -> bool:
        return self.threshold_ema_dead_code > 0 or self.dead_code_threshold_ratio > 0

    @property
    def needs_sync(self) -> bool:
        return default(self.sync_codebook, True) and is_distributed()

    @torch.no_grad()
    def nearest(self, x: torch.Tensor, temperature: float = 0.0) -> torch.Tensor:
        """Nearest codes (h, M) for x (h, M, d); Gumbel-sampled from -distance / temperature if > 0."""
        embed = self.embed.detach().float()
        if temperature <= 0:
            return nearest_codes(x, embed, self.use_cosine_sim)
        if self.use_cosine_sim:
            logits = torch.bmm(x, embed.transpose(1, 2))  # (h, M, K)
        else:
            logits = -(x.pow(2).sum(-1, keepdim=True) - 2 * half_similarity(x, embed)).clamp(min=0).sqrt()
        return (logits / temperature + gumbel_noise(logits)).argmax(-1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (..., d) for non-negative indices (h, ...) (differentiable when the codebook is learnable)."""
        flat_embed = self.embed.reshape(-1, self.embed.shape[-1])
        if self.num_codebooks > 1:
            indices = indices + self.offsets().view(-1, *([1] * (indices.dim() - 1)))
        return F.embedding(indices, flat_embed)

    # ------------------------------------------------------------------ training updates
    def _assignment_stats(
        self, x: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-code sums and counts (h * K, d + 1) of x (h, M, d) assigned to indices (h, M), all-reduced."""
        h, m, d = x.shape
        rows = x.reshape(h * m, d)
        weights = None
        if exists(valid):
            weights = valid.reshape(-1).to(x.dtype)
            rows = rows.masked_fill(~valid.reshape(-1, 1), 0.0)
            indices = indices.clamp(min=0)
        flat = (indices + self.offsets()).reshape(-1)
        num_codes = h * self.codebook_size
        # sums as a sparse one-hot (h K, h M) times rows: exact like index_add_, and it has no OpenMP
        # barrier, which costs index_add_ up to 100 ms per call on an oversubscribed CPU
        positions = torch.stack([flat, torch.arange(flat.numel(), device=flat.device)])
        one_hot = torch.sparse_coo_tensor(
            positions, rows.new_ones(flat.numel()), (num_codes, flat.numel()), check_invariants=False
        )
        sums = torch.sparse.mm(one_hot, rows)  # (h K, d)
        counts = torch.bincount(flat, weights=weights, minlength=num_codes).to(x.dtype)
        stats = torch.cat([sums, counts.unsqueeze(-1)], dim=-1)
        return all_reduce_sum_(stats) if self.needs_sync else stats

    def _refresh_embed_(self) -> None:
        """Codes = EMA sums / EMA counts, eps pulling toward the current code (a code with no count stays)."""
        embed = (self.embed_avg + self.embed * self.eps) / (self.cluster_size + self.eps).unsqueeze(-1)
        self.embed.copy_(l2norm(embed) if self.use_cosine_sim else embed)

    @torch.no_grad()
    def update_(self, x: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """One EMA step from x (h, M, d) assigned to indices (h, M), then replace expired codes."""
        if not (self.ema_update or self.expires_codes):
            return
        d = x.shape[-1]
        stats = self._assignment_stats(x.float(), indices, valid).view(
            self.num_codebooks, self.codebook_size, d + 1
        )
        self.cluster_size.lerp_(stats[..., d], 1 - self.decay)
        self.embed_avg.lerp_(stats[..., :d], 1 - self.decay)
        if self.ema_update:
            self._refresh_embed_()
        self.expire_codes_(x.float(), valid)

    @torch.no_grad()
    def expire_codes_(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Codes whose EMA count fell below the threshold restart at random vectors of x (h, M, d)."""
        if not self.expires_codes or x.shape[1] == 0:
            return
        threshold, reset = self._expiry_counts()  # (h, 1) each
        expired = self.cluster_size < threshold  # (h, K)
        sync = self.needs_sync
        if sync and not expired.any():  # same answer on every rank: the counts were all-reduced
            return
        candidates, replace = self._replacement_candidates(x, valid, expired)
        if sync:
            candidates, replace = self._broadcast_candidates(candidates, replace)
        keep = ~replace.unsqueeze(-1)
        self.embed.copy_(torch.where(keep, self.embed, candidates))
        self.embed_avg.copy_(torch.where(keep, self.embed_avg, candidates * reset.unsqueeze(-1)))
        self.cluster_size.copy_(torch.where(replace, reset, self.cluster_size))
        self.codes_replaced += replace.sum()

    def _expiry_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, 1) EMA count below which a code expires, and (h, 1) count a replaced code restarts at."""
        mean = self.cluster_size.mean(-1, keepdim=True)  # (h, 1)
        if self.threshold_ema_dead_code > 0:
            threshold = torch.full_like(mean, float(self.threshold_ema_dead_code))
        else:
            threshold = mean * self.dead_code_threshold_ratio
        if exists(self.reset_cluster_size):
            reset = torch.full_like(mean, float(self.reset_cluster_size))
        else:
            reset = mean.clamp(min=self.eps) * self.reset_cluster_size_ratio
        return threshold, reset

    def _replacement_candidates(
        self, x: torch.Tensor, valid: torch.Tensor | None, expired: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Distinct random rows of x (h, M, d) for expired codes (h, K), without a host sync.

        Valid rows are ordered randomly, expired codes are ranked by EMA count (ties in random order),
        and the code of rank r takes row r: when there are more expired codes than rows, the least used
        are replaced now and the rest wait for a later batch.
        """
        h, m, d = x.shape
        valid = default(valid, torch.ones(h, m, dtype=torch.bool, device=x.device))
        row_order = torch.rand(h, m, device=x.device).masked_fill(~valid, 2.0).argsort(-1)  # valid rows first
        # expired codes first, least used first, ties in random order: a stable sort of a random order
        shuffled = torch.rand(h, self.codebook_size, device=x.device).argsort(-1)  # (h, K)
        counts = self.cluster_size.gather(-1, shuffled).masked_fill(~expired.gather(-1, shuffled), torch.inf)
        code_order = shuffled.gather(-1, counts.argsort(dim=-1, stable=True))
        rank = torch.empty_like(code_order).scatter_(
            -1, code_order, torch.arange(self.codebook_size, device=x.device).expand_as(code_order)
        )
        replace = expired & (rank < valid.sum(-1, keepdim=True))
        rows = row_order.gather(-1, rank.clamp(max=m - 1))  # (h, K)
        candidates = x.gather(1, rows.unsqueeze(-1).expand(h, self.codebook_size, d))
        return candidates, replace

    def _broadcast_candidates(
        self, candidates: torch.Tensor, replace: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank takes one rank's candidates; the source rank rotates from one replacement to the next."""
        src = self._replace_round % dist.get_world_size()
        self._replace_round += 1
        packed = broadcast_(torch.cat([candidates, replace.unsqueeze(-1).float()], dim=-1).contiguous(), src)
        return packed[..., :-1], packed[..., -1] > 0.5

    @torch.no_grad()
    def init_embed_(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Kmeans on the valid rows of x (h, M, d), synchronized across ranks; no-op when no row is valid."""
        means = self._kmeans_seed(x, valid)
        if means is None:
            return
        for _ in range(self.kmeans_iters):
            indices = nearest_codes(x, means, self.use_cosine_sim)
            stats = self._assignment_stats(x, indices, valid).view(self.num_codebooks, self.codebook_size, -1)
            sums, counts = stats[..., :-1], stats[..., -1]
            new_means = sums / counts.clamp(min=1).unsqueeze(-1)
            new_means = l2norm(new_means) if self.use_cosine_sim else new_means
            means = torch.where((counts == 0).unsqueeze(-1), means, new_means)
        self.embed.copy_(means)
        self.embed_avg.copy_(means * counts.unsqueeze(-1))  # a fixed point of the EMA update
        self.cluster_size.copy_(counts)
        self.initted.fill_(True)

    def _kmeans_seed(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor | None:
        """Initial means (h, K, d): K random valid rows per codebook, from the first rank that has rows."""
        h = x.shape[0]
        rows = [x[i] if valid is None else x[i][valid[i]] for i in range(h)]
        num_rows = min(len(r) for r in rows)
        sync = self.needs_sync
        if sync:
            per_rank = torch.zeros(dist.get_world_size(), device=x.device)
            per_rank[dist.get_rank()] = num_rows
            all_reduce_sum_(per_rank)
            if not per_rank.any():
                return None
            src = int(per_rank.nonzero()[0].item())
        elif num_rows == 0:
            return None
        means = x.new_zeros(h, self.codebook_size, x.shape[-1])
        if num_rows > 0:
            if num_rows < self.codebook_size:
                warnings.warn(
                    f"kmeans init got {num_rows} vectors for {self.codebook_size} codes; codes repeat"
                )
            means = torch.stack([sample_rows(r, self.codebook_size) for r in rows])
        return broadcast_(means, src) if sync else means


def _allow_missing_codes_replaced(module, state_dict, prefix, *args) -> None:
    """Checkpoints of vector-quantize-pytorch have no replacement counter: start it at 0."""
    state_dict.setdefault(prefix + "codes_replaced", torch.zeros((), dtype=torch.long))


def sample_rows(rows: torch.Tensor, num: int) -> torch.Tensor:
    """num random rows of rows (n, d): without replacement when n >= num."""
    n = rows.shape[0]
    picks = (
        torch.randperm(n, device=rows.device)[:num]
        if n >= num
        else torch.randint(0, n, (num,), device=rows.device)
    )
    return rows[picks]


class VectorQuantize(nn.Module):
    """Quantize (B, ..., dim) vectors to the nearest of `codebook_size` codes (vector-quantize-pytorch keywords).

    forward(x, mask=None) -> quantized (like x), indices (B, ...) or (B, ..., heads), loss ().
    Input is channel-last (B, N, dim), a batch of single vectors (B, dim), or channel-first:
    (B, dim, N) with `channel_last=False`, an image feature map (B, dim, H, W) with
    `accept_image_fmap=True` (indices (B, H, W[, heads])), a video one (B, dim, T, H, W) with
    `accept_3d_fmap=True`. `mask` (B, ...) marks real positions: padded ones neither
    update the codebook nor enter the loss, and get index -1 and output 0 (or the input itself with
    `return_zeros_for_masked_padding=False`). The loss is 0 in eval mode.
    """

    # the reference's keywords for features rqlm does not have: accepted at these (its) defaults only
    REFERENCE_ONLY_KEYWORDS: ClassVar[dict] = {
        "sync_kmeans": True,
        "layernorm_after_project_in": False,
        "commitment_use_cross_entropy_loss": False,
        "codebook_diversity_loss_weight": 0.0,
        "codebook_diversity_temperature": 100.0,
        "straight_through": False,
        "directional_reparam": False,
        "directional_reparam_variance": 5e-3,
        "sync_affine_param": False,
        "vq_bridge": None,
        "manual_ema_update": False,
        "in_place_codebook_optimizer": None,
        "manual_in_place_optimizer_update": False,
        "affine_param": False,
        "affine_param_batch_decay": 0.99,
        "affine_param_codebook_decay": 0.9,
        "sync_update_v": 0.0,
        "route_gradients_to_input": True,
    }
    REFERENCE_ONLY_FORWARD_KEYWORDS: ClassVar[dict] = {
        "indices": None,
        "lens": None,
        "topk": None,
        "return_loss_breakdown": False,
        "codebook_transform_fn": None,
        "ema_update_weight": None,
        "accum_ema_update": False,
        "ema_update": None,
    }

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        decay: float = 0.8,
        eps: float = 1e-5,
        freeze_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        use_cosine_sim: bool = False,
        threshold_ema_dead_code: float = 0,
        dead_code_threshold_ratio: float = 0.0,
        reset_cluster_size: float | None = None,
        reset_cluster_size_ratio: float | None = None,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        commitment_weight: float = 1.0,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        rotation_trick: bool | None = None,
        sync_codebook: bool | None = None,
        ema_update: bool | None = None,
        learnable_codebook: bool | None = None,
        return_zeros_for_masked_padding: bool = True,
        **reference_only,
    ):
        super().__init__()
        check_reference_keywords(VectorQuantize, reference_only)
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("pass at most one of accept_image_fmap and accept_3d_fmap")
        learnable_codebook = bool(learnable_codebook)
        ema_update = default(ema_update, not learnable_codebook)
        _check_arguments(
            dim,
            codebook_size,
            heads,
            decay,
            kmeans_init,
            kmeans_iters,
            use_cosine_sim,
            learnable_codebook,
            ema_update,
            orthogonal_reg_active_codes_only,
            separate_codebook_per_head,
        )
        _check_dead_code_arguments(
            threshold_ema_dead_code, dead_code_threshold_ratio, reset_cluster_size, reset_cluster_size_ratio
        )
        codebook_dim = default(codebook_dim, dim)
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.heads = heads
        self.separate_codebook_per_head = separate_codebook_per_head
        self.channel_last = channel_last
        self.accept_image_fmap = accept_image_fmap
        self.accept_3d_fmap = accept_3d_fmap
        # spatial dimensions of a channel-first feature map: 2 for images, 3 for video, None for any
        self.fmap_dims = 2 if accept_image_fmap else 3 if accept_3d_fmap else None
        self.use_cosine_sim = use_cosine_sim
        self.kmeans_init = kmeans_init
        self.freeze_codebook = freeze_codebook
        self.commitment_weight = commitment_weight
        self.learnable_codebook = learnable_codebook
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sample_codebook_temp = sample_codebook_temp
        self.rotation_trick = default(rotation_trick, dim > 1)
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding

        self.has_projections = codebook_dim * heads != dim
        self.project_in = nn.Linear(dim, codebook_dim * heads) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim * heads, dim) if self.has_projections else nn.Identity()
        self._codebook = Codebook(
            dim=codebook_dim,
            codebook_size=codebook_size,
            num_codebooks=heads if separate_codebook_per_head else 1,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            decay=decay,
            eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            dead_code_threshold_ratio=dead_code_threshold_ratio,
            reset_cluster_size=reset_cluster_size,
            reset_cluster_size_ratio=reset_cluster_size_ratio,
            learnable_codebook=learnable_codebook or orthogonal_reg_weight > 0,
            ema_update=ema_update,
            use_cosine_sim=use_cosine_sim,
            sync_codebook=sync_codebook,
        )

    # ------------------------------------------------------------------ codebook access
    @property
    def channel_first(self) -> bool:
        """Whether inputs and outputs carry dim on axis 1: channel_last=False or a feature map."""
        return not self.channel_last or exists(self.fmap_dims)

    @property
    def ema_update(self) -> bool:
        return self._codebook.ema_update

    @property
    def codebook(self) -> torch.Tensor:
        """The codes: (K, codebook_dim), or (heads, K, codebook_dim) with separate codebooks per head."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes: torch.Tensor) -> None:
        with torch.no_grad():
            self._codebook.embed.copy_(codes if self.separate_codebook_per_head else codes.unsqueeze(0))

    @property
    def codes_replaced(self) -> torch.Tensor:
        """How many codes dead-code expiry has replaced since construction (a long scalar)."""
        return self._codebook.codes_replaced

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, ...[, heads]) -> codes (B, ..., heads * codebook_dim), channel-first if channel_first; -1 gives 0."""
        per_head = indices if self.heads > 1 else indices.unsqueeze(-1)  # (..., heads)
        padding = per_head < 0
        if self.separate_codebook_per_head:
            codes = self._codebook.lookup(per_head.clamp(min=0).movedim(-1, 0)).movedim(0, -2)
        else:
            codes = self._codebook.lookup(per_head.clamp(min=0).unsqueeze(0))[0]
        codes = codes.masked_fill(padding.unsqueeze(-1), 0.0).flatten(-2)  # (..., heads * codebook_dim)
        return codes.movedim(-1, 1) if self.channel_first else codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, ...[, heads]) -> quantized output, equal to forward's in eval mode."""
        codes = self.get_codes_from_indices(indices)
        codes = codes.movedim(1, -1) if self.channel_first else codes
        out = self.project_out(codes)
        if self.return_zeros_for_masked_padding:
            padding = (indices < 0) if self.heads == 1 else (indices < 0).all(-1)
            out = out.masked_fill(padding.unsqueeze(-1), 0.0)
        return out.movedim(-1, 1) if self.channel_first else out

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        **reference_only,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, dim) -> quantized (B, N, dim), indices (B, N[, heads]), loss (); see the class docstring."""
        check_reference_keywords(VectorQuantize, reference_only, "forward")
        x, mask, spatial = self._as_sequence(x, mask)  # (B, N, dim), (B, N)
        batch, length = x.shape[:2]
        z = self.project_in(x)  # (B, N, heads * codebook_dim)
        valid = self._head_mask(mask)  # (h, M)
        with fp32_region(z.device.type):
            flat = self.to_codebook_space(z)  # (h, M, codebook_dim)
            quantized, indices, loss = self._quantize_flat(
                flat,
                valid,
                temperature=default(sample_codebook_temp, self.sample_codebook_temp),
                freeze_codebook=default(freeze_codebook, self.freeze_codebook),
            )
            quantized = self._merge_heads(quantized, batch, length)  # (B, N, heads * codebook_dim)
            indices = self._merge_heads(indices.unsqueeze(-1), batch, length)  # (B, N, heads)
        quantized = self.project_out(quantized.to(z.dtype))  # (B, N, dim)
        indices = indices if self.heads > 1 else indices[..., 0]
        if exists(mask):
            padding_value = 0.0 if self.return_zeros_for_masked_padding else x
            quantized = torch.where(mask.unsqueeze(-1), quantized, padding_value)
            indices = indices.masked_fill(~(mask if self.heads == 1 else mask.unsqueeze(-1)), -1)
        return self._restore(quantized, spatial), self._restore_indices(indices, spatial), loss

    def _quantize_flat(
        self, flat: torch.Tensor, valid: torch.Tensor | None, temperature: float, freeze_codebook: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codebook-space step: flat (h, M, d) fp32 -> quantized (h, M, d), indices (h, M), loss ()."""
        if self.kmeans_init and not bool(self._codebook.initted):
            self._codebook.init_embed_(flat.detach(), valid)
        sample = self.training and self.stochastic_sample_codes
        indices = self._codebook.nearest(flat.detach(), temperature if sample else 0.0)
        codes = self._codebook.lookup(indices)  # (h, M, d)
        if self.training and not freeze_codebook:
            self._codebook.update_(flat.detach(), indices, valid)
        loss = self._loss(flat, codes, indices, valid, freeze_codebook)
        if self.training and flat.requires_grad:
            codes = rotate_to(flat, codes) if self.rotation_trick else straight_through(flat, codes)
        return codes, indices, loss

    def _loss(
        self,
        flat: torch.Tensor,
        codes: torch.Tensor,
        indices: torch.Tensor,
        valid: torch.Tensor | None,
        freeze: bool,
    ) -> torch.Tensor:
        """Commitment (+ orthogonal regularization) loss in training; 0 in eval."""
        loss = torch.zeros((), device=flat.device, requires_grad=self.training)
        if not self.training:
            return loss
        if self.commitment_weight > 0:
            target = codes if self.learnable_codebook and not freeze else codes.detach()
            commitment = (
                F.mse_loss(flat, target) if valid is None else masked_mean((target - flat).pow(2), valid)
            )
            loss = loss + commitment * self.commitment_weight
        if self.orthogonal_reg_weight > 0:
            loss = loss + self._orthogonal_loss(indices, valid) * self.orthogonal_reg_weight
        return loss

    def _orthogonal_loss(self, indices: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        codebook = self._codebook.embed
        if self.orthogonal_reg_active_codes_only:
            used = indices if valid is None else indices[valid]
            codebook = codebook[:, torch.unique(used)]
        num_codes = codebook.shape[1]
        if exists(self.orthogonal_reg_max_codes) and num_codes > self.orthogonal_reg_max_codes:
            codebook = codebook[
                :, torch.randperm(num_codes, device=codebook.device)[: self.orthogonal_reg_max_codes]
            ]
        return orthogonal_loss(codebook)

    # ------------------------------------------------------------------ layout
    def to_codebook_space(self, z: torch.Tensor) -> torch.Tensor:
        """Projected input (B, N, heads * d) -> fp32 (h, M, d), unit-normalized for cosine similarity."""
        batch, length = z.shape[:2]
        z = z.float()
        if self.separate_codebook_per_head:
            flat = z.reshape(batch * length, self.heads, self.codebook_dim).transpose(0, 1).contiguous()
        else:
            flat = z.reshape(1, batch * length * self.heads, self.codebook_dim)
        return l2norm(flat) if self.use_cosine_sim else flat

    def _head_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Mask (B, N) -> (h, M), matching `to_codebook_space`."""
        if mask is None:
            return None
        per_head = mask.reshape(-1, 1).expand(-1, self.heads)  # (B N, heads)
        return per_head.t() if self.separate_codebook_per_head else per_head.reshape(1, -1)

    def _merge_heads(self, t: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """(h, M, c) -> (B, N, heads * c), the inverse of `to_codebook_space`."""
        if self.separate_codebook_per_head:
            t = t.transpose(0, 1)
        return t.reshape(batch, length, -1)

    def _as_sequence(
        self, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...] | None]:
        """Any accepted input -> (B, N, dim) and mask (B, N); `spatial` remembers the original layout."""
        if x.dim() < 2:
            raise ValueError(f"expected input of shape (batch, ..., {self.dim}), got {tuple(x.shape)}")
        if exists(self.fmap_dims) and x.dim() != self.fmap_dims + 2:
            spatial_names = "height, width" if self.fmap_dims == 2 else "time, height, width"
            raise ValueError(
                f"expected a feature map (batch, {self.dim}, {spatial_names}), got shape {tuple(x.shape)}"
            )
        if x.dim() == 2:
            if exists(mask):
                raise ValueError("mask is not supported for a batch of single vectors (batch, dim)")
            spatial = None
            x = x.unsqueeze(1)
        else:
            if self.channel_first:
                x = x.movedim(1, -1)
            spatial = tuple(x.shape[1:-1])
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        if x.shape[-1] != self.dim:
            layout = "(batch, dim, ...)" if self.channel_first else "(batch, ..., dim)"
            raise ValueError(f"expected input {layout} with dim {self.dim}, got last dimension {x.shape[-1]}")
        if exists(mask):
            if mask.numel() != x.shape[0] * x.shape[1]:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not match input positions {tuple(x.shape[:2])}"
                )
            mask = mask.reshape(x.shape[:2]).bool()
        return x, mask, spatial

    def _restore(self, quantized: torch.Tensor, spatial: tuple[int, ...] | None) -> torch.Tensor:
        if spatial is None:
            return quantized[:, 0]
        quantized = quantized.reshape(quantized.shape[0], *spatial, quantized.shape[-1])
        return quantized.movedim(-1, 1) if self.channel_first else quantized

    def _restore_indices(self, indices: torch.Tensor, spatial: tuple[int, ...] | None) -> torch.Tensor:
        if spatial is None:
            return indices[:, 0]
        return indices.reshape(indices.shape[0], *spatial, *indices.shape[2:])


def _check_arguments(
    dim,
    codebook_size,
    heads,
    decay,
    kmeans_init,
    kmeans_iters,
    use_cosine_sim,
    learnable_codebook,
    ema_update,
    orthogonal_reg_active_codes_only,
    separate_codebook_per_head,
) -> None:
    """One-line errors for bad VectorQuantize keywords, including the combinations the reference rejects."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    if kmeans_init and kmeans_iters < 1:
        raise ValueError(f"kmeans_init=True needs kmeans_iters >= 1, got {kmeans_iters}")
    if use_cosine_sim and learnable_codebook:
        raise ValueError("use_cosine_sim=True does not support learnable_codebook=True; use the EMA codebook")
    if learnable_codebook and ema_update:
        raise ValueError(
            "learnable_codebook=True needs ema_update=False (the EMA would overwrite the learned codes)"
        )
    if orthogonal_reg_active_codes_only and separate_codebook_per_head and heads > 1:
        raise ValueError("orthogonal_reg_active_codes_only does not support separate_codebook_per_head=True")


def _check_dead_code_arguments(threshold, ratio, reset, reset_ratio) -> None:
    """One-line errors for the dead-code keywords: one threshold, one reset count, each used and in range."""
    if threshold < 0:
        raise ValueError(f"threshold_ema_dead_code must be >= 0 (an EMA count), got {threshold}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"dead_code_threshold_ratio must lie in [0, 1) (of the mean EMA count), got {ratio}")
    if threshold > 0 and ratio > 0:
        raise ValueError(
            f"pass one dead-code threshold: threshold_ema_dead_code={threshold} (an EMA count) or "
            f"dead_code_threshold_ratio={ratio} (of the mean EMA count), not both"
        )
    if exists(reset) and exists(reset_ratio):
        raise ValueError("pass reset_cluster_size (an EMA count) or reset_cluster_size_ratio, not both")
    for name, value in (("reset_cluster_size", reset), ("reset_cluster_size_ratio", reset_ratio)):
        if exists(value) and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        if exists(value) and threshold == 0 and ratio == 0:
            raise ValueError(
                f"{name}={value} has no effect without dead-code expiry; "
                "set dead_code_threshold_ratio or threshold_ema_dead_code too"
            )
