"""What a client computes locally: minibatch SGD epochs and evaluation on tensors.

No DataLoader and no model copies on this path: a client's tensors already sit on the
device, batches are index slices of one permutation drawn from the client's generator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """Client-side local training (config section ``train``)."""

    model_config = ConfigDict(extra="forbid")

    local_epochs: int = Field(1, ge=1, description="epochs over the client's training split per round (E)")
    batch_size: int = Field(32, ge=1, description="minibatch size (B)")
    lr: float = Field(0.05, gt=0, description="client learning rate (eta)")
    momentum: float = Field(0.0, ge=0, lt=1, description="client SGD momentum, reset every round")
    weight_decay: float = Field(0.0, ge=0, description="client L2 weight decay")


Regulariser = Callable[[], torch.Tensor]


def sgd_epochs(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    generator: torch.Generator,
    params: list[torch.nn.Parameter] | None = None,
    regulariser: Regulariser | None = None,
    epochs: int | None = None,
) -> float:
    """Train ``params`` (default: all) for ``epochs`` (default cfg.local_epochs); return the mean batch loss.

    ``regulariser`` adds a term to every batch's loss (FedProx's proximal term, Ditto's pull to w).
    The step is torch's SGD rule (weight decay, then momentum with dampening 0), written out so that
    nothing is allocated per client but the momentum buffers, which start at zero every call.
    """
    params = list(model.parameters()) if params is None else params
    if not model.training:
        model.train()
    momentum = [torch.zeros_like(p) for p in params] if cfg.momentum else None
    n, total, batches = x.shape[0], torch.zeros((), device=x.device), 0
    for _ in range(cfg.local_epochs if epochs is None else epochs):
        order = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            objective = loss if regulariser is None else loss + regulariser()
            sgd_step(params, torch.autograd.grad(objective, params), cfg, momentum)
            total += loss.detach()
            batches += 1
    return float(total) / max(batches, 1)


@torch.no_grad()
def sgd_step(
    params: list[torch.nn.Parameter],
    grads: tuple[torch.Tensor, ...],
    cfg: TrainConfig,
    momentum: list[torch.Tensor] | None,
) -> None:
    """One step of torch's SGD rule in place: weight decay, then momentum (dampening 0; ``momentum`` holds
    one buffer per parameter, or None without momentum), then ``p -= lr * g``."""
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if cfg.weight_decay:
            g = g.add(p, alpha=cfg.weight_decay)
        if momentum is not None:
            g = momentum[i].mul_(cfg.momentum).add_(g)
        p.add_(g, alpha=-cfg.lr)


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
