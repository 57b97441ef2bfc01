"""Plain SGD of a block of clients whose model is a chain of Linear, ReLU and Flatten layers, written out by hand:
the forward pass, the cross-entropy's gradient (softmax minus one-hot, times each row's weight) and the backward
pass are explicit batched GEMMs and element-wise operations, without autograd. Each Linear layer's input gradient
is taken from its weights as they were, then the layer steps in place: ``w += -lr * g^T x`` (one ``baddbmm_``)
and ``b += -lr * sum(g)``; no gradient tensor is kept. It computes what the autograd path of ``batched.py``
computes for plain SGD (the same steps; float rounding apart), with fewer and cheaper kernels: on a CPU the
generic ``log_softmax``, ReLU backward and advanced indexing cost as much as a small GEMM."""

from __future__ import annotations

import torch
from torch import nn

from ..models.nets import SplitModel
from .stacked import Stacked

Op = tuple[str, str, str | None]
"""One layer of a chain: ("linear", weight name, bias name or None), ("relu", "", None), ("flatten", "", None)."""


def linear_chain(model: nn.Module, names: set[str]) -> list[Op] | None:
    """``model``'s layers in the order ``stacked.stacked_forward`` runs them, or None when it is not a chain of
    Linear, ReLU, Identity and Flatten(1, -1) layers (through ``Sequential`` and a split model) whose Linear
    layers use every parameter of ``names`` exactly once."""
    ops: list[Op] = []

    def walk(module: nn.Module, prefix: str) -> bool:
        if type(module) is SplitModel:
            return walk(module.base, "base.") and walk(module.head, "head.")
        if type(module) is nn.Sequential:
            return all(walk(child, f"{prefix}{name}.") for name, child in module.named_children())
        if type(module) is nn.Linear:
            ops.append(("linear", f"{prefix}weight", None if module.bias is None else f"{prefix}bias"))
        elif type(module) is nn.ReLU:
            ops.append(("relu", "", None))
        elif type(module) is nn.Flatten and (module.start_dim, module.end_dim) == (1, -1):
            ops.append(("flatten", "", None))
        elif type(module) is not nn.Identity:
            return False
        return True

    if not walk(model, ""):
        return None
    used = [n for kind, w, b in ops if kind == "linear" for n in (w, b) if n is not None]
    return ops if len(used) == len(set(used)) and set(used) == names and used else None


@torch.no_grad()
def chain_sgd(
    ops: list[Op],
    params: Stacked,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    active: list[int],
    lr: float,
) -> torch.Tensor:
    """Train the block in place: at step s the first ``active[s]`` clients take one SGD step on the rows
    ``index[s, i]`` (``[S, K, B]``, of ``x_all``/``y_all``), row j weighing ``weight[s, i, j]`` (1/b, 0 on
    padding). Returns each client's sum over its steps of its batch losses, ``[K]``."""
    steps, k, b = index.shape
    first = next(i for i, op in enumerate(ops) if op[0] == "linear")  # no input gradient before it
    losses = torch.zeros(steps, k, dtype=x_all.dtype, device=x_all.device)
    for s in range(steps):
        a = active[s]
        rows = index[s, :a].reshape(-1)
        h = x_all.index_select(0, rows).view(a, b, *x_all.shape[1:])
        saved: list[torch.Tensor] = []  # per op: a linear's input, a ReLU's output, the shape before a flatten
        for kind, w_name, b_name in ops:
            if kind == "linear":
                w, flat = params[w_name][:a], h.reshape(a, -1, h.shape[-1])
                saved.append(flat)
                out = torch.bmm(flat, w.transpose(1, 2))
                if b_name is not None:
                    out.add_(params[b_name][:a].unsqueeze(1))
                h = out.view(*h.shape[:-1], w.shape[1])
            elif kind == "relu":
                h = h.relu_()  # in place: a layer's output, or the block's gathered copy of the data
                saved.append(h)
            else:
                saved.append(h)
                h = h.flatten(2)
        y = y_all.index_select(0, rows).view(a, b, 1)
        g, losses[s, :a] = _cross_entropy_grad(h.reshape(a, b, -1), y, weight[s, :a])
        for i in range(len(ops) - 1, first - 1, -1):
            kind, w_name, b_name = ops[i]
            if kind == "linear":
                w, x = params[w_name][:a], saved[i]
                g = g.reshape(a, -1, w.shape[1])
                grad_x = torch.bmm(g, w) if i > first else None  # from the weights before the step
                w.baddbmm_(g.transpose(1, 2), x, alpha=-lr)
                if b_name is not None:
                    params[b_name][:a].add_(g.sum(dim=1), alpha=-lr)
                g = grad_x
            elif kind == "relu":
                g = g.view(saved[i].shape).mul_(saved[i].sign())  # 0 where the ReLU was 0: its derivative
            else:
                g = g.reshape(saved[i].shape)
    return losses.sum(dim=0)


def _cross_entropy_grad(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For logits ``[K, B, C]``, labels ``[K, B, 1]`` and row weights ``[K, B]``: the gradient of
    ``sum_j weight[i, j] * cross_entropy(logits[i, j], y[i, j])`` with respect to the logits (softmax - one-hot,
    times the row's weight), and that weighted loss per client ``[K]``."""
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    exp = shifted.exp()
    total = exp.sum(dim=-1, keepdim=True)
    w = weight.unsqueeze(-1)
    ce = total.log().sub_(shifted.gather(-1, y))  # -log softmax at the label
    grad = exp.mul_(w / total).scatter_add_(-1, y, -w)
    return grad, (ce * w).sum(dim=(1, 2))
