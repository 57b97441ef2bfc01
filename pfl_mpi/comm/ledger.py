"""Accounting of every message: calls, payload bytes sent and received, and seconds, per operation.

Each rank keeps its own ledger for the round in flight. At the end of a round the runtime
gathers every rank's ledger to rank 0 (``Ledger.as_row``), which writes it to the HDF5 file.

Bytes are the *logical payload* of a collective as seen by this rank, independent of the
algorithm MPI uses underneath: a Bcast of n bytes counts n received on every worker and n
sent per worker on the root; a Reduce counts n sent on every worker and n received per worker
on the root; Scatterv/Gatherv count each rank's own part.
"""

from __future__ import annotations

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
# (what waiting costs the node: near 0 when the rank sleeps instead of spinning)
FIELDS: tuple[str, ...] = ("calls", "bytes_sent", "bytes_received", "seconds", "cpu_seconds")


@dataclass
class Ledger:
    """Per-operation counters of one rank for the round in flight."""

    def __post_init__(self) -> None:
        self.table = np.zeros((len(LABELS), len(FIELDS)), dtype=np.float64)
        self._packed_ledger = np.zeros(len(FIELDS))  # the ``ledger`` entry when last packed

    def record(self, label: str, sent: int, received: int, seconds: float, cpu_seconds: float = 0.0) -> None:
        """Add one collective call to the counters of ``label``."""
        row = self.table[LABELS.index(label)]
        row += (1.0, sent, received, seconds, cpu_seconds)

    def seconds(self) -> float:
        """Seconds this rank spent inside collectives this round."""
        return float(self.table[:, FIELDS.index("seconds")].sum())

    def as_row(self) -> np.ndarray:
        """The counters as one flat float64 vector (labels x fields), for gathering."""
        self._packed_ledger = self.table[LABELS.index("ledger")].copy()
        return self.table.reshape(-1).copy()

    def reset(self) -> None:
        """Start a new round. The gather of the previous round's ledgers happened after they were
        packed, so its own counters are carried into the new round under ``ledger``."""
        carried = self.table[LABELS.index("ledger")] - self._packed_ledger
        self.table[:] = 0.0
        self._packed_ledger = np.zeros(len(FIELDS))
        self.table[LABELS.index("ledger")] = carried


def unpack_rows(rows: np.ndarray) -> np.ndarray:
    """Gathered ledger rows [ranks, labels*fields] -> [ranks, labels, fields]."""
    return rows.reshape(rows.shape[0], len(LABELS), len(FIELDS))
