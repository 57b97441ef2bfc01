"""Reading a run file: its configuration, how far it got, and its metrics (committed rounds only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .layout import CLIENT_STATE, CLIENTS, COMM, FORMAT, PARTITION, ROUNDS, group_key


@dataclass
class RunSummary:
    path: Path
    attrs: dict
    rounds_completed: int
    rounds: dict[str, np.ndarray]  # /rounds/<metric>[:rounds_completed]


def open_run(path: str | Path) -> h5py.File:
    """Open a run file read-only without taking HDF5's file lock (a running job may hold it)."""
    f = h5py.File(path, "r", locking=False)
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise ValueError(f"{path} is not a pfl_mpi run file")
    return f


def _attr(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value.item() if isinstance(value, np.generic) else value


def read_summary(path: str | Path) -> RunSummary:
    """Attributes and per-round metrics of the committed rounds."""
    with open_run(path) as f:
        done = int(f.attrs["rounds_completed"])
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
        rounds = {name: ds[:done] for name, ds in f[ROUNDS].items()}
    return RunSummary(Path(path), attrs, done, rounds)


def read_config_text(path: str | Path) -> str:
    """The YAML configuration a run was started with."""
    with open_run(path) as f:
        return str(_attr(f.attrs["config"]))


def read_clients(path: str | Path, name: str) -> np.ndarray:
    """/clients/<name> for the committed rounds, [rounds, N]."""
    with open_run(path) as f:
        return f[CLIENTS][name][: int(f.attrs["rounds_completed"])]


def read_comm(path: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Labels and /comm/<field> [rounds, ranks, labels] of the committed rounds."""
    with open_run(path) as f:
        done = int(f.attrs["rounds_completed"])
        labels = list(_attr(f.attrs["comm_labels"]))
        return labels, {name: ds[:done] for name, ds in f[COMM].items()}


def read_client_states(path: str | Path, name: str, snapshot: int = -1) -> list[np.ndarray]:
    """Every client's state ``name`` at snapshot ``snapshot`` (default: the last), one array per client of its
    own size: with several architecture groups the tables are per group (docs/hdf5.md), this hides it."""
    with open_run(path) as f:
        states = f[CLIENT_STATE]
        if name in states and isinstance(states[name], h5py.Dataset):
            return list(states[name][snapshot])
        groups, rows = f[PARTITION]["group"][...], f[PARTITION]["group_row"][...]
        tables = {int(g): states[group_key(int(g), name)][snapshot] for g in np.unique(groups)}
        return [tables[int(g)][r] for g, r in zip(groups, rows, strict=True)]
