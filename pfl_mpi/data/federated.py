"""``load_federated``: the partition of a data set over N clients, with each client materialised on demand."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pfl_mpi.data import pooled, public, synthetic
from pfl_mpi.data.config import DataConfig, SyntheticConfig, check_static
from pfl_mpi.data.files import FileReader, inspect_file
from pfl_mpi.data.partition import Partition, dirichlet, iid, natural, quantity, shards
from pfl_mpi.data.seeding import Stream, rng
from pfl_mpi.data.split import held_out_counts, split_positions
from pfl_mpi.errors import ConfigError


@dataclass
class ClientData:
    """One client's samples on the CPU: x float32 [n, *input_shape], y int64 [n]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


class _Source(Protocol):
    def labels(self, k: int) -> np.ndarray: ...

    def samples(self, k: int) -> tuple[np.ndarray, np.ndarray]: ...


class _PooledSource:
    """Client k's samples are rows of a pool, chosen by a partition."""

    def __init__(self, partition: Partition, labels: np.ndarray, read: Callable[[np.ndarray], np.ndarray]):
        self.partition, self._labels, self._read = partition, labels, read

    def labels(self, k: int) -> np.ndarray:
        return self._labels[self.partition.of(k)]

    def samples(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.partition.of(k)
        return self._read(idx), self._labels[idx]


class _SyntheticSource:
    """Client k's samples are generated from its own stream."""

    def __init__(self, cfg: SyntheticConfig, seed: int, sizes: np.ndarray):
        self.cfg, self.seed, self.sizes = cfg, seed, sizes

    def labels(self, k: int) -> np.ndarray:
        return self.samples(k)[1]

    def samples(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return synthetic.generate(self.cfg, self.seed, k, int(self.sizes[k]))


class FederatedData:
    """N clients' data: sizes known up front on every rank, tensors built only by ``client(k)``.

    Everything is a pure function of (config, seed): ``client(k)`` returns the same tensors in any process,
    whichever clients were loaded before it.
    """

    def __init__(
        self,
        *,
        name: str,
        partition: str,
        num_classes: int,
        input_shape: tuple[int, ...],
        sizes: np.ndarray,
        test_fraction: float,
        stratify: bool,
        seed: int,
        source: _Source,
    ):
        self.name = name
        self.partition = partition
        self.num_clients = len(sizes)
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.test_sizes = held_out_counts(sizes, test_fraction)
        self.train_sizes = np.asarray(sizes, dtype=np.int64) - self.test_sizes
        self._fraction, self._stratify, self._seed, self._source = test_fraction, stratify, seed, source
        self._histograms: np.ndarray | None = None
        self.public: public.PublicData | None = None  # data.public, set by load_federated

    def __repr__(self) -> str:
        total = int(self.train_sizes.sum() + self.test_sizes.sum())
        return (
            f"FederatedData({self.name}, {self.partition}, {self.num_clients} clients, {self.num_classes} "
            f"classes, input {self.input_shape}, {total} samples)"
        )

    def _split(self, k: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return split_positions(labels, self._fraction, self._stratify, rng(self._seed, Stream.SPLIT, k))

    def _check(self, k: int) -> None:
        if not 0 <= k < self.num_clients:
            raise IndexError(f"client {k} out of range 0..{self.num_clients - 1}")

    def client(self, k: int) -> ClientData:
        """Client k's train and test tensors (CPU)."""
        self._check(k)
        x, y = self._source.samples(k)
        train, test = self._split(k, y)
        return ClientData(
            x_train=torch.from_numpy(np.ascontiguousarray(x[train], dtype=np.float32)),
            y_train=torch.from_numpy(np.ascontiguousarray(y[train], dtype=np.int64)),
            x_test=torch.from_numpy(np.ascontiguousarray(x[test], dtype=np.float32)),
            y_test=torch.from_numpy(np.ascontiguousarray(y[test], dtype=np.int64)),
        )

    def label_histograms(self) -> np.ndarray:
        """int64 [N, C]: train samples of each class per client (synthetic: generates every client).

        For tools and tests: a run never calls it, each worker counts the clients it hosts instead
        (``Engine._label_histograms``), so that no rank materialises a client it does not host.
        """
        if self._histograms is None:
            hist = np.zeros((self.num_clients, self.num_classes), dtype=np.int64)
            for k in range(self.num_clients):
                labels = self._source.labels(k)
                train, _ = self._split(k, labels)
                hist[k] = np.bincount(labels[train], minlength=self.num_classes)
            self._histograms = hist
        return self._histograms.copy()


def load_federated(cfg: DataConfig, seed: int) -> FederatedData:
    """Validate ``cfg`` against the data and compute the partition; cheap enough for every rank.

    Raises ``ConfigError`` (key under ``data.``) for anything impossible, before any tensor is built.
    """
    check_static(cfg)
    data_seed = seed if cfg.seed is None else cfg.seed
    if data_seed < 0:
        raise ConfigError("seed", f"must be >= 0, got {data_seed}")
    data = _load(cfg, seed, data_seed)
    data.public = public.load_public(cfg, seed)
    return data


def _load(cfg: DataConfig, seed: int, data_seed: int) -> FederatedData:
    common = dict(test_fraction=cfg.test_fraction, stratify=cfg.stratify, seed=data_seed)
    if cfg.name == "synthetic":
        syn = cfg.synthetic
        sizes = synthetic.sizes(syn, cfg.num_clients, data_seed)
        return FederatedData(
            name=cfg.name,
            partition="natural",
            num_classes=syn.num_classes,
            input_shape=(syn.dimension,),
            sizes=sizes,
            source=_SyntheticSource(syn, data_seed, sizes),
            **common,
        )

    client_ids = None
    if cfg.name == "file":
        info = inspect_file(cfg.path or "")
        labels, num_classes, input_shape, client_ids = info.y, info.num_classes, info.input_shape, info.client
        read = FileReader(info).read
    else:
        pool = pooled.digits() if cfg.name == "digits" else pooled.mnist1d(cfg.mnist1d)
        labels, num_classes, input_shape = pool.y, pool.num_classes, pool.input_shape

        def read(idx: np.ndarray, x: np.ndarray = pool.x) -> np.ndarray:
            return x[idx]

    labels, read, client_ids = public.hold_apart(cfg, data_seed, labels, read, client_ids)  # data.public: holdout
    kind = cfg.partition or ("natural" if client_ids is not None else "iid")
    part = _partition(cfg, kind, labels, num_classes, client_ids, rng(data_seed, Stream.PARTITION))
    return FederatedData(
        name=cfg.name,
        partition=kind,
        num_classes=num_classes,
        input_shape=input_shape,
        sizes=part.sizes,
        source=_PooledSource(part, labels, read),
        **common,
    )


def _partition(
    cfg: DataConfig,
    kind: str,
    labels: np.ndarray,
    num_classes: int,
    client_ids: np.ndarray | None,
    g: np.random.Generator,
) -> Partition:
    n, m = cfg.num_clients, cfg.min_samples
    if kind == "natural":
        if client_ids is None:
            raise ConfigError("data.partition", f"'natural' needs a 'client' array in {cfg.path}")
        return natural(client_ids, n, m)
    if kind == "iid":
        return iid(len(labels), n, m, g)
    if kind == "quantity":
        return quantity(len(labels), n, m, cfg.quantity_sigma, g)
    if kind == "dirichlet":
        return dirichlet(labels, num_classes, n, m, cfg.dirichlet_alpha, g)
    if kind == "shards":
        return shards(labels, num_classes, n, m, cfg.classes_per_client, g)
    raise ConfigError("data.partition", f"unknown partition {kind!r}")
