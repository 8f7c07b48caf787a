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
    """The moments restated in plain Python: each step, the ranks' means of the clipped losses
    are averaged; a non-finite batch on any rank leaves the moments as they were. The weight of
    a new batch is max(1 - beta, 1 / (k + 1)) after k batches (the default warm-up)."""
    per_rank = [[b.tolist() for b in _rank_batches(r)] for r in range(2)]
    mu1 = mu2 = None
    k = 0
    history = []
    for step in range(len(per_rank[0])):
        batches = [per_rank[r][step] for r in range(2)]
        if not all(math.isfinite(v) for b in batches for v in b):
            history.append((mu1, mu2))
            continue
        threshold = None if mu1 is None else mu1 + 3.0 * math.sqrt(max(mu2 - mu1**2, 0.0) + 1e-8)
        means, squares = [], []
        for b in batches:
            x = [v if threshold is None or v <= threshold else threshold for v in b]
            means.append(sum(x) / len(x))
            squares.append(sum(v * v for v in x) / len(x))
        m, s = sum(means) / 2, sum(squares) / 2
        if mu1 is None:
            mu1, mu2 = m, s + m * m
        else:
            w = max(1 - 0.9, 1 / (k + 1))
            mu1, mu2 = (1 - w) * mu1 + w * m, (1 - w) * mu2 + w * s
        k += 1
        history.append((mu1, mu2))
    return torch.tensor(history, dtype=torch.float64)


def test_moments_identical_on_ranks_and_equal_to_the_rank_average():
    results = run_distributed(_alrc_worker, world=2)
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], _single_process_expectation(), rtol=1e-12, atol=0)
    # the NaN batch on rank 1 (step 20) left the moments of both ranks unchanged
    assert torch.equal(results[0][20], results[0][19])
