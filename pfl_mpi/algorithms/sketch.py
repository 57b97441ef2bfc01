"""Count Sketch (Charikar et al., 2002) of flat vectors, with hash tables shared by every rank.

A sketch of v in R^d is an r x c table S with S[j, h_j(i)] += s_j(i) v_i for every row j, where
h_j: [d] -> [c] and s_j: [d] -> {-1, +1} are random tables drawn from one seed (so every rank builds
the same ones without communication). It is linear, S(a u + b v) = a S(u) + b S(v), so sketches
can be summed by a Reduce. ``unsketch`` estimates every v_i by the median over the rows of
s_j(i) S[j, h_j(i)]: a coordinate much larger than the rest of v (a heavy hitter) comes back
nearly exactly.
"""

from __future__ import annotations

import torch


class CountSketch:
    """Hash tables of an r x c Count Sketch of vectors of ``d`` entries, drawn from ``seed``."""

    def __init__(self, d: int, rows: int, columns: int, seed: int):
        self.d, self.rows, self.columns = d, rows, columns
        g = torch.Generator().manual_seed(seed)
        self.buckets = torch.randint(0, columns, (rows, d), generator=g)  # h_j(i)
        self.signs = torch.randint(0, 2, (rows, d), generator=g).float().mul_(2).sub_(1)  # s_j(i)

    @property
    def numel(self) -> int:
        return self.rows * self.columns

    def sketch(self, v: torch.Tensor) -> torch.Tensor:
        """S(v): [rows, columns] float32."""
        v = v.detach().float().cpu().reshape(1, -1)
        table = torch.zeros(self.rows, self.columns)
        return table.scatter_add_(1, self.buckets, self.signs * v)

    def unsketch(self, table: torch.Tensor) -> torch.Tensor:
        """The estimate of every coordinate: median_j s_j(i) S[j, h_j(i)] ([d]; the true median for even r)."""
        est = (self.signs * table.reshape(self.rows, self.columns).gather(1, self.buckets)).sort(dim=0).values
        r = self.rows
        return est[r // 2] if r % 2 else 0.5 * (est[r // 2 - 1] + est[r // 2])

    def zero(self, table: torch.Tensor, index: torch.Tensor) -> None:
        """Zero, in place, the buckets of coordinates ``index`` in every row of ``table`` [rows, columns]."""
        rows = torch.arange(self.rows)[:, None].expand(-1, index.numel())
        table[rows, self.buckets[:, index]] = 0


def top_k(v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (ascending) and values of the k entries of ``v`` largest in magnitude."""
    index = v.abs().topk(k, sorted=False).indices.sort().values
    return index, v[index]
