"""Many clients per kernel: K clients of one architecture trained together, each exactly as
:func:`training.local_training` trains it alone.

The K clients' parameters (and momentum buffers) are stacked along a leading client dimension and one
forward/backward runs through ``torch.func.vmap`` over ``functional_call``: every kernel works on all K
clients at once. What stays per client:

- its batches: the permutation of each epoch comes from its own generator, drawn exactly as
  ``epoch_batches`` draws it, so client k sees the same minibatches as in the sequential loop;
- its ragged last batch: the slice has b < B rows, padded to B with rows of weight 0; the loss of a
  batch is ``sum(mask * ce) / b``, so each real row carries 1/b, as in the mean of the sequential loss,
  and padding contributes nothing, to the loss or to the gradient;
- its number of steps: the clients of a block are ordered by steps (most first); at step s only the
  clients that still have a step train (a prefix of the block, sliced, so finished clients cost nothing
  and their parameters and buffers stop changing);
- its optimiser: SGD with momentum, Nesterov, weight decay and clipping by its own gradient norm, the
  same element-wise operations in the same order as ``training.SGD``.

Gradients: the objective is the sum of the clients' objectives; the gradient of client k's slice is the
gradient of its own objective (the clients share no parameter). Nothing is read back to the host per
step (clipping scales with ``torch.where``), so a GPU is never made to wait.

Results equal the sequential loop's to float rounding (the padded rows change the order of some sums);
a client's results do not depend on which clients share its block, so placement stays invisible.

What is not batched (``batchable`` says why): optimisers other than SGD or SGD state kept between rounds
(``train.optimizer_state: keep``), models with buffers
(batch norm's running statistics) or with operations ``vmap`` cannot batch (a probe forward decides),
custom losses and data augmentation (its draws interleave with the permutations). Callers then use the
sequential loop. Algorithms reach this loop through ``client_blocks.train_in_blocks``, fine-tuning through
``client_blocks.finetune_stack``; ``client_batch`` chooses K. ``batched_evaluate`` scores K clients' models on their
test sets with one forward per chunk of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..models.nets import SplitModel
from .training import Means, TrainConfig

Stacked = dict[str, torch.Tensor]
"""Parameters by name, each ``[K, *shape]``: client i's parameters are the i-th slices."""

BatchedRegulariser = Callable[[Stacked, slice], torch.Tensor]
"""``regulariser(params, rows) -> scalar``: the sum over the clients ``rows`` of the block of their regularisers,
given the trained parameters of exactly those clients (``params[name]`` is ``[len(rows), *shape]``). The batched
loop orders a block's clients by steps: a regulariser whose terms differ between clients also has
``permuted(order)``, the same regulariser with its clients in that order (``StackedProximal``)."""


def blocks(items: Sequence, size: int) -> Iterator[list]:
    """``items`` in consecutive blocks of at most ``size``."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def stack(flats: Sequence[Stacked]) -> Stacked:
    """Stack K clients' parameters (each a dict of name -> tensor) into one dict of ``[K, *shape]`` tensors."""
    return {name: torch.stack([f[name] for f in flats]) for name in flats[0]}


