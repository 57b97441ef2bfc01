"""The messages an algorithm declares, the dtypes a payload may have on the wire, and what arrives.

``Broadcast`` and ``PerClient`` go down (MPI Bcast, Scatterv); ``WeightedSum`` and ``Gathered`` come up
(MPI Reduce of per-rank pre-sums, Gatherv). The server receives a :class:`WeightedMean` or a
:class:`Collected`. ``pack``/``unpack`` build byte payloads of several parts (e.g. int32 indices then
float32 values). Nothing here moves anything: see :mod:`pfl_mpi.wire.transport`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

WIRE_DTYPES: dict[torch.dtype, np.dtype] = {
    t: np.dtype(n)
    for t, n in (
        (torch.float32, "float32"),
        (torch.float64, "float64"),
        (torch.float16, "float16"),
        (torch.int8, "int8"),
        (torch.int16, "int16"),
        (torch.int32, "int32"),
        (torch.int64, "int64"),
        (torch.uint8, "uint8"),
    )
}
"""The dtypes a payload may have on the wire, with their numpy equivalents."""

SUMMABLE_DTYPES = frozenset(WIRE_DTYPES) - {torch.uint8}
"""The dtypes a WeightedSum may reduce in (signed: a weighted sum may be negative)."""


def _check_dtype(kind: object, dtype: torch.dtype, allowed: frozenset[torch.dtype] | dict) -> None:
    if dtype not in allowed:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in allowed))
        raise ValueError(f"{type(kind).__name__}: dtype {dtype} is not supported; use one of {names}")


@dataclass(frozen=True)
class Broadcast:
    """One payload for all clients (MPI Bcast), ``down_numel`` elements of ``dtype``."""

    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        _check_dtype(self, self.dtype, WIRE_DTYPES)


@dataclass(frozen=True)
class PerClient:
    """One payload per client, sent only to the rank hosting it (MPI Scatterv), ``down_numel`` of ``dtype``."""

    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        _check_dtype(self, self.dtype, WIRE_DTYPES)


@dataclass(frozen=True)
class WeightedSum:
    """Linear aggregation: sum of weight * payload, pre-summed per rank (MPI Reduce in ``dtype``).

    float32: the summed weight is one more float32 of the same buffer. Any other dtype: a second
    Reduce of two float64 (summed weight, overflow bound); see the module docstring.
    """

    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        _check_dtype(self, self.dtype, SUMMABLE_DTYPES)


@dataclass(frozen=True)
class Gathered:
    """Every client's payload to the server (MPI Gatherv), ``up_numel`` elements of ``dtype`` each."""

    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        _check_dtype(self, self.dtype, WIRE_DTYPES)


Down = Broadcast | PerClient
Up = WeightedSum | Gathered
Phase = Literal["train", "eval"]
"""What a downlink is for: the round's training, or the evaluation of every client after it."""


@dataclass
class WeightedMean:
    """What the server gets from a WeightedSum uplink: sum(w_k p_k) / sum(w_k).

    ``sum`` is the reduced sum(w_k p_k) itself, in the WeightedSum's dtype (signSGD votes on it);
    ``mean`` is always float32 (zeros when the total weight is 0).
    """

    mean: torch.Tensor
    total_weight: float
    count: int
    sum: torch.Tensor | None = None


@dataclass
class Collected:
    """What the server gets from a Gathered uplink: every client's payload, in ``clients`` order.

    ``rows[i]`` is client ``clients[i]``'s payload (1-D, ``up_numel_of`` elements, a view), always set.
    ``payloads`` stacks them, ``[len(clients), up_numel]``, when every client of the round sent the same
    size; when sizes differ (``ragged``) it is None: use ``rows`` or ``of(client)``. Built from
    ``payloads`` alone (the uniform case), ``rows`` are its rows.
    """

    clients: list[int]
    payloads: torch.Tensor | None  # [len(clients), up_numel] in the Gathered's dtype; None when ragged
    weights: torch.Tensor  # [len(clients)]
    rows: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.payloads is not None and not self.rows:
            self.rows = list(self.payloads)
        if len(self.rows) != len(self.clients):
            raise ValueError(f"Collected: {len(self.rows)} payloads for {len(self.clients)} clients")

    @property
    def ragged(self) -> bool:
        """Whether the clients' payloads differ in size (then ``payloads`` is None)."""
        return self.payloads is None

    def of(self, client: int) -> torch.Tensor:
        """The payload of ``client``."""
        return self.rows[self.clients.index(client)]

    def weighted_mean(
        self, decode: Callable[[torch.Tensor], torch.Tensor] | None = None, size: int | None = None
    ) -> torch.Tensor:
        """sum_k w_k x_k / sum_k w_k as float32, x_k = ``decode(rows[k])`` (default: the row itself), summed
        in float64 over the rows in client order. ``size`` is the length of x_k (needed with ``decode`` or
        ragged payloads; default: the payloads' width); the mean is zeros of it when the total weight is 0."""
        if size is None:
            if decode is not None or self.payloads is None:
                raise ValueError("Collected.weighted_mean: give size with decode or ragged payloads")
            size = self.payloads.shape[1]
        mean = torch.zeros(size, dtype=torch.float64)
        total = float(self.weights.double().sum())
        if total:
            for row, weight in zip(self.rows, self.weights.tolist(), strict=True):
                mean.add_((row if decode is None else decode(row)).double(), alpha=weight / total)
        return mean.float()


def pack(*tensors: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensors`` (each flattened, in order) as one uint8 vector: a packed payload."""
    return torch.cat([t.detach().contiguous().reshape(-1).cpu().view(torch.uint8) for t in tensors])


def unpack(payload: torch.Tensor, *parts: tuple[torch.dtype, int]) -> list[torch.Tensor]:
    """Split a packed uint8 ``payload`` into tensors of ``(dtype, numel)`` parts, in order (copies).

    ``payload`` may be longer than the parts (trailing bytes are ignored).
    """
    if packed_size(*parts) > payload.numel():
        raise ValueError(f"packed payload has {payload.numel()} bytes, the parts need {packed_size(*parts)}")
    out, offset = [], 0
    for dtype, numel in parts:
        size = numel * torch.empty((), dtype=dtype).element_size()
        out.append(payload[offset : offset + size].clone().view(dtype))
        offset += size
    return out


def packed_size(*parts: tuple[torch.dtype, int]) -> int:
    """Bytes of a payload packed from ``(dtype, numel)`` parts (its ``up_numel`` as a uint8 message)."""
    return sum(numel * torch.empty((), dtype=dtype).element_size() for dtype, numel in parts)
