"""Client optimisers and learning-rate schedules: the ``step(grads)`` objects the client loop drives.

:class:`SGD` is torch's SGD rule written out in place (nothing allocated per step); Adam and AdamW are
torch.optim's behind the same ``step(grads)`` (:class:`TorchOptimizer`); :func:`make_optimizer` builds the
``train`` section's one; :func:`lr_factor` is a schedule's factor at a round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .train_config import ScheduleConfig, lr_factor  # noqa: F401 - re-exported: schedules are read with the train section

if TYPE_CHECKING:
    from .train_config import TrainConfig


class SGD:
    """torch's SGD rule in place, written out so that nothing is allocated per step: weight decay, then
    momentum (dampening 0, buffers starting at zero), then ``p -= lr * g``; optionally the gradients are first
    scaled to a total L2 norm of at most ``clip`` (torch's ``clip_grad_norm_`` rule)."""

    def __init__(
        self,
        params: list[torch.Tensor],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        clip: float | None = None,
        nesterov: bool = False,
    ):
        self.params, self.lr, self.momentum, self.weight_decay, self.clip = params, lr, momentum, weight_decay, clip
        self.nesterov = nesterov
        self.buffers = [torch.zeros_like(p) for p in params] if momentum else None

    @torch.no_grad()
    def step(self, grads: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> float | None:
        """One step with ``grads`` (scaled in place when clipping); the gradient norm before clipping, if clipped."""
        norm = clip_grad_norm_(grads, self.clip) if self.clip is not None else None
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if self.buffers is not None:
                buf = self.buffers[i].mul_(self.momentum).add_(g)
                g = g.add(buf, alpha=self.momentum) if self.nesterov else buf
            p.add_(g, alpha=-self.lr)
        return norm


class TorchOptimizer:
    """A torch.optim optimiser (Adam, AdamW) behind the loop's ``step(grads)``: the gradients become ``.grad``,
    clipped first like :class:`SGD`'s."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], clip: float | None = None):
        self.optimizer, self.params, self.clip = optimizer, params, clip

    def step(self, grads: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> float | None:
        norm = clip_grad_norm_(grads, self.clip) if self.clip is not None else None
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.optimizer.step()
        for p in self.params:
            p.grad = None
        return norm


Optimizer = SGD | TorchOptimizer


def make_optimizer(
    params: list[torch.Tensor], cfg: TrainConfig, round: int = 0, rounds: int = 1, lr: float | None = None
) -> Optimizer:
    """The ``train`` section's optimiser for one client's round ``round`` of ``rounds``, its state fresh; ``lr``
    replaces ``train.lr`` (the schedule still applies)."""
    lr = (cfg.lr if lr is None else lr) * lr_factor(cfg.schedule, round, rounds)
    if cfg.optimizer == "sgd":
        return SGD(params, lr, cfg.momentum, cfg.weight_decay, cfg.clip_norm, cfg.nesterov)
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    torch_opt = kind(params, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)
    return TorchOptimizer(torch_opt, params, cfg.clip_norm)


@torch.no_grad()
def clip_grad_norm_(grads: tuple[torch.Tensor, ...] | list[torch.Tensor], max_norm: float) -> float:
    """Scale ``grads`` in place to a total L2 norm of at most ``max_norm``; return the norm before."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = max_norm / (float(norm) + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return float(norm)
