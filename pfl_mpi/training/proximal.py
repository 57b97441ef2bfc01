"""The proximal term (coefficient / 2) * ||params - anchor||^2 in the sequential and the batched loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .stacked import Stacked


class ProximalTerm:
    """The regulariser (coefficient / 2) * ||params - anchor||^2 (FedProx's proximal term, Ditto's pull to w), in
    both loops: called with no argument it is the sequential loop's regulariser of ``params``; the batched loop
    stacks the anchors of a block's clients (``names``: the model's names of ``params``, ``anchor`` flat, in
    ``params`` order)."""

    def __init__(self, params: list[nn.Parameter], names: Sequence[str], anchor: torch.Tensor, coefficient: float):
        anchor = anchor.to(device=params[0].device, dtype=params[0].dtype)
        chunks = anchor.split([p.numel() for p in params])
        self.params, self.names, self.coefficient = params, list(names), coefficient
        self.targets = [a.view(p.shape) for p, a in zip(params, chunks, strict=True)]

    def __call__(self) -> torch.Tensor:
        half = 0.5 * self.coefficient
        return half * sum((p - a).square().sum() for p, a in zip(self.params, self.targets, strict=True))

    @staticmethod
    def stacked(terms: Sequence[ProximalTerm]) -> StackedProximal:
        """The sum of the terms of a block's clients (client i's term on the i-th slices)."""
        names = terms[0].names
        targets = {n: torch.stack([t.targets[j] for t in terms]) for j, n in enumerate(names)}
        halves = torch.tensor([0.5 * t.coefficient for t in terms], dtype=targets[names[0]].dtype)
        return StackedProximal(targets, halves.to(targets[names[0]].device))


class StackedProximal:
    """A block's proximal terms (a :data:`BatchedRegulariser`): client i is pulled towards ``targets[name][i]``
    with the coefficient ``2 * halves[i]``."""

    def __init__(self, targets: Stacked, halves: torch.Tensor):
        self.targets, self.halves = targets, halves

    def permuted(self, order: torch.Tensor) -> StackedProximal:
        """The same terms with the clients in ``order`` (the batched loop orders a block by steps)."""
        return StackedProximal({n: t[order.to(t.device)] for n, t in self.targets.items()}, self.halves[order])

    def __call__(self, params: Stacked, rows: slice) -> torch.Tensor:
        k = rows.stop - rows.start
        squares = sum((params[n] - t[rows]).square().reshape(k, -1).sum(dim=1) for n, t in self.targets.items())
        return (self.halves[rows] * squares).sum()
