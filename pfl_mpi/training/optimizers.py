"""Client optimisers and learning-rate schedules: the ``step(grads)`` objects the client loop drives.

:class:`SGD` is torch's SGD rule written out in place (nothing allocated per step); Adam and AdamW are
torch.optim's behind the same ``step(grads)`` (:class:`TorchOptimizer`); :func:`make_optimizer` builds the
``train`` section's one; :func:`lr_factor` is a schedule's factor at a round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .config import ScheduleConfig, lr_factor  # noqa: F401 - re-exported: schedules are read with the train section

if TYPE_CHECKING:
    from .config import TrainConfig


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


class KeptState:
    """Where each parameter's optimiser state sits in a client's flat ``optimizer_state`` vector
    (``train.optimizer_state: keep``), for the parameters ``params`` of one architecture group, in order.

    Per parameter: sgd with momentum, its momentum buffer; adam and adamw, the step count (one float: exact up
    to 2^24 steps) then ``exp_avg`` and ``exp_avg_sq``; nothing otherwise. A step count of 0 means no state yet:
    the optimiser then starts fresh, exactly as with ``reset``. float32, as the optimisers keep it."""

    def __init__(self, cfg: TrainConfig, params: list[torch.Tensor]):
        adam = cfg.optimizer != "sgd"
        self.adam, self.slots = adam, 2 if adam else (1 if cfg.momentum else 0)
        self.offsets: dict[int, int] = {}
        offset = 0
        for p in params:
            self.offsets[id(p)] = offset
            offset += (self.slots * p.numel() + int(adam)) if self.slots else 0
        self.numel = offset

    def _parts(self, p: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(step slot or None, the numel-sized slots) of ``p`` in ``flat``, as views."""
        start, n = self.offsets[id(p)], p.numel()
        step = flat[start : start + 1] if self.adam else None
        start += int(self.adam)
        return step, [flat[start + i * n : start + (i + 1) * n] for i in range(self.slots)]

    @torch.no_grad()
    def load(self, optimizer: Optimizer, params: list[torch.Tensor], flat: torch.Tensor) -> None:
        """Give ``optimizer`` (over ``params``) the state kept in ``flat``."""
        for i, p in enumerate(params):
            step, slots = self._parts(p, flat)
            if isinstance(optimizer, SGD):
                if optimizer.buffers is not None:
                    optimizer.buffers[i].copy_(slots[0].view_as(p))
            elif float(step[0]) > 0:
                exp_avg, exp_avg_sq = (s.view_as(p).to(p.device, copy=True) for s in slots)
                state = {"step": step[0].clone(), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
                optimizer.optimizer.state[p] = state

    @torch.no_grad()
    def store(self, optimizer: Optimizer, params: list[torch.Tensor], flat: torch.Tensor) -> None:
        """Write ``optimizer``'s state of ``params`` into ``flat`` (a client's state row)."""
        for i, p in enumerate(params):
            step, slots = self._parts(p, flat)
            if isinstance(optimizer, SGD):
                if optimizer.buffers is not None:
                    slots[0].copy_(optimizer.buffers[i].reshape(-1))
            elif p in optimizer.optimizer.state:
                state = optimizer.optimizer.state[p]
                step.copy_(state["step"].reshape(1))
                slots[0].copy_(state["exp_avg"].reshape(-1))
                slots[1].copy_(state["exp_avg_sq"].reshape(-1))
