"""What a worker sends up, filled client by client as they train: no per-client copies are kept."""

from __future__ import annotations

import numpy as np
import torch

from ..algorithms import Gathered, Update, WeightedSum


class UplinkBuffer:
    """WeightedSum: sum(w_k p_k) with sum(w_k) appended, one vector; Gathered: one row per client."""

    def __init__(self, up: WeightedSum | Gathered | None, numel: int, clients: int):
        self.up, self.numel, self.count = up, numel, 0
        if isinstance(up, WeightedSum):
            self.buf = np.zeros(numel + 1, dtype=np.float32)
            self._sum = torch.from_numpy(self.buf)
        elif isinstance(up, Gathered):
            self.buf = np.empty((clients, numel), dtype=np.float32)
        else:
            self.buf = np.empty(0, dtype=np.float32)

    def add(self, update: Update) -> None:
        """Fold in one client's payload."""
        if isinstance(self.up, WeightedSum):
            self._sum[: self.numel].add_(update.payload.detach().cpu(), alpha=update.weight)
            self._sum[self.numel] += update.weight
        elif isinstance(self.up, Gathered):
            self.buf[self.count] = update.payload.detach().cpu().numpy()
        self.count += 1