class _SteppingLinear(torch.autograd.Function):
    """A stacked Linear layer whose backward also takes plain SGD's step: the input's gradient from the weights
    as they were, then ``w += -lr * g^T x`` and ``b += -lr * sum(g)`` in place (one GEMM, no gradient tensor)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, lr: float) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.bias, ctx.lr = b, lr
        out = torch.bmm(x, w.transpose(1, 2))
        return out if b is None else out.add_(b.unsqueeze(1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        grad_x = torch.bmm(grad, w) if ctx.needs_input_grad[0] else None
        with torch.no_grad():
            w.baddbmm_(grad.transpose(1, 2), x, alpha=-ctx.lr)
            if ctx.bias is not None:
                ctx.bias.add_(grad.sum(dim=1), alpha=-ctx.lr)
        return grad_x, None, None, None


EXPLICIT = (nn.Sequential, nn.Linear, nn.ReLU, nn.Identity, SplitModel)


def stacked_forward(
    module: nn.Module, params: Stacked, x: torch.Tensor, prefix: str = "", step: float | None = None
) -> torch.Tensor:
    """``module`` applied to K clients at once: ``x`` is ``[K, B, ...]``, ``params`` the stacked parameters of the
    whole model (names from the root). Linear layers become one batched GEMM (``baddbmm``), element-wise layers
    and flattening act on the stacked tensor, ``Sequential`` chains and a split model (``base``, ``head``) recurse;
    any other module runs under ``vmap`` of ``functional_call``. ``step``: the Linear layers take plain SGD's step
    with this lr in the backward pass (``_SteppingLinear``; only for models of ``EXPLICIT`` layers)."""
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            x = stacked_forward(child, params, x, f"{prefix}{name}.", step)
        return x
    if isinstance(module, nn.Linear):
        w, b = params[f"{prefix}weight"], params.get(f"{prefix}bias")
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        if step is not None:
            out = _SteppingLinear.apply(flat, w, b, step)
        else:
            wt = w.transpose(1, 2)
            out = torch.bmm(flat, wt) if b is None else torch.baddbmm(b.unsqueeze(1), flat, wt)
        return out.view(*x.shape[:-1], w.shape[1])
    if isinstance(module, nn.ReLU):
        return torch.relu(x)
    if isinstance(module, nn.Identity):
        return x
    if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) == (1, -1):
        return x.flatten(2)
    if type(module) is SplitModel:
        features = stacked_forward(module.base, params, x, "base.", step)
        return stacked_forward(module.head, params, features, "head.", step)
    own = {n[len(prefix) :]: p for n, p in params.items() if n.startswith(prefix)}
    return vmap(lambda p, xb: functional_call(module, p, (xb,)))(own, x)


_PROBED: dict[int, str | None] = {}


def _probe(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why ``model`` cannot be batched (None: it can): it has buffers, or ``stacked_forward`` fails on it;
    decided once per model by a forward of 2 clients."""
    key = id(model)
    if key not in _PROBED and any(True for _ in model.buffers()):
        _PROBED[key] = "the model has buffers"
    if key not in _PROBED:
        try:
            params = {n: p.detach().unsqueeze(0).expand(2, *p.shape) for n, p in model.named_parameters()}
            with torch.no_grad():
                stacked_forward(model, params, x[:1].expand(2, *x[:1].shape))
            _PROBED[key] = None
        except Exception as err:  # noqa: BLE001 - any failure means: train this model sequentially
            _PROBED[key] = f"vmap cannot run the model ({type(err).__name__})"
    return _PROBED[key]


def batchable(
    model: nn.Module, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, *, augment=None, loss=None
) -> str | None:
    """Why these clients must train one at a time, or None when the batched loop trains them exactly: the batched
    loop's objective is the cross-entropy of classification (integer labels, one per sample)."""
    if cfg.optimizer != "sgd":
        return f"optimizer {cfg.optimizer}"
    if getattr(cfg, "optimizer_state", None) == "keep":
        return "optimiser state kept between rounds"
    if augment is not None:
        return "data augmentation"
    if loss is not None or getattr(cfg, "loss", None) is not None:
        return "a custom loss"
    if x.dtype not in (torch.float32, torch.float64) or x.shape[0] == 0:
        return "inputs that are not float features"
    if y.dtype != torch.int64 or y.dim() != 1:
        return "targets that are not class labels"
    return _probe(model, x)


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


class BatchedSGD:
    """``training.SGD`` on stacked parameters: every operation of its step, on the slices of the clients
    that train; clipping by each client's own gradient norm."""

    def __init__(self, params: list[torch.Tensor], lr: float, cfg: TrainConfig):
        self.params, self.lr = params, lr
        self.momentum, self.weight_decay, self.nesterov, self.clip = (
            cfg.momentum,
            cfg.weight_decay,
            cfg.nesterov,
            cfg.clip_norm,
        )
        self.buffers = [torch.zeros_like(p) for p in params] if self.momentum else None

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], rows: slice) -> None:
        """One step of the clients ``rows`` with their gradients ``grads`` (``[len(rows), *shape]`` each)."""
        if self.clip is not None:
            _clip(grads, self.clip)
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            p = p[rows]
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if self.buffers is not None:
                buf = self.buffers[i][rows].mul_(self.momentum).add_(g)
                g = g.add(buf, alpha=self.momentum) if self.nesterov else buf
            p.add_(g, alpha=-self.lr)


def _clip(grads: Sequence[torch.Tensor], max_norm: float) -> None:
    """``training.clip_grad_norm_`` per client: each client's gradients scaled to a total norm <= max_norm."""
    k = grads[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(k, -1), dim=1) for g in grads])
    norm = torch.linalg.vector_norm(norms, dim=0).double()
    scale = (max_norm / (norm + 1e-6)).float()
    scale = torch.where(scale < 1, scale, torch.ones_like(scale))
    for g in grads:
        g.mul_(scale.view(k, *[1] * (g.dim() - 1)))


def _plain_sgd(cfg: TrainConfig) -> bool:
    return cfg.optimizer == "sgd" and not (cfg.momentum or cfg.weight_decay) and cfg.clip_norm is None


def _explicit(model: nn.Module) -> bool:
    """Whether every layer of ``model`` is one ``stacked_forward`` runs itself (and each Linear is used once)."""
    return all(
        isinstance(m, EXPLICIT) or (isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) == (1, -1))
        for m in model.modules()
    )


