"""``load_federated``: the partition of a data set over N clients, with each client materialised on demand."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pfl_mpi.data import pooled, public, synthetic
from pfl_mpi.data.augment import Augment, make_augmenter
from pfl_mpi.data.config import DataConfig, SyntheticConfig, check_static
from pfl_mpi.data.files import FileReader, inspect_file
from pfl_mpi.data.partition import Partition, dirichlet, iid, natural, quantity, shards
from pfl_mpi.data.seeding import Stream, rng
from pfl_mpi.data.splits import HeldOut, Official, Source, Splitter
from pfl_mpi.data.tagged import TRAIN, Tagged, check_every_client_has, held_out, keep_users, resolve_test_from
from pfl_mpi.errors import ConfigError


@dataclass
class ClientData:
    """One client's samples on the CPU: x float32 [n, *input_shape] (int64 token ids for text), y int64 [n]
    (labels), or float32 [n] / [n, k] (``data.targets: values``).

    ``x_val``/``y_val``: its validation samples (``data.val_fraction`` or the data set's own split), else None.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None


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

    ``test_sizes`` and ``val_sizes`` count what ``client(k).x_test`` and ``x_val`` hold. ``client_names``
    (natural partitions: LEAF users, a file's or HF set's client ids) name client k; ``augment``
    (``data.augment``) is the per-batch image augmentation, or None.
    ``targets``: ``labels`` (int64 class labels, ``num_classes`` classes) or ``values`` (float32 regression
    targets, ``num_classes`` values per sample).
    """

    def __init__(
        self,
        *,
        name: str,
        partition: str,
        num_classes: int,
        input_shape: tuple[int, ...],
        splitter: Splitter,
        x_dtype: type = np.float32,
        client_names: Sequence[str] | None = None,
        augment: Augment | None = None,
        targets: str = "labels",
    ):
        self.name = name
        self.targets = targets
        self.partition = partition
        self.num_clients = len(splitter.train_sizes)
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.train_sizes = np.asarray(splitter.train_sizes, dtype=np.int64)
        self.val_sizes = np.asarray(splitter.val_sizes, dtype=np.int64)
        self.test_sizes = np.asarray(splitter.test_sizes, dtype=np.int64)
        self.client_names: list[str] | None = None if client_names is None else list(client_names)
        self.augment = augment
        self.x_dtype = np.dtype(x_dtype)
        self._y_dtype = np.float32 if targets == "values" else np.int64
        self._splitter = splitter
        self._histograms: np.ndarray | None = None
        self._release: Callable[[], None] | None = None  # the reader's cache, emptied by clients()
        self.public: public.PublicData | None = None  # data.public, set by load_federated

    def __repr__(self) -> str:
        total = int(self.train_sizes.sum() + self.val_sizes.sum() + self.test_sizes.sum())
        return (
            f"FederatedData({self.name}, {self.partition}, {self.num_clients} clients, {self.num_classes} "
            f"classes, input {self.input_shape}, {total} samples)"
        )

    def _check(self, k: int) -> None:
        if not 0 <= k < self.num_clients:
            raise IndexError(f"client {k} out of range 0..{self.num_clients - 1}")

    def _tensors(self, part: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = part
        return (
            torch.from_numpy(np.ascontiguousarray(x, dtype=self.x_dtype)),
            torch.from_numpy(np.ascontiguousarray(y, dtype=self._y_dtype)),
        )

    def client(self, k: int) -> ClientData:
        """Client k's train and test (and validation) tensors (CPU)."""
        self._check(k)
        train, val, test = self._splitter.parts(k)
        x_val, y_val = (None, None) if val is None else self._tensors(val)
        return ClientData(*self._tensors(train), *self._tensors(test), x_val, y_val)

    def clients(self, ks: Iterable[int]) -> dict[int, ClientData]:
        """``client(k)`` for each k of ``ks``, in increasing order (readers that parse whole files, LEAF's json,
        then parse each file once); the reader's cache is emptied afterwards."""
        out = {int(k): self.client(int(k)) for k in sorted(int(k) for k in ks)}
        if self._release is not None:
            self._release()
        return out

    def partition_columns(self) -> dict[str, np.ndarray]:
        """What the run file's ``/partition`` records beside the sizes: ``client_names`` (UTF-8 bytes, when the
        clients are named users) and ``val_sizes`` (when clients have validation samples); nothing otherwise."""
        columns: dict[str, np.ndarray] = {}
        if self.client_names:
            columns["client_names"] = np.char.encode(np.asarray(self.client_names, dtype=str), "utf-8")
        if self.val_sizes.any():
            columns["val_sizes"] = self.val_sizes
        return columns

    def label_histograms(self) -> np.ndarray:
        """int64 [N, C]: train samples of each class per client (synthetic: generates every client).

        For tools and tests: a run never calls it, each worker counts the clients it hosts instead
        (``Engine._label_histograms``), so that no rank materialises a client it does not host.
        Real-valued targets (``targets == "values"``) have no classes: ``ValueError``.
        """
        if self.targets == "values":
            raise ValueError("real-valued targets (data.targets: values) have no label histograms")
        if self._histograms is None:
            hist = np.zeros((self.num_clients, self.num_classes), dtype=np.int64)
            for k in range(self.num_clients):
                hist[k] = np.bincount(self._splitter.train_labels(k), minlength=self.num_classes)
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
    if "val" in cfg.eval_splits and not (data.val_sizes > 0).all():
        raise ConfigError(_eval_key(cfg), "val needs a validation split: set data.val_fraction or give the data one")
    data.augment = make_augmenter(cfg.augment, data.input_shape)
    data.public = public.load_public(cfg, seed)
    return data


def _load(cfg: DataConfig, seed: int, data_seed: int) -> FederatedData:
    if cfg.name == "synthetic":
        syn = cfg.synthetic
        sizes = synthetic.sizes(syn, cfg.num_clients, data_seed)
        return FederatedData(
            name=cfg.name,
            partition="natural",
            num_classes=syn.num_classes,
            input_shape=(syn.dimension,),
            splitter=_held_out(cfg, _SyntheticSource(syn, data_seed, sizes), sizes, data_seed),
        )

    client_ids, names = None, None
    if cfg.name == "file":
        info = inspect_file(cfg.path or "", values=cfg.targets == "values")
        if info.split is not None:
            if cfg.public is not None:
                raise ConfigError("data.public", "not available for a file with a split array")
            reader = FileReader(info)
            tagged = Tagged(
                info.y, info.split, info.client, info.client_names, info.num_classes, info.input_shape, reader.read
            )
            return _load_tagged(cfg, tagged, data_seed)
        labels, num_classes, input_shape, client_ids = info.y, info.num_classes, info.input_shape, info.client
        names = info.client_names
        read = FileReader(info).read
    elif cfg.name in ("digits", "mnist1d"):
        pool = pooled.digits() if cfg.name == "digits" else pooled.mnist1d(cfg.mnist1d)
        labels, num_classes, input_shape = pool.y, pool.num_classes, pool.input_shape

        def read(idx: np.ndarray, x: np.ndarray = pool.x) -> np.ndarray:
            return x[idx]
    else:
        from pfl_mpi.data.readers import read_tagged

        return _load_tagged(cfg, read_tagged(cfg), data_seed)

    if cfg.max_clients is not None and client_ids is None:
        raise ConfigError("data.max_clients", f"{cfg.path or cfg.name} has no client ids to sub-sample")
    if client_ids is not None and cfg.max_clients is not None and (cfg.partition or "natural") == "natural":
        whole = Tagged(labels, np.zeros(len(labels), np.int8), client_ids, names, num_classes, input_shape, read)
        kept = keep_users(whole, cfg.max_clients, data_seed)
        labels, client_ids, names, read = kept.y, kept.client, kept.names, kept.read
    labels, read, client_ids = public.hold_apart(cfg, data_seed, labels, read, client_ids)  # data.public: holdout
    kind = cfg.partition or ("natural" if client_ids is not None else "iid")
    part = _partition(cfg, kind, labels, num_classes, client_ids, rng(data_seed, Stream.PARTITION), names)
    return FederatedData(
        name=cfg.name,
        partition=kind,
        num_classes=num_classes,
        input_shape=input_shape,
        splitter=_held_out(cfg, _PooledSource(part, labels, read), part.sizes, data_seed),
        client_names=names if kind == "natural" else None,
        targets=cfg.targets,
    )


def _eval_key(cfg: DataConfig) -> str:
    """The key that asked for the validation split: ``data.eval_on``, or the deprecated ``data.eval_split``."""
    return "data.eval_split" if cfg.eval_on is None else "data.eval_on"


def _stratify(cfg: DataConfig) -> bool:
    """``data.stratify``, which keeps class proportions: real-valued targets have none, their split is uniform."""
    return cfg.stratify and cfg.targets == "labels"


def _held_out(cfg: DataConfig, source: Source, sizes: np.ndarray, data_seed: int) -> HeldOut:
    return HeldOut(source, sizes, cfg.test_fraction, _stratify(cfg), data_seed, cfg.val_fraction)


def _load_tagged(cfg: DataConfig, t: Tagged, data_seed: int) -> FederatedData:
    """A data set with its own splits: official test (and validation) rows dealt out, or held out per client."""
    if cfg.max_clients is not None and t.client is None:
        raise ConfigError("data.max_clients", f"{cfg.root or cfg.path} has no client ids to sub-sample")
    natural_ids = t.client is not None and cfg.partition in (None, "natural")
    if natural_ids and cfg.max_clients is not None:
        t = keep_users(t, cfg.max_clients, data_seed)
    test_from = resolve_test_from(cfg, t)
    kind = cfg.partition or ("natural" if t.client is not None else "iid")
    if cfg.targets == "values" and test_from == "official" and kind != "natural":
        raise ConfigError(
            "data.test_from",
            f"official test rows are dealt to {kind} clients by class, but data.targets is values; use "
            "data.test_from: client, or client ids in the file for the natural partition",
        )
    g = rng(data_seed, Stream.PARTITION)
    common = dict(
        name=cfg.name,
        partition=kind,
        num_classes=t.num_classes,
        input_shape=t.input_shape,
        x_dtype=t.x_dtype,
        client_names=t.names if kind == "natural" else None,
        targets=cfg.targets,
    )
    # pooled: a natural client's samples of every split; otherwise the official training rows only
    rows = np.arange(len(t.y)) if (test_from == "client" and kind == "natural") else np.flatnonzero(t.split == TRAIN)
    ids = None if t.client is None else t.client[rows]
    if kind == "natural" and ids is not None and t.names is not None:
        missing = np.setdiff1d(np.arange(len(t.names)), ids)
        if len(missing):  # client k must be code k for the held-out rows grouped by code below
            raise ConfigError(
                "data.test_from", f"client {t.names[int(missing[0])]!r} has no training sample (only held-out ones)"
            )
    part = _partition(cfg, kind, t.y[rows], t.num_classes, ids, g, t.names)
    if test_from == "client":

        def read(idx: np.ndarray) -> np.ndarray:
            return t.read(rows[idx])

        source = _PooledSource(part, t.y[rows], read)
        data = FederatedData(splitter=_held_out(cfg, source, part.sizes, data_seed), **common)
        data._release = t.release
        return data
    train = Partition(rows[part.indices], part.offsets)
    n = len(part.sizes)
    test = held_out(t, 2, train, kind == "natural", n, data_seed)
    check_every_client_has(test, "test", t.names if kind == "natural" else None, "data.test_from")
    val = None
    if (t.split == 1).any():
        val = held_out(t, 1, train, kind == "natural", n, data_seed)
        if "val" in cfg.eval_splits:
            check_every_client_has(val, "validation", t.names if kind == "natural" else None, _eval_key(cfg))
    splitter = Official(t.y, t.read, train, val, test, _stratify(cfg), data_seed, cfg.val_fraction)
    data = FederatedData(splitter=splitter, **common)
    data._release = t.release
    return data


def _partition(
    cfg: DataConfig,
    kind: str,
    labels: np.ndarray,
    num_classes: int,
    client_ids: np.ndarray | None,
    g: np.random.Generator,
    names: Sequence[str] | None = None,
) -> Partition:
    n, m = cfg.num_clients, cfg.min_samples
    if kind == "natural":
        if client_ids is None:
            raise ConfigError("data.partition", f"'natural' needs client ids in {cfg.path or cfg.root}")
        return natural(client_ids, n, m, names, sampled=cfg.max_clients is not None)
    if kind == "iid":
        return iid(len(labels), n, m, g)
    if kind == "quantity":
        return quantity(len(labels), n, m, cfg.quantity_sigma, g)
    if kind == "dirichlet":
        return dirichlet(labels, num_classes, n, m, cfg.dirichlet_alpha, g)
    if kind == "shards":
        return shards(labels, num_classes, n, m, cfg.classes_per_client, g)
    raise ConfigError("data.partition", f"unknown partition {kind!r}")
