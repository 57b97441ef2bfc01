"""The public data set that every client shares (FedMD's D0), configured by ``data.public``.

Either a part of the clients' own pooled data set held apart before partitioning (``source: holdout``:
``load_federated`` then deals out only the rest, so no client holds a public sample), or another data set
with the clients' input shape and classes (``digits``, ``mnist1d``). Which samples: a pure function of the
configuration and the data seed, so every rank computes the same public set without communication.
Labels come with it (FedMD's transfer-learning start trains on them; its digest uses only x).

``load_federated`` keeps it as ``FederatedData.public``; the runtime hands it to the algorithm as ``Setup.public``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pfl_mpi.data import pooled
from pfl_mpi.data.config import DataConfig, Mnist1dConfig
from pfl_mpi.data.files import FileReader, inspect_file
from pfl_mpi.errors import ConfigError

_SALT = 0x9B_11C_DA7A  # keeps the public draws apart from the data package's other streams
_HOLDOUT, _SUBSET = 0, 1  # what a draw is for

Read = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PublicData:
    """The public samples on the CPU: ``x`` float32 [M, *input_shape], ``y`` int64 [M]; ``positions`` are their
    rows in the source pool (for ``holdout``: in the clients' pool before it was dealt out)."""

    x: torch.Tensor
    y: torch.Tensor
    source: str
    positions: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SALT, purpose])  # keys of one length (see seeding.rng)


def data_seed(cfg: DataConfig, seed: int) -> int:
    """The seed of the data: ``data.seed``, else the run's."""
    return seed if cfg.seed is None else cfg.seed


def holdout_positions(pool_size: int, size: int, seed: int) -> np.ndarray:
    """The ``size`` rows of a pool of ``pool_size`` held apart as public data, ascending, drawn from ``seed``."""
    if size >= pool_size:
        raise ConfigError(
            "data.public.size", f"{size} public samples leave none of the data set's {pool_size} for the clients"
        )
    return np.sort(_rng(seed, _HOLDOUT).choice(pool_size, size, replace=False)).astype(np.int64)


def hold_apart(
    cfg: DataConfig, seed: int, labels: np.ndarray, read: Read, client_ids: np.ndarray | None
) -> tuple[np.ndarray, Read, np.ndarray | None]:
    """The clients' pool (labels, row reader, client ids) without the public holdout: unchanged unless
    ``data.public.source`` is ``holdout``. ``seed`` is the data seed."""
    if cfg.public is None or cfg.public.source != "holdout":
        return labels, read, client_ids
    kept = np.ones(len(labels), dtype=bool)
    kept[holdout_positions(len(labels), cfg.public.size, seed)] = False
    rows = np.flatnonzero(kept)

    def read_kept(idx: np.ndarray) -> np.ndarray:
        return read(rows[idx])

    return labels[rows], read_kept, None if client_ids is None else client_ids[rows]


def _clients_pool(cfg: DataConfig) -> tuple[np.ndarray, Read, tuple[int, ...], int]:
    """(labels, row reader, input shape, classes) of the clients' pooled data set."""
    if cfg.name == "file":
        info = inspect_file(cfg.path or "")
        return info.y, FileReader(info).read, info.input_shape, info.num_classes
    pool = pooled.digits() if cfg.name == "digits" else pooled.mnist1d(cfg.mnist1d)
    return pool.y, pool.x.__getitem__, pool.input_shape, pool.num_classes


def load_public(cfg: DataConfig, seed: int) -> PublicData | None:
    """The public set of ``cfg`` under the run seed ``seed`` (None without ``data.public``); raises
    ``ConfigError`` when it cannot serve the clients (too large, another input shape or class count)."""
    public = cfg.public
    if public is None:
        return None
    seed = data_seed(cfg, seed)
    labels, read, shape, classes = _clients_pool(cfg)
    if public.source == "holdout":
        positions = holdout_positions(len(labels), public.size, seed)
        return _public(read(positions), labels[positions], "holdout", positions)
    if public.source == "digits":
        pool = pooled.digits()
    else:
        generated = Mnist1dConfig(
            num_samples=10 * math.ceil(public.size / 10), seed=public.mnist1d_seed, shuffle_seq=cfg.mnist1d.shuffle_seq
        )
        pool = pooled.mnist1d(generated)
    if (pool.input_shape, pool.num_classes) != (tuple(shape), classes):
        raise ConfigError(
            "data.public.source",
            f"{public.source} has input shape {pool.input_shape} and {pool.num_classes} classes, but the "
            f"clients' data ({cfg.name}) have {tuple(shape)} and {classes}",
        )
    if public.size > len(pool.y):
        raise ConfigError("data.public.size", f"{public.size} exceeds the {len(pool.y)} samples of {public.source}")
    positions = np.sort(_rng(seed, _SUBSET).choice(len(pool.y), public.size, replace=False)).astype(np.int64)
    return _public(pool.x[positions], pool.y[positions], public.source, positions)


def _public(x: np.ndarray, y: np.ndarray, source: str, positions: np.ndarray) -> PublicData:
    return PublicData(
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
        source,
        positions,
    )
