"""Accounting of every message: calls, payload bytes sent and received, and seconds, per operation.

Each rank keeps its own ledger for the round in flight. At the end of a round the runtime
gathers every rank's ledger to rank 0 (``Ledger.as_row``), which writes it to the HDF5 file.

Bytes are the *logical payload* of a collective as seen by this rank, independent of the
algorithm MPI uses underneath: a Bcast of n bytes counts n received on every worker and n
sent per worker on the root; a Reduce counts n sent on every worker and n received per worker
on the root; Scatterv/Gatherv count each rank's own part.

Waiting (``waiting`` field) is the part of a call's seconds spent before the last rank entered
it: ``min(max(0, last_entry - own_entry), seconds)``, with entry times on a common clock (each
rank's ``perf_counter`` shifted by its offset to rank 0, measured at start-up). A rank only knows
its own entry times, so the ledger keeps them per call and, when it is packed for gathering,
asks ``resolve_entries`` (set by the MPI world: one small Allgather) for every rank's. Without a
resolver (one process) waiting stays 0. See docs/communication.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Every message the runtime sends carries one of these labels. The order is the column
# order of /comm in the HDF5 file; append new labels at the end to keep old files readable.
LABELS: tuple[str, ...] = (
    "control",  # Bcast of the round's control word (round, continue/stop)
    "down",  # the algorithm's downlink: Bcast or Scatterv
    "up",  # the algorithm's uplink: Reduce or Gatherv
    "metrics",  # per-client training metrics to rank 0 (Gatherv)
    "eval_down",  # the downlink of an evaluation round
    "eval_metrics",  # per-client evaluation metrics to rank 0 (Gatherv)
    "state",  # personal client state to rank 0 for the checkpoint (Gatherv)
    "restore",  # client states from a checkpoint back to their ranks (Scatterv)
    "ledger",  # the gather of the previous round's ledgers (counted in the round after it)
    "setup",  # once at start-up: the global label counts (Reduce, then Bcast)
)
ALGORITHM_LABELS = ("down", "up")
# seconds: wall time in the call, waiting included; cpu_seconds: this process's CPU time in it
# (what waiting costs the node: near 0 when the rank sleeps instead of spinning); waiting: seconds
# of the call before the last rank entered it (imbalance, not transfer). Append new fields at the end.
FIELDS: tuple[str, ...] = ("calls", "bytes_sent", "bytes_received", "seconds", "cpu_seconds", "waiting")
WAITING = FIELDS.index("waiting")


@dataclass
class Ledger:
    """Per-operation counters of one rank for the round in flight."""

    def __post_init__(self) -> None:
        self.table = np.zeros((len(LABELS), len(FIELDS)), dtype=np.float64)
        self._packed_ledger = np.zeros(len(FIELDS))  # the ``ledger`` entry when last packed
        # calls whose waiting is not known yet: (label index, entry time on the common clock, seconds)
        self.entries: list[tuple[int, float, float]] = []
        # every rank's entry times [ranks, calls] from this rank's [calls]; a collective call
        self.resolve_entries: Callable[[np.ndarray], np.ndarray] | None = None

    def record(
        self,
        label: str,
        sent: int,
        received: int,
        seconds: float,
        cpu_seconds: float = 0.0,
        entered: float | None = None,
        waiting: float = 0.0,
    ) -> None:
        """Add one collective call to the counters of ``label``. ``entered``: its start on the common
        clock, for waiting resolved later; ``waiting``: its waiting when already known."""
        index = LABELS.index(label)
        self.table[index] += (1.0, sent, received, seconds, cpu_seconds, waiting)
        if entered is not None:
            self.entries.append((index, entered, seconds))

    def resolve_waiting(self) -> None:
        """Turn the pending entry times into waiting, from every rank's entry times of the same calls.

        Every rank makes the same collective calls in the same order, so the i-th entry of every rank
        is the same call. Collective when ``resolve_entries`` is set: every rank must call it together.
        """
        if self.resolve_entries is None:
            self.entries.clear()
            return
        pending = self.entries
        self.entries = []
        own = np.array([entered for _, entered, _ in pending], dtype=np.float64)
        every = self.resolve_entries(own)  # records its own call, with its waiting
        if not len(pending):
            return
        waits = waiting_of(every, own, np.array([seconds for _, _, seconds in pending]))
        np.add.at(self.table[:, WAITING], [index for index, _, _ in pending], waits)

    def seconds(self) -> float:
        """Seconds this rank spent inside collectives this round."""
        return float(self.table[:, FIELDS.index("seconds")].sum())

    def waiting(self) -> float:
        """Seconds this rank waited for other ranks inside collectives (resolved calls only)."""
        return float(self.table[:, WAITING].sum())

    def as_row(self) -> np.ndarray:
        """The counters as one flat float64 vector (labels x fields), for gathering.

        Resolves waiting first, which is collective under MPI (see ``resolve_waiting``)."""
        self.resolve_waiting()
        self._packed_ledger = self.table[LABELS.index("ledger")].copy()
        return self.table.reshape(-1).copy()

    def reset(self) -> None:
        """Start a new round. The gather of the previous round's ledgers happened after they were
        packed, so its own counters are carried into the new round under ``ledger``."""
        carried = self.table[LABELS.index("ledger")] - self._packed_ledger
        self.table[:] = 0.0
        self._packed_ledger = np.zeros(len(FIELDS))
        self.table[LABELS.index("ledger")] = carried


def waiting_of(every: np.ndarray, own: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Per call: seconds from this rank's entry until the last rank entered, within the call's own seconds.

    ``every`` [ranks, calls] and ``own`` [calls] are entry times on the common clock."""
    if not own.size:
        return np.zeros(0)
    last = np.max(every, axis=0)
    return np.clip(last - own, 0.0, np.maximum(seconds, 0.0))


def unpack_rows(rows: np.ndarray) -> np.ndarray:
    """Gathered ledger rows [ranks, labels*fields] -> [ranks, labels, fields]."""
    return rows.reshape(rows.shape[0], len(LABELS), len(FIELDS))