def batched_local_training(
    model: nn.Module,
    params: Stacked,
    data: Sequence[tuple[torch.Tensor, torch.Tensor]],
    generators: Sequence[torch.Generator],
    cfg: TrainConfig,
    lr: float,
    *,
    trainable: Sequence[str] | None = None,
    epochs: Sequence[int] | None = None,
    regulariser: BatchedRegulariser | None = None,
) -> list[Means]:
    """Train K clients at once: ``params`` (every parameter of ``model``, stacked ``[K, ...]``, on the data's
    device) in place, client i on ``data[i]`` = (x, y) with ``generators[i]``; its train loss mean per client.

    ``trainable``: the names trained (default all; the others stay as given, per client); ``epochs[i]``:
    client i's local epochs (default ``cfg.local_epochs``); ``lr``: the step size (the schedule applied);
    ``regulariser``: see :data:`BatchedRegulariser`. Client i ends exactly where
    ``local_training(model_i, *data[i], cfg, generators[i], ...)`` ends, up to float rounding.
    """
    k = len(data)
    names = list(params) if trainable is None else list(trainable)
    epochs = [cfg.local_epochs] * k if epochs is None else list(epochs)
    x_all = torch.cat([x for x, _ in data])
    y_all = torch.cat([y for _, y in data])
    plan = plan_batches([int(y.shape[0]) for _, y in data], cfg.batch_size, epochs, generators, x_all.dtype)
    order = sorted(range(k), key=lambda i: -plan.steps[i])  # most steps first: the clients training are a prefix
    if order != list(range(k)):
        perm = torch.tensor(order)
        for name in params:
            params[name].copy_(params[name][perm.to(params[name].device)])
        plan = BatchPlan(plan.index[:, perm], plan.mask[:, perm], plan.size[:, perm], [plan.steps[i] for i in order])
        if regulariser is not None and hasattr(regulariser, "permuted"):
            regulariser = regulariser.permuted(perm)
    device = x_all.device
    index, mask, size = plan.index.to(device), plan.mask.to(device), plan.size.to(device)
    fused = regulariser is None and set(names) == set(params) and _plain_sgd(cfg) and _explicit(model)
    optimizer = None if fused else BatchedSGD([params[n] for n in names], lr, cfg)
    fixed = {n: p for n, p in params.items() if n not in set(names)}
    totals = torch.zeros(k, dtype=torch.float32, device=device)
    for s in range(index.shape[0]):
        active = sum(1 for n in plan.steps if n > s)
        rows = slice(0, active)
        leaves = {n: params[n][rows].detach().requires_grad_() for n in names}
        current = {**{n: p[rows] for n, p in fixed.items()}, **leaves}
        idx = index[s, rows]
        logits = stacked_forward(model, current, x_all[idx], step=lr if fused else None)
        ce = F.cross_entropy(logits.flatten(0, 1), y_all[idx].flatten(), reduction="none").view(active, -1)
        losses = (ce * mask[s, rows]).sum(dim=1) / size[s, rows]
        objective = losses.sum()
        if fused:  # the backward pass steps every layer (_SteppingLinear)
            objective.backward()
        else:
            if regulariser is not None:
                objective = objective + regulariser(leaves, rows)
            optimizer.step(torch.autograd.grad(objective, [leaves[n] for n in names]), rows)
        totals[rows] += losses.detach().float()
    means = totals.cpu().tolist()
    result: list[Means] = [Means() for _ in range(k)]
    for position, i in enumerate(order):
        steps = plan.steps[position]
        result[i] = Means({"train_loss": means[position] / steps}) if steps else Means()
    if order != list(range(k)):  # back to the callers' order
        inverse = torch.tensor(sorted(range(k), key=lambda j: order[j]))
        for name in params:
            params[name].copy_(params[name][inverse.to(params[name].device)])
    return result


# -- evaluation -----------------------------------------------------------------------------
EVAL_ROWS = 16
"""Test rows per client in the first chunk of ``batched_evaluate`` (the chunks then double, up to
``EVAL_MAX_ROWS``): fixed shapes, so a client's scores do not depend on which clients share its block."""
EVAL_MAX_ROWS = 1024


