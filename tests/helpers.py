"""Small configurations and readers shared by the tests."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pfl_mpi.config import load_config


def tiny_config(out: Path, algorithm: str = "fedavg", **overrides):
    """A run that takes about a second: 10 digits clients, 2 classes each, a small MLP."""
    sets = {
        "name": "tiny",
        "rounds": 3,
        "clients_per_round": 6,
        "eval_every": 1,
        "state_every": 2,
        "data.name": "digits",
        "data.num_clients": 10,
        "data.partition": "shards",
        "data.classes_per_client": 2,
        "model.name": "mlp",
        "model.hidden": "[16]",
        "train.local_epochs": 1,
        "train.batch_size": 8,
        "train.lr": 0.1,
        "algorithm.name": algorithm,
        "output": str(out),
    }
    sets.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def committed(path: Path, group: str, name: str) -> np.ndarray:
    """A per-round dataset of a run file, cut to the committed rounds."""
    with h5py.File(path, "r", locking=False) as f:
        return f[group][name][: int(f.attrs["rounds_completed"])]


def last_global_state(path: Path, name: str = "shared") -> np.ndarray:
    with h5py.File(path, "r", locking=False) as f:
        return f["global/state"][name][-1]
