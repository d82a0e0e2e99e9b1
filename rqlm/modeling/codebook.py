"""h codebooks of K codes in one (h, K, d) tensor, with EMA statistics, kmeans init and dead-code expiry:
the machinery under `VectorQuantize` (vector_quantize.py). Under data parallelism (`sync_codebook`), the EMA
statistics and kmeans sums are all-reduced and replacement codes are broadcast, so every rank holds the same
codebook.

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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .quantizer_utils import (
    all_reduce_sum_,
    broadcast_,
    default,
    exists,
    gumbel_noise,
    is_distributed,
    l2norm,
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
