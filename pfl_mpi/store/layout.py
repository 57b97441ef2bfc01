"""Names shared by the writer and the reader of a run file (documented in docs/hdf5.md)."""

from __future__ import annotations

import numpy as np

FORMAT = "pfl_mpi-run"
FORMAT_VERSION = 1
ROUNDS = "rounds"  # /rounds/<metric> [R]
CLIENTS = "clients"  # /clients/<metric> [R, N]
CLIENT_STATE = "clients/state"  # /clients/state/<name> [S, N, numel] (or <group>/<name>), /clients/state/round [S]
GLOBAL_STATE = "global/state"  # /global/state/<name> [S, numel], /global/state/round [S]
COMM = "comm"  # /comm/<field> [R, P, L]
RANKS = "ranks"  # /ranks/<field> [R, P]
PARTITION = "partition"
CHECKPOINT = "checkpoint"  # /checkpoint/slot0, /checkpoint/slot1: {server/<name>, clients/<name>}


def slot_of(round: int) -> str:
    """The checkpoint slot written by round ``round`` (rounds alternate, so the other slot stays intact)."""
    return f"{CHECKPOINT}/slot{round % 2}"


def group_key(group: int, name: str) -> str:
    """The table of state ``name`` of architecture group ``group`` when a run has several groups."""
    return f"group{group}/{name}"


class StateLayout:
    """Where each client's persistent state lives: in the file's client tables and on the wire.

    One architecture group: one table per state name, ``<name>`` [N, numel], row k = client k (the
    layout of files written before groups existed). Several groups: one table per group and name,
    ``group<g>/<name>`` [N_g, numel_g], holding group g's clients in ascending id order; ``row[k]`` is
    client k's row in its group's tables (``/partition/group_row``). On the wire, client k's state is
    the rows of its group's tables concatenated in spec order: ``numel_of(k)`` float32, never padded.
    """

    def __init__(self, specs: list[dict[str, int]], groups: np.ndarray):
        self.specs = [dict(spec) for spec in specs]
        self.groups = np.asarray(groups, dtype=np.int64)
        self.members = [np.flatnonzero(self.groups == g) for g in range(len(self.specs))]
        self.row = np.empty(len(self.groups), dtype=np.int64)
        for clients in self.members:
            self.row[clients] = np.arange(len(clients))
        self.group_numel = np.array([sum(spec.values()) for spec in self.specs], dtype=np.int64)

    @property
    def single(self) -> bool:
        """One architecture group: the file layout of a homogeneous run."""
        return len(self.specs) == 1

    @property
    def empty(self) -> bool:
        """No client keeps any state."""
        return not self.group_numel.any()

    def key(self, group: int, name: str) -> str:
        """Path of a table under a checkpoint slot's ``clients/`` (and under ``/clients/state``)."""
        return name if self.single else group_key(group, name)

    def tables(self) -> dict[str, tuple[int, np.ndarray]]:
        """Every table: key -> (numel, client ids of its rows in row order)."""
        return {
            self.key(g, name): (numel, self.members[g])
            for g, spec in enumerate(self.specs)
            for name, numel in spec.items()
        }

    def numels(self, clients) -> np.ndarray:
        """State floats of each of ``clients`` on the wire, int64 [len(clients)]."""
        return self.group_numel[self.groups[np.asarray(clients, dtype=np.int64)]]

    def _blocks(self, clients: np.ndarray) -> list[tuple[np.ndarray, np.ndarray | slice]]:
        """Per group: (positions in ``clients`` of its clients, where their states lie in the wire layout:
        a 2-D index array, or a slice of the uniform [len(clients), numel] view)."""
        sizes = self.numels(clients)
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
        out = []
        for g in range(len(self.specs)):
            mine = np.flatnonzero(self.groups[clients] == g)
            if len(mine) == len(clients):
                out.append((mine, slice(None)))  # every client in one group: a plain reshape
            else:
                out.append((mine, starts[mine][:, None] + np.arange(self.group_numel[g])))
        return out

    def split(self, clients, flat: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``flat``, the concatenated states of ``clients`` (wire layout), as table key -> (rows, values)
        with values [len(rows), numel]: what the checkpoint writes."""
        clients = np.asarray(clients, dtype=np.int64)
        out = {}
        for g, (mine, where) in enumerate(self._blocks(clients)):
            if isinstance(where, slice):
                block = flat.reshape(len(clients), int(self.group_numel[g]))
            else:
                block = flat[where]
            offset = 0
            for name, numel in self.specs[g].items():
                out[self.key(g, name)] = (self.row[clients[mine]], block[:, offset : offset + numel])
                offset += numel
        return out

    def join(self, clients, rows: dict[str, np.ndarray]) -> np.ndarray:
        """The wire layout of ``clients`` from ``rows``: table key -> [number of that group's clients among
        ``clients``, numel], in their order in ``clients``. The inverse of ``split``."""
        clients = np.asarray(clients, dtype=np.int64)
        out = np.empty(int(self.numels(clients).sum()), dtype=np.float32)
        for g, (mine, where) in enumerate(self._blocks(clients)):
            if not len(mine) or not self.group_numel[g]:
                continue
            block = np.concatenate([rows[self.key(g, name)] for name in self.specs[g]], axis=1)
            if isinstance(where, slice):
                out.reshape(len(clients), -1)[:] = block
            else:
                out[where] = block
        return out

    def read(self, tables, clients) -> np.ndarray:
        """The wire layout of ``clients`` read from whole tables (key -> [rows, numel] arrays or HDF5
        datasets). One contiguous range of rows is read per table: pass a contiguous range of client ids."""
        clients = np.asarray(clients, dtype=np.int64)
        rows = {}
        for g, spec in enumerate(self.specs):
            r = self.row[clients[self.groups[clients] == g]]
            if not len(r):
                continue
            lo, hi = int(r.min()), int(r.max()) + 1
            for name in spec:
                key = self.key(g, name)
                rows[key] = np.asarray(tables[key][lo:hi])[r - lo]
        return self.join(clients, rows)

    def partition(self) -> dict[str, np.ndarray]:
        """What ``/partition`` records of the layout: nothing with one group (unchanged files)."""
        return {} if self.single else {"group": self.groups, "group_row": self.row}
