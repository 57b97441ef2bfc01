"""The federated protocol's ledger: the bytes each client would download and upload in a real deployment.

A deployment has no ranks: each sampled client downloads its downlink payload (the ``Broadcast`` payload or
its own ``PerClient`` one) and uploads its own payload (its ``WeightedSum`` term or its ``Gathered`` row).
These bytes follow from the declarations alone (``down_numel_of``/``up_numel_of`` times the wire dtype's
size), so they are the same on any number of ranks and on one process. Evaluation downloads are counted
apart. What the simulation's collectives moved (per rank and label) is the other ledger, the transport's
(``pfl_mpi.comm.ledger``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .messages import WIRE_DTYPES, Broadcast, Down, Up
from .transport import sizes_of

if TYPE_CHECKING:
    from ..algorithms import Algorithm


def _down_bytes(algo: Algorithm, kind: Down | None, clients: Sequence[int]) -> np.ndarray:
    if kind is None:
        return np.zeros(len(clients), dtype=np.int64)
    itemsize = WIRE_DTYPES[kind.dtype].itemsize
    if isinstance(kind, Broadcast):
        return np.full(len(clients), algo.down_numel() * itemsize, dtype=np.int64)
    return sizes_of(algo.down_numel_of, clients) * itemsize


def _up_bytes(algo: Algorithm, kind: Up | None, clients: Sequence[int]) -> np.ndarray:
    if kind is None:
        return np.zeros(len(clients), dtype=np.int64)
    return sizes_of(algo.up_numel_of, clients) * WIRE_DTYPES[kind.dtype].itemsize


def training_bytes(algo: Algorithm, clients: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Bytes each of ``clients`` downloads and uploads in one training round (int64, in ``clients`` order)."""
    return _down_bytes(algo, algo.down, clients), _up_bytes(algo, algo.up, clients)


def evaluation_bytes(algo: Algorithm, clients: Sequence[int]) -> np.ndarray:
    """Bytes each of ``clients`` downloads to be evaluated (its ``eval_down`` payload; 0 without one)."""
    return _down_bytes(algo, algo.eval_down, clients)
