"""The minibatches of a block of clients, each drawn from its own generator as the sequential loop draws them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class BatchPlan:
    """The minibatches of a block: ``index[s, i, j]``, the row (of the block's concatenated data) of sample j of
    client i's step s (padding: the client's first row), ``mask`` 1 on real rows and 0 on padding, ``size`` the
    real rows b of each (client, step) (1 where the client has no step s), ``steps`` each client's steps."""

    index: torch.Tensor  # int64 [S, K, B]
    mask: torch.Tensor  # float [S, K, B]
    size: torch.Tensor  # float [S, K]
    steps: list[int]


def plan_batches(
    sizes: Sequence[int], batch_size: int, epochs: Sequence[int], generators: Sequence[torch.Generator], dtype
) -> BatchPlan:
    """Each client's minibatches, drawn from its generator as ``epoch_batches`` draws them (on the CPU): one
    permutation per epoch, cut into slices of ``batch_size``, the last one of each epoch ragged."""
    rows, steps, offset = [], [], 0
    for n, e, g in zip(sizes, epochs, generators, strict=True):
        per_epoch = -(-n // batch_size)
        slots = torch.full((e, per_epoch * batch_size), -1, dtype=torch.int64)
        for epoch in range(e):
            slots[epoch, :n] = torch.randperm(n, generator=g)
        rows.append((slots.view(e * per_epoch, batch_size), offset))
        steps.append(e * per_epoch)
        offset += n
    s_max = max(steps, default=0)
    index = torch.zeros(s_max, len(sizes), batch_size, dtype=torch.int64)
    mask = torch.zeros(s_max, len(sizes), batch_size, dtype=dtype)
    for i, (slots, start) in enumerate(rows):
        real = slots >= 0
        index[: len(slots), i] = torch.where(real, slots + start, start)  # padding: the client's first row
        index[len(slots) :, i] = start
        mask[: len(slots), i] = real.to(dtype)
    size = mask.sum(dim=2).clamp_min(1)
    return BatchPlan(index, mask, size, steps)
