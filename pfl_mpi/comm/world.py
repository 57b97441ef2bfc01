"""The communication interface the runtime uses: a handful of collectives on flat buffers.

Rank 0 is the server; the workers are ranks 1..P-1, or rank 0 itself when P = 1. Every
collective is rooted at rank 0, takes contiguous numpy arrays, and records itself in the
rank's ledger under a label from :mod:`pfl_mpi.comm.ledger`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np

from .ledger import Ledger

SERVER = 0
WAIT_MODES = ("polled", "blocking")  # how a rank completes a collective (comm.wait)
# the polled wait: spin, then sleeps doubling from POLL_MIN up to poll_max, each followed by a burst of polls
SPIN = 50e-6  # seconds of spinning before the first sleep
POLL_MIN = 20e-6  # first sleep (s)
BURST = 5e-6  # spin after each sleep (s)
POLL_MAX_MS = 1.0  # default longest sleep (comm.poll_max_ms)


class World(abc.ABC):
    """One process's view of the job: who it is and how it talks to the others."""

    rank: int
    size: int
    local_rank: int  # rank among the processes of this node (for GPU binding)
    local_size: int  # processes on this node (ranks that may share its GPUs)
    hosts: list[str]  # host name of every rank (known on every rank)

    def __init__(self) -> None:
        self.ledger = Ledger()

    @property
    def is_server(self) -> bool:
        return self.rank == SERVER

    @property
    def workers(self) -> list[int]:
        """Ranks that host clients."""
        return [SERVER] if self.size == 1 else list(range(1, self.size))

    @property
    def is_worker(self) -> bool:
        return self.rank in self.workers

    @abc.abstractmethod
    def broadcast(self, buf: np.ndarray, label: str) -> None:
        """Broadcast ``buf`` from the server into ``buf`` on every rank."""

    @abc.abstractmethod
    def scatterv(self, send: np.ndarray | None, counts: Sequence[int], recv: np.ndarray, label: str) -> None:
        """Send ``counts[r]`` elements of the server's ``send`` to rank r, into its ``recv``."""

    @abc.abstractmethod
    def reduce_sum(self, buf: np.ndarray, label: str) -> None:
        """Sum ``buf`` over all ranks into the server's ``buf`` (other ranks' buffers are left as they are)."""

    @abc.abstractmethod
    def gatherv(self, send: np.ndarray, counts: Sequence[int], recv: np.ndarray | None, label: str) -> None:
        """Concatenate every rank's ``send`` (``counts[r]`` elements) into the server's ``recv``, in rank order."""

    @abc.abstractmethod
    def gather_rows(self, row: np.ndarray, label: str) -> np.ndarray | None:
        """Gather one equal-length float64 row per rank; the server gets [size, len(row)], others None."""

    @abc.abstractmethod
    def abort(self, code: int) -> None:
        """End every rank of the job at once."""

    def barrier(self) -> None:  # noqa: B027 - optional for single-process worlds
        """Wait until every rank gets here."""

    def agree(self, failure: str | None) -> tuple[int, str] | None:
        """Every rank says whether it failed (a message) or not (None); every rank gets the lowest failing
        rank and its message, or None when none failed. One collective: a failure on one rank never
        leaves the others waiting in the next one."""
        return None if failure is None else (self.rank, failure)

    def exit(self, code: int) -> None:
        """End this process now, skipping the interpreter's clean-up (after a failed write HDF5 crashes when
        it closes the file); the other ranks must be done with their collectives."""
        import os
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def configure(self, poll_max: float, wait: str) -> None:  # noqa: B027 - nothing to wait on alone
        """Set how this rank completes a collective, once the configuration is known."""
