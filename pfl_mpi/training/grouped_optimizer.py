"""Two optimisers behind the client loop's one ``step(grads)``, each on its own slice of the parameters."""

from __future__ import annotations

import torch

from .optimizers import Optimizer


class Grouped:
    """Two optimisers behind the loop's ``step(grads)``: the first takes the gradients of the first ``split``
    parameters, the second the rest (each clips only its own, if at all)."""

    def __init__(self, first: Optimizer, second: Optimizer, split: int):
        self.first, self.second, self.split = first, second, split

    def step(self, grads: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> float | None:
        norm = self.first.step(grads[: self.split])
        self.second.step(grads[self.split :])
        return norm
