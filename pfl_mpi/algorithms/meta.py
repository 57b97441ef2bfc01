"""Helpers of the meta-learning algorithms (Per-FedAvg, FedMeta): the model as a function of explicit
parameter tensors, and minibatches drawn from a client's generator.

No algorithm is defined here. MAML-style inner steps need the loss as a function of parameter tensors
that may carry a graph (second-order gradients), so the rank's model is called through
``torch.func.functional_call`` with tensors that are not the module's own parameters: the module itself
is never modified by these functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..models.params import ParamLayout
from ..training.loop import Augment

Tensors = list[torch.Tensor]


class FunctionalModel:
    """``loss(params, x, y)``: cross-entropy of ``model`` with its parameters replaced by ``params``.

    ``params`` is a list of tensors in ``model.named_parameters()`` order, the order of the flat vectors
    of ``layout`` (every parameter of the model).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.layout = ParamLayout(model, self.names)
        self.numel = self.layout.numel

    def loss(self, params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.model.training:
            self.model.train()
        logits = functional_call(self.model, dict(zip(self.names, params, strict=True)), (x,))
        return F.cross_entropy(logits, y)

    def grad(
        self, params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor, create_graph: bool = False
    ) -> tuple[torch.Tensor, Tensors]:
        """(loss, gradient of the loss with respect to ``params``); ``create_graph`` keeps it differentiable."""
        loss = self.loss(params, x, y)
        grads = torch.autograd.grad(loss, list(params), create_graph=create_graph)
        return loss, list(grads)

    def unflatten(self, flat: torch.Tensor, device: torch.device, requires_grad: bool = True) -> Tensors:
        """Fresh leaf tensors (on ``device``) holding the values of the flat vector ``flat``."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"expected a 1-D tensor of {self.numel} values, got shape {tuple(flat.shape)}")
        flat = flat.detach().to(device=device, dtype=torch.float32)
        return [
            chunk.view(shape).clone().requires_grad_(requires_grad)
            for chunk, shape in zip(flat.split(self.layout.numels), self.layout.shapes, strict=True)
        ]

    @torch.no_grad()
    def load(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``tensors`` into the model's own parameters (e.g. a personalised model before a test)."""
        for param, t in zip(self.model.parameters(), tensors, strict=True):
            param.copy_(t)

    @staticmethod
    def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """One detached 1-D float32 CPU vector of ``tensors``."""
        return torch.cat([t.detach().reshape(-1) for t in tensors]).to("cpu", torch.float32).contiguous()


def leaves(tensors: Sequence[torch.Tensor]) -> Tensors:
    """Detached copies that require grad: the start of a new differentiable computation."""
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def axpy(a: float, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> Tensors:
    """a * x + y, element by element of two lists of tensors (no graph)."""
    with torch.no_grad():
        return [y + a * x for x, y in zip(xs, ys, strict=True)]


def hvp_exact(
    fn: FunctionalModel, w: Sequence[torch.Tensor], v: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> Tensors:
    """grad^2 f(w; x, y) v by double backward: the gradient of <grad f(w), v> with respect to ``w`` (detached)."""
    w = leaves(w)
    _, g = fn.grad(w, x, y, create_graph=True)
    dot = sum((gi * vi.detach()).sum() for gi, vi in zip(g, v, strict=True))
    return [h.detach() for h in torch.autograd.grad(dot, w)]


def hvp_finite_difference(
    fn: FunctionalModel,
    w: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    delta: float,
    scaled: bool,
) -> Tensors:
    """Central-difference estimate [grad f(w + r v) - grad f(w - r v)] / (2 r) of grad^2 f(w; x, y) v.

    ``scaled``: r = delta / ||v||, so that the points probed lie at distance delta from w whatever the size of v;
    else r = delta (Per-FedAvg's estimator, whose probes move delta ||v|| away and cross a ReLU network's kinks
    once ||v|| is large). A zero v gives zeros.
    """
    norm = float(torch.sqrt(sum((vi.detach().double() ** 2).sum() for vi in v)))
    if norm == 0.0:
        return [torch.zeros_like(vi) for vi in v]
    r = delta / norm if scaled else delta
    _, g_plus = fn.grad(leaves(axpy(r, v, w)), x, y)
    _, g_minus = fn.grad(leaves(axpy(-r, v, w)), x, y)
    with torch.no_grad():
        return [(gp - gm) / (2 * r) for gp, gm in zip(g_plus, g_minus, strict=True)]


class BatchStream:
    """Minibatches of one client's training split, drawn from its generator.

    Indices come from ``torch.randperm(n, generator=generator)`` in consecutive slices of ``batch_size``;
    when fewer than ``batch_size`` indices remain, a new permutation is drawn (the remainder is dropped),
    so consecutive batches (D, D', D'' of Per-FedAvg) are disjoint whenever the split holds enough samples.
    A batch size of at least n gives the whole split, in the order of a fresh permutation, every time.
    ``augment`` (``data.augment``) transforms each batch's inputs, drawing from the same generator.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
        augment: Augment | None = None,
    ):
        self.x, self.y, self.generator, self.augment = x, y, generator, augment
        self.n = int(y.shape[0])
        self.batch_size = min(int(batch_size), self.n)
        self.order = torch.empty(0, dtype=torch.int64)
        self.pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch_size > self.order.numel():
            self.order = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        idx = self.order[self.pos : self.pos + self.batch_size].to(self.x.device)
        self.pos += self.batch_size
        x = self.x[idx]
        return (x if self.augment is None else self.augment(x, self.generator)), self.y[idx]
