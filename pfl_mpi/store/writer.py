"""The run file's only writer (rank 0): per-round records, snapshots and the checkpoint.

The file is kept open with HDF5's default format and flushed after every round: killed at any
moment, it reopens with every completed round (the kill -9 tests of tests/test_e2e.py). A round is committed by
the ``rounds_completed`` attribute, written last. Datasets on the round axis may hold one
uncommitted row more; readers slice and resume truncates.

The checkpoint has two slots and round t writes slot t % 2, so a crash in the middle of round
t leaves the slot of round t-1 untouched. A slot is made current by writing the client rows
that changed in the previous round as well as those of this round.

A new file is written under a temporary name (``<name>.partial``) and renamed into place once its
header, partition and initial states are flushed, so the run file's name never points at a half-made
file. ``commit`` flushes the round's data before it writes ``rounds_completed`` and flushes again:
a write error (a full disk) can never mark a round committed. Once a write failed, the writer stops
writing: with an ``on_failure`` callback it tells the caller (which stops the run) instead of raising.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
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

_BLOCK_BYTES = 8 << 20  # bytes of client rows per block when streaming [N, numel] tables
# checkpoint tables: chunks of at most this many bytes (at least one row), so that writing a round's
# scattered rows rewrites little more than those rows (a partly written chunk is read and written whole)
_CHUNK_BYTES = 64 << 10
ROUND_BLOCK = 64  # per-round datasets grow by this many rows at a time (trimmed on close)
_ROUND_GROUPS = (ROUNDS, CLIENTS, COMM, RANKS)
_COMPRESS_FROM = 4096  # bytes per row; smaller rows are stored uncompressed
# A round starts writing only with this much free space, plus 4 times the file's largest growth in one round
# so far, plus one snapshot of every client's state: HDF5 that meets ENOSPC in the middle of a flush can
# leave its metadata pointing past the end of the file (measured: 2 of 5 files on a full tmpfs).
RESERVE_BYTES = 256 << 10
SCALAR_CHUNK = 1024  # rows per chunk of a per-round scalar


class RunFileWriteError(OSError):
    """Writing the run file failed (e.g. a full disk); the file keeps its committed rounds."""

    def __init__(self, path: str | Path, t: int | None, done: int, cause: BaseException):
        where = f" (round {t + 1})" if t is not None else ""
        reason = _reason(cause)
        super().__init__(
            f"cannot write {path}{where}: {reason}; the file keeps at least {done} committed round(s): "
            f"make room, then continue it with pfl-mpi run --resume {path}"
        )
        self.path, self.round, self.done = Path(path), t, done


def _reason(err: BaseException) -> str:
    """An I/O error in a few words: HDF5's messages span lines and carry the system's errno inside."""
    if isinstance(err, OSError) and err.strerror and not str(err.strerror).startswith("Unable"):
        return str(err.strerror)
    found = re.search(r"errno = (\d+)", str(err))
    if found:
        return os.strerror(int(found.group(1)))
    return " ".join(str(err).split())[:200]


class RunFileDamaged(ValueError):
    """A run file's committed part cannot be read back as written."""


def partial_path(path: Path) -> Path:
    """Where a new run file is made before it is renamed into place."""
    return path.with_name(path.name + ".partial")


def _guarded(method):
    """A per-round write: does nothing once a write has failed; turns an error into ``RunFileWriteError``,
    passed to ``on_failure`` when the caller set one (raised otherwise)."""

    @functools.wraps(method)
    def wrapper(self: RunWriter, t: int, *args, **kwargs):
        if self.failed is not None:
            return None
        try:
            return method(self, t, *args, **kwargs)
        except (OSError, RuntimeError) as err:
            self.failed = RunFileWriteError(self.path, t, self.committed, err)
            if self.on_failure is None:
                raise self.failed from err
            self.on_failure(self.failed)
            return None

    return wrapper


