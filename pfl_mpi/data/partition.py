"""Partitioners: deal the samples of a pooled data set out to N clients.

Each returns a ``Partition`` and raises ``ConfigError`` before doing any work when the request is
impossible. All of them use one generator for all clients, since clients draw from a common pool; it is
derived from the seed alone, so every rank computes the same partition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pfl_mpi.errors import ConfigError


@dataclass(frozen=True)
class Partition:
    """Client k holds the pool samples ``indices[offsets[k]:offsets[k + 1]]``."""

    indices: np.ndarray  # int64 [sum of sizes]
    offsets: np.ndarray  # int64 [N + 1]

    @classmethod
    def from_parts(cls, parts: list[np.ndarray]) -> Partition:
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        indices = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return cls(indices, offsets)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def of(self, k: int) -> np.ndarray:
        return self.indices[self.offsets[k] : self.offsets[k + 1]]


def _need_samples(total: int, num_clients: int, min_samples: int) -> None:
    if total < num_clients * min_samples:
        raise ConfigError(
            "data.num_clients",
            f"{num_clients} clients with at least data.min_samples = {min_samples} samples each need "
            f"{num_clients * min_samples} samples, but the data set has {total}",
        )


def _equal_sizes(total: int, num_clients: int) -> np.ndarray:
    sizes = np.full(num_clients, total // num_clients, dtype=np.int64)
    sizes[: total % num_clients] += 1
    return sizes


def _cut(order: np.ndarray, sizes: np.ndarray) -> Partition:
    return Partition(order.astype(np.int64), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def iid(num_samples: int, num_clients: int, min_samples: int, rng: np.random.Generator) -> Partition:
    """A random permutation cut into N parts whose sizes differ by at most one."""
    _need_samples(num_samples, num_clients, min_samples)
    return _cut(rng.permutation(num_samples), _equal_sizes(num_samples, num_clients))


def quantity(num_samples: int, num_clients: int, min_samples: int, sigma: float, rng: np.random.Generator) -> Partition:
    """Quantity skew: client k holds min_samples plus a share of the rest proportional to w_k ~ lognormal(0,
    sigma) (largest-remainder rounding); which samples it holds is iid."""
    _need_samples(num_samples, num_clients, min_samples)
    weights = rng.lognormal(0.0, sigma, num_clients)
    sizes = min_samples + _apportion(num_samples - num_clients * min_samples, weights)
    return _cut(rng.permutation(num_samples), sizes)


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights`` summing to ``total`` (largest remainder)."""
    exact = total * weights / weights.sum()
    base = np.floor(exact).astype(np.int64)
    short = total - int(base.sum())
    base[np.argsort(-(exact - base), kind="stable")[:short]] += 1
    return base


