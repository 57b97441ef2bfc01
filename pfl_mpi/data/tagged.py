"""Data sets that come with their own splits (CIFAR's, LEAF's, a HF set's, a file's ``split`` array).

Every reader returns a ``Tagged``: the rows of all its splits, each with a label, a split code and, when the data
set has them, a client id. ``plan`` turns it into a partition and a splitter following ``data.partition``,
``data.test_from``, ``data.max_clients`` and ``data.val_fraction``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from pfl_mpi.data.config import DataConfig
from pfl_mpi.data.files import TEST, TRAIN, VAL
from pfl_mpi.data.partition import Partition, follow
from pfl_mpi.data.seeding import Stream, rng
from pfl_mpi.errors import ConfigError

Read = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Tagged:
    """Rows of a data set over all its splits; ``read(rows)`` gives their x (only the rows asked for)."""

    y: np.ndarray  # int64 [n]
    split: np.ndarray  # int8 [n]: TRAIN, VAL or TEST
    client: np.ndarray | None  # int64 [n]: client codes 0..U-1 in client order, or None
    names: list[str] | None  # the id of each client code
    num_classes: int
    input_shape: tuple[int, ...]
    read: Read
    x_dtype: type = np.float32  # int64 for token sequences
    release: Callable[[], None] | None = None  # drops whatever the reader caches


def keep_users(t: Tagged, count: int, seed: int) -> Tagged:
    """``count`` of the data set's users drawn from ``seed`` (all if it has fewer), in their original order."""
    assert t.client is not None and t.names is not None
    users = len(t.names)
    if count >= users:
        return t
    chosen = np.sort(rng(seed, Stream.USERS).choice(users, count, replace=False))
    recode = np.full(users, -1, dtype=np.int64)
    recode[chosen] = np.arange(count)
    rows = np.flatnonzero(recode[t.client] >= 0)
    base = t.read

    def read(idx: np.ndarray) -> np.ndarray:
        return base(rows[idx])

    names = [t.names[int(u)] for u in chosen]
    return replace(t, y=t.y[rows], split=t.split[rows], client=recode[t.client[rows]], names=names, read=read)


def resolve_test_from(cfg: DataConfig, t: Tagged) -> str:
    """``data.test_from``, defaulting to official when the data set has a test split."""
    has_test = bool((t.split == TEST).any())
    test_from = cfg.test_from or ("official" if has_test else "client")
    if test_from == "official" and not has_test:
        raise ConfigError("data.test_from", f"{cfg.name} data at {cfg.root or cfg.path} have no test split; use client")
    if (t.split == VAL).any() and cfg.val_fraction:
        raise ConfigError(
            "data.val_fraction", "the data set has its own validation split; leave val_fraction at 0 to use it"
        )
    return test_from


def by_client(rows: np.ndarray, client: np.ndarray, num_clients: int) -> Partition:
    """``rows`` grouped by their client code (codes 0..num_clients-1), in row order within a client."""
    order = np.argsort(client, kind="stable")
    counts = np.bincount(client, minlength=num_clients).astype(np.int64)
    return Partition(rows[order].astype(np.int64), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def held_out(t: Tagged, code: int, train: Partition, natural: bool, num_clients: int, seed: int) -> Partition:
    """The rows of split ``code`` given to each client: its own (natural), else dealt to follow its train labels."""
    rows = np.flatnonzero(t.split == code)
    if natural:
        assert t.client is not None
        return by_client(rows, t.client[rows], num_clients)
    counts = np.zeros((num_clients, t.num_classes), dtype=np.int64)
    for k in range(num_clients):
        counts[k] = np.bincount(t.y[train.of(k)], minlength=t.num_classes)
    part = follow(counts, t.y[rows], rng(seed, Stream.OFFICIAL, code))
    return Partition(rows[part.indices], part.offsets)


def check_every_client_has(part: Partition, what: str, names: list[str] | None, key: str) -> None:
    """ConfigError naming ``key`` when a client got none of ``what``."""
    empty = np.flatnonzero(part.sizes == 0)
    if len(empty):
        k = int(empty[0])
        who = f"client {k}" + (f" (user {names[k]!r})" if names else "")
        raise ConfigError(
            key,
            f"{who} has no {what} sample ({len(empty)} client(s) have none); choose fewer clients, or "
            "data.test_from: client to split each client's own samples",
        )


__all__ = ["TEST", "TRAIN", "VAL", "Tagged", "by_client", "held_out", "keep_users", "resolve_test_from"]
