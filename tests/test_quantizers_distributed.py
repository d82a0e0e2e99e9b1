"""A real 2-process gloo run: ranks see different data, yet after training steps with EMA, kmeans init,
dead-code expiry (below an EMA count, and below a ratio of the mean count) and quantize dropout every rank
holds bit-identical codebooks; and those codebooks are the ones one process reaches on the two ranks'
batches concatenated (the statistics are summed over ranks, not taken from one of them)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from rqlm.modeling import codebook
from rqlm.quantizers import ResidualVQ, VectorQuantize

WORLD_SIZE, STEPS, DIM = 2, 4, 8
ROWS_PER_RANK, LENGTH = 2, 12


def build_quantizers(
    sync_codebook: bool | None, threshold_ema_dead_code: float = 2, quantize_dropout: bool = True
) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)  # same initial weights on every rank
    common = {"kmeans_init": True, "kmeans_iters": 3, "sync_codebook": sync_codebook}
    absolute = {"threshold_ema_dead_code": threshold_ema_dead_code}
    # "heads" expires codes below a share of its mean EMA count instead: both rules run across ranks
    ratio = {"dead_code_threshold_ratio": threshold_ema_dead_code / 4, "reset_cluster_size_ratio": 0.25}
    return {
        "rvq": ResidualVQ(
            dim=DIM,
            num_quantizers=3,
            codebook_size=16,
            quantize_dropout=quantize_dropout,
            **common,
            **absolute,
        ),
        "shared": ResidualVQ(
            dim=DIM, num_quantizers=2, codebook_size=16, shared_codebook=True, **common, **absolute
        ),
        "heads": VectorQuantize(
            dim=DIM,
            codebook_size=16,
            heads=2,
            separate_codebook_per_head=True,
            use_cosine_sim=True,
            **common,
            **(ratio if threshold_ema_dead_code else {}),
        ),
    }


def train(quantizers: dict[str, torch.nn.Module], rank: int) -> None:
    generator = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    for step in range(STEPS):
        x = torch.randn(2, 12 + 4 * rank, DIM, generator=generator) * (1 + rank)
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
        mask[:, -3:] = step % 2 == 0  # some steps pad the tail
        for quantizer in quantizers.values():
            quantized, _, loss = quantizer(x.clone().requires_grad_(), mask=mask)
            (quantized.sum() + loss.sum()).backward()


def first_rows(rows: torch.Tensor, num: int) -> torch.Tensor:
    """Kmeans seeds without randomness: the first num rows (rank 0's rows come first in the full batch)."""
    return rows[:num]


def train_on_shared_batches(quantizers: dict[str, torch.nn.Module], rows: slice) -> None:
    """Steps on `rows` of full batches (4, LENGTH, DIM) that every rank draws alike; rank 1 pads its tail."""
    generator = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        x = torch.randn(WORLD_SIZE * ROWS_PER_RANK, LENGTH, DIM, generator=generator)
        x[ROWS_PER_RANK:] *= 2  # the halves differ in scale: one rank's statistics alone are far off
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
        mask[-1, -5:] = False
        for quantizer in quantizers.values():
            quantized, _, loss = quantizer(x[rows].clone().requires_grad_(), mask=mask[rows])
            (quantized.sum() + loss.sum()).backward()


def flat_state(quantizers: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name, q in quantizers.items() for key, value in q.state_dict().items()}


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        for sync in (None, False):  # None: synchronized because a process group is up; False: a control
            quantizers = build_quantizers(sync)
            train(quantizers, rank)
            state = {
                f"{name}.{key}": value
                for name, q in quantizers.items()
                for key, value in q.state_dict().items()
            }
            state["replaced"] = torch.stack(
                [quantizers["rvq"].codes_replaced.sum(), quantizers["heads"].codes_replaced]
            )
            torch.save(state, os.path.join(out_dir, f"sync={sync}-rank{rank}.pt"))
        codebook.sample_rows = first_rows  # kmeans seeds from rank 0's first rows: deterministic
        quantizers = build_quantizers(None, threshold_ema_dead_code=0, quantize_dropout=False)
        train_on_shared_batches(quantizers, slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK))
        torch.save(flat_state(quantizers), os.path.join(out_dir, f"halves-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_states(tmp_path_factory):
    """The folder of what each rank saved, from one 2-process run shared by this file's tests."""
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return out_dir


def test_two_gloo_ranks_hold_identical_codebooks(rank_states):
    tmp_path = rank_states
    synced = [torch.load(tmp_path / f"sync=None-rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for key, value in synced[0].items():
        assert torch.equal(value, synced[1][key]), f"{key} differs between ranks"
    assert bool(synced[0]["rvq.layers.0._codebook.initted"])
    assert (synced[0]["replaced"] > 0).all(), "dead-code expiry never ran; the test would not cover it"

    unsynced = [torch.load(tmp_path / f"sync=False-rank{rank}.pt") for rank in range(WORLD_SIZE)]
    embeds = [k for k in unsynced[0] if k.endswith("_codebook.embed")]
    assert all(not torch.equal(unsynced[0][k], unsynced[1][k]) for k in embeds), "ranks saw the same data"


def test_two_ranks_equal_one_process_on_the_concatenated_batch(rank_states, monkeypatch):
    halves = [torch.load(rank_states / f"halves-rank{rank}.pt") for rank in range(WORLD_SIZE)]
    monkeypatch.setattr(codebook, "sample_rows", first_rows)
    quantizers = build_quantizers(None, threshold_ema_dead_code=0, quantize_dropout=False)
    train_on_shared_batches(quantizers, slice(None))
    whole = flat_state(quantizers)
    assert bool(whole["rvq.layers.0._codebook.initted"])
    for key, value in whole.items():
        assert torch.equal(halves[0][key], halves[1][key]), f"{key} differs between ranks"
        torch.testing.assert_close(halves[0][key], value, rtol=1e-5, atol=1e-5, msg=key)
