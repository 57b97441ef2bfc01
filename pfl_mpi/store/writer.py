"""The run file's only writer (rank 0): per-round records, snapshots and the checkpoint.

The file is kept open with HDF5's default format and flushed after every round: killed at any
moment, it reopens with every completed round (shared/HPC-NOTES.md). A round is committed by
the ``rounds_completed`` attribute, written last. Datasets on the round axis may hold one
uncommitted row more; readers slice and resume truncates.

The checkpoint has two slots and round t writes slot t % 2, so a crash in the middle of round
t leaves the slot of round t-1 untouched. A slot is made current by writing the client rows
that changed in the previous round as well as those of this round.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import h5py
import numpy as np

from .layout import (
    CHECKPOINT,
    CLIENT_STATE,
    CLIENTS,
    COMM,
    FORMAT,
    FORMAT_VERSION,
    GLOBAL_STATE,
    PARTITION,
    RANKS,
    ROUNDS,
    slot_of,
)

_BLOCK = 1024  # clients per block when streaming [N, numel] tables
ROUND_BLOCK = 64  # per-round datasets grow by this many rows at a time (trimmed on close)
_ROUND_GROUPS = (ROUNDS, CLIENTS, COMM, RANKS)
_COMPRESS_FROM = 4096  # bytes per row; smaller rows are stored uncompressed


class RunWriter:
    """Writes one run file. Open it with :meth:`create` or :meth:`reopen`."""

    def __init__(self, file: h5py.File):
        self.f = file
        self.pending: tuple[np.ndarray, dict[str, np.ndarray]] | None = None  # rows changed last round
        self._handles: dict[str, h5py.Dataset] = {}  # open datasets, looked up once (the write is per round)
        self._round_names = set(file[ROUNDS]) if ROUNDS in file else set()

    def _append(
        self, group: str, name: str, t: int, value, dtype, fill=np.nan, ragged: bool = False, block: int = ROUND_BLOCK
    ) -> None:
        """Write ``value`` as row ``t`` of ``group/name``, an array growing along its first axis by ``block`` rows.

        ``ragged``: the other axes may grow too (the rank axis, when a run resumes on more ranks);
        a smaller value fills the leading part of its row and leaves the rest at ``fill``.
        """
        value = np.asarray(value, dtype=dtype)
        key = f"{group}/{name}"
        ds = self._handles.get(key)
        if ds is None:
            if key not in self.f:
                self.f[group].create_dataset(
                    name,
                    shape=(0, *value.shape),
                    maxshape=(None, *((None,) * value.ndim if ragged else value.shape)),
                    dtype=dtype,
                    # one row per chunk: a round's chunk is compressed once, never again at later flushes
                    chunks=(1 if value.ndim else 1024, *value.shape),
                    compression="gzip" if value.nbytes >= _COMPRESS_FROM else None,
                    fillvalue=fill,
                )
            ds = self._handles[key] = self.f[key]
        shape = ds.shape
        rows = shape[0] if t < shape[0] else t + block
        other = tuple(int(n) for n in np.maximum(shape[1:], value.shape)) if ragged else shape[1:]
        if (rows, *other) != shape:
            ds.resize((rows, *other))
        if ragged and value.shape != other:
            row = np.full(other, fill, dtype=dtype)
            row[tuple(slice(0, n) for n in value.shape)] = value
            value = row
        ds[t] = value

    def _trim(self, rounds: int) -> None:
        """Cut every per-round dataset to ``rounds`` rows (spare capacity, or rows of an uncommitted round)."""
        for group in _ROUND_GROUPS:
            for ds in self.f[group].values():
                if isinstance(ds, h5py.Dataset) and ds.shape[0] != rounds:
                    ds.resize(rounds, axis=0)

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: Path,
        attrs: Mapping[str, object],
        partition: Mapping[str, np.ndarray],
        state_spec: Mapping[str, int],
        init_state: Callable[[int], dict[str, np.ndarray]],
        num_clients: int,
    ) -> RunWriter:
        """A new file with the run's description, partition and initial client states in both slots."""
        path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(path, "w")
        f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "rounds_completed": 0})
        f.attrs.update({k: (json.dumps(v) if isinstance(v, list | dict) else v) for k, v in attrs.items()})
        f.attrs["status"] = "running"
        part = f.create_group(PARTITION)
        for name, values in partition.items():
            part.create_dataset(name, data=values)
        for group in (ROUNDS, CLIENTS, CLIENT_STATE, GLOBAL_STATE, COMM, RANKS):
            f.require_group(group)
        writer = cls(f)
        for slot in (0, 1):
            clients = f.require_group(f"{slot_of(slot)}/clients")
            f.require_group(f"{slot_of(slot)}/server")
            for name, numel in state_spec.items():
                clients.create_dataset(
                    name,
                    shape=(num_clients, numel),
                    dtype=np.float32,
                    chunks=(min(num_clients, max(1, (1 << 20) // (4 * max(numel, 1)))), numel),
                )
            for start in range(0, num_clients, _BLOCK):
                block = range(start, min(start + _BLOCK, num_clients))
                states = [init_state(k) for k in block]
                for name in state_spec:
                    clients[name][block.start : block.stop] = np.stack([s[name] for s in states])
        f.flush()
        return writer

    @classmethod
    def reopen(cls, path: Path, attrs: Mapping[str, object] | None = None) -> tuple[RunWriter, int]:
        """Reopen a run file to continue it: drop uncommitted rows, update ``attrs`` (the new plan);
        return the writer and the rounds completed."""
        f = h5py.File(path, "r+")
        f.attrs.update(attrs or {})
        done = int(f.attrs["rounds_completed"])
        writer = cls(f)
        writer._trim(done)
        for group in (CLIENT_STATE, GLOBAL_STATE):
            g = f[group]
            if "round" in g:
                keep = int(np.sum(g["round"][:] < done))
                for ds in g.values():
                    ds.resize(keep, axis=0)
        f.attrs["status"] = "running"
        return writer, done

    # -- per round ------------------------------------------------------------------------
    def append_round(
        self,
        t: int,
        scalars: Mapping[str, float],
        clients: Mapping[str, np.ndarray],
        comm: Mapping[str, np.ndarray],
        ranks: Mapping[str, np.ndarray],
    ) -> None:
        """Row ``t`` of every per-round dataset (a metric missing this round is NaN)."""
        self._round_names |= set(scalars)
        for name in self._round_names:
            self._append(ROUNDS, name, t, scalars.get(name, np.nan), np.float64)
        for name, values in clients.items():
            dtype = np.uint8 if values.dtype == bool else np.float32
            self._append(CLIENTS, name, t, values, dtype, fill=0 if dtype == np.uint8 else np.nan)
        for name, values in comm.items():
            self._append(COMM, name, t, values, np.float64, fill=0, ragged=True)
        for name, values in ranks.items():
            self._append(RANKS, name, t, values, np.float64, ragged=True)

    def set_round_value(self, t: int, name: str, value: float) -> None:
        """Overwrite one per-round scalar (e.g. the seconds spent writing the round itself)."""
        self._append(ROUNDS, name, t, value, np.float64)

    def checkpoint(
        self, t: int, server: Mapping[str, np.ndarray], clients: Iterable[int], rows: Mapping[str, np.ndarray]
    ) -> None:
        """Make slot t % 2 hold the state after round t: the server's, and the rows of changed clients."""
        slot = slot_of(t)
        for name, value in server.items():
            value = np.asarray(value)
            key = f"{slot}/server/{name}"
            ds = self._handles.get(key) or self.f.get(key)
            if ds is None or ds.shape != value.shape or ds.dtype != value.dtype:
                if key in self.f:
                    del self.f[key]
                ds = self.f.create_dataset(key, shape=value.shape, dtype=value.dtype)
            self._handles[key] = ds
            ds[...] = value
        clients = np.asarray(list(clients), dtype=np.int64)
        for changed, values in ([self.pending] if self.pending else []) + [(clients, rows)]:
            order = np.argsort(changed)
            for name, table in values.items():
                if len(changed):
                    self.f[f"{slot}/clients/{name}"][changed[order]] = table[order]
        self.f[slot].attrs["round"] = t
        self.pending = (clients, dict(rows))

    def pend_all(self, clients: np.ndarray, rows: Mapping[str, np.ndarray]) -> None:
        """After a resume: the next checkpoint rewrites these rows (the whole restored state)."""
        self.pending = (clients, dict(rows))

    def snapshot(self, t: int, global_state: Mapping[str, np.ndarray]) -> None:
        """Copy the server's model and every client's current state (slot of round t) into the snapshots."""
        g = self.f[GLOBAL_STATE]
        s = g["round"].shape[0] if "round" in g else 0
        self._append(GLOBAL_STATE, "round", s, t, np.int64, fill=-1, block=1)
        for name, value in global_state.items():
            self._append(GLOBAL_STATE, name, s, value, np.float32, block=1)
        c = self.f[CLIENT_STATE]
        self._append(CLIENT_STATE, "round", s, t, np.int64, fill=-1, block=1)
        for name, table in self.f[slot_of(t)]["clients"].items():
            n, numel = table.shape
            if name not in c:
                c.create_dataset(
                    name,
                    shape=(0, n, numel),
                    maxshape=(None, n, numel),
                    dtype=np.float32,
                    chunks=(1, min(n, max(1, (1 << 20) // (4 * max(numel, 1)))), numel),
                    compression="gzip",
                )
            c[name].resize(s + 1, axis=0)
            for start in range(0, n, _BLOCK):
                c[name][s, start : start + _BLOCK] = table[start : start + _BLOCK]

    def commit(self, t: int) -> None:
        """Mark round t complete and flush: from here on the file holds it for good."""
        self.f.attrs["rounds_completed"] = t + 1
        self.f.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.f.flush()

    def close(self, status: str) -> None:
        """Record the final status, cut spare rows, close."""
        self._trim(int(self.f.attrs["rounds_completed"]))
        self.f.attrs["status"] = status
        self.f.close()

    # -- resume ---------------------------------------------------------------------------
    def read_checkpoint(self, done: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Server state and full client-state tables after round ``done - 1``."""
        slot = self.f[slot_of(done - 1)]
        if int(slot.attrs.get("round", -1)) != done - 1:
            raise RuntimeError(f"checkpoint slot holds round {slot.attrs.get('round')}, expected {done - 1}")
        server = {name: ds[...] for name, ds in slot["server"].items()}
        clients = {name: ds[...] for name, ds in slot["clients"].items()}
        return server, clients


__all__ = ["RunWriter", "CHECKPOINT"]
