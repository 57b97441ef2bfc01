"""P = 1: one process is the server and the only worker. Nothing moves, so nothing is counted."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

import numpy as np

from .world import World


class SerialWorld(World):
    """A world of one rank: every collective is a local copy."""

    def __init__(self) -> None:
        super().__init__()
        self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1
        self.hosts = [socket.gethostname()]

    def broadcast(self, buf: np.ndarray, label: str) -> None:
        pass

    def scatterv(self, send: np.ndarray | None, counts: Sequence[int], recv: np.ndarray, label: str) -> None:
        assert send is not None
        recv.reshape(-1)[:] = send.reshape(-1)[: counts[0]]

    def reduce_sum(self, buf: np.ndarray, label: str) -> None:
        pass

    def gatherv(self, send: np.ndarray, counts: Sequence[int], recv: np.ndarray | None, label: str) -> None:
        assert recv is not None
        recv.reshape(-1)[: counts[0]] = send.reshape(-1)

    def gather_rows(self, row: np.ndarray, label: str) -> np.ndarray:
        return row.reshape(1, -1).copy()

    def abort(self, code: int) -> None:
        os._exit(code)
