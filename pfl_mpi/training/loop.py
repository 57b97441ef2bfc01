"""The library's client loop: minibatch training of one client's model, and evaluation on tensors.

Every algorithm trains its clients through :func:`local_training`; an algorithm supplies at most a
loss function ``loss(model, batch) -> (objective, metrics)`` and a regulariser, and the loop owns the
rest: the batches (index slices of permutations drawn from the client's generator), the optimiser
step, gradient clipping and the running means of the metrics. No DataLoader and no model copies on
this path: a client's tensors already sit on the device, and nothing is allocated per step but what
autograd allocates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import (  # re-exported: the section's schema lives without torch
    AutoClientBatch,
    ScheduleConfig,
    TrainConfig,
    lr_factor,
)
from .optimizers import (  # re-exported: the loop's optimisers live in optimizers.py
    SGD,
    Optimizer,
    TorchOptimizer,
    clip_grad_norm_,
    make_optimizer,
)

__all__ = [
    "SGD",
    "Optimizer",
    "ScheduleConfig",
    "TorchOptimizer",
    "clip_grad_norm_",
    "lr_factor",
    "make_optimizer",
    "Augment",
    "AutoClientBatch",
    "Batch",
    "LossFn",
    "Means",
    "Regulariser",
    "TrainConfig",
    "cross_entropy",
    "epoch_batches",
    "evaluate",
    "local_training",
    "sampled_batches",
]


@dataclass
class Batch:
    """One minibatch: the samples ``x``, ``y`` at positions ``idx`` of the split, in epoch ``epoch``."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    epoch: int


LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss(model, batch) -> (objective, metrics)``: the objective to differentiate and the scalars whose mean
over the batches the loop returns (detached by the loop; their dtype is the dtype they are summed in)."""

Regulariser = Callable[[], torch.Tensor]
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def cross_entropy(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The default loss: cross-entropy of the model's logits, reported as ``train_loss``."""
    loss = F.cross_entropy(model(batch.x), batch.y)
    return loss, {"train_loss": loss}


class Means(dict):
    """Mean of each metric over the batches; a metric no batch reported (or no batch at all) reads 0.0."""

    def __missing__(self, key: str) -> float:
        return 0.0


def epoch_batches(
    n: int, batch_size: int, epochs: int, generator: torch.Generator, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """``epochs`` passes over n samples: one permutation per epoch, drawn when the epoch starts, cut into
    slices of ``batch_size`` (the last one ragged)."""
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            yield epoch, order[start : start + batch_size]


def sampled_batches(
    n: int, batch_size: int, steps: int, generator: torch.Generator, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """``steps`` batches, each the first ``batch_size`` positions of a fresh permutation (pFedHN's inner loop)."""
    for _ in range(steps):
        yield 0, torch.randperm(n, generator=generator)[:batch_size].to(device)


def local_training(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    generator: torch.Generator,
    *,
    params: list[torch.nn.Parameter] | None = None,
    loss: LossFn = cross_entropy,
    regulariser: Regulariser | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    optimizer: Optimizer | None = None,
    augment: Augment | None = None,
) -> Means:
    """Train ``params`` (default: all of ``model``'s) on (x, y); return the mean of each metric over the batches.

    Batches: ``epochs`` (default ``cfg.local_epochs``) passes over the data, or, with ``steps``, that many
    batches each drawn from a fresh permutation; of ``batch_size`` (default ``cfg.batch_size``). The objective
    of a batch is ``loss(model, batch)[0]`` plus ``regulariser()`` (FedProx's proximal term, Ditto's pull to w);
    the step is ``optimizer`` (default: the ``train`` section's optimiser at round 0, its state fresh).
    ``augment(x_b, generator)`` transforms each training batch (image augmentation), drawing from the client's
    generator so that it stays a function of (seed, client, round).
    """
    params = list(model.parameters()) if params is None else params
    if not model.training:
        model.train()
    optimizer = optimizer or make_optimizer(params, cfg)
    size = cfg.batch_size if batch_size is None else batch_size
    n = x.shape[0]
    if steps is None:
        batches = epoch_batches(n, size, cfg.local_epochs if epochs is None else epochs, generator, x.device)
    else:
        batches = sampled_batches(n, size, steps, generator, x.device)
    totals: dict[str, torch.Tensor] = {}
    count = 0
    for epoch, idx in batches:
        x_b = x[idx] if augment is None else augment(x[idx], generator)
        objective, metrics = loss(model, Batch(x_b, y[idx], idx, epoch))
        if regulariser is not None:
            objective = objective + regulariser()
        optimizer.step(torch.autograd.grad(objective, params))
        for name, value in metrics.items():
            value = value.detach()
            if name not in totals:
                totals[name] = torch.zeros((), dtype=value.dtype, device=value.device)
            totals[name] += value
        count += 1
    return Means({name: float(total) / max(count, 1) for name, total in totals.items()})


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y)."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    n = max(x.shape[0], 1)
    return loss_sum / n, correct / n
