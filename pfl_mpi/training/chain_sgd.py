"""Plain SGD of a block of clients whose model is a chain of Linear and ReLU layers (after an optional Flatten of
the input), written out by hand: the forward pass, the cross-entropy's gradient (softmax minus one-hot, times each
row's weight) and the backward pass are explicit batched GEMMs and element-wise operations, without autograd.
Each Linear layer's input gradient is taken from its weights as they were, then the layer steps in place:
``w += -lr * g^T x`` (one ``baddbmm_``) and ``b += -lr * sum(g)``; no gradient tensor is kept.

Activations are kept feature-major, ``[K, features, B]``: every GEMM then reads the weights ``[K, out, in]`` as
stored and the activations as stored, the layout in which the CPU's batched GEMMs measured fastest. It computes
what the autograd path of ``batched.py`` computes for plain SGD (the same steps; float rounding apart), with
fewer and cheaper kernels: on a CPU the generic ``log_softmax``, ReLU backward and advanced indexing each cost
as much as a small GEMM. See docs/batched.md."""

from __future__ import annotations

import torch
from torch import nn

from ..models.nets import SplitModel
from .stacked import Stacked

Op = tuple[str, str, str | None]
"""One layer of a chain: ("linear", weight name, bias name or None) or ("relu", "", None)."""


def linear_chain(model: nn.Module, names: set[str], sample_shape: tuple[int, ...]) -> list[Op] | None:
    """``model``'s layers in the order ``stacked.stacked_forward`` runs them (Identity layers and a Flatten of the
    input left out), or None when the model is not such a chain (through ``Sequential`` and a split model) of
    Linear layers that use every parameter of ``names`` exactly once, or when its samples (``sample_shape``) are
    not vectors and not flattened before the first Linear layer."""
    ops: list[Op] = []
    flat = len(sample_shape) == 1

    def walk(module: nn.Module, prefix: str) -> bool:
        nonlocal flat
        if type(module) is SplitModel:
            return walk(module.base, "base.") and walk(module.head, "head.")
        if type(module) is nn.Sequential:  # every use: named_children would skip a repeated module
            return all(walk(child, f"{prefix}{name}.") for name, child in module._modules.items())
        if type(module) is nn.Linear and flat:
            ops.append(("linear", f"{prefix}weight", None if module.bias is None else f"{prefix}bias"))
        elif type(module) is nn.ReLU:
            ops.append(("relu", "", None))
        elif type(module) is nn.Flatten and (module.start_dim, module.end_dim) == (1, -1):
            flat = flat or not any(kind == "linear" for kind, _, _ in ops)  # of the input: samples become vectors
        elif type(module) is not nn.Identity:
            return False
        return True

    if not walk(model, ""):
        return None
    used = [n for kind, w, b in ops if kind == "linear" for n in (w, b) if n is not None]
    return ops if used and len(used) == len(set(used)) and set(used) == names else None


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
    totals = torch.zeros(k, dtype=x_all.dtype, device=x_all.device)  # summed step by step: the same order for any K
    for s in range(steps):
        a = active[s]
        rows = index[s, :a].reshape(-1)
        x = x_all.index_select(0, rows).view(a, b, -1)  # [K, B, features]: a copy, free to change in place
        h = x.transpose(1, 2)  # feature-major from here on: [K, features, B]
        saved: list[torch.Tensor] = []  # per op: a Linear's input, a ReLU's output
        for kind, w_name, b_name in ops:
            if kind == "linear":
                saved.append(h)
                h = torch.bmm(params[w_name][:a], h)
                if b_name is not None:
                    h.add_(params[b_name][:a].unsqueeze(2))
            else:
                h = h.relu_()
                saved.append(h)
        y = y_all.index_select(0, rows).view(a, 1, b)
        g, loss = _cross_entropy_grad(h, y, weight[s, :a].unsqueeze(1))
        totals[:a] += loss
        for i in range(len(ops) - 1, first - 1, -1):
            kind, w_name, b_name = ops[i]
            if kind == "linear":
                w = params[w_name][:a]
                grad_x = torch.bmm(w.transpose(1, 2), g) if i > first else None  # from the weights before the step
                w.baddbmm_(g, saved[i].transpose(1, 2), alpha=-lr)
                if b_name is not None:
                    params[b_name][:a].add_(g.sum(dim=2), alpha=-lr)
                g = grad_x
            else:
                g = g.mul_(saved[i].sign())  # 0 where the ReLU was 0: its derivative
    return totals


def _cross_entropy_grad(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For logits ``[K, C, B]`` (classes along dim 1), labels ``[K, 1, B]`` and row weights ``[K, 1, B]``: the
    gradient of ``sum_j weight[i, 0, j] * cross_entropy(logits[i, :, j], y[i, 0, j])`` with respect to the logits
    (softmax - one-hot, times the row's weight), and that weighted loss per client ``[K]``."""
    shifted = logits - logits.amax(dim=1, keepdim=True)
    exp = shifted.exp()
    total = exp.sum(dim=1, keepdim=True)
    ce = total.log().sub_(shifted.gather(1, y))  # -log softmax at the label
    grad = exp.mul_(weight / total).scatter_add_(1, y, -weight)
    return grad, (ce * weight).sum(dim=(1, 2))
