"""The clients of one exchange grouped by the rank that hosts them: the order of every Scatterv and Gatherv."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Plan:
    """The clients of one exchange, grouped by host rank in rank order (the order of Scatterv/Gatherv)."""

    order: list[int]
    per_rank: list[int]  # how many of ``order`` each rank hosts

    def of_rank(self, rank: int) -> list[int]:
        start = sum(self.per_rank[:rank])
        return self.order[start : start + self.per_rank[rank]]


def make_plan(clients: np.ndarray, host: np.ndarray, size: int) -> Plan:
    """Group ``clients`` by their host rank."""
    order = sorted((int(k) for k in clients), key=lambda k: (int(host[k]), k))
    per_rank = np.bincount(host[np.asarray(order, dtype=np.int64)], minlength=size).tolist() if order else [0] * size
    return Plan(order, per_rank)
