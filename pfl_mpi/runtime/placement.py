"""Which rank hosts which client, and which clients a round samples: computed on every rank, no messages."""

from __future__ import annotations

import heapq

import numpy as np

from ..seeding import derive_seed

_SAMPLING = 1  # tag that separates the sampling stream from other streams of the same seed
_NOVEL = 0x4E4F56  # tag of the draw of the novel clients


def place_clients(sizes: np.ndarray, workers: list[int]) -> np.ndarray:
    """Host rank of each client, balancing total sample counts (largest first onto the lightest rank)."""
    host = np.empty(len(sizes), dtype=np.int64)
    heap = [(0, i, rank) for i, rank in enumerate(workers)]  # (load, tie-break, rank)
    for k in sorted(range(len(sizes)), key=lambda c: (-int(sizes[c]), c)):
        load, i, rank = heapq.heappop(heap)
        host[k] = rank
        heapq.heappush(heap, (load + int(sizes[k]), i, rank))
    return host


def sample_clients(
    seed: int, round: int, num_clients: int, per_round: int, pool: np.ndarray | None = None
) -> np.ndarray:
    """The sorted client ids of round ``round``: a function of (seed, round) only. ``pool``: the sorted ids that
    may train (``training_clients``); None: all ``num_clients`` (the same draw as a pool of every client)."""
    pool = np.arange(num_clients) if pool is None else np.asarray(pool, dtype=np.int64)
    if per_round >= len(pool):
        return pool.copy()
    rng = np.random.default_rng(derive_seed(seed, _SAMPLING, round))
    return pool[np.sort(rng.choice(len(pool), size=per_round, replace=False))]


def novel_clients(data_seed: int, num_clients: int, count: int) -> np.ndarray:
    """The sorted ids of the ``count`` novel clients (``data.novel_clients``: held out of training), a function of
    the data seed only: the same clients are held out whatever the training seed, the ranks and the algorithm."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(derive_seed(data_seed, _NOVEL))
    return np.sort(rng.choice(num_clients, size=count, replace=False)).astype(np.int64)


def training_clients(num_clients: int, novel: np.ndarray) -> np.ndarray:
    """The sorted ids of the clients that may be sampled: all but the novel ones."""
    return np.setdiff1d(np.arange(num_clients, dtype=np.int64), novel)


def held_out(cfg, num_clients: int) -> tuple[np.ndarray, np.ndarray]:
    """The run's novel clients (``data.novel_clients``, drawn from the data seed) and the clients that may train,
    both sorted; ``num_clients``: the clients the data set holds."""
    data_seed = cfg.seed if cfg.data.seed is None else cfg.data.seed
    novel = novel_clients(data_seed, num_clients, cfg.data.novel_count(num_clients))
    return novel, training_clients(num_clients, novel)
