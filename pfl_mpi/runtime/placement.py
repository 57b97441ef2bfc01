"""Which rank hosts which client, and which clients a round samples: computed on every rank, no messages."""

from __future__ import annotations

import heapq

import numpy as np

from ..seeding import derive_seed

_SAMPLING = 1  # tag that separates the sampling stream from other streams of the same seed


def place_clients(sizes: np.ndarray, workers: list[int]) -> np.ndarray:
    """Host rank of each client, balancing total sample counts (largest first onto the lightest rank)."""
    host = np.empty(len(sizes), dtype=np.int64)
    heap = [(0, i, rank) for i, rank in enumerate(workers)]  # (load, tie-break, rank)
    for k in sorted(range(len(sizes)), key=lambda c: (-int(sizes[c]), c)):
        load, i, rank = heapq.heappop(heap)
        host[k] = rank
        heapq.heappush(heap, (load + int(sizes[k]), i, rank))
    return host


def sample_clients(seed: int, round: int, num_clients: int, per_round: int) -> np.ndarray:
    """The sorted client ids of round ``round``: a function of (seed, round) only."""
    if per_round >= num_clients:
        return np.arange(num_clients)
    rng = np.random.default_rng(derive_seed(seed, _SAMPLING, round))
    return np.sort(rng.choice(num_clients, size=per_round, replace=False))
