"""Reading a run file: its configuration, how far it got, and its metrics (committed rounds only).

A running job's writer keeps the file open and flushes each round, so a reader may open it between two
writes of a flush. Readers take a consistent snapshot: ``rounds_completed`` first, then rows up to it,
and a read that fails or finds fewer rows than committed is retried a few times (``snapshot``) before it
is reported as an ``OSError`` naming the file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .layout import CLIENT_STATE, CLIENTS, COMM, FORMAT, PARTITION, ROUNDS, group_key

SNAPSHOT_TRIES = 6  # reads of a live file retried this many times, SNAPSHOT_PAUSE seconds apart
SNAPSHOT_PAUSE = 0.2


class TornRead(OSError):
    """A live file read between two writes of a flush (retried)."""


def committed_rows(ds: h5py.Dataset, start: int, done: int) -> np.ndarray:
    """Rows ``start:done`` of a per-round dataset; ``TornRead`` when it has fewer than ``done`` rows yet."""
    if ds.shape[0] < done:
        raise TornRead(f"{ds.name} has {ds.shape[0]} rows, {done} committed")
    return ds[start:done]


def snapshot(path: str | Path, read: Callable[[h5py.File], object], tries: int = SNAPSHOT_TRIES):
    """``read(f)`` on the run file opened read-only, retried while a running job's file is caught mid-write.
    A file that is missing, or not a run file, is reported at once; so is a missing key of a finished run."""
    for attempt in range(tries):
        try:
            with open_run(path) as f:
                return read(f)
        except (FileNotFoundError, ValueError):
            raise
        except (OSError, KeyError, IndexError, TypeError) as err:
            torn = isinstance(err, OSError) or _live(path)
            if not torn or not h5py.is_hdf5(path):
                raise
            if attempt == tries - 1:
                why = f"{type(err).__name__}: {err}"
                raise OSError(f"{path}: cannot read a consistent state of the file ({why})") from err
            time.sleep(SNAPSHOT_PAUSE)
    raise AssertionError("unreachable")


@dataclass
class RunSummary:
    path: Path
    attrs: dict
    rounds_completed: int
    rounds: dict[str, np.ndarray]  # /rounds/<metric>[:rounds_completed]


def _live(path: str | Path) -> bool:
    """True unless the file says its run has ended (a file that cannot be read says nothing)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return _attr(f.attrs.get("status", "running")) == "running"
    except (OSError, ValueError):
        return True


def open_run(path: str | Path) -> h5py.File:
    """Open a run file read-only without taking HDF5's file lock (a running job may hold it)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no such file: {path}")
    if Path(path).is_dir():
        raise ValueError(f"{path} is a directory, not a run file")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as err:
        if not h5py.is_hdf5(path):
            raise ValueError(f"{path} is not a pfl_mpi run file (not an HDF5 file)") from None
        raise OSError(" ".join(str(err).split())) from None  # HDF5's message spans lines: make it one
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

    def read(f: h5py.File) -> RunSummary:
        done = int(f.attrs["rounds_completed"])
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
        rounds = {name: committed_rows(ds, 0, done) for name, ds in f[ROUNDS].items()}
        return RunSummary(Path(path), attrs, done, rounds)

    return snapshot(path, read)


def read_config_text(path: str | Path) -> str:
    """The YAML configuration a run was started with."""
    return snapshot(path, lambda f: str(_attr(f.attrs["config"])))


def read_clients(path: str | Path, name: str) -> np.ndarray:
    """/clients/<name> for the committed rounds, [rounds, N]."""
    return snapshot(path, lambda f: committed_rows(f[CLIENTS][name], 0, int(f.attrs["rounds_completed"])))


def read_comm(path: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Labels and /comm/<field> [rounds, ranks, labels] of the committed rounds."""

    def read(f: h5py.File) -> tuple[list[str], dict[str, np.ndarray]]:
        done = int(f.attrs["rounds_completed"])
        labels = list(_attr(f.attrs["comm_labels"]))
        return labels, {name: committed_rows(ds, 0, done) for name, ds in f[COMM].items()}

    return snapshot(path, read)


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
