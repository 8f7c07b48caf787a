"""ALRC under real multi-process torch.distributed (gloo, CPU): every rank holds the same moments,
equal to the moments of the ranks' batch statistics averaged, and clips alike."""

from __future__ import annotations

import math

import torch

import steadystep as ss
from tests.dist_utils import run_distributed


def _rank_batches(rank: int, steps: int = 25) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    batches = [
        torch.rand(8, generator=g, dtype=torch.float64) * (1 + rank) + 0.5 for _ in range(steps)
    ]
    if rank == 1:
        batches[15] = batches[15] * 30.0  # a spike on one rank only
        batches[20] = batches[20].clone()
        batches[20][2] = math.nan  # a non-finite batch on one rank only
    return batches


def _alrc_worker(rank: int, world: int):
    alrc = ss.ALRC(beta1=0.9, beta2=0.9).double()
    history = []
    for batch in _rank_batches(rank):
        alrc(batch)
        history.append(torch.stack([alrc.mu1, alrc.mu2]))
    return torch.stack(history)


def _single_process_expectation() -> torch.Tensor:
    """The same moments computed in one process from the per-rank statistics, averaged."""
    alrc = ss.ALRC(beta1=0.9, beta2=0.9).double()
    history = []
    per_rank = [_rank_batches(r) for r in range(2)]
    for step in range(len(per_rank[0])):
        threshold = alrc.stats()["threshold"]
        means, squares, finite = [], [], True
        for r in range(2):
            batch = per_rank[r][step]
            finite &= bool(torch.isfinite(batch).all())
            clipped = torch.where(bool(alrc.initialized) & (batch > threshold), threshold, batch)
            means.append(clipped.mean())
            squares.append((clipped**2).mean())
        from steadystep.alrc import alrc_moment_update

        m = torch.stack(means).mean() if finite else torch.tensor(math.nan, dtype=torch.float64)
        s = torch.stack(squares).mean() if finite else torch.tensor(math.nan, dtype=torch.float64)
        mu1, mu2, init = alrc_moment_update(
            alrc.mu1, alrc.mu2, alrc.initialized, m, s, beta1=0.9, beta2=0.9
        )
        alrc.mu1, alrc.mu2, alrc.initialized = mu1, mu2, init
        history.append(torch.stack([mu1, mu2]))
    return torch.stack(history)


def test_moments_identical_on_ranks_and_equal_to_the_rank_average():
    results = run_distributed(_alrc_worker, world=2)
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], _single_process_expectation(), rtol=1e-12, atol=0)
    # the NaN batch on rank 1 (step 20) left the moments of both ranks unchanged
    assert torch.equal(results[0][20], results[0][19])
