"""CIFAR-10 and CIFAR-100 from the python-pickle batches as distributed (Krizhevsky 2009).

``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5`` (train) and ``test_batch``, each a pickled dict
with ``b'data'`` (uint8 [10000, 3072], the red, green and blue 32 x 32 planes of each image, row-major) and
``b'labels'``. ``cifar-100-python/``: ``train`` and ``test`` with ``b'fine_labels'`` and ``b'coarse_labels'``.

Start-up reads every batch once for its labels and drops the pixels; a client's images are read again, from
the batches holding them, when the client is built, so a rank keeps only its own clients' images. Images are
scaled to [0, 1] and standardised per channel with the constants of pFedHN's code (Shamsian et al. 2021).
The batches are Python pickles: read only files you trust (the official archive).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from pfl_mpi.data.config import DataConfig
from pfl_mpi.data.files import TEST, TRAIN
from pfl_mpi.data.tagged import Tagged
from pfl_mpi.errors import ConfigError

KEY = "data.root"
LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": ("cifar-100-python", ["train"], ["test"]),
}
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
URL = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


def locate(name: str, root: str) -> Path:
    """The directory holding the batches: ``root`` itself or its ``cifar-10-batches-py``/``cifar-100-python``."""
    folder, train, _ = LAYOUT[name]
    base = Path(root).expanduser()
    for candidate in (base, base / folder):
        if (candidate / train[0]).is_file():
            return candidate
    tried = base / train[0] if base.name == folder else f"{base / train[0]} nor {base / folder / train[0]}"
    raise ConfigError(KEY, f"no {tried}: expected {name}'s python batches, the {folder}/ directory of {URL[name]}")


def _load(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(KEY, f"no {path}: expected a CIFAR python batch")
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as exc:
        raise ConfigError(KEY, f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def _labels(batch: dict, key: bytes, path: Path) -> np.ndarray:
    if key not in batch or b"data" not in batch:
        found = ", ".join(sorted(k.decode("latin-1") if isinstance(k, bytes) else str(k) for k in batch))
        raise ConfigError(KEY, f"{path} has no {key.decode()!r} and 'data' entries (it has: {found})")
    y = np.asarray(batch[key], dtype=np.int64)
    if batch[b"data"].shape != (len(y), 3072):
        raise ConfigError(KEY, f"{path}: 'data' has shape {batch[b'data'].shape}, expected ({len(y)}, 3072)")
    return y


class Batches:
    """The batch files of all splits, one after another as rows; reads only the batches that hold asked rows."""

    def __init__(self, files: list[Path], mean: np.ndarray, std: np.ndarray):
        self.files, self.mean, self.std = files, mean, std
        self.starts = np.zeros(len(files) + 1, dtype=np.int64)

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), 3, 32, 32), dtype=np.float32)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for i in np.unique(which):
            mask = which == i
            data = _load(self.files[i])[b"data"]
            out[mask] = data[rows[mask] - self.starts[i]].reshape(-1, 3, 32, 32)
        return (out / 255.0 - self.mean) / self.std


def read(cfg: DataConfig) -> Tagged:
    """Labels and split of every image of ``data.root``; images stay on disk until a client is built."""
    name = cfg.name
    folder = locate(name, cfg.root or "")
    _, train, test = LAYOUT[name]
    key = b"labels" if name == "cifar10" else f"{cfg.cifar100_labels}_labels".encode()
    files = [folder / f for f in train + test]
    mean, std = (np.asarray(v, dtype=np.float32)[None, :, None, None] for v in MEAN_STD[name])
    batches = Batches(files, mean, std)
    labels, splits = [], []
    for i, path in enumerate(files):
        y = _labels(_load(path), key, path)
        labels.append(y)
        splits.append(np.full(len(y), TRAIN if i < len(train) else TEST, dtype=np.int8))
        batches.starts[i + 1] = batches.starts[i] + len(y)
    y = np.concatenate(labels)
    classes = 10 if name == "cifar10" else (100 if cfg.cifar100_labels == "fine" else 20)
    if y.min() < 0 or y.max() >= classes:
        raise ConfigError(KEY, f"{folder}: labels outside 0..{classes - 1}")
    return Tagged(y, np.concatenate(splits), None, None, classes, (3, 32, 32), batches.read)
