"""The wire: what an algorithm's messages are, how payloads become flat buffers, and the round's transfers.

One home for everything between an algorithm's tensors and the communicator: the declarations
(``messages``), the per-rank layout of an exchange (``plan``), the buffers a worker fills as its clients
train (``uplink``) and the transport that turns declarations into collectives on a ``World``
(``transport``), which the engine runs and the communication predictor reads. No mpi4py here: the
``World`` of :mod:`pfl_mpi.comm` does the moving.
"""

from .messages import (
    SUMMABLE_DTYPES,
    WIRE_DTYPES,
    Broadcast,
    Collected,
    Down,
    Gathered,
    PerClient,
    Phase,
    Up,
    WeightedMean,
    WeightedSum,
    pack,
    packed_size,
    unpack,
)

__all__ = [
    "SUMMABLE_DTYPES",
    "WIRE_DTYPES",
    "Broadcast",
    "Collected",
    "Down",
    "Gathered",
    "PerClient",
    "Phase",
    "Up",
    "WeightedMean",
    "WeightedSum",
    "pack",
    "packed_size",
    "unpack",
]