def _by_class(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each class's pool indices, shuffled."""
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def dirichlet(
    labels: np.ndarray,
    num_classes: int,
    num_clients: int,
    min_samples: int,
    alpha: float,
    rng: np.random.Generator,
) -> Partition:
    """Label skew after Hsu et al. (2019): client k draws class proportions q_k ~ Dir(alpha * p), p the pooled
    class frequencies, and fills an equal quota of samples (sizes differ by at most one) by drawing classes
    from q_k without replacement from the pool. When a class runs out, q_k is renormalised over the classes
    left. Clients are filled in a random order, so none is systematically left with the remainders.
    """
    total = len(labels)
    _need_samples(total, num_clients, min_samples)
    pools = _by_class(labels, num_classes, rng)
    stock = np.array([len(p) for p in pools], dtype=np.int64)
    present = stock > 0
    prior = stock[present] / total
    quotas = _equal_sizes(total, num_clients)
    taken = np.zeros(num_classes, dtype=np.int64)
    parts: list[np.ndarray] = [np.zeros(0, np.int64)] * num_clients
    for k in rng.permutation(num_clients):
        q = np.zeros(num_classes)
        q[present] = rng.dirichlet(alpha * prior)
        counts = _fill(int(quotas[k]), q, stock - taken, rng)
        parts[k] = np.concatenate([pools[c][taken[c] : taken[c] + counts[c]] for c in range(num_classes)])
        taken += counts
    return Partition.from_parts(parts)


def _fill(quota: int, q: np.ndarray, left: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class counts summing to ``quota``, drawn from ``q`` without exceeding ``left``."""
    counts = np.zeros_like(left)
    weights = np.where(left > 0, q, 0.0)
    while quota > 0:
        if not weights.sum() > 0:  # q put all its mass on exhausted classes: follow what is left
            weights = (left - counts).astype(float)
        draw = rng.multinomial(quota, weights / weights.sum())
        draw = np.minimum(draw, left - counts)
        counts += draw
        quota -= int(draw.sum())
        weights = np.where(left - counts > 0, weights, 0.0)
    return counts


def shards(
    labels: np.ndarray,
    num_classes: int,
    num_clients: int,
    min_samples: int,
    classes_per_client: int,
    rng: np.random.Generator,
) -> Partition:
    """pFedHN's split (Shamsian et al., 2021): every client gets ``classes_per_client`` distinct classes and
    every class is cut into the same number s = classes_per_client * N / C of equal shards (sizes differ by
    at most one), one per client holding that class. Each client in turn takes the classes with the most
    shards left (ties broken at random), which keeps the classes' remaining counts within one of each other
    and so always succeeds.
    """
    c = classes_per_client
    if c > num_classes:
        raise ConfigError(
            "data.classes_per_client",
            f"{c} classes per client, but the data set has {num_classes} classes",
        )
    if (c * num_clients) % num_classes:
        raise ConfigError(
            "data.classes_per_client",
            f"shards do not divide: classes_per_client * num_clients = {c} * {num_clients} = "
            f"{c * num_clients} is not a multiple of the {num_classes} classes, so classes cannot appear "
            "equally often",
        )
    per_class = c * num_clients // num_classes
    pools = _by_class(labels, num_classes, rng)
    thin = [k for k, p in enumerate(pools) if len(p) < per_class]
    if thin:
        raise ConfigError(
            "data.num_clients",
            f"class {thin[0]} has {len(pools[thin[0]])} samples, fewer than its {per_class} shards "
            f"(classes_per_client * num_clients / classes)",
        )
    cut = [np.array_split(p, per_class) for p in pools]
    smallest = sum(sorted(len(s[-1]) for s in cut)[:c])
    if smallest < min_samples:
        raise ConfigError(
            "data.num_clients",
            f"with {num_clients} clients, shards hold as few as {min(len(s[-1]) for s in cut)} samples and a "
            f"client may get {smallest}, below data.min_samples = {min_samples}",
        )
    left = np.full(num_classes, per_class, dtype=np.int64)
    parts = []
    for _ in range(num_clients):
        chosen = np.lexsort((rng.random(num_classes), -left))[:c]
        left[chosen] -= 1
        parts.append(np.concatenate([cut[j][per_class - 1 - left[j]] for j in chosen]))
    return Partition.from_parts(parts)


def natural(
    client_ids: np.ndarray,
    num_clients: int,
    min_samples: int,
    names: Sequence[str] | None = None,
    sampled: bool = False,
) -> Partition:
    """The file's own split: client k holds the samples of the k-th smallest distinct id, in file order.

    ``names``: the name of each id (ids are then codes 0..U-1), for the messages; ``sampled``: the ids are the
    users ``data.max_clients`` kept."""
    ids, inverse, counts = np.unique(client_ids, return_inverse=True, return_counts=True)
    if names is not None:
        ids = np.asarray([names[int(i)] for i in ids], dtype=object)
    if len(ids) != num_clients:
        have = f"data.max_clients keeps {len(ids)} users" if sampled else f"the data set has {len(ids)} client ids"
        raise ConfigError(
            "data.num_clients",
            f"{num_clients}, but {have}; set data.num_clients: {len(ids)} (or choose a partition other than natural)",
        )
    small = np.flatnonzero(counts < min_samples)
    if len(small):
        k = int(small[0])
        raise ConfigError(
            "data.min_samples",
            f"client id {ids[k]} has {counts[k]} samples, fewer than data.min_samples = {min_samples} "
            f"({len(small)} client(s) are that small; every client needs at least 1 train and 1 test sample)",
        )
    order = np.argsort(inverse, kind="stable")
    return _cut(order, counts.astype(np.int64))


def follow(train_counts: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> Partition:
    """Deal a held-out pool (an official test or validation split, ``labels``) out to the clients so that each
    client's share of class c is proportional to its training samples of class c (``train_counts`` [N, C]),
    pFedHN's protocol: every client's held-out labels follow its training labels. The pool's samples of a
    class are shuffled and cut in those proportions (largest remainder), so the clients' sets are disjoint;
    samples of a class that no client trains on are left out."""
    num_clients, num_classes = train_counts.shape
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        rows = rng.permutation(np.flatnonzero(labels == c))
        holders = train_counts[:, c].astype(np.float64)
        if not len(rows) or holders.sum() == 0:
            continue
        counts = _apportion(len(rows), holders)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for k in np.flatnonzero(counts):
            parts[k].append(rows[offsets[k] : offsets[k + 1]])
    return Partition.from_parts([np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts])
