"""What a worker keeps of its clients between rounds: one row per client in one table per state name."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


class ClientStore:
    """Persistent per-client state of the clients hosted on this rank (no model objects)."""

    def __init__(self, spec: dict[str, int], clients: Sequence[int], init: Callable[[int], dict[str, torch.Tensor]]):
        self.spec = dict(spec)
        self.numel = sum(spec.values())
        self.row = {int(k): i for i, k in enumerate(clients)}
        self.tables = {name: torch.empty(len(clients), numel) for name, numel in spec.items()}
        for k in clients:
            for name, value in init(int(k)).items():
                self.tables[name][self.row[int(k)]] = value

    def views(self, client: int) -> dict[str, torch.Tensor]:
        """Writable views of ``client``'s rows."""
        i = self.row[client]
        return {name: table[i] for name, table in self.tables.items()}

    def pack(self, clients: Sequence[int]) -> np.ndarray:
        """The state of ``clients`` as one float32 array [len(clients), numel], names in spec order."""
        out = np.empty((len(clients), self.numel), dtype=np.float32)
        for j, k in enumerate(clients):
            i = self.row[k]
            out[j] = torch.cat([table[i] for table in self.tables.values()]).numpy() if self.numel else out[j]
        return out

    def unpack(self, clients: Sequence[int], rows: np.ndarray) -> None:
        """Overwrite the state of ``clients`` from ``pack``'s layout."""
        for j, k in enumerate(clients):
            offset, i = 0, self.row[k]
            for name, numel in self.spec.items():
                self.tables[name][i] = torch.from_numpy(rows[j, offset : offset + numel])
                offset += numel
