"""Data sets generated or shipped inside a package, loaded whole as one pool of samples."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pfl_mpi.data.config import Mnist1dConfig


@dataclass(frozen=True)
class Pool:
    """All samples of a data set: ``x`` float32 [M, *input_shape], ``y`` int64 [M]; both read-only."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


def _freeze(x: np.ndarray, y: np.ndarray, num_classes: int) -> Pool:
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return Pool(x, y, num_classes)


@lru_cache(maxsize=1)
def digits() -> Pool:
    """scikit-learn's 8x8 handwritten digits (read from the package, no download), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.reshape(-1, 1, 8, 8) / 16.0
    return _freeze(x, bunch.target, 10)


def mnist1d(cfg: Mnist1dConfig) -> Pool:
    """MNIST-1D generated from the package's templates (``make_dataset``, never ``get_dataset``, which may
    download). Train and test parts are pooled; x has shape [M, 1, 40], standardised by the generator.

    The generator seeds numpy's and Python's global RNGs; their states are restored afterwards.
    """
    return _mnist1d(cfg.num_samples, cfg.seed, cfg.shuffle_seq)


@lru_cache(maxsize=4)
def _mnist1d(num_samples: int, seed: int, shuffle_seq: bool) -> Pool:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.shuffle_seq = shuffle_seq
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        made = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([made["x"], made["x_test"]])
    y = np.concatenate([made["y"], made["y_test"]])
    return _freeze(x[:, None, :], y, len(made["templates"]["y"]))