def block_rows(numel: int) -> int:
    """Client rows of ``numel`` float32 per block when an [N, numel] table is streamed (about 8 MiB)."""
    return max(1, _BLOCK_BYTES // (4 * max(numel, 1)))


def _write_rows(ds: h5py.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
    """``ds[rows] = values`` for sorted distinct ``rows``, one slice per run of consecutive rows. h5py's
    fancy-index write of scattered rows costs far more than the rows it moves (measured: 1.1 s against
    0.1 s in slices, for 200 rows of 268 KiB out of 1,000)."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for start, stop in zip(np.concatenate(([0], breaks)), np.concatenate((breaks, [len(rows)])), strict=True):
        ds[int(rows[start]) : int(rows[stop - 1]) + 1] = values[start:stop]


def tables_under(group: h5py.Group) -> dict[str, h5py.Dataset]:
    """Every dataset under ``group``, by path relative to it (``name``, or ``group<g>/name`` for the client
    tables of a run with several architecture groups; ``store.layout.StateLayout``), in name order."""
    found: dict[str, h5py.Dataset] = {}

    def visit(key: str, obj: h5py.HLObject) -> None:  # returning a value would stop the visit
        if isinstance(obj, h5py.Dataset):
            found[key] = obj

    group.visititems(visit)
    return found


class RunWriter:
    """Writes one run file. Open it with :meth:`create` or :meth:`reopen`."""

    def __init__(self, file: h5py.File, path: Path | None = None):
        self.f = file
        self.path = Path(path or file.filename)
        self.committed = int(file.attrs.get("rounds_completed", 0))
        self.failed: RunFileWriteError | None = None
        self.on_failure: Callable[[RunFileWriteError], None] | None = None
        self._size, self._growth = self._file_size(), 0  # bytes, and the largest growth of one round
        self._rounds_written = 0
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
                    chunks=(1 if value.ndim else SCALAR_CHUNK, *value.shape),
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
        state_spec: Mapping[str, int | tuple[int, np.ndarray]],
        init_state: Callable[[int], dict[str, np.ndarray]],
        num_clients: int,
    ) -> RunWriter:
        """A new file with the run's description, partition and initial client states in both slots.

        ``state_spec``: client-state table key -> numel (one row per client), or -> (numel, the client ids
        of its rows) for the per-group tables ``group<g>/<name>``; the value of a table's row for client k
        is ``init_state(k)[name]``, name being the key's last part.
        """
        try:
            return cls._create(path, attrs, partition, state_spec, init_state, num_clients)
        except (OSError, RuntimeError) as err:
            raise RunFileWriteError(path, None, 0, err) from err

    @classmethod
    def _create(cls, path, attrs, partition, state_spec, init_state, num_clients) -> RunWriter:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(path)
        partial.unlink(missing_ok=True)  # left by an attempt killed while creating (the caller holds the lock)
        f = h5py.File(partial, "w")
        f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "rounds_completed": 0})
        f.attrs.update({k: (json.dumps(v) if isinstance(v, list | dict) else v) for k, v in attrs.items()})
        f.attrs["status"] = "running"
        part = f.create_group(PARTITION)
        for name, values in partition.items():
            part.create_dataset(name, data=values)
        for group in (ROUNDS, CLIENTS, CLIENT_STATE, GLOBAL_STATE, COMM, RANKS):
            f.require_group(group)
        writer = cls(f, path)
        spec = {
            key: (value, np.arange(num_clients)) if isinstance(value, int | np.integer) else value
            for key, value in state_spec.items()
        }
        tables = []
        for slot in (0, 1):
            clients = f.require_group(f"{slot_of(slot)}/clients")
            f.require_group(f"{slot_of(slot)}/server")
            for key, (numel, ids) in spec.items():
                clients.create_dataset(
                    key,
                    shape=(len(ids), numel),
                    dtype=np.float32,
                    chunks=(min(len(ids), max(1, _CHUNK_BYTES // (4 * max(numel, 1)))), numel),
                )
            tables.append(clients)
        by_rows: dict[tuple[int, ...], list[str]] = {}  # tables with the same clients are filled together
        for key, (_, ids) in spec.items():
            by_rows.setdefault(tuple(int(k) for k in ids), []).append(key)
        for ids, keys in by_rows.items():
            rows = block_rows(sum(spec[key][0] for key in keys))
            for start in range(0, len(ids), rows):  # never N x state in memory
                states = [init_state(k) for k in ids[start : start + rows]]
                for key in keys:
                    values = np.stack([s[key.rsplit("/", 1)[-1]] for s in states])
                    for clients in tables:
                        clients[key][start : start + len(states)] = values
        f.flush()
        os.replace(partial, path)  # the open file follows its inode
        return writer

    @classmethod
    def reopen(cls, path: Path, attrs: Mapping[str, object] | None = None) -> tuple[RunWriter, int]:
        """Reopen a run file to continue it: drop uncommitted rows, update ``attrs`` (the new plan);
        return the writer and the rounds completed."""
        f = h5py.File(path, "r+")
        try:
            done = int(f.attrs["rounds_completed"])
            _verify(f, done)
        except BaseException:
            f.close()
            raise
        f.attrs.update(attrs or {})
        writer = cls(f, path)
        writer._trim(done)
        for group in (CLIENT_STATE, GLOBAL_STATE):
            g = f[group]
            if "round" in g:
                keep = int(np.sum(g["round"][:] < done))
                for ds in tables_under(g).values():
                    ds.resize(keep, axis=0)
        f.attrs["status"] = "running"
        return writer, done

    # -- room on the disk -----------------------------------------------------------------
    def _file_size(self) -> int:
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def _snapshot_bytes(self) -> int:
        tables = tables_under(self.f[slot_of(0)]["clients"]) if slot_of(0) in self.f else {}
        return sum(int(ds.size) * ds.dtype.itemsize for ds in tables.values())

    def _check_room(self, t: int, scalars: int) -> None:
        """Raise ENOSPC before a round's write when the file system lacks room for it (see RESERVE_BYTES).
        Every SCALAR_CHUNK rounds the per-round scalars take a new chunk each."""
        need = RESERVE_BYTES + 4 * self._growth + self._snapshot_bytes()
        if t % SCALAR_CHUNK == 0:
            need += scalars * SCALAR_CHUNK * 8
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if free < need:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device: {free >> 10} KiB free, a round is written only with {need >> 10} KiB",
            )

    # -- per round ------------------------------------------------------------------------
    @_guarded
    def append_round(
        self,
        t: int,
        scalars: Mapping[str, float],
        clients: Mapping[str, np.ndarray],
        comm: Mapping[str, np.ndarray],
        ranks: Mapping[str, np.ndarray],
    ) -> None:
        """Row ``t`` of every per-round dataset (a metric missing this round is NaN). The round's first write:
        it refuses to start without room on the disk for the whole round."""
        self._check_room(t, len(self._round_names | set(scalars)))
        self._round_names |= set(scalars)
        for name in self._round_names:
            self._append(ROUNDS, name, t, scalars.get(name, np.nan), np.float64)
        for name, values in clients.items():  # flags as uint8, counts (e.g. protocol bytes) as int64, else float32
            dtype = np.uint8 if values.dtype == bool else np.int64 if values.dtype.kind in "iu" else np.float32
            self._append(CLIENTS, name, t, values, dtype, fill=np.nan if dtype == np.float32 else 0)
        for name, values in comm.items():
            self._append(COMM, name, t, values, np.float64, fill=0, ragged=True)
        for name, values in ranks.items():
            self._append(RANKS, name, t, values, np.float64, ragged=True)

    @_guarded
    def set_round_value(self, t: int, name: str, value: float) -> None:
        """Overwrite one per-round scalar (e.g. the seconds spent writing the round itself, after its commit).
        From here on ``append_round`` grows ``name`` with the others: a later round's row exists (NaN until
        set) when that round is committed, so a value written after its commit never resizes the dataset
        between two flushes (a run stopped then would leave fewer rows than committed rounds)."""
        self._round_names.add(name)
        self._append(ROUNDS, name, t, value, np.float64)

    @_guarded
    def checkpoint(
        self,
        t: int,
        server: Mapping[str, np.ndarray],
        clients: Iterable[int] | Mapping[str, np.ndarray],
        rows: Mapping[str, np.ndarray],
    ) -> None:
        """Make slot t % 2 hold the state after round t: the server's, and the rows of changed clients.

        ``rows``: table key -> new values of the changed rows; ``clients``: the indices of those rows,
        shared by every table (client ids), or per table key (per-group tables)."""
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
        if isinstance(clients, Mapping):
            changed = {key: np.asarray(clients[key], dtype=np.int64) for key in rows}
        else:
            shared = np.asarray(list(clients), dtype=np.int64)
            changed = {key: shared for key in rows}
        for indices, values in ([self.pending] if self.pending else []) + [(changed, rows)]:
            for key, table in values.items():
                order = np.argsort(indices[key])
                if len(order):
                    _write_rows(self.f[f"{slot}/clients/{key}"], indices[key][order], table[order])
        self.f[slot].attrs["round"] = t
        self.pending = (changed, dict(rows))

    def carry_over(self, done: int) -> None:
        """After a resume from ``done`` rounds: copy the client tables of the checkpoint (round ``done - 1``)
        into the slot round ``done`` writes, block by block, so that its checkpoint need only add its own rows.

        Safe against a crash: while ``rounds_completed`` is ``done``, that slot is never read.
        """
        source, target = self.f[slot_of(done - 1)]["clients"], self.f[slot_of(done)]["clients"]
        for key, table in tables_under(source).items():
            rows = block_rows(table.shape[1])
            for start in range(0, table.shape[0], rows):
                target[key][start : start + rows] = table[start : start + rows]
        self.pending = None

    @_guarded
    def snapshot(self, t: int, global_state: Mapping[str, np.ndarray]) -> None:
        """Copy the server's model and every client's current state (slot of round t) into the snapshots."""
        g = self.f[GLOBAL_STATE]
        s = g["round"].shape[0] if "round" in g else 0
        self._append(GLOBAL_STATE, "round", s, t, np.int64, fill=-1, block=1)
        for name, value in global_state.items():
            self._append(GLOBAL_STATE, name, s, value, np.float32, block=1)
        c = self.f[CLIENT_STATE]
        self._append(CLIENT_STATE, "round", s, t, np.int64, fill=-1, block=1)
        for name, table in tables_under(self.f[slot_of(t)]["clients"]).items():
            n, numel = table.shape
            if name not in c:
                c.create_dataset(
                    name,
                    shape=(0, n, numel),
                    maxshape=(None, n, numel),
                    dtype=np.float32,
                    chunks=(1, min(n, max(1, (1 << 20) // (4 * max(numel, 1)))), numel),
                    # uncompressed: trained float32 weights gzip to 92% of their size, at 18 MB/s (1.2 GB/s
                    # without), and this write is the whole last round's I/O (261 MiB of heads: 25 s with gzip)
                )
            c[name].resize(s + 1, axis=0)
            rows = block_rows(numel)
            for start in range(0, n, rows):
                c[name][s, start : start + rows] = table[start : start + rows]

    @_guarded
    def commit(self, t: int) -> None:
        """Mark round t complete: flush its data first, then write ``rounds_completed`` and flush again.
        From here on the file holds the round for good; a failed first flush leaves it uncommitted."""
        self.f.flush()
        self.f.attrs["rounds_completed"] = t + 1
        self.f.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.f.flush()
        self.committed = t + 1
        size = self._file_size()  # a session's first round allocates the scalars' chunks: not a round's growth
        self._growth = max(self._growth, size - self._size) if self._rounds_written else 0
        self._size, self._rounds_written = size, self._rounds_written + 1

    def close(self, status: str) -> None:
        """Record the final status, cut spare rows, close. After a failed write only close (quietly): the
        file keeps its committed rounds and its ``running`` status, as a killed run's does."""
        if self.failed is not None:  # HDF5 cannot close a file whose flush failed (it crashes): leave it,
            return  # the process ends without closing it (``World.exit``), as a killed one would
        try:
            self._trim(self.committed)
            self.f.attrs["status"] = status
            self.f.close()
        except (OSError, RuntimeError) as err:
            self.failed = RunFileWriteError(self.path, None, self.committed, err)
            raise self.failed from err

    # -- resume ---------------------------------------------------------------------------
    def read_checkpoint(self, done: int) -> tuple[dict[str, np.ndarray], dict[str, h5py.Dataset]]:
        """Server state after round ``done - 1``, and that round's [N, numel] client-state tables as
        datasets of the file, to be read in blocks of rows (``block_rows``), never whole."""
        slot = self.f[slot_of(done - 1)]
        if int(slot.attrs.get("round", -1)) != done - 1:
            raise RuntimeError(f"checkpoint slot holds round {slot.attrs.get('round')}, expected {done - 1}")
        server = {name: ds[...] for name, ds in slot["server"].items()}
        return server, tables_under(slot["clients"])


def _verify(f: h5py.File, done: int) -> None:
    """Read back what ``done`` committed rounds need: every per-round row and the latest checkpoint slot.
    Raises ``RunFileDamaged`` naming what is missing (a row never written reads as its fill value)."""
    try:
        if ROUNDS in f and "round" in f[ROUNDS]:
            rounds = f[ROUNDS]["round"]
            if rounds.shape[0] < done or not np.array_equal(rounds[:done], np.arange(done)):
                raise RunFileDamaged(f"{f.filename}: the rows of its {done} committed round(s) are incomplete")
        for group in _ROUND_GROUPS:
            for name, ds in f[group].items() if group in f else ():
                if isinstance(ds, h5py.Dataset) and ds.shape[0] < done:
                    raise RunFileDamaged(f"{f.filename}: {group}/{name} has {ds.shape[0]} rows, {done} are committed")
                if isinstance(ds, h5py.Dataset):
                    ds[:done]
        if done:
            slot = f[slot_of(done - 1)]
            if int(slot.attrs.get("round", -1)) != done - 1:
                raise RunFileDamaged(f"{f.filename}: its checkpoint does not hold round {done}")
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        raise RunFileDamaged(f"{f.filename}: cannot read its committed rounds back ({err})") from None


__all__ = [
    "CHECKPOINT",
    "RunFileDamaged",
    "RunFileWriteError",
    "RunWriter",
    "block_rows",
    "partial_path",
    "tables_under",
]
