"""The library's client loop: minibatch training of one client's model, and evaluation on tensors.

Every algorithm trains its clients through :func:`local_training`; an algorithm supplies at most a
loss function ``loss(model, batch) -> (objective, metrics)`` and a regulariser, and the loop owns the
rest: the batches (index slices of permutations drawn from the client's generator), the optimiser
step, gradient clipping and the running means of the metrics. No DataLoader and no model copies on
this path: a client's tensors already sit on the device, and nothing is allocated per step but what
autograd allocates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator


class ScheduleConfig(BaseModel):
    """A learning rate over rounds: lr_t = lr * factor(t) (config ``train.schedule``, ``server_opt.schedule``)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["constant", "step", "exponential", "cosine"] = Field(
        "constant",
        description="constant; step: x gamma every step_size rounds; exponential: x gamma^t; cosine: "
        "from 1 down to min_factor over period rounds",
    )
    step_size: int = Field(10, ge=1, description="step: rounds between two decays")
    gamma: float = Field(0.1, gt=0, le=1, description="step, exponential: the decay factor")
    min_factor: float = Field(0.0, ge=0, le=1, description="cosine: the factor at the end of the period")
    period: int | None = Field(None, ge=1, description="cosine: rounds of the period; null = the run's rounds")


def lr_factor(schedule: ScheduleConfig, t: int, rounds: int) -> float:
    """factor(t) of the schedule at round ``t`` (0-based) of a run of ``rounds`` rounds."""
    if schedule.name == "step":
        return schedule.gamma ** (t // schedule.step_size)
    if schedule.name == "exponential":
        return schedule.gamma**t
    if schedule.name == "cosine":
        period = schedule.period or rounds
        progress = min(t, period) / max(period, 1)
        return schedule.min_factor + (1 - schedule.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


class TrainConfig(BaseModel):
    """Client-side local training (config section ``train``)."""

    model_config = ConfigDict(extra="forbid")

    local_epochs: int = Field(1, ge=1, description="epochs over the client's training split per round (E)")
    batch_size: int = Field(32, ge=1, description="minibatch size (B)")
    lr: float = Field(0.05, gt=0, description="client learning rate (eta)")
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "sgd", description="client optimiser, its state reset at the start of every round (torch's rules)"
    )
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd: momentum (dampening 0)")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum (needs momentum > 0)")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay (adamw: decoupled)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam, adamw: the moment decay rates")
    eps: float = Field(1e-8, gt=0, description="adam, adamw: the denominator's epsilon")
    clip_norm: float | None = Field(None, gt=0, description="scale each step's gradient to at most this L2 norm")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="the learning rate over rounds")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer sgd with momentum > 0")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"momentum applies to sgd; {self.optimizer} uses betas")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must lie in [0, 1)")
        return self


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
