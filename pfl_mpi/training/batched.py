"""Many clients per kernel: K clients of one architecture trained together, each exactly as
:func:`training.local_training` trains it alone.

The K clients' parameters (and momentum buffers) are stacked along a leading client dimension and one
forward/backward serves all K (batched GEMMs; ``vmap`` of ``functional_call`` for other layers; plain SGD of a
Linear/ReLU chain is written out by hand in ``chain_sgd.py``): every kernel works on all K. What stays per client:

- its batches: the permutation of each epoch comes from its own generator, drawn exactly as
  ``epoch_batches`` draws it, so client k sees the same minibatches as in the sequential loop;
- its ragged last batch: the slice has b < B rows, padded to B with rows of weight 0; the loss of a
  batch is ``sum(mask * ce) / b``, so each real row carries 1/b, as in the mean of the sequential loss,
  and padding contributes nothing, to the loss or to the gradient;
- its number of steps: the clients of a block are ordered by steps (most first); at step s only the
  clients that still have a step train (a prefix of the block, sliced, so finished clients cost nothing
  and their parameters and buffers stop changing);
- its optimiser: SGD with momentum, Nesterov, weight decay and clipping by its own gradient norm, the
  same element-wise operations in the same order as ``loop.SGD``.

Gradients: the objective is the sum of the clients' objectives; the gradient of client k's slice is the
gradient of its own objective (the clients share no parameter). Nothing is read back to the host per
step (clipping scales with ``torch.where``), so a GPU is never made to wait.

Results equal the sequential loop's to float rounding (the padded rows change the order of some sums);
a client's results do not depend on which clients share its block, so placement stays invisible.

What is not batched (``batchable`` says why): optimisers other than SGD or SGD state kept between rounds
(``train.optimizer_state: keep``), models with buffers
(batch norm's running statistics) or with operations ``vmap`` cannot batch (a probe forward decides),
custom losses and data augmentation (its draws interleave with the permutations). Callers then use the
sequential loop. Algorithms reach this loop through ``blocks.train_in_blocks``, fine-tuning through
``block_eval.finetune_stack``; ``client_batch`` chooses K. ``batched_evaluate`` scores K clients' models on their
test sets with one forward per chunk of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batch_plan import BatchPlan, plan_batches
from .chain_sgd import chain_sgd, linear_chain
from .loop import Means, TrainConfig, cross_entropy
from .stacked import Stacked, probe, stacked_forward

BatchedRegulariser = Callable[[Stacked, slice], torch.Tensor]
"""``regulariser(params, rows) -> scalar``: the sum over the clients ``rows`` of the block of their regularisers,
given the trained parameters of exactly those clients (``params[name]`` is ``[len(rows), *shape]``). The batched
loop orders a block's clients by steps: a regulariser whose terms differ between clients also has
``permuted(order)``, the same regulariser with its clients in that order (``StackedProximal``)."""


def task_loss(setup):
    """The setup's default training loss when it is not the cross-entropy of ``loop.cross_entropy``."""
    loss = getattr(setup, "loss", None) or getattr(getattr(setup, "task", None), "loss", None)
    return None if loss is None or loss is cross_entropy else loss


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
    return probe(model, x)


class BatchedSGD:
    """``loop.SGD`` on stacked parameters: every operation of its step, on the slices of the clients
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
    """``loop.clip_grad_norm_`` per client: each client's gradients scaled to a total norm <= max_norm."""
    k = grads[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(k, -1), dim=1) for g in grads])
    norm = torch.linalg.vector_norm(norms, dim=0).double()
    scale = (max_norm / (norm + 1e-6)).float()
    scale = torch.where(scale < 1, scale, torch.ones_like(scale))
    for g in grads:
        g.mul_(scale.view(k, *[1] * (g.dim() - 1)))


def _plain_sgd(cfg: TrainConfig) -> bool:
    return cfg.optimizer == "sgd" and not (cfg.momentum or cfg.weight_decay) and cfg.clip_norm is None


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
    active = [sum(1 for n in plan.steps if n > s) for s in range(plan.index.shape[0])]  # a prefix trains
    plain = regulariser is None and _plain_sgd(cfg) and set(names) == set(params)
    chain = linear_chain(model, set(params), tuple(x_all.shape[1:])) if plain else None
    if chain is not None:  # plain SGD of a Linear/ReLU chain: explicit steps, no autograd
        weight = (plan.mask / plan.size.unsqueeze(-1)).to(x_all.device)  # 1/b per real row, 0 on padding
        totals = chain_sgd(chain, params, x_all, y_all, plan.index.to(x_all.device), weight, active, lr)
    else:
        totals = _autograd_steps(model, params, names, x_all, y_all, plan, active, cfg, lr, regulariser)
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


def _autograd_steps(model, params, names, x_all, y_all, plan: BatchPlan, active, cfg, lr, regulariser) -> torch.Tensor:
    """The steps of ``batched_local_training`` through autograd (any optimiser option, regulariser, trainable
    subset or ``vmap``-ed layer); each client's sum of its batch losses, ``[K]``."""
    device = x_all.device
    index, mask, size = plan.index.to(device), plan.mask.to(device), plan.size.to(device)
    optimizer = BatchedSGD([params[n] for n in names], lr, cfg)
    fixed = {n: p for n, p in params.items() if n not in set(names)}
    totals = torch.zeros(len(plan.steps), dtype=x_all.dtype, device=device)
    for s, k in enumerate(active):
        rows = slice(0, k)
        leaves = {n: params[n][rows].detach().requires_grad_() for n in names}
        idx = index[s, rows]
        logits = stacked_forward(model, {**{n: p[rows] for n, p in fixed.items()}, **leaves}, x_all[idx])
        ce = F.cross_entropy(logits.flatten(0, 1), y_all[idx].flatten(), reduction="none").view(k, -1)
        losses = (ce * mask[s, rows]).sum(dim=1) / size[s, rows]
        objective = losses.sum() if regulariser is None else losses.sum() + regulariser(leaves, rows)
        optimizer.step(torch.autograd.grad(objective, [leaves[n] for n in names]), rows)
        totals[rows] += losses.detach()
    return totals
