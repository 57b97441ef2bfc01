"""FedGKT's server side: its model (a ReLU MLP on the clients' features), its optimiser, and the rows that carry
features between clients and server (docs/algorithms.md#fedgkt)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def server_mlp(feature_dim: int, hidden: Sequence[int], num_classes: int, seed: int) -> nn.Sequential:
    """Linear+ReLU per width of ``hidden``, then a Linear to ``num_classes``; torch's default initialisation drawn
    from ``seed`` alone (the global random state is left as it was)."""
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        width = feature_dim
        for w in hidden:
            layers += [nn.Linear(width, w), nn.ReLU()]
            width = w
        layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def server_optimizer(
    params: list[nn.Parameter], kind: str, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    """The authors' optimisers: Adam with AMSGrad (``adam``), or SGD with Nesterov momentum (``sgd``; torch refuses
    Nesterov without momentum, so momentum 0 gives plain SGD, the same step)."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=True)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=momentum > 0)


@torch.no_grad()
def feature_rows(model: nn.Module, x: Tensor, y: Tensor, logits: bool = True, batch: int = 1024) -> Tensor:
    """One row [base(x_i), head(base(x_i)), y_i] per sample (without the head's logits when ``logits`` is False),
    in order, flat float32 on the CPU: what a client sends up."""
    model.eval()
    rows = []
    for x_b, y_b in zip(x.split(batch), y.split(batch), strict=True):
        features = model.base(x_b)
        parts = [features, model.head(features)] if logits else [features]
        rows.append(torch.cat([*parts, y_b.to(features.dtype)[:, None]], dim=1))
    return torch.cat(rows).flatten().to(device="cpu", dtype=torch.float32) if rows else torch.zeros(0)


def split_rows(row: Tensor, samples: int, dim: int, classes: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One client's uplink as (features [n, d], client logits [n, C], labels [n]) of its ``samples`` training rows,
    then (features [m, d], labels [m]) of the test rows that follow them (m = 0 when none do)."""
    train, test = row[: samples * (dim + classes + 1)].reshape(samples, -1), row[samples * (dim + classes + 1) :]
    test = test.reshape(-1, dim + 1)
    label = train[:, dim + classes].round().long()
    return train[:, :dim], train[:, dim : dim + classes], label, test[:, :dim], test[:, dim].round().long()
