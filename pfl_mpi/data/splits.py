"""Where a client's train, validation and test samples come from: held out of its own samples, or official splits.

A *splitter* knows every client's split sizes up front (cheap, on every rank) and builds one client's three parts
on demand. ``HeldOut`` is the historical rule (each client's samples split by ``test_fraction``); ``Official``
deals a data set's own test (and validation) split out to the clients. Both can take a validation set out of the
training samples (``data.val_fraction``), from the client's own stream, so it is placement-invariant too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from pfl_mpi.data.partition import Partition
from pfl_mpi.data.seeding import Stream, rng
from pfl_mpi.data.split import held_out_counts, split_positions
from pfl_mpi.errors import ConfigError

Read = Callable[[np.ndarray], np.ndarray]
Part = tuple[np.ndarray, np.ndarray]  # (x, y) of one split of one client


class Source(Protocol):
    """Client k's pooled samples (before any train/test split)."""

    def labels(self, k: int) -> np.ndarray: ...

    def samples(self, k: int) -> tuple[np.ndarray, np.ndarray]: ...


class Splitter(Protocol):
    """Sizes of every client's splits, and one client's parts."""

    train_sizes: np.ndarray
    val_sizes: np.ndarray
    test_sizes: np.ndarray

    def train_labels(self, k: int) -> np.ndarray: ...

    def parts(self, k: int) -> tuple[Part, Part | None, Part]: ...


def val_counts(train_sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Validation samples taken out of ``train_sizes`` training samples (0 everywhere when ``fraction`` is 0)."""
    if not fraction:
        return np.zeros_like(train_sizes)
    small = np.flatnonzero(train_sizes < 2)
    if len(small):
        raise ConfigError(
            "data.val_fraction",
            f"client {int(small[0])} has {int(train_sizes[small[0]])} training sample(s): too few to hold one out "
            "for validation",
        )
    return held_out_counts(train_sizes, fraction)


def _carve(train: np.ndarray, labels: np.ndarray, fraction: float, stratify: bool, seed: int, k: int):
    """(train, val) positions: ``fraction`` of the positions ``train`` (labels ``labels[train]``) held out."""
    if not fraction:
        return train, None
    keep, val = split_positions(labels[train], fraction, stratify, rng(seed, Stream.VAL, k))
    return train[keep], train[val]


class HeldOut:
    """Each client's samples split into train and test by ``test_fraction`` (and val by ``val_fraction``)."""

    def __init__(
        self, source: Source, sizes: np.ndarray, test_fraction: float, stratify: bool, seed: int, val_fraction: float
    ):
        self.source, self.fraction, self.stratify, self.seed, self.val_fraction = (
            source,
            test_fraction,
            stratify,
            seed,
            val_fraction,
        )
        self.test_sizes = held_out_counts(sizes, test_fraction)
        train = np.asarray(sizes, dtype=np.int64) - self.test_sizes
        self.val_sizes = val_counts(train, val_fraction)
        self.train_sizes = train - self.val_sizes

    def _positions(self, k: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        train, test = split_positions(labels, self.fraction, self.stratify, rng(self.seed, Stream.SPLIT, k))
        train, val = _carve(train, labels, self.val_fraction, self.stratify, self.seed, k)
        return train, val, test

    def train_labels(self, k: int) -> np.ndarray:
        labels = self.source.labels(k)
        return labels[self._positions(k, labels)[0]]

    def parts(self, k: int) -> tuple[Part, Part | None, Part]:
        x, y = self.source.samples(k)
        train, val, test = self._positions(k, y)
        return (x[train], y[train]), None if val is None else (x[val], y[val]), (x[test], y[test])


class Official:
    """Train, validation and test rows given per client (rows of one data set whose splits are its own)."""

    def __init__(
        self,
        labels: np.ndarray,
        read: Read,
        train: Partition,
        val: Partition | None,
        test: Partition,
        stratify: bool,
        seed: int,
        val_fraction: float,
    ):
        self.labels, self.read, self.train, self.val, self.test = labels, read, train, val, test
        self.stratify, self.seed, self.val_fraction = stratify, seed, val_fraction
        self.test_sizes = test.sizes
        self.val_sizes = val.sizes if val is not None else val_counts(train.sizes, val_fraction)
        self.train_sizes = train.sizes - (0 if val is not None else self.val_sizes)

    def _rows(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        rows = self.train.of(k)
        if self.val is not None:
            return rows, self.val.of(k)
        keep, val = _carve(np.arange(len(rows)), self.labels[rows], self.val_fraction, self.stratify, self.seed, k)
        return rows[keep], None if val is None else rows[val]

    def train_labels(self, k: int) -> np.ndarray:
        return self.labels[self._rows(k)[0]]

    def parts(self, k: int) -> tuple[Part, Part | None, Part]:
        train, val = self._rows(k)
        test = self.test.of(k)
        groups = [train, test] if val is None else [train, val, test]
        bounds = np.cumsum([0, *(len(g) for g in groups)])
        rows = np.concatenate(groups)
        x = self.read(rows)  # one read for the client's three parts
        cut = [(x[a:b], self.labels[rows[a:b]]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return cut[0], None if val is None else cut[1], cut[-1]