def evaluable(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str | None:
    """Why ``batched_evaluate`` cannot score ``model`` on (x, y) (None: it can): classification's float features
    and integer labels, a model without buffers that ``stacked_forward`` runs."""
    if x.dtype not in (torch.float32, torch.float64) or x.shape[0] == 0:
        return "inputs that are not float features"
    if y.dtype != torch.int64 or y.dim() != 1:
        return "targets that are not class labels"
    return _probe(model, x)


def _chunks(n: int, rows: int) -> list[tuple[int, int]]:
    """(first row, rows) of the chunks that cover ``n`` rows: ``rows``, ``rows``, then doubling up to
    ``EVAL_MAX_ROWS``; the same cut for every client, so a row's chunk does not depend on the block."""
    out, begin = [], 0
    while begin < n:
        width = min(max(begin, rows), EVAL_MAX_ROWS)
        out.append((begin, width))
        begin += width
    return out


@torch.no_grad()
def batched_evaluate(
    model: nn.Module, params: Stacked, data: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: int = EVAL_ROWS
) -> list[tuple[float, float]]:
    """``training.evaluate`` (mean cross-entropy, accuracy) of K clients at once: client i's model is ``model``
    with the i-th slices of ``params``, its test set ``data[i]``. Each client's rows go through in chunks
    (``_chunks``: ``rows``, ``rows``, 2 ``rows``, 4 ``rows``, ...; its last one padded with its first row, weight
    0); a chunk's forward serves every client that still has rows (beyond the first chunk, their parameters
    gathered). The accuracy counts exactly as the sequential one; the loss differs by float rounding."""
    model.eval()
    sizes = [int(y.shape[0]) for _, y in data]
    x_all, y_all = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    device = x_all.device
    starts = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], device=device).unsqueeze(1)
    ns = torch.tensor(sizes, device=device).unsqueeze(1)
    loss = torch.zeros(len(data), dtype=torch.float64, device=device)
    correct = torch.zeros(len(data), dtype=torch.int64, device=device)
    for begin, width in _chunks(max(sizes, default=0), rows):
        active = [i for i, n in enumerate(sizes) if n > begin]  # the clients with rows in this chunk
        if active == list(range(active[-1] + 1)):  # a prefix (every client in the first chunk): views
            pick: slice | torch.Tensor = slice(0, len(active))
        else:
            pick = torch.tensor(active, device=device)
        position = begin + torch.arange(width, device=device)
        real = position < ns[pick]
        idx = torch.where(real, starts[pick] + position, starts[pick])
        logits = stacked_forward(model, {n: p[pick] for n, p in params.items()}, x_all[idx])
        target = y_all[idx]
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(len(active), width)
        loss[pick] += (ce * real).sum(dim=1).double()
        correct[pick] += ((logits.argmax(dim=-1) == target) & real).sum(dim=1)
    loss_of, correct_of = loss.cpu().tolist(), correct.cpu().tolist()
    return [(loss_of[i] / max(n, 1), correct_of[i] / max(n, 1)) for i, n in enumerate(sizes)]


# -- regularisers ---------------------------------------------------------------------------
class ProximalTerm:
    """The regulariser (coefficient / 2) * ||params - anchor||^2 (FedProx's proximal term, Ditto's pull to w), in
    both loops: called with no argument it is the sequential loop's regulariser of ``params``; the batched loop
    stacks the anchors of a block's clients (``names``: the model's names of ``params``, ``anchor`` flat, in
    ``params`` order)."""

    def __init__(self, params: list[nn.Parameter], names: Sequence[str], anchor: torch.Tensor, coefficient: float):
        anchor = anchor.to(device=params[0].device, dtype=params[0].dtype)
        chunks = anchor.split([p.numel() for p in params])
        self.params, self.names, self.coefficient = params, list(names), coefficient
        self.targets = [a.view(p.shape) for p, a in zip(params, chunks, strict=True)]

    def __call__(self) -> torch.Tensor:
        half = 0.5 * self.coefficient
        return half * sum((p - a).square().sum() for p, a in zip(self.params, self.targets, strict=True))

    @staticmethod
    def stacked(terms: Sequence[ProximalTerm]) -> StackedProximal:
        """The sum of the terms of a block's clients (client i's term on the i-th slices)."""
        names = terms[0].names
        targets = {n: torch.stack([t.targets[j] for t in terms]) for j, n in enumerate(names)}
        halves = torch.tensor([0.5 * t.coefficient for t in terms], dtype=targets[names[0]].dtype)
        return StackedProximal(targets, halves.to(targets[names[0]].device))


class StackedProximal:
    """A block's proximal terms (a :data:`BatchedRegulariser`): client i is pulled towards ``targets[name][i]``
    with the coefficient ``2 * halves[i]``."""

    def __init__(self, targets: Stacked, halves: torch.Tensor):
        self.targets, self.halves = targets, halves

    def permuted(self, order: torch.Tensor) -> StackedProximal:
        """The same terms with the clients in ``order`` (the batched loop orders a block by steps)."""
        return StackedProximal({n: t[order.to(t.device)] for n, t in self.targets.items()}, self.halves[order])

    def __call__(self, params: Stacked, rows: slice) -> torch.Tensor:
        k = rows.stop - rows.start
        squares = sum((params[n] - t[rows]).square().reshape(k, -1).sum(dim=1) for n, t in self.targets.items())
        return (self.halves[rows] * squares).sum()
