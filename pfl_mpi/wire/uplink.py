"""What a worker sends up, filled client by client as they train: no per-client copies are kept.

Buffers have the message's wire dtype (``up.dtype``), so the bytes that move are the bytes the
algorithm declared. See ``pfl_mpi.algorithms.base`` for the WeightedSum side channel.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from .messages import WIRE_DTYPES, Gathered, WeightedSum


class Outgoing(Protocol):
    """What one client sends up (``algorithms.Update``): its payload and aggregation weight."""

    payload: torch.Tensor
    weight: float


def wire_limit(dtype: np.dtype) -> float:
    """The largest magnitude a value of ``dtype`` can hold."""
    return float(np.iinfo(dtype).max if dtype.kind in "iu" else np.finfo(dtype).max)


def payload_of(update: Outgoing, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The client's payload on the CPU, checked: ``numel`` elements of ``dtype`` (float32 converts floats)."""
    payload = update.payload.detach().reshape(-1).cpu()
    if payload.numel() != numel:
        raise ValueError(f"payload has {payload.numel()} elements, the algorithm declared {numel}")
    if payload.dtype != dtype:
        if dtype != torch.float32 or not payload.dtype.is_floating_point:
            raise TypeError(f"payload has dtype {payload.dtype}, the message declares {dtype}; convert it explicitly")
        payload = payload.float()
    return payload


class UplinkBuffer:
    """WeightedSum: sum(w_k p_k) (float32: with sum(w_k) appended), one vector; Gathered: the clients'
    payloads one after another, ``sizes[i]`` elements for the i-th client added (default ``numel`` each).

    ``buf`` is what goes up in the main message; ``side`` (WeightedSum with a dtype other than
    float32) the float64 [sum(w_k), sum(|w_k| max|p_k|)] of the second Reduce.
    """

    def __init__(self, up: WeightedSum | Gathered | None, numel: int, clients: int, sizes=None):
        self.up, self.numel, self.count = up, numel, 0
        self.sizes = [numel] * clients if sizes is None else [int(n) for n in sizes]
        self._offset = 0
        self.dtype = up.dtype if up is not None else torch.float32
        self.side: np.ndarray | None = None
        wire = WIRE_DTYPES[self.dtype]
        if isinstance(up, WeightedSum):
            if self.dtype == torch.float32:
                self.buf = np.zeros(numel + 1, dtype=np.float32)
                self._sum = torch.from_numpy(self.buf)
            else:
                # exact pre-sum in float64 (integer payloads times integer weights), cast once when sealed
                self._acc = torch.zeros(numel, dtype=torch.float64)
                self.side = np.zeros(2, dtype=np.float64)
                self.buf = np.zeros(numel, dtype=wire)
        elif isinstance(up, Gathered):
            if len(self.sizes) != clients:
                raise ValueError(f"{len(self.sizes)} payload sizes for {clients} clients")
            self.buf = np.empty(sum(self.sizes), dtype=wire)
        else:
            self.buf = np.empty(0, dtype=np.float32)

    def add(self, update: Outgoing) -> None:
        """Fold in one client's payload."""
        if isinstance(self.up, WeightedSum):
            payload = payload_of(update, self.dtype, self.numel)
            if self.side is None:
                self._sum[: self.numel].add_(payload, alpha=update.weight)
                self._sum[self.numel] += update.weight
            else:
                weight = float(update.weight)
                if not self.dtype.is_floating_point and not weight.is_integer():
                    raise ValueError(f"WeightedSum in {self.dtype} needs integer client weights, got {weight}")
                self._acc.add_(payload.double(), alpha=weight)
                self.side[0] += weight
                self.side[1] += abs(weight) * (float(payload.abs().max()) if self.numel else 0.0)
        elif isinstance(self.up, Gathered):
            size = self.sizes[self.count]
            self.buf[self._offset : self._offset + size] = payload_of(update, self.dtype, size).numpy()
            self._offset += size
        self.count += 1

    def seal(self) -> None:
        """Cast the pre-sum into the wire buffer (WeightedSum in a dtype other than float32); check it fits."""
        if self.side is None:
            return
        limit = wire_limit(self.buf.dtype)
        if self.side[1] > limit:
            raise OverflowError(
                f"this rank's weighted sum can reach {self.side[1]:g}, more than {self.buf.dtype} holds ({limit:g})"
            )
        self.buf[:] = self._acc.numpy()
